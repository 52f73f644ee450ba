"""No data file runs code: every CIFAR file (batches and meta) goes through kdmtl's restricted
unpickler, which rebuilds arrays/lists/dicts/strings/numbers only. A poisoned file is refused with
one line naming it, before the object it describes is created (the marker file stays absent) --
through the reader, through the real CLI, for files torchvision's MD5 check would pass and for
files a download produced. Real layouts still load: a Python 2 cPickle stream as in the official
release (numpy 1 module names), and Python 3 pickles of every protocol (numpy 2 module names)."""

from __future__ import annotations

import os
import pathlib
import pickle
import struct

import numpy as np
import pytest

from conftest import FAST, assert_one_line_error, run_kdmtl
from test_cifar_data import NAMES10, _image_rows, write_cifar10

from kdmtl_cli.data.cifar import load_cifar_arrays
from kdmtl_cli.errors import KdmtlError


class _Open:
    """Unpickling this calls builtins.open(marker, "w"): the file appears."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


class _System(_Open):
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _PathWrite(_Open):
    def __reduce__(self):
        return (pathlib.Path.write_text, (pathlib.Path(self.marker), "pwned"))


def _poison(path, marker, kind=_Open, key="data"):
    entry = {"data": _image_rows(0, 4), "labels": [0, 1, 2, 3], "label_names": NAMES10}
    entry[key] = kind(marker)
    path.write_bytes(pickle.dumps(entry))


def _assert_refused(err, path, marker):
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg and "was not loaded" in msg, msg
    assert "arrays/lists/dicts/strings/numbers" in msg, msg
    assert not marker.exists(), "the poisoned file ran code"


@pytest.mark.parametrize("kind", [_Open, _System, _PathWrite])
def test_poisoned_batch_is_refused_and_runs_nothing(tmp_path, kind):
    folder = write_cifar10(tmp_path / "data")
    marker = tmp_path / "marker"
    _poison(folder / "data_batch_3", marker, kind)
    with pytest.raises(KdmtlError) as err:
        load_cifar_arrays("cifar10", tmp_path / "data", download=False)
    _assert_refused(err, folder / "data_batch_3", marker)


def test_poisoned_meta_is_refused(tmp_path):
    folder = write_cifar10(tmp_path / "data")
    marker = tmp_path / "marker"
    _poison(folder / "batches.meta", marker, key="label_names")
    with pytest.raises(KdmtlError) as err:
        load_cifar_arrays("cifar10", tmp_path / "data", download=False)
    _assert_refused(err, folder / "batches.meta", marker)


def test_files_passing_the_md5_check_still_go_through_the_restricted_reader(tmp_path, monkeypatch):
    """Before: torchvision read files whose MD5 matched with plain pickle. Now nothing asks."""
    import torchvision.datasets as tvd
    import torchvision.datasets.cifar as tv_cifar
    import torchvision.datasets.utils as tv_utils

    monkeypatch.setattr(tv_utils, "check_integrity", lambda *a, **k: True)
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)

    def never(*args, **kwargs):
        raise AssertionError("torchvision's CIFAR reader (plain pickle) was used")

    monkeypatch.setattr(tvd.CIFAR10, "__init__", never)
    monkeypatch.setattr(tvd.CIFAR100, "__init__", never)
    folder = write_cifar10(tmp_path / "data")
    marker = tmp_path / "marker"
    _poison(folder / "test_batch", marker)
    with pytest.raises(KdmtlError) as err:
        load_cifar_arrays("cifar10", tmp_path / "data", download=True)
    _assert_refused(err, folder / "test_batch", marker)


def test_download_uses_torchvision_only_to_fetch_then_the_own_reader(tmp_path, monkeypatch):
    import torchvision.datasets as tvd
    import torchvision.datasets.utils as tv_utils

    calls = []
    poisoned = []

    def fake_download(url, download_root, filename=None, md5=None, **kwargs):
        calls.append((url, filename, md5))
        folder = write_cifar10(pathlib.Path(download_root))     # as if the archive was extracted
        if poisoned:
            _poison(folder / "data_batch_1", poisoned[0])

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", fake_download)
    arrays = load_cifar_arrays("cifar10", tmp_path / "a", download=True)
    assert calls == [(tvd.CIFAR10.url, tvd.CIFAR10.filename, tvd.CIFAR10.tgz_md5)]
    assert arrays["train"][0].shape == (20, 3, 32, 32) and arrays["classes"] == NAMES10
    marker = tmp_path / "marker"
    poisoned.append(marker)
    with pytest.raises(KdmtlError) as err:
        load_cifar_arrays("cifar10", tmp_path / "b", download=True)
    _assert_refused(err, tmp_path / "b" / "cifar-10-batches-py" / "data_batch_1", marker)


# ------------------------------------------------------------------ real layouts still load
def _py2_str(raw: bytes) -> bytes:
    """A Python 2 `str` as cPickle writes it (SHORT_BINSTRING / BINSTRING)."""
    return (b"U" + bytes([len(raw)]) if len(raw) < 256 else b"T" + struct.pack("<i", len(raw))) + raw


def _py2_int(value: int) -> bytes:
    return b"K" + bytes([value]) if value < 256 else b"J" + struct.pack("<i", value)


def _py2_batch(rows: np.ndarray, labels, names=None) -> bytes:
    """The official release's byte layout: Python 2 cPickle protocol 2, numpy 1 module names
    (numpy.core.multiarray._reconstruct), Python 2 strings (read with encoding latin1)."""
    n = rows.shape[0]
    array = (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + _py2_int(0) + b"\x85" + _py2_str(b"b")
             + b"\x87R"
             + b"(" + _py2_int(1) + _py2_int(n) + b"M\x00\x0c\x86"                 # (1, (n, 3072),
             + b"cnumpy\ndtype\n" + _py2_str(b"u1") + _py2_int(0) + _py2_int(1) + b"\x87R"
             + b"(" + _py2_int(3) + _py2_str(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xff" + _py2_int(0)
             + b"tb"                                                               # dtype u1,
             + b"\x89" + _py2_str(rows.tobytes()) + b"tb")                         # False, raw)
    items = b""
    if rows.size:
        items += _py2_str(b"data") + array
        items += _py2_str(b"labels") + b"](" + b"".join(_py2_int(v) for v in labels) + b"e"
        items += _py2_str(b"batch_label") + _py2_str(b"training batch 1 of 5")
    if names is not None:
        items += _py2_str(b"label_names") + b"](" + b"".join(_py2_str(s.encode()) for s in names) + b"e"
        items += _py2_str(b"num_vis") + _py2_int(3072)
    return b"\x80\x02}(" + items + b"u."


def test_python2_release_layout_loads(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for b in range(5):
        (folder / f"data_batch_{b + 1}").write_bytes(_py2_batch(_image_rows(b * 2, 2), [b, (b + 1) % 10]))
    (folder / "test_batch").write_bytes(_py2_batch(_image_rows(50, 3), [9, 8, 7]))
    (folder / "batches.meta").write_bytes(_py2_batch(np.zeros((0, 3072), np.uint8), [], names=NAMES10))
    assert b"numpy.core.multiarray" in (folder / "data_batch_1").read_bytes()
    arrays = load_cifar_arrays("cifar10", tmp_path, download=False)
    images, labels = arrays["train"]
    assert images.shape == (10, 3, 32, 32) and labels.tolist() == [0, 1, 1, 2, 2, 3, 3, 4, 4, 5]
    assert int(images[3, 0, 0, 0]) == 3 and int(images[3, 1, 5, 5]) == 103 and int(images[3, 2, 1, 0]) == 32
    assert arrays["test"][1].tolist() == [9, 8, 7] and arrays["classes"] == NAMES10


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_python3_pickles_of_every_protocol_load(tmp_path, protocol):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    entry = {"data": _image_rows(0, 3), "fine_labels": [5, 6, 7], "filenames": [b"a.png", b"", "b.png"],
             "coarse_labels": np.array([1, 2, 3])}
    (folder / "train").write_bytes(pickle.dumps(entry, protocol=protocol))
    (folder / "test").write_bytes(pickle.dumps({"data": _image_rows(9, 1), "fine_labels": [np.int64(4)]},
                                               protocol=protocol))
    (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": [f"c{i}" for i in range(100)]},
                                               protocol=protocol))
    arrays = load_cifar_arrays("cifar100", tmp_path, download=False)
    assert arrays["train"][1].tolist() == [5, 6, 7] and arrays["test"][1].tolist() == [4]
    assert int(arrays["test"][0][0, 1, 0, 0]) == 109 and arrays["classes"][99] == "c99"


# ------------------------------------------------------------------ through the real CLI
def test_cli_refuses_a_poisoned_cifar_file(tmp_path):
    root = tmp_path / "data"
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    (folder / "test").write_bytes(pickle.dumps({"data": _image_rows(0, 4), "fine_labels": [1, 2, 3, 4]}))
    marker = tmp_path / "marker"
    _poison(folder / "train", marker, _System)
    work = tmp_path / "work"
    work.mkdir()
    proc = run_kdmtl(["train", "+experiment=cifar100_resnet56_resnet20_vanilla", f"data.root={root}",
                      "data.download=false", *FAST], cwd=work, cache=tmp_path / "cache")
    assert_one_line_error(proc, str(folder / "train"), "was not loaded", rc=1)
    assert not marker.exists()
