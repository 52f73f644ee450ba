"""Data sets by name. Each module registers a builder ``cfg.data -> DataBundle``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

from kdmtl_cli.registry import Registry

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class TargetSpec:
    """What a data set provides for one target: its task kind and, for labels, the class count."""

    kind: str                           # a task kind: classification | multilabel | segmentation |
                                        # depth | normals | regression (kdmtl_cli/tasks/)
    num_classes: Optional[int] = None   # classes (classification, segmentation) or labels (multilabel)
    class_names: Optional[List[str]] = None
    mean: Optional[float] = None        # regression targets: train-split statistics, so heads
    std: Optional[float] = None         # predict in normalised units from the first step


@dataclass
class DataBundle:
    """A data set resident in memory: per split, uint8 images [N,C,H,W] and target tensors."""

    name: str
    targets: Dict[str, TargetSpec]
    splits: Dict[str, Dict[str, torch.Tensor]]
    mean: List[float]
    std: List[float]
    fingerprint: str = ""               # identifies the exact data (for teacher cache keys)
    info: Dict[str, str] = field(default_factory=dict)

    def size(self, split: str) -> int:
        return int(self.splits[split]["image"].shape[0])


DATASETS: Registry = Registry("data set", "data.name")


@dataclass
class GeneratedSettings:
    """`data.*` keys of a data set generated offline (and cached under data.root)."""
    generate: bool = True                 # create a missing generated data set (like torchvision's download)


def fingerprint_splits(splits: Dict[str, Dict[str, torch.Tensor]], extra: str) -> str:
    """A short hash of every tensor of every split (and `extra`), identifying data read from
    files, for teacher cache keys and Δm baselines."""
    import hashlib

    digest = hashlib.sha256(extra.encode())
    for split in splits.values():
        for tensor in split.values():
            digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def generated_splits(folder, sizes: Dict[str, int], keys, make, *, name: str, items: str, generate: bool,
                     missing_hint: str = "") -> Dict[str, Dict[str, torch.Tensor]]:
    """Every split of a generated data set: read from `<folder>/<split>.pt` when cached (checked
    against the expected `keys` and size), else made by `make(split, index)` and cached
    atomically, or a one-line error when `generate` is off or the cache is unwritable."""
    from pathlib import Path

    from kdmtl_cli.engine.checkpoint import atomic_torch_save, load_tensor_file
    from kdmtl_cli.errors import KdmtlError

    folder = Path(folder)
    splits = {}
    for index, split in enumerate(SPLITS):
        path = folder / f"{split}.pt"
        if path.exists():
            tensors = load_tensor_file(path, what=f"{name} data file")
            if set(tensors) != set(keys) or tensors["image"].shape[0] != sizes[split]:
                raise KdmtlError(f"{name} data file {path} does not hold the expected {sizes[split]} "
                                 f"{items} with {sorted(keys)}; delete {folder} to regenerate it")
        elif not generate:
            raise KdmtlError(f"no {name} data at {folder} (expected train.pt, val.pt, test.pt); "
                             f"set data.generate=true to create it{missing_hint}")
        else:
            tensors = make(split, index)
            try:
                folder.mkdir(parents=True, exist_ok=True)
                atomic_torch_save(tensors, path)
            except OSError as err:
                raise KdmtlError(f"cannot write generated data to {folder} ({err.strerror}); "
                                 "set data.root (or KDMTL_CACHE) to a writable directory") from None
        splits[split] = tensors
    return splits


def builders_with(trait: str) -> List[str]:
    """The data sets registered with `trait` true (`DATASETS.register(name, trait=True)`):
    `no_validation_ok` (can train on its whole training split, `data.val_size=0`, as
    the papers of the shipped experiments; generated sets always have a validation split),
    `scale_crop_ok` (dense benchmarks whose official code has the random scale-crop)."""
    from kdmtl_cli.plugins import load_builtin

    load_builtin()
    return [name for name in DATASETS.names() if DATASETS.trait(name, trait)]


def check_val_size(data_cfg) -> None:
    """`data.val_size=0` only where the builder supports it; never negative."""
    from kdmtl_cli.errors import KdmtlError

    if data_cfg.val_size < 0:
        raise KdmtlError(f"data.val_size must be >= 0 (got {data_cfg.val_size}); 0 = no validation split")
    allowed = builders_with("no_validation_ok")
    if data_cfg.val_size == 0 and data_cfg.name not in allowed:
        raise KdmtlError(f"data.val_size=0 (no validation split) is supported for {', '.join(allowed)}, "
                         f"not data={data_cfg.name}; set data.val_size >= 1")


def check_scale_crop(data_cfg) -> None:
    """`data.scale_crop`: null (off) or a non-empty list of scales >= 1, for data sets with `scale_crop_ok`,
    without data.crop_padding. One line naming the key."""
    import math

    from kdmtl_cli.errors import KdmtlError

    value = data_cfg.get("scale_crop", None)
    if value is None:
        return
    hint = "expected null (off) or a list of scales >= 1 such as [1.0, 1.2, 1.5]"
    try:
        scales = [float(x) for x in value] if not isinstance(value, (str, bytes)) else None
    except (TypeError, ValueError):
        scales = None
    if not scales or any(not math.isfinite(x) or x < 1.0 for x in scales) \
            or any(isinstance(x, bool) for x in value):
        raise KdmtlError(f"data.scale_crop={value}: {hint}")
    allowed = builders_with("scale_crop_ok")
    if data_cfg.name not in allowed:
        raise KdmtlError(f"data.scale_crop is supported for {', '.join(allowed)} (dense targets), "
                         f"not data={data_cfg.name}; set data.scale_crop=null")
    if int(data_cfg.get("crop_padding", 0) or 0) > 0:
        raise KdmtlError("data.scale_crop and data.crop_padding cannot be combined; set one of them off")


def build_data(data_cfg) -> DataBundle:
    from kdmtl_cli.plugins import load_builtin

    load_builtin()   # every module of kdmtl_cli/data/ registers its data set

    check_val_size(data_cfg)
    check_scale_crop(data_cfg)
    return DATASETS.get(data_cfg.name)(data_cfg)
