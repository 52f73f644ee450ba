"""`shapes`: the embedded multi-task data set, generated offline from a seed.

Scenes of circles, squares, triangles and crosses over textured backgrounds
(kdmtl_cli/data/shapes_generator.py, which defines the conventions). Targets, with the task
kind each feeds:

- `cls` (classification, 4 shapes): shape covering the largest visible area;
- `near` (classification, 4 shapes): shape of the nearest visible object;
- `present` (multilabel, 4 shapes): which shapes are visible at all;
- `count` (regression): how many objects are visible (train-split mean/std in its spec);
- `seg` (segmentation, background + 4 shapes): per-pixel shape, 0 = background;
- `depth` (depth): distance of the visible surface (train-split mean/std in its spec);
- `normal` (normals): unit surface normal of the visible surface, float16 [N,3,H,W].

Splits are generated once and cached under ``<data.root>/shapes/<fingerprint>/``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
import json
from pathlib import Path

import torch

from kdmtl_cli.data import DATASETS, DataBundle, GeneratedSettings, TargetSpec, generated_splits
from kdmtl_cli.errors import KdmtlError
from kdmtl_cli.ranges import at_least

GENERATOR_VERSION = 3  # bump when the generator's output changes, to invalidate caches
# 2: normal, present, count and near targets

EXPECTED_KEYS = frozenset({"image", "cls", "seg", "depth", "normal", "present", "count", "near"})


def _stats(values: torch.Tensor):
    """(mean, std) of a train-split target, for heads that predict in target units; a std that
    is zero or undefined (one sample, a constant target) becomes 1 so the head still learns."""
    values = values.float()
    mean = float(values.mean())
    std = float(values.std()) if values.numel() > 1 else float("nan")
    return mean, (std if std > 0 else 1.0)  # nan > 0 is False


def _fingerprint(cfg, sizes: dict) -> str:
    key = {"version": GENERATOR_VERSION, "image_size": cfg.image_size, "seed": cfg.seed,
           "min_objects": cfg.min_objects, "max_objects": cfg.max_objects, "sizes": sizes}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _split_sizes(cfg) -> dict:
    sizes = {"train": cfg.train_size, "val": cfg.val_size, "test": cfg.test_size}
    for split, n in sizes.items():
        if n < 1:
            raise KdmtlError(f"data.{split}_size must be at least 1 (got {n})")
    return sizes


@dataclass
class ShapesSettings(GeneratedSettings):
    """`data.*` keys of shapes."""
    min_objects: int = at_least(1, default=2)     # objects per generated scene
    max_objects: int = at_least("min_objects", default=4)


@DATASETS.register("shapes", settings=ShapesSettings)
def build_shapes(cfg) -> DataBundle:
    from kdmtl_cli.data.shapes_generator import SHAPE_NAMES, generate_shapes

    sizes = _split_sizes(cfg)
    fingerprint = _fingerprint(cfg, sizes)
    folder = Path(cfg.root).expanduser() / "shapes" / fingerprint
    # Each split has its own seed so no scene repeats across splits.
    splits = generated_splits(
        folder, sizes, EXPECTED_KEYS,
        lambda split, index: generate_shapes(sizes[split], image_size=cfg.image_size, seed=cfg.seed * 1000 + index,
                                             min_objects=cfg.min_objects, max_objects=cfg.max_objects),
        name="shapes", items="images", generate=cfg.generate,
        missing_hint=", or point data.root at existing data")
    num_shapes = len(SHAPE_NAMES)
    depth_mean, depth_std = _stats(splits["train"]["depth"])
    count_mean, count_std = _stats(splits["train"]["count"])
    targets = {
        "cls": TargetSpec("classification", num_shapes, list(SHAPE_NAMES)),
        "seg": TargetSpec("segmentation", num_shapes + 1, ["background", *SHAPE_NAMES]),
        "depth": TargetSpec("depth", mean=depth_mean, std=depth_std),
        "normal": TargetSpec("normals"),
        "present": TargetSpec("multilabel", num_shapes, list(SHAPE_NAMES)),
        "count": TargetSpec("regression", mean=count_mean, std=count_std),
        "near": TargetSpec("classification", num_shapes, list(SHAPE_NAMES)),
    }
    return DataBundle(name="shapes", targets=targets, splits=splits, mean=list(cfg.mean),
                      std=list(cfg.std), fingerprint=fingerprint, info={"path": str(folder)})
