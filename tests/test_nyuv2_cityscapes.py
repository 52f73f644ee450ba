"""nyuv2 / cityscapes from tiny files in the preprocessed MTAN / LibMTL .npy layout:
<root>/<name>/{train,val}/{image,label,depth,normal}/<i>.npy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

import kdmtl_cli.data.nyuv2  # noqa: F401  (registers nyuv2 / cityscapes even before build_data imports it)
from kdmtl_cli.data import build_data
from kdmtl_cli.errors import KdmtlError
from kdmtl_cli.schema import TrainConfig, validate

H, W = 8, 12


def _arrays(seed: int, classes: int, h: int = H, w: int = W):
    """Known values: image with a marker in pixel (0,0,0), labels with -1 in the first row,
    depth with zeros (invalid) in the first column, normals zero where depth is invalid."""
    rng = np.random.default_rng(seed)
    image = rng.uniform(0, 1, (h, w, 3)).astype(np.float32)
    image[0, 0, 0] = seed / 255.0
    label = rng.integers(0, classes, (h, w)).astype(np.float32)
    label[0] = -1
    depth = rng.uniform(0.5, 5.0, (h, w, 1)).astype(np.float32)
    depth[:, 0] = 0
    normal = rng.normal(size=(h, w, 3)).astype(np.float32)
    normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
    normal[:, 0] = 0
    return {"image": image, "label": label, "depth": depth, "normal": normal}


def write_release(root, name, n_train=3, n_val=2, classes=13, normals=True, label_dir="label", h=H, w=W):
    files = {}
    for split, n, offset in (("train", n_train, 0), ("val", n_val, 100)):
        for i in range(n):
            arrays = _arrays(offset + i, classes, h, w)
            if not normals:
                arrays.pop("normal")
            files[(split, i)] = arrays
            for part, arr in arrays.items():
                folder = root / name / split / (label_dir if part == "label" else part)
                folder.mkdir(parents=True, exist_ok=True)
                np.save(folder / f"{i}.npy", arr)
    return files


def data_cfg(root, **data):
    base = {"root": str(root), "val_size": 1, "train_size": 100, "test_size": 100, "image_size": 999}
    base.update(data)
    return validate(OmegaConf.create({"data": base}), TrainConfig).data


def _check_sample(split, j, arrays, normals=True):
    img = split["image"][j]
    assert img.dtype == torch.uint8 and tuple(img.shape) == (3, H, W)
    expected = np.rint(arrays["image"] * 255).astype(np.uint8).transpose(2, 0, 1)
    assert np.array_equal(img.numpy(), expected)
    seg = split["seg"][j]
    assert seg.dtype == torch.int64
    assert torch.all(seg[0] == 255)
    assert np.array_equal(seg[1:].numpy(), arrays["label"][1:].astype(np.int64))
    depth = split["depth"][j]
    assert depth.dtype == torch.float32 and tuple(depth.shape) == (H, W)
    assert np.array_equal(depth.numpy(), arrays["depth"][..., 0])
    assert not (depth[:, 0] > 0).any() and (depth[:, 1:] > 0).all()
    if normals:
        normal = split["normal"][j]
        assert normal.dtype == torch.float16 and tuple(normal.shape) == (3, H, W)
        assert torch.all(normal[:, :, 0] == 0) and normal[:, :, 1:].ne(0).any(0).all()
        assert np.allclose(normal.float().numpy(), arrays["normal"].transpose(2, 0, 1), atol=1e-3)


def test_nyuv2_tiny_release_values_splits_targets(tmp_path):
    files = write_release(tmp_path, "nyuv2")
    bundle = build_data(data_cfg(tmp_path, name="nyuv2"))
    assert bundle.name == "nyuv2"
    assert bundle.size("train") == 2 and bundle.size("val") == 1 and bundle.size("test") == 2
    train, val, test = (bundle.splits[s] for s in ("train", "val", "test"))
    # train = release train 0, 1; val = the last release train file (2); test = release val 0, 1
    assert [int(s["image"][j, 0, 0, 0]) for s, j in ((train, 0), (train, 1), (val, 0), (test, 0), (test, 1))] \
        == [0, 1, 2, 100, 101]
    _check_sample(train, 1, files[("train", 1)])
    _check_sample(val, 0, files[("train", 2)])
    _check_sample(test, 1, files[("val", 1)])
    assert set(bundle.targets) == {"seg", "depth", "normal"}
    seg, depth, normal = bundle.targets["seg"], bundle.targets["depth"], bundle.targets["normal"]
    assert seg.kind == "segmentation" and seg.num_classes == 13 and len(seg.class_names) == 13
    assert normal.kind == "normals" and depth.kind == "depth"
    valid = np.concatenate([files[("train", i)]["depth"][:, 1:].ravel() for i in (0, 1)])
    assert depth.mean == pytest.approx(valid.mean(), rel=1e-5)
    assert depth.std == pytest.approx(valid.std(ddof=1), rel=1e-4)
    # sizes are upper limits; the fingerprint follows the data
    small = build_data(data_cfg(tmp_path, name="nyuv2", train_size=1, test_size=1))
    assert small.size("train") == 1 and small.size("val") == 1 and small.size("test") == 1
    assert small.fingerprint != bundle.fingerprint


def test_cityscapes_seven_classes_no_normals_and_label_7_folder(tmp_path):
    files = write_release(tmp_path, "cityscapes", n_train=4, classes=7, normals=False, label_dir="label_7")
    bundle = build_data(data_cfg(tmp_path, name="cityscapes", val_size=2))
    assert set(bundle.targets) == {"seg", "depth"} and "normal" not in bundle.splits["train"]
    assert bundle.targets["seg"].num_classes == 7
    assert bundle.size("train") == 2 and bundle.size("val") == 2 and bundle.size("test") == 2
    _check_sample(bundle.splits["val"], 1, files[("train", 3)], normals=False)
    _check_sample(bundle.splits["test"], 0, files[("val", 0)], normals=False)


def test_missing_folder_is_one_line_error_naming_layout(tmp_path):
    with pytest.raises(KdmtlError) as err:
        build_data(data_cfg(tmp_path, name="nyuv2"))
    message = str(err.value)
    assert "\n" not in message and "nyuv2/{train,val}/{image,label,depth,normal}/<i>.npy" in message
    assert "github.com/lorenmt/mtan" in message
    write_release(tmp_path, "cityscapes", classes=7, normals=False)
    (tmp_path / "cityscapes" / "val" / "depth" / "1.npy").unlink()
    with pytest.raises(KdmtlError, match="1.npy"):
        build_data(data_cfg(tmp_path, name="cityscapes"))


def test_bad_labels_and_val_size(tmp_path):
    write_release(tmp_path, "cityscapes", classes=13, normals=False)  # labels up to 12 > 6
    with pytest.raises(KdmtlError, match="labels outside -1..6"):
        build_data(data_cfg(tmp_path, name="cityscapes"))
    write_release(tmp_path, "nyuv2")
    with pytest.raises(KdmtlError, match="val_size"):
        build_data(data_cfg(tmp_path, name="nyuv2", val_size=3))
