"""`cifar10`, `cifar100`: the CIFAR data sets, from the python-pickle release under ``data.root``.

Files (https://www.cs.toronto.edu/~kriz/cifar.html, "python version", extracted in data.root):
``cifar-10-batches-py/data_batch_1..5, test_batch, batches.meta`` and
``cifar-100-python/train, test, meta``.

Reading: every file (batches and meta) is read by kdmtl's own reader with a restricted
unpickler (``_SafeUnpickler``): it rebuilds only what these files hold -- numpy arrays, lists,
dicts, strings, numbers -- and refuses any other Python object (one error line naming the file)
before it is created, so a replaced or poisoned file under data.root cannot run code. The layout:
``data`` uint8 [N,3072] = R, G, B planes of 32x32, and ``labels`` / ``fine_labels``.
torchvision is used only to download and extract the official archive when files are missing and
``data.download=true`` (its MD5 check of the archive; downloading and extracting unpickle nothing).

Splits: ``val`` = the LAST ``data.val_size`` images of the official training set (in file
order; ``data.val_size=0``: no validation split, as in the papers), ``train`` = the first
``data.train_size`` of the images before them, ``test`` = the
first ``data.test_size`` images of the official test set (sizes are upper limits: a larger
value takes all there is). Target ``cls`` (classification; 10 or 100 fine classes, names from
the meta file when present). Images stay uint8 [N,3,32,32]; the loader normalises.
"""

from __future__ import annotations

from dataclasses import dataclass

import builtins
import codecs
import functools
import importlib
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


# What the CIFAR files (Python 2 cPickle, or files written by Python 3 such as tests/ and
# scripts/fake_cifar.py) name besides plain containers: numpy's array/dtype reconstruction, under
# numpy 1's (numpy.core) and numpy 2's (numpy._core) module names, and _codecs.encode, which
# protocol 0-2 pickles written by Python 3 use for bytes. Anything else is refused.
_NUMPY = {("multiarray", "_reconstruct"), ("multiarray", "scalar"), ("numeric", "_frombuffer")}
_BUILTINS = {"bytes", "bytearray", "set", "frozenset"}


class _Refused(pickle.UnpicklingError):
    """A global the CIFAR layout never uses: refused before it is looked up, let alone called."""


def _numpy_function(submodule: str, name: str):
    for module in (f"numpy._core.{submodule}", f"numpy.core.{submodule}"):   # numpy 2, numpy 1
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
    raise _Refused(f"numpy.{submodule}.{name}")


def _latin1_encode(text, encoding="utf-8"):
    # Python 3 writes bytes in protocol <= 2 as _codecs.encode(text, "latin1"); no other codec.
    if encoding not in ("latin1", "latin-1"):
        raise _Refused(f"_codecs.encode(..., {encoding!r})")
    return codecs.encode(text, encoding)


class _SafeUnpickler(pickle.Unpickler):
    """Unpickle arrays, lists, dicts, strings and numbers only (the CIFAR layout)."""

    def find_class(self, module: str, name: str):
        module = "builtins" if module == "__builtin__" else module          # Python 2 pickles
        parts = module.split(".")
        if parts[:1] == ["numpy"] and len(parts) == 3 and parts[1] in ("core", "_core") \
                and (parts[2], name) in _NUMPY:
            return _numpy_function(parts[2], name)
        if module == "numpy" and name in ("ndarray", "dtype"):
            return getattr(np, name)
        if (module, name) == ("_codecs", "encode"):
            return _latin1_encode
        if module == "builtins" and name in _BUILTINS:
            return getattr(builtins, name)
        raise _Refused(f"{module}.{name}")


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as handle:
            return _SafeUnpickler(handle, encoding="latin1").load()
    except _Refused as err:
        raise KdmtlError(f"CIFAR file {path} contains a Python object other than arrays/lists/dicts/strings/"
                         f"numbers ({err}) and was not loaded; replace it with the original file") from None
    except Exception as err:  # noqa: BLE001 - a damaged file: pickle and numpy raise many kinds
        raise KdmtlError(f"cannot read CIFAR file {path} ({type(err).__name__}: {err}); "
                         "replace it with the original file") from None


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


def _download(which: str, root: Path) -> None:
    """The official archive through torchvision (MD5-checked), extracted in root; nothing is
    unpickled here -- the files are read by _read_own like any others."""
    from torchvision import datasets
    from torchvision.datasets import utils

    official = datasets.CIFAR10 if which == "cifar10" else datasets.CIFAR100
    utils.download_and_extract_archive(official.url, str(root), filename=official.filename, md5=official.tgz_md5)


def load_cifar_arrays(which: str, root, download: bool) -> dict:
    """Full official splits: {"train": (images uint8 [N,3,32,32], labels), "test": (...),
    "classes": names}. One-line KdmtlError when the files are missing and cannot be downloaded."""
    lay = LAYOUT[which]
    root = Path(str(root)).expanduser()
    folder = root / lay["folder"]
    present = all((folder / name).is_file() for name in lay["train"] + lay["test"])
    if not present and not download:
        raise KdmtlError(_missing_message(which, root, "data.download=false"))
    if not present:
        try:
            _download(which, root)
        except Exception as err:  # no network, refused write...: torchvision raises many kinds
            raise KdmtlError(_missing_message(which, root, f"download failed: {type(err).__name__}")) from None
        if not all((folder / name).is_file() for name in lay["train"] + lay["test"]):
            raise KdmtlError(_missing_message(which, root, "download did not produce them"))
    train_x, train_y, test_x, test_y = _read_own(which, folder)
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


@dataclass
class CifarSettings:
    """`data.*` keys of cifar10 / cifar100."""
    download: bool = True                 # let torchvision download missing files (needs network)


# One data set per layout: cifar10, cifar100; both can train on the whole training split (data.val_size=0).
for _name in LAYOUT:
    DATASETS.register(_name, settings=CifarSettings, no_validation_ok=True)(functools.partial(_build, _name))
