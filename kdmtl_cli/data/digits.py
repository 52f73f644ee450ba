"""`digits_mtl`: the MultiMNIST recipe (Sener & Koltun, 2018) on scikit-learn's bundled 8x8 digits.

Offline: ``sklearn.datasets.load_digits`` ships with scikit-learn (an optional dependency:
``pip install scikit-learn`` or ``pip install kdmtl[digits]``).

Each image: a ``data.image_size`` square canvas (24 in conf/data/digits_mtl.yaml, at least 20);
two digits, each upscaled 2x by nearest neighbour to 16x16 (grey 0..16 -> 0..255), one at the
top-left with offset (dy, dx) each uniform in 0..2, the other at the bottom-right pulled in by
an offset in 0..2 as well; the image is their pixel-wise max, replicated to 3 channels.

Targets: ``left``, ``right`` (classification, 10): the digits' labels; ``seg`` (segmentation,
3): 0 background (both digits 0 there), 1 where the left digit is at least as bright as the
right (overlap ties go to the left), 2 where the right one is brighter.

Splits: the 1797 source digits are permuted with ``data.seed`` and cut 70% / 10% / 20% into
train / val / test pools, so no source digit appears in two splits; data.*_size pairs are drawn
per split from its pool. Generation takes well under a second, so nothing is cached.
"""

from __future__ import annotations

import hashlib
import json

import torch

from kdmtl_cli.data import DATASETS, SPLITS, DataBundle, TargetSpec
from kdmtl_cli.errors import KdmtlError

GENERATOR_VERSION = 1
DIGIT = 16   # side of an upscaled digit
JITTER = 2   # max offset of each digit from its corner
POOL_FRACTIONS = {"train": 0.7, "val": 0.1}  # test: the rest


def load_digit_pool():
    """(images float [1797,8,8] in 0..16, labels int64 [1797]) from scikit-learn."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise KdmtlError("data.name=digits_mtl needs scikit-learn: pip install scikit-learn "
                         "(or pip install kdmtl[digits])") from None
    bunch = load_digits()
    return torch.as_tensor(bunch.images, dtype=torch.float32), torch.as_tensor(bunch.target, dtype=torch.int64)


def split_pools(n: int, seed: int) -> dict:
    """Disjoint source indices per split, a function of (n, seed)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_train = int(n * POOL_FRACTIONS["train"])
    n_val = int(n * POOL_FRACTIONS["val"])
    return {"train": order[:n_train], "val": order[n_train:n_train + n_val], "test": order[n_train + n_val:]}


def generate_pairs(images: torch.Tensor, labels: torch.Tensor, pool: torch.Tensor, n: int, *,
                   size: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    big = (images * (255.0 / 16.0)).round().clamp(0, 255).to(torch.uint8)
    big = big.repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1)   # [M,16,16]
    pick = pool[torch.randint(len(pool), (n, 2), generator=g)]            # [n,2] source indices
    offsets = torch.randint(0, JITTER + 1, (n, 4), generator=g)
    left = torch.zeros(n, size, size, dtype=torch.uint8)
    right = torch.zeros(n, size, size, dtype=torch.uint8)
    boxes = torch.empty(n, 2, 4, dtype=torch.int64)  # per digit: y0, x0, y1, x1 (exclusive)
    far = size - DIGIT
    for i in range(n):
        ly, lx = int(offsets[i, 0]), int(offsets[i, 1])
        ry, rx = far - int(offsets[i, 2]), far - int(offsets[i, 3])
        left[i, ly:ly + DIGIT, lx:lx + DIGIT] = big[pick[i, 0]]
        right[i, ry:ry + DIGIT, rx:rx + DIGIT] = big[pick[i, 1]]
        boxes[i, 0] = torch.tensor([ly, lx, ly + DIGIT, lx + DIGIT])
        boxes[i, 1] = torch.tensor([ry, rx, ry + DIGIT, rx + DIGIT])
    grey = torch.maximum(left, right)
    seg = torch.zeros(n, size, size, dtype=torch.int64)
    seg[(right > 0) & (right > left)] = 2
    seg[(left > 0) & (left >= right)] = 1
    return {"image": grey[:, None].expand(n, 3, size, size).contiguous(), "left": labels[pick[:, 0]],
            "right": labels[pick[:, 1]], "seg": seg, "source": pick, "box": boxes}


@DATASETS.register("digits_mtl")
def build_digits_mtl(cfg) -> DataBundle:
    sizes = {"train": cfg.train_size, "val": cfg.val_size, "test": cfg.test_size}
    for split, n in sizes.items():
        if n < 1:
            raise KdmtlError(f"data.{split}_size must be at least 1 (got {n})")
    if cfg.image_size < DIGIT + 2 * JITTER:
        raise KdmtlError(f"data.image_size must be at least {DIGIT + 2 * JITTER} for digits_mtl "
                         f"(got {cfg.image_size})")
    images, labels = load_digit_pool()
    pools = split_pools(len(labels), cfg.seed)
    splits = {}
    for index, split in enumerate(SPLITS):
        pairs = generate_pairs(images, labels, pools[split], sizes[split], size=cfg.image_size,
                               seed=cfg.seed * 1000 + index + 1)
        splits[split] = {k: pairs[k] for k in ("image", "left", "right", "seg")}  # not source/box
    key = {"version": GENERATOR_VERSION, "image_size": cfg.image_size, "seed": cfg.seed, "sizes": sizes,
           "labels": hashlib.sha256(labels.numpy().tobytes()).hexdigest()}
    fingerprint = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    digits = [str(d) for d in range(10)]
    targets = {"left": TargetSpec("classification", 10, digits),
               "right": TargetSpec("classification", 10, digits),
               "seg": TargetSpec("segmentation", 3, ["background", "left", "right"])}
    return DataBundle(name="digits_mtl", targets=targets, splits=splits, mean=list(cfg.mean),
                      std=list(cfg.std), fingerprint=fingerprint, info={"source": "sklearn.datasets.load_digits"})
