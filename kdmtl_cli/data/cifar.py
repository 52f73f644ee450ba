"""`cifar10`, `cifar100`: the CIFAR data sets, from the python-pickle release under ``data.root``.

Files (https://www.cs.toronto.edu/~kriz/cifar.html, "python version", extracted in data.root):
``cifar-10-batches-py/data_batch_1..5, test_batch, batches.meta`` and
``cifar-100-python/train, test, meta``.

Reading: torchvision's ``datasets.CIFAR10/100`` is used when its MD5 check of the files passes
(with ``data.download=true`` it also downloads missing files). When files are present but fail
that check (a subset, or files written by tests), they are read by the small reader below,
which unpickles the same layout (``data`` uint8 [N,3072] = R, G, B planes of 32x32, and
``labels`` / ``fine_labels``). Those are the only files unpickled; they come from the user's
own data.root, so only use files you trust there.

Splits: ``val`` = the LAST ``data.val_size`` images of the official training set (in file
order; ``data.val_size=0``: no validation split, as in the papers), ``train`` = the first
``data.train_size`` of the images before them, ``test`` = the
first ``data.test_size`` images of the official test set (sizes are upper limits: a larger
value takes all there is). Target ``cls`` (classification; 10 or 100 fine classes, names from
the meta file when present). Images stay uint8 [N,3,32,32]; the loader normalises.
"""

from __future__ import annotations

import functools
import pickle
from pathlib import Path

import numpy as np
import torch

from kdmtl_cli.data import DATASETS, DataBundle, TargetSpec, fingerprint_splits
from kdmtl_cli.errors import KdmtlError

LAYOUT = {
    "cifar10": {"folder": "cifar-10-batches-py", "train": [f"data_batch_{i}" for i in range(1, 6)],
                "test": ["test_batch"], "meta": "batches.meta", "names_key": "label_names",
                "labels_key": "labels", "classes": 10},
    "cifar100": {"folder": "cifar-100-python", "train": ["train"], "test": ["test"], "meta": "meta",
                 "names_key": "fine_label_names", "labels_key": "fine_labels", "classes": 100},
}


def _missing_message(which: str, root: Path, why: str) -> str:
    lay = LAYOUT[which]
    files = ", ".join(lay["train"] + lay["test"])
    return (f"{which} data not found in {root / lay['folder']} (expected {files}; {why}); download the "
            f"CIFAR python version from https://www.cs.toronto.edu/~kriz/cifar.html and extract it "
            f"in {root}, or set data.root to the directory that holds {lay['folder']}/")


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as handle:
            return pickle.load(handle, encoding="latin1")
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as err:
        raise KdmtlError(f"cannot read CIFAR file {path} ({err}); replace it with the original file") from None


def _read_own(which: str, folder: Path):
    """The pickle format read directly: (train images, train labels, test images, test labels)."""
    lay = LAYOUT[which]
    out = []
    for part in ("train", "test"):
        images, labels = [], []
        for name in lay[part]:
            entry = _unpickle(folder / name)
            if not isinstance(entry, dict) or "data" not in entry or lay["labels_key"] not in entry:
                raise KdmtlError(f"CIFAR file {folder / name} lacks 'data' or '{lay['labels_key']}'; "
                                 "replace it with the original file")
            data = np.asarray(entry["data"], dtype=np.uint8)
            if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
                raise KdmtlError(f"CIFAR file {folder / name}: 'data' has shape {data.shape}, "
                                 "expected [N, 3072]; replace it with the original file")
            images.append(torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()))
            labels.append(torch.as_tensor(list(entry[lay["labels_key"]]), dtype=torch.int64))
        out += [torch.cat(images), torch.cat(labels)]
    return tuple(out)


def _read_torchvision(which: str, root: Path, download: bool):
    """Through torchvision (MD5-checked); None when files exist but fail its check."""
    from torchvision import datasets

    cls = datasets.CIFAR10 if which == "cifar10" else datasets.CIFAR100
    try:
        parts = [cls(str(root), train=train, download=download) for train in (True, False)]
    except RuntimeError:  # "Dataset not found or corrupted": let the own reader try
        return None
    out = []
    for part in parts:
        out += [torch.from_numpy(np.ascontiguousarray(part.data)).permute(0, 3, 1, 2).contiguous(),
                torch.as_tensor(part.targets, dtype=torch.int64)]
    return tuple(out)


def load_cifar_arrays(which: str, root, download: bool) -> dict:
    """Full official splits: {"train": (images uint8 [N,3,32,32], labels), "test": (...),
    "classes": names}. One-line KdmtlError when the files are missing and cannot be downloaded."""
    lay = LAYOUT[which]
    root = Path(str(root)).expanduser()
    folder = root / lay["folder"]
    present = all((folder / name).is_file() for name in lay["train"] + lay["test"])
    if not present and not download:
        raise KdmtlError(_missing_message(which, root, "data.download=false"))
    arrays = None
    if present or download:
        try:
            arrays = _read_torchvision(which, root, download=download and not present)
        except Exception as err:  # no network, refused write...: torchvision raises many kinds
            raise KdmtlError(_missing_message(which, root, f"download failed: {type(err).__name__}")) from None
    if arrays is None:
        if not present:
            raise KdmtlError(_missing_message(which, root, "download did not produce them"))
        arrays = _read_own(which, folder)
    train_x, train_y, test_x, test_y = arrays
    n = lay["classes"]
    for labels, part in ((train_y, "train"), (test_y, "test")):
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= n):
            raise KdmtlError(f"{which} {part} labels outside 0..{n - 1} in {folder}; replace the files")
    names = [str(i) for i in range(n)]
    meta = folder / lay["meta"]
    if meta.is_file():
        entry = _unpickle(meta)
        if isinstance(entry, dict) and len(entry.get(lay["names_key"], [])) == n:
            names = [str(x) for x in entry[lay["names_key"]]]
    return {"train": (train_x, train_y), "test": (test_x, test_y), "classes": names, "folder": str(folder)}


def _build(which: str, cfg) -> DataBundle:
    arrays = load_cifar_arrays(which, cfg.root, cfg.download)
    train_x, train_y = arrays["train"]
    test_x, test_y = arrays["test"]
    total = int(train_x.shape[0])
    if cfg.val_size < 0 or cfg.val_size >= total:
        raise KdmtlError(f"data.val_size must be between 0 (no validation split) and {total - 1} for {which} "
                         f"(the last val_size training images; got {cfg.val_size})")
    if cfg.train_size < 1 or cfg.test_size < 1:
        raise KdmtlError(f"data.train_size and data.test_size must be at least 1 (got {cfg.train_size}, "
                         f"{cfg.test_size})")
    cut = total - cfg.val_size
    n_train = min(cfg.train_size, cut)
    splits = {"train": {"image": train_x[:n_train].contiguous(), "cls": train_y[:n_train].contiguous()},
              "val": {"image": train_x[cut:].contiguous(), "cls": train_y[cut:].contiguous()},
              "test": {"image": test_x[:cfg.test_size].contiguous(), "cls": test_y[:cfg.test_size].contiguous()}}
    fingerprint = fingerprint_splits(splits, extra=f"{which}:{n_train}:{cfg.val_size}")
    n = LAYOUT[which]["classes"]
    targets = {"cls": TargetSpec("classification", n, arrays["classes"])}
    return DataBundle(name=which, targets=targets, splits=splits, mean=list(cfg.mean), std=list(cfg.std),
                      fingerprint=fingerprint, info={"path": arrays["folder"]})


# One data set per layout: cifar10, cifar100.
for _name in LAYOUT:
    DATASETS.register(_name)(functools.partial(_build, _name))
