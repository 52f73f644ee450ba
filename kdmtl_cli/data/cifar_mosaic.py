"""`cifar_cls_seg`: multi-task mosaics of CIFAR-10 images (classification + segmentation).

Each image is a ``data.image_size`` square (64 in conf/data/cifar_cls_seg.yaml):

- background: grey noise, each pixel an independent grey level uniform in 32..96 (same value in
  R, G, B), class 0 = "background";
- ``data.min_tiles``..``data.max_tiles`` CIFAR-10 tiles pasted in order at uniform random
  positions, each resized from 32x32 to a random side in ``data.min_tile_size``..
  ``data.max_tile_size`` (capped at the canvas) with bilinear antialiased interpolation; later
  tiles occlude earlier ones. The tiles of one mosaic have distinct CIFAR classes (so fewer tiles
  when the source pool holds fewer classes), hence a class's visible area is its tile's.

Targets: ``cls`` (classification, 10): class of the tile with the largest visible area, ties
to the top-most (last pasted) tile; ``seg`` (segmentation, 11): CIFAR class + 1 per pixel,
0 = background.

Sources: train mosaics use the first 90% of the CIFAR-10 training images, val mosaics the last
10% (at least one image), test mosaics the official test images, so no CIFAR image is shared
between splits. Mosaic counts are data.train_size/val_size/test_size; everything is a function
of ``data.seed``. CIFAR-10 is read by kdmtl_cli/data/cifar.py (same files, same errors); splits
are cached under ``<data.root>/cifar_cls_seg/<fingerprint>/`` (the fingerprint covers the
settings and the CIFAR pixels, so the CIFAR files are read on every build).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from kdmtl_cli.data import DATASETS, DataBundle, GeneratedSettings, TargetSpec, generated_splits
from kdmtl_cli.data.cifar import load_cifar_arrays
from kdmtl_cli.errors import KdmtlError
from kdmtl_cli.ranges import at_least

GENERATOR_VERSION = 1
EXPECTED_KEYS = frozenset({"image", "cls", "seg"})
BACKGROUND_RANGE = (32, 96)  # grey levels of the background noise (inclusive, exclusive)


def _resize(tile: torch.Tensor, side: int) -> torch.Tensor:
    if side == tile.shape[-1]:
        return tile
    out = F.interpolate(tile[None].float(), size=(side, side), mode="bilinear", align_corners=False,
                        antialias=True)[0]
    return out.round().clamp(0, 255).to(torch.uint8)


def generate_mosaics(images: torch.Tensor, labels: torch.Tensor, n: int, *, size: int, seed: int,
                     min_tiles: int, max_tiles: int, min_tile: int, max_tile: int) -> dict:
    """`n` mosaics from the pool (images uint8 [M,3,32,32], labels [M]); see the module docstring."""
    g = torch.Generator().manual_seed(seed)
    by_class = {int(c): torch.nonzero(labels == c).flatten() for c in torch.unique(labels)}
    classes = torch.tensor(sorted(by_class))
    max_tile = min(max_tile, size)
    min_tile = min(min_tile, max_tile)
    out_img = torch.empty(n, 3, size, size, dtype=torch.uint8)
    out_seg = torch.zeros(n, size, size, dtype=torch.int64)
    out_cls = torch.empty(n, dtype=torch.int64)
    for i in range(n):
        grey = torch.randint(*BACKGROUND_RANGE, (1, size, size), generator=g, dtype=torch.uint8)
        canvas = grey.expand(3, size, size).clone()
        owner = torch.full((size, size), -1, dtype=torch.int64)
        k = int(torch.randint(min_tiles, max_tiles + 1, (1,), generator=g))
        picked = classes[torch.randperm(len(classes), generator=g)[:k]].tolist()
        tile_classes = []
        for t, c in enumerate(picked):
            pool = by_class[c]
            src = int(pool[int(torch.randint(len(pool), (1,), generator=g))])
            side = int(torch.randint(min_tile, max_tile + 1, (1,), generator=g))
            y = int(torch.randint(size - side + 1, (1,), generator=g))
            x = int(torch.randint(size - side + 1, (1,), generator=g))
            canvas[:, y:y + side, x:x + side] = _resize(images[src], side)
            owner[y:y + side, x:x + side] = t
            out_seg[i, y:y + side, x:x + side] = c + 1
            tile_classes.append(c)
        areas = torch.bincount(owner[owner >= 0], minlength=len(tile_classes))
        best = max(range(len(tile_classes)), key=lambda t: (int(areas[t]), t))  # ties: top-most
        out_cls[i] = tile_classes[best]
        out_img[i] = canvas
    return {"image": out_img, "cls": out_cls, "seg": out_seg}


def _check(cfg) -> dict:
    sizes = {"train": cfg.train_size, "val": cfg.val_size, "test": cfg.test_size}
    for split, n in sizes.items():
        if n < 1:
            raise KdmtlError(f"data.{split}_size must be at least 1 (got {n})")
    if not 1 <= cfg.min_tiles <= cfg.max_tiles:
        raise KdmtlError(f"need 1 <= data.min_tiles <= data.max_tiles (got {cfg.min_tiles}, {cfg.max_tiles})")
    if not 1 <= cfg.min_tile_size <= cfg.max_tile_size:
        raise KdmtlError(f"need 1 <= data.min_tile_size <= data.max_tile_size "
                         f"(got {cfg.min_tile_size}, {cfg.max_tile_size})")
    if cfg.image_size < 8:
        raise KdmtlError(f"data.image_size must be at least 8 for cifar_cls_seg (got {cfg.image_size})")
    return sizes


@dataclass
class MosaicSettings(GeneratedSettings):
    """`data.*` keys of cifar_cls_seg."""
    download: bool = True                 # let torchvision download missing CIFAR-10 files (needs network)
    min_tiles: int = at_least(1, default=2)       # CIFAR tiles pasted per mosaic
    max_tiles: int = at_least("min_tiles", default=4)
    min_tile_size: int = at_least(1, default=16)  # tile side in pixels (resized from 32x32)
    max_tile_size: int = at_least("min_tile_size", default=40)  # capped at data.image_size


@DATASETS.register("cifar_cls_seg", settings=MosaicSettings)
def build_cifar_cls_seg(cfg) -> DataBundle:
    sizes = _check(cfg)
    arrays = load_cifar_arrays("cifar10", cfg.root, cfg.download)
    train_x, train_y = arrays["train"]
    test_x, test_y = arrays["test"]
    cut = train_x.shape[0] - max(1, train_x.shape[0] // 10)
    if cut < 1 or test_x.shape[0] < 1:
        raise KdmtlError(f"cifar_cls_seg needs at least 2 CIFAR-10 training and 1 test image in {arrays['folder']}")
    pools = {"train": (train_x[:cut], train_y[:cut]), "val": (train_x[cut:], train_y[cut:]),
             "test": (test_x, test_y)}
    digest = hashlib.sha256()
    for x, y in pools.values():
        digest.update(x.contiguous().numpy().tobytes())
        digest.update(y.contiguous().numpy().tobytes())
    key = {"version": GENERATOR_VERSION, "image_size": cfg.image_size, "seed": cfg.seed, "sizes": sizes,
           "tiles": [cfg.min_tiles, cfg.max_tiles, cfg.min_tile_size, cfg.max_tile_size],
           "source": digest.hexdigest()}
    fingerprint = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    folder = Path(str(cfg.root)).expanduser() / "cifar_cls_seg" / fingerprint
    splits = generated_splits(
        folder, sizes, EXPECTED_KEYS,
        lambda split, index: generate_mosaics(*pools[split], sizes[split], size=cfg.image_size,
                                              seed=cfg.seed * 1000 + index, min_tiles=cfg.min_tiles,
                                              max_tiles=cfg.max_tiles, min_tile=cfg.min_tile_size,
                                              max_tile=cfg.max_tile_size),
        name="cifar_cls_seg", items="mosaics", generate=cfg.generate)
    names = list(arrays["classes"])
    targets = {"cls": TargetSpec("classification", 10, names),
               "seg": TargetSpec("segmentation", 11, ["background", *names])}
    return DataBundle(name="cifar_cls_seg", targets=targets, splits=splits, mean=list(cfg.mean),
                      std=list(cfg.std), fingerprint=fingerprint, info={"path": str(folder)})
