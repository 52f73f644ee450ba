"""cifar10 / cifar100 from tiny files in the real pickle layout (torchvision's MD5 check fails
on them, so the module's own reader is used), and the loader's random crop."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from kdmtl_cli.data import build_data
from kdmtl_cli.data.loader import TensorLoader, crop_batch
from kdmtl_cli.errors import KdmtlError
from kdmtl_cli.schema import TrainConfig, validate

CPU = torch.device("cpu")
NAMES10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _image_rows(start: int, n: int) -> np.ndarray:
    """Row i: R plane all (start+i), G plane all (start+i+100), B plane a ramp 0..1023 mod 256."""
    rows = np.zeros((n, 3072), dtype=np.uint8)
    for i in range(n):
        rows[i, :1024] = start + i
        rows[i, 1024:2048] = start + i + 100
        rows[i, 2048:] = np.arange(1024) % 256
    return rows


def write_cifar10(root, per_batch=4, n_test=3, meta=True):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for b in range(5):
        start = b * per_batch
        entry = {"batch_label": f"batch {b + 1}", "data": _image_rows(start, per_batch),
                 "labels": [(start + i) % 10 for i in range(per_batch)],
                 "filenames": [f"f{start + i}.png" for i in range(per_batch)]}
        (folder / f"data_batch_{b + 1}").write_bytes(pickle.dumps(entry))
    test = {"data": _image_rows(50, n_test), "labels": [(9 - i) % 10 for i in range(n_test)]}
    (folder / "test_batch").write_bytes(pickle.dumps(test))
    if meta:
        (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": NAMES10}))
    return folder


def data_cfg(root, **data):
    base = {"root": str(root), "download": False, "val_size": 3, "train_size": 100, "test_size": 100}
    base.update(data)
    return validate(OmegaConf.create({"data": base}), TrainConfig)


def test_cifar10_tiny_files_images_labels_splits_names(tmp_path):
    write_cifar10(tmp_path)
    bundle = build_data(data_cfg(tmp_path, name="cifar10").data)
    assert bundle.size("train") == 17 and bundle.size("val") == 3 and bundle.size("test") == 3
    train, val, test = (bundle.splits[s] for s in ("train", "val", "test"))
    assert train["image"].dtype == torch.uint8 and train["image"].shape == (17, 3, 32, 32)
    # image i of the concatenated training batches: R = i, G = i + 100, B ramp (CHW, R then G then B)
    for i in (0, 5, 16):
        img = train["image"][i]
        assert torch.all(img[0] == i) and torch.all(img[1] == i + 100)
        assert img[2, 0, 5] == 5 and img[2, 1, 0] == 32 and img[2, 31, 31] == 1023 % 256
        assert int(train["cls"][i]) == i % 10
    # val = the last 3 training images (17, 18, 19), in order
    assert [int(val["image"][j, 0, 0, 0]) for j in range(3)] == [17, 18, 19]
    assert val["cls"].tolist() == [7, 8, 9]
    assert [int(test["image"][j, 0, 0, 0]) for j in range(3)] == [50, 51, 52]
    assert test["cls"].tolist() == [9, 8, 7]
    spec = bundle.targets["cls"]
    assert spec.kind == "classification" and spec.num_classes == 10 and spec.class_names == NAMES10
    # sizes are upper limits; the fingerprint depends on the split
    small = build_data(data_cfg(tmp_path, name="cifar10", train_size=5, test_size=2).data)
    assert small.size("train") == 5 and small.size("test") == 2 and small.fingerprint != bundle.fingerprint


def test_cifar10_without_meta_uses_numbers(tmp_path):
    write_cifar10(tmp_path, meta=False)
    bundle = build_data(data_cfg(tmp_path, name="cifar10").data)
    assert bundle.targets["cls"].class_names == [str(i) for i in range(10)]


def test_cifar100_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    (folder / "train").write_bytes(pickle.dumps({"data": _image_rows(0, 6), "fine_labels": [99, 1, 2, 3, 4, 50],
                                                 "coarse_labels": [0] * 6}))
    (folder / "test").write_bytes(pickle.dumps({"data": _image_rows(10, 2), "fine_labels": [7, 8]}))
    names = [f"c{i}" for i in range(100)]
    (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": names, "coarse_label_names": ["x"] * 20}))
    bundle = build_data(data_cfg(tmp_path, name="cifar100", val_size=2).data)
    assert bundle.splits["train"]["cls"].tolist() == [99, 1, 2, 3]
    assert bundle.splits["val"]["cls"].tolist() == [4, 50]
    assert bundle.splits["test"]["cls"].tolist() == [7, 8]
    assert bundle.targets["cls"].num_classes == 100 and bundle.targets["cls"].class_names == names
    assert torch.all(bundle.splits["test"]["image"][1, 1] == 111)


def test_missing_files_without_download_is_one_line_error(tmp_path):
    with pytest.raises(KdmtlError) as err:
        build_data(data_cfg(tmp_path / "nowhere", name="cifar10").data)
    msg = str(err.value)
    assert "\n" not in msg
    for word in ("data_batch_1", "test_batch", "cifar-10-batches-py", "https://www.cs.toronto.edu/~kriz/cifar.html",
                 "data.root", str(tmp_path / "nowhere")):
        assert word in msg


def test_val_size_must_leave_training_images(tmp_path):
    write_cifar10(tmp_path)
    with pytest.raises(KdmtlError, match="val_size"):
        build_data(data_cfg(tmp_path, name="cifar10", val_size=20).data)


def test_bad_pickle_is_a_kdmtl_error(tmp_path):
    folder = write_cifar10(tmp_path)
    (folder / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(KdmtlError, match="data_batch_3"):
        build_data(data_cfg(tmp_path, name="cifar10").data)


# ================================================================ random crop in the loader
def _crop_split(n=6, size=8):
    g = torch.Generator().manual_seed(0)
    return {"image": torch.randint(1, 256, (n, 3, size, size), generator=g, dtype=torch.uint8),
            "cls": torch.arange(n),
            "seg": torch.randint(0, 5, (n, size, size), generator=g),
            "depth": torch.rand(n, size, size, generator=g) + 1.0}


def _crop_loader(split, **kw):
    return TensorLoader(split, {"cls": None, "seg": "segmentation", "depth": "depth"}, batch_size=4,
                        mean=[0.0] * 3, std=[1.0] * 3, device=CPU, shuffle=True, seed=5, crop_padding=2,
                        pad_values={"seg": 255}, **kw)


def test_crop_matches_padded_source_at_recorded_offsets():
    split = _crop_split()
    loader = _crop_loader(split)
    loader.set_epoch(1)
    batches = list(loader)
    crops = torch.cat([b["crop"] for b in batches])
    assert crops.dtype == torch.int64 and crops.shape == (6, 2)
    assert int(crops.min()) >= 0 and int(crops.max()) <= 4 and len({tuple(c) for c in crops.tolist()}) > 1
    size, p = 8, 2
    for b in batches:
        for j, i in enumerate(b["index"].tolist()):
            dy, dx = b["crop"][j].tolist()
            padded = torch.zeros(3, size + 2 * p, size + 2 * p, dtype=torch.uint8)
            padded[:, p:p + size, p:p + size] = split["image"][i]
            assert torch.equal(b["image"][j], padded[:, dy:dy + size, dx:dx + size].float() / 255.0)
            seg = torch.full((size + 2 * p, size + 2 * p), 255, dtype=torch.int64)
            seg[p:p + size, p:p + size] = split["seg"][i]
            assert torch.equal(b["targets"]["seg"][j], seg[dy:dy + size, dx:dx + size])
            depth = torch.zeros(size + 2 * p, size + 2 * p)
            depth[p:p + size, p:p + size] = split["depth"][i]
            assert torch.equal(b["targets"]["depth"][j], depth[dy:dy + size, dx:dx + size])
            assert int(b["targets"]["cls"][j]) == i
            # hand check of one pixel: output (0, 0) is padded (dy, dx), i.e. source (dy-p, dx-p)
            if dy >= p and dx >= p:
                assert int(b["targets"]["seg"][j, 0, 0]) == int(split["seg"][i, dy - p, dx - p])
            else:
                assert int(b["targets"]["seg"][j, 0, 0]) == 255 and float(b["image"][j, :, 0, 0].sum()) == 0


def test_crop_replay_is_exact_and_flip_comes_after_crop():
    split = _crop_split(10)
    a, b = _crop_loader(split, hflip=True), _crop_loader(split, hflip=True)
    for loader in (a, b):
        loader.set_epoch(3)
    first, second = list(a), list(b)
    again = list(a)
    for x, y, z in zip(first, second, again):
        for key in ("image", "index", "flip", "crop"):
            assert torch.equal(x[key], y[key]) and torch.equal(x[key], z[key])
        assert torch.equal(x["targets"]["seg"], y["targets"]["seg"])
    for bt in first:
        for j, i in enumerate(bt["index"].tolist()):
            dy, dx = bt["crop"][j].tolist()
            want = crop_batch(split["seg"][i:i + 1], torch.tensor([[dy, dx]]), 2, 255)[0]
            if bt["flip"][j]:
                want = want.flip(-1)
            assert torch.equal(bt["targets"]["seg"][j], want)
    # the shuffle and flips are the same as without the crop (offsets drawn after them)
    plain = TensorLoader(split, {"cls": None}, batch_size=4, mean=[0.0] * 3, std=[1.0] * 3, device=CPU,
                         shuffle=True, hflip=True, seed=5)
    plain.set_epoch(3)
    for x, y in zip(first, plain):
        assert torch.equal(x["index"], y["index"]) and torch.equal(x["flip"], y["flip"])
        assert "crop" not in y


def test_make_loader_crops_train_only_with_segmentation_fill():
    from kdmtl_cli.build import make_loader
    from kdmtl_cli.data import DataBundle, TargetSpec
    from kdmtl_cli.engine.hardware import Hardware
    from kdmtl_cli.tasks import TASK_KINDS, Task, _load_kinds

    _load_kinds()
    hw = Hardware(device=CPU, precision="32", channels_last=False, scaler=None)
    split = _crop_split(4)
    tasks = {"seg": Task("seg", TASK_KINDS.get("segmentation")(), TargetSpec("segmentation", 5), "seg"),
             "depth": Task("depth", TASK_KINDS.get("depth")(), TargetSpec("depth"), "depth")}
    bundle = DataBundle("t", {}, {"train": split}, mean=[0.0] * 3, std=[1.0] * 3)
    cfg = OmegaConf.create({"data": {"batch_size": 4, "eval_batch_size": 4, "hflip": False, "crop_padding": 3},
                            "seed": 2})
    train = make_loader(bundle, "train", tasks, cfg, hw, train=True, limit=None)
    assert train.crop_padding == 3 and train.pad_values == {"seg": 255, "depth": 0}
    batch = next(iter(train))
    assert "crop" in batch and (batch["targets"]["seg"] == 255).any()
    evaluation = make_loader(bundle, "train", tasks, cfg, hw, train=False, limit=None)
    assert evaluation.crop_padding == 0 and "crop" not in next(iter(evaluation))


def test_yaml_files_compose_and_carry_cifar_statistics():
    from pathlib import Path

    conf = Path(__file__).resolve().parents[1] / "conf" / "data"
    for name, mean in (("cifar10", [0.4914, 0.4822, 0.4465]), ("cifar100", [0.5071, 0.4865, 0.4409])):
        node = OmegaConf.load(conf / f"{name}.yaml")
        cfg = validate(OmegaConf.create({"data": node}), TrainConfig)
        assert cfg.data.name == name and list(cfg.data.mean) == mean and cfg.data.crop_padding == 4
    for name in ("cifar_cls_seg", "digits_mtl"):
        cfg = validate(OmegaConf.create({"data": OmegaConf.load(conf / f"{name}.yaml")}), TrainConfig)
        assert cfg.data.name == name
