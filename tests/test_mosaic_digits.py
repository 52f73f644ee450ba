"""cifar_cls_seg mosaics (from tiny CIFAR-10 files) and digits_mtl pairs (scikit-learn digits)."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from test_cifar_data import (
    write_cifar10,  # tests/ is on sys.path (pytest rootdir-less import)
)

from kdmtl_cli.data import build_data
from kdmtl_cli.errors import KdmtlError
from kdmtl_cli.schema import TrainConfig, validate


def mosaic_cfg(root, **data):
    base = {"name": "cifar_cls_seg", "root": str(root), "download": False, "image_size": 32,
            "train_size": 12, "val_size": 4, "test_size": 4, "min_tiles": 2, "max_tiles": 4,
            "min_tile_size": 8, "max_tile_size": 20, "seed": 3}
    base.update(data)
    return validate(OmegaConf.create({"data": base}), TrainConfig).data


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    write_cifar10(root, per_batch=6, n_test=10)
    return root


@pytest.fixture(scope="module")
def mosaic(cifar_root):
    return build_data(mosaic_cfg(cifar_root))


def test_mosaic_targets_consistent_with_layout(mosaic):
    assert mosaic.targets["cls"].num_classes == 10 and mosaic.targets["seg"].num_classes == 11
    assert mosaic.targets["seg"].class_names[0] == "background"
    # tile pools: train mosaics from the first 27 CIFAR train images, val from the last 3, test from test
    pool_labels = {"train": {i % 10 for i in range(27)}, "val": {27 % 10, 28 % 10, 29 % 10},
                   "test": {(9 - i) % 10 for i in range(10)}}
    saw_background = False
    for split, tensors in mosaic.splits.items():
        assert tensors["image"].dtype == torch.uint8 and tensors["image"].shape[1:] == (3, 32, 32)
        seg, cls = tensors["seg"], tensors["cls"]
        for i in range(seg.shape[0]):
            present = set(torch.unique(seg[i]).tolist()) - {0}
            assert present and {c - 1 for c in present} <= pool_labels[split]
            saw_background |= bool((seg[i] == 0).any())
            area = torch.bincount(seg[i].flatten(), minlength=11)[1:]
            assert int(area[cls[i]]) == int(area.max()) > 0     # largest visible class
            # background pixels are grey (R = G = B); tile pixels carry the source's G = R + 100
            bg = seg[i] == 0
            img = tensors["image"][i].long()
            assert torch.equal(img[0][bg], img[1][bg])
    assert saw_background


def test_mosaic_tile_pixels_come_from_a_tile_of_that_class(cifar_root):
    # Without resizing (tile side 32 on a 40 canvas), a tile pixel's R value is its CIFAR image
    # index, whose label is index % 10: so seg - 1 must equal R % 10 wherever seg > 0.
    bundle = build_data(mosaic_cfg(cifar_root, image_size=40, min_tile_size=32, max_tile_size=32))
    for tensors in (bundle.splits["train"], bundle.splits["val"]):
        seg, red = tensors["seg"], tensors["image"][:, 0].long()
        fg = seg > 0
        assert fg.any() and (~fg).any()
        assert torch.equal(seg[fg] - 1, red[fg] % 10)


def test_mosaic_deterministic_and_cached(cifar_root, mosaic, tmp_path):
    again = build_data(mosaic_cfg(cifar_root, generate=False))   # read back from the cache
    assert again.fingerprint == mosaic.fingerprint
    for split in mosaic.splits:
        for key in ("image", "cls", "seg"):
            assert torch.equal(again.splits[split][key], mosaic.splits[split][key])
    other = build_data(mosaic_cfg(cifar_root, seed=4))
    assert other.fingerprint != mosaic.fingerprint
    assert not torch.equal(other.splits["train"]["seg"], mosaic.splits["train"]["seg"])
    assert (cifar_root / "cifar_cls_seg" / mosaic.fingerprint / "train.pt").is_file()


def test_mosaic_without_cifar_files_names_them(tmp_path):
    with pytest.raises(KdmtlError, match="data_batch_1.*cifar.html"):
        build_data(mosaic_cfg(tmp_path))


# ================================================================ digits_mtl
def digits_cfg(**data):
    base = {"name": "digits_mtl", "image_size": 24, "train_size": 40, "val_size": 10, "test_size": 10}
    base.update(data)
    return validate(OmegaConf.create({"data": base}), TrainConfig).data


def test_digits_targets_match_placement():
    pytest.importorskip("sklearn")
    from kdmtl_cli.data.digits import generate_pairs, load_digit_pool, split_pools

    images, labels = load_digit_pool()
    pool = split_pools(len(labels), 0)["train"]
    pairs = generate_pairs(images, labels, pool, 30, size=24, seed=1)
    assert torch.equal(pairs["left"], labels[pairs["source"][:, 0]])
    assert torch.equal(pairs["right"], labels[pairs["source"][:, 1]])
    assert set(pairs["source"].flatten().tolist()) <= set(pool.tolist())
    for i in range(30):
        seg = pairs["seg"][i]
        for owner, d in ((1, 0), (2, 1)):
            y0, x0, y1, x1 = pairs["box"][i, d].tolist()
            inside = torch.zeros(24, 24, dtype=torch.bool)
            inside[y0:y1, x0:x1] = True
            assert not ((seg == owner) & ~inside).any()
        left_box = pairs["box"][i, 0]
        assert left_box[0] <= 2 and left_box[1] <= 2 and pairs["box"][i, 1, 2] >= 22
        img = pairs["image"][i]
        assert torch.equal(img[0], img[1]) and torch.equal(img[0], img[2])
        assert torch.equal(seg == 0, img[0] == 0)   # background exactly where both digits are dark
    assert (pairs["seg"] == 1).any() and (pairs["seg"] == 2).any()


def test_digits_pools_disjoint_and_build_deterministic():
    pytest.importorskip("sklearn")
    from kdmtl_cli.data.digits import split_pools

    pools = split_pools(1797, 0)
    sets = [set(p.tolist()) for p in pools.values()]
    assert sum(len(s) for s in sets) == 1797 and len(set().union(*sets)) == 1797
    a, b = build_data(digits_cfg()), build_data(digits_cfg())
    assert a.fingerprint == b.fingerprint
    assert set(a.targets) == {"left", "right", "seg"} and a.targets["seg"].num_classes == 3
    for split in ("train", "val", "test"):
        for key in ("image", "left", "right", "seg"):
            assert torch.equal(a.splits[split][key], b.splits[split][key])
    assert a.splits["train"]["image"].shape == (40, 3, 24, 24) and a.splits["train"]["image"].dtype == torch.uint8


def test_digits_without_sklearn_says_pip_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(KdmtlError, match="pip install scikit-learn"):
        build_data(digits_cfg())
