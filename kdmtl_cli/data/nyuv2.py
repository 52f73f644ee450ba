"""`nyuv2`, `cityscapes`: the dense multi-task benchmarks of MTAN / LibMTL / KD4MTL, read from
their preprocessed ``.npy`` release under ``data.root`` (nothing is downloaded).

Layout (that of MTAN, https://github.com/lorenmt/mtan, and LibMTL; the download links of the
preprocessed archives are in the MTAN README)::

    <data.root>/nyuv2/{train,val}/{image,label,depth,normal}/<i>.npy
    <data.root>/cityscapes/{train,val}/{image,label,depth}/<i>.npy     (``label_7/`` is accepted too)

with ``i`` = 0, 1, ... and, per file: image float32 [H,W,3] in [0,1]; label [H,W] (float) with
-1 for unlabelled pixels; depth [H,W,1] (0 = no measurement); normal [H,W,3] in [-1,1] (all
zero = invalid). NYUv2: 288x384, 13 classes (795 train / 654 val files); Cityscapes: 128x256,
7 classes (2975 / 500), no normals.

In memory: images uint8 [N,3,H,W] (round(x * 255)); ``seg`` int64 [N,H,W] with -1 -> 255 (the
segmentation ignore label); ``depth`` float32 [N,H,W] (valid where > 0; its TargetSpec mean/std
are over the valid pixels of our train split); ``normal`` float16 [N,3,H,W] (nyuv2 only).

Splits: the release has only ``train`` and ``val``, and the papers report on ``val``. Here
``val`` = the LAST ``data.val_size`` files of the release's ``train`` folder (by index, so it is
deterministic; ``data.val_size=0``: no validation split, as in the papers), ``train`` = the first ``data.train_size`` files before them, and ``test`` = the
first ``data.test_size`` files of the release's ``val`` folder (sizes are upper limits).
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch

from kdmtl_cli.data import DATASETS, DataBundle, TargetSpec, fingerprint_splits
from kdmtl_cli.errors import KdmtlError

IGNORE = 255

# The 13-class NYUv2 labelling (Couprie et al., 2013) and the 7 Cityscapes categories (void removed).
NYU_CLASSES = ["bed", "books", "ceiling", "chair", "floor", "furniture", "objects", "picture", "sofa",
               "table", "tv", "wall", "window"]
CITYSCAPES_CLASSES = ["flat", "construction", "object", "nature", "sky", "human", "vehicle"]

LAYOUT = {
    "nyuv2": {"classes": NYU_CLASSES, "parts": ("image", "label", "depth", "normal"), "size": "288x384"},
    "cityscapes": {"classes": CITYSCAPES_CLASSES, "parts": ("image", "label", "depth"), "size": "128x256"},
}


def _layout_text(which: str, root: Path) -> str:
    parts = ",".join(LAYOUT[which]["parts"])
    return f"{root / which}/{{train,val}}/{{{parts}}}/<i>.npy"


def _missing(which: str, root: Path, why: str) -> KdmtlError:
    return KdmtlError(
        f"{which} data not found ({why}); expected the preprocessed MTAN/LibMTL layout "
        f"{_layout_text(which, root)}: download the preprocessed {which} archive "
        f"({LAYOUT[which]['size']} .npy files) linked from the README of https://github.com/lorenmt/mtan, "
        f"extract it as {root / which}, or set data.root to the directory that holds {which}/")


def _indices(folder: Path) -> List[int]:
    """Numeric file names <i>.npy in `folder`, sorted by number."""
    out = []
    for path in folder.iterdir():
        match = re.fullmatch(r"(\d+)\.npy", path.name)
        if match:
            out.append(int(match.group(1)))
    return sorted(out)


def _load(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise KdmtlError(f"cannot read {path} ({err}); replace it with the original file") from None


def _part_folder(split_dir: Path, part: str, which: str, root: Path) -> Path:
    folder = split_dir / part
    if part == "label" and not folder.is_dir() and (split_dir / "label_7").is_dir():
        folder = split_dir / "label_7"  # the original MTAN Cityscapes release names it label_7
    if not folder.is_dir():
        raise _missing(which, root, f"no folder {folder}")
    return folder


def _read(which: str, root: Path, split_dir: Path, indices: List[int]) -> Dict[str, torch.Tensor]:
    """Read files `indices` of one release split into the in-memory tensors."""
    n_classes = len(LAYOUT[which]["classes"])
    folders = {part: _part_folder(split_dir, part, which, root) for part in LAYOUT[which]["parts"]}
    images, labels, depths, normals = [], [], [], []
    for i in indices:
        paths = {part: folder / f"{i}.npy" for part, folder in folders.items()}
        for path in paths.values():
            if not path.is_file():
                raise _missing(which, root, f"no file {path}")
        image = _load(paths["image"]).astype(np.float32)
        if image.ndim != 3 or image.shape[-1] != 3:
            raise KdmtlError(f"{paths['image']}: shape {image.shape}, expected [H,W,3]")
        size = image.shape[:2]
        images.append(np.rint(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8).transpose(2, 0, 1))
        label = _load(paths["label"])
        label = label.reshape(label.shape[:2]) if label.ndim == 3 and label.shape[-1] == 1 else label
        label = np.rint(label).astype(np.int64)
        bad = (label != -1) & ((label < 0) | (label >= n_classes))
        if bad.any():
            raise KdmtlError(f"{paths['label']}: labels outside -1..{n_classes - 1} "
                             f"(e.g. {int(label[bad][0])}); replace it with the original file")
        label[label == -1] = IGNORE
        depth = _load(paths["depth"]).astype(np.float32)
        depth = depth[..., 0] if depth.ndim == 3 else depth
        entries = [("label", label), ("depth", depth)]
        if "normal" in paths:
            normal = _load(paths["normal"])
            if normal.ndim != 3 or normal.shape[-1] != 3:
                raise KdmtlError(f"{paths['normal']}: shape {normal.shape}, expected [H,W,3]")
            normal = normal.astype(np.float16).transpose(2, 0, 1)
            normals.append(normal)
            entries.append(("normal", normal[0]))
        for name, arr in entries:
            if tuple(arr.shape[:2]) != tuple(size):
                raise KdmtlError(f"{paths[name]}: size {tuple(arr.shape[:2])} differs from its image's {size}")
        labels.append(label)
        depths.append(depth)
    if images and len({im.shape for im in images}) > 1:
        raise KdmtlError(f"{split_dir}: images of different sizes; use the preprocessed release as is")
    out = {"image": torch.from_numpy(np.stack(images)), "seg": torch.from_numpy(np.stack(labels)),
           "depth": torch.from_numpy(np.stack(depths))}
    if normals:
        out["normal"] = torch.from_numpy(np.stack(normals))
    return out


def _valid_stats(depth: torch.Tensor):
    values = depth[depth > 0].double()
    if values.numel() == 0:
        return 0.0, 1.0
    mean = float(values.mean())
    std = float(values.std()) if values.numel() > 1 else float("nan")
    return mean, (std if std > 0 else 1.0)


def build_dense(which: str, cfg) -> DataBundle:
    root = Path(str(cfg.root)).expanduser()
    folders = {part: root / which / part for part in ("train", "val")}
    for folder in folders.values():
        if not (folder / "image").is_dir():
            raise _missing(which, root, f"no folder {folder / 'image'}")
    train_ids = _indices(folders["train"] / "image")
    test_ids = _indices(folders["val"] / "image")
    total = len(train_ids)
    if cfg.val_size < 0 or cfg.val_size >= total:
        raise KdmtlError(f"data.val_size must be between 0 (no validation split) and {total - 1} for {which} "
                         f"(the last val_size files of {folders['train']}; got {cfg.val_size})")
    if cfg.train_size < 1 or cfg.test_size < 1:
        raise KdmtlError(f"data.train_size and data.test_size must be at least 1 (got {cfg.train_size}, "
                         f"{cfg.test_size})")
    if not test_ids:
        raise _missing(which, root, f"no .npy files in {folders['val'] / 'image'}")
    cut = total - cfg.val_size
    splits = {"train": _read(which, root, folders["train"], train_ids[:min(cfg.train_size, cut)])}
    splits["val"] = _read(which, root, folders["train"], train_ids[cut:]) if cfg.val_size \
        else {name: t[:0].clone() for name, t in splits["train"].items()}     # no validation split
    splits["test"] = _read(which, root, folders["val"], test_ids[:cfg.test_size])
    classes = LAYOUT[which]["classes"]
    mean, std = _valid_stats(splits["train"]["depth"])
    targets = {"seg": TargetSpec("segmentation", len(classes), list(classes)),
               "depth": TargetSpec("depth", mean=mean, std=std)}
    if "normal" in LAYOUT[which]["parts"]:
        targets["normal"] = TargetSpec("normals")
    fingerprint = fingerprint_splits(splits, extra=f"{which}:{cut}:{cfg.val_size}")
    return DataBundle(name=which, targets=targets, splits=splits, mean=list(cfg.mean), std=list(cfg.std),
                      fingerprint=fingerprint, info={"path": str(root / which)})


# One data set per layout: nyuv2, cityscapes; the papers train on the whole training split
# (data.val_size=0), and CAGrad / Nash-MTL's code has the random scale-crop (data.scale_crop).
for _name in LAYOUT:
    DATASETS.register(_name, no_validation_ok=True, scale_crop_ok=True)(functools.partial(build_dense, _name))
