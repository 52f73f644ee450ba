"""data=coco from a tiny fabricated COCO 2017 root: <root>/{train2017,val2017}/<file>,
<root>/annotations/instances_{train,val}2017.json. Expected masks are written down by hand:
pycocotools rasterises an axis-aligned rectangle polygon with integer corners (x0,y0)-(x1,y1)
as the pixels x0 <= x < x1, y0 <= y < y1 (checked below)."""

from __future__ import annotations

import builtins
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from kdmtl_cli.data import DATASETS, build_data, coco  # importing coco registers it
from kdmtl_cli.errors import KdmtlError
from kdmtl_cli.schema import TrainConfig, validate

pytest.importorskip("pycocotools")
from pycocotools import mask as mask_api

# pycocotools' own numpy-2 DeprecationWarning (mask.decode), not ours
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

REPO = Path(__file__).resolve().parents[1]

# COCO's own ids for these names; listed out of id order on purpose.
CATEGORIES = [{"id": 18, "name": "dog"}, {"id": 1, "name": "person"}, {"id": 27, "name": "backpack"},
              {"id": 3, "name": "car"}]
ALL = ["person", "car", "dog", "backpack"]            # category-id order: 1, 3, 18, 27
CID = {c["name"]: c["id"] for c in CATEGORIES}


def rect(x0, y0, x1, y1, h=8, w=8):
    m = np.zeros((h, w), dtype=np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


def poly(x0, y0, x1, y1):
    return [float(x0), float(y0), float(x1), float(y0), float(x1), float(y1), float(x0), float(y1)]


def uncompressed_rle(m):
    """COCO's uncompressed RLE (column-major run lengths, starting with zeros), as scripts/fake_coco.py writes it."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("fake_coco", Path(__file__).resolve().parents[1] / "scripts" / "fake_coco.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.uncompressed_rle(m)


def compressed_rle(m):
    rle = mask_api.encode(np.asfortranarray(m.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode()}


def ann(aid, image_id, name, segmentation, crowd=0):
    return {"id": aid, "image_id": image_id, "category_id": CID[name], "segmentation": segmentation,
            "iscrowd": crowd, "area": 0.0, "bbox": [0, 0, 1, 1]}


def make_coco(root: Path):
    """The fabricated root; returns {image id: the image array as the builder must read it}."""
    rng = np.random.default_rng(0)
    images = {}
    spec = {  # folder: [(id, file name, height, width)]
        "train2017": [(5, "000005.png", 8, 8), (2, "000002.jpg", 8, 8), (9, "000009.png", 8, 8),
                      (20, "000020.png", 6, 10), (12, "000012.png", 8, 8)],
        "val2017": [(11, "000011.png", 8, 8), (7, "000007.png", 8, 8), (3, "000003.png", 8, 8)],
    }
    anns = {
        "train2017": [
            ann(101, 5, "person", [poly(1, 1, 7, 7)]),                             # 36 px
            ann(102, 5, "car", [poly(2, 2, 4, 5)]),                                # 6 px, on top
            ann(103, 5, "dog", uncompressed_rle(rect(6, 0, 8, 8)), crowd=1),       # crowd -> 255
            ann(104, 9, "car", compressed_rle(rect(0, 4, 4, 8))),                  # 16 px
            ann(105, 9, "backpack", [poly(5, 0, 8, 3)]),                           # 9 px
            ann(106, 9, "person", [poly(0, 0, 2, 2), poly(6, 6, 8, 8)]),           # 8 px, two polygons
            ann(107, 12, "person", uncompressed_rle(rect(0, 2, 8, 6)), crowd=1),   # crowd only
            ann(108, 20, "dog", [poly(3, 1, 9, 5)]),
        ],
        "val2017": [
            ann(201, 7, "person", [poly(0, 0, 4, 8)]),                             # 32 px
            ann(202, 7, "car", [poly(3, 2, 8, 6)]),                                # 20 px, on top
            ann(203, 11, "dog", [poly(2, 2, 6, 6)]),
            ann(204, 11, "backpack", [poly(0, 0, 1, 1)]),
        ],
    }
    (root / "annotations").mkdir(parents=True)
    for folder, records in spec.items():
        (root / folder).mkdir()
        for image_id, name, h, w in records:
            array = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(array).save(root / folder / name)
            with Image.open(root / folder / name) as im:   # the JPEG as decoded
                images[image_id] = np.asarray(im.convert("RGB"))
        data = {"info": {}, "licenses": [], "categories": CATEGORIES, "annotations": anns[folder],
                "images": [{"id": i, "file_name": n, "height": h, "width": w} for i, n, h, w in records]}
        (root / "annotations" / f"instances_{folder}.json").write_text(json.dumps(data))
    return images


def seg_of(person=None, car=None, dog=None, backpack=None, crowd=None, h=8, w=8, classes=ALL):
    """A label map painted in the given order (later on top)."""
    out = np.zeros((h, w), dtype=np.int64)
    if crowd is not None:
        out[crowd > 0] = 255
    for name, m in (("person", person), ("car", car), ("dog", dog), ("backpack", backpack)):
        if m is not None and name in classes:
            out[m > 0] = classes.index(name) + 1
    return out


def data_cfg(root, **data):
    base = {"name": "coco", "root": str(root), "image_size": 8, "train_size": 100, "val_size": 2, "test_size": 100}
    base.update(data)
    return validate(OmegaConf.create({"data": base}), TrainConfig).data


def image_ids(bundle, split):
    return torch.load(Path(bundle.info["cache"]) / f"{split}.pt", weights_only=True)["image_id"].tolist()


def by_id(bundle, split, key):
    return {i: bundle.splits[split][key][j] for j, i in enumerate(image_ids(bundle, split))}


@pytest.fixture
def root(tmp_path):
    root = tmp_path / "coco"
    make_coco(root)
    return root


def test_pycocotools_rectangle_convention():
    rle = mask_api.merge(mask_api.frPyObjects([poly(2, 1, 6, 4)], 6, 8))
    assert np.array_equal(mask_api.decode(rle), rect(2, 1, 6, 4, h=6, w=8))


def test_all_categories_targets_masks_and_splits(tmp_path):
    root = tmp_path / "coco"
    images = make_coco(root)
    bundle = build_data(data_cfg(root))
    assert bundle.name == "coco" and len(bundle.fingerprint) == 16
    assert set(bundle.targets) == {"labels", "seg"}
    assert bundle.targets["labels"].kind == "multilabel" and bundle.targets["labels"].class_names == ALL
    assert bundle.targets["labels"].num_classes == 4
    assert bundle.targets["seg"].kind == "segmentation" and bundle.targets["seg"].num_classes == 5
    assert bundle.targets["seg"].class_names == ["background", *ALL]
    # Split rule: sorted ids 2, 5, 9, 12, 20 -> val = the last two; test = val2017.
    assert image_ids(bundle, "train") == [2, 5, 9] and image_ids(bundle, "val") == [12, 20]
    assert image_ids(bundle, "test") == [3, 7, 11]
    for split in ("train", "val", "test"):
        tensors = bundle.splits[split]
        assert set(tensors) == {"image", "labels", "seg"}
        n = bundle.size(split)
        assert tensors["image"].dtype == torch.uint8 and tuple(tensors["image"].shape) == (n, 3, 8, 8)
        assert tensors["seg"].dtype == torch.int64 and tuple(tensors["seg"].shape) == (n, 8, 8)
        assert tensors["labels"].dtype == torch.uint8 and tuple(tensors["labels"].shape) == (n, 4)

    seg = {**by_id(bundle, "train", "seg"), **by_id(bundle, "val", "seg"), **by_id(bundle, "test", "seg")}
    labels = {**by_id(bundle, "train", "labels"), **by_id(bundle, "val", "labels"), **by_id(bundle, "test", "labels")}
    image = {**by_id(bundle, "train", "image"), **by_id(bundle, "val", "image"), **by_id(bundle, "test", "image")}
    # Image 5: the crowd dog region is ignored, the person wins over it, the small car lies on the person.
    expected5 = seg_of(person=rect(1, 1, 7, 7), car=rect(2, 2, 4, 5), crowd=rect(6, 0, 8, 8))
    assert expected5[0, 7] == 255 and expected5[3, 6] == 1 and expected5[3, 7] == 255 and expected5[3, 3] == 2
    assert np.array_equal(seg[5].numpy(), expected5)
    # Image 9: compressed RLE car, backpack polygon at the border, person from two polygons.
    assert np.array_equal(seg[9].numpy(), seg_of(car=rect(0, 4, 4, 8), backpack=rect(5, 0, 8, 3),
                                                 person=rect(0, 0, 2, 2) | rect(6, 6, 8, 8)))
    assert np.array_equal(seg[12].numpy(), seg_of(crowd=rect(0, 2, 8, 6)))          # crowd only
    assert not seg[2].any() and not seg[3].any()                                      # no annotations
    assert np.array_equal(seg[7].numpy(), seg_of(person=rect(0, 0, 4, 8), car=rect(3, 2, 8, 6)))
    assert np.array_equal(seg[11].numpy(), seg_of(dog=rect(2, 2, 6, 6), backpack=rect(0, 0, 1, 1)))
    # Labels: crowd annotations count; order person, car, dog, backpack.
    expected_labels = {2: [0, 0, 0, 0], 5: [1, 1, 1, 0], 9: [1, 1, 0, 1], 12: [1, 0, 0, 0], 20: [0, 0, 1, 0],
                       3: [0, 0, 0, 0], 7: [1, 1, 0, 0], 11: [0, 0, 1, 1]}
    assert {i: v.tolist() for i, v in labels.items()} == expected_labels
    # Square images are stored as read (PNG and JPEG as decoded).
    for i in (2, 5, 9, 12, 3, 7, 11):
        assert np.array_equal(image[i].numpy(), images[i].transpose(2, 0, 1)), i
    # Image 20 (10 x 6): bilinear (antialiased) image, nearest label map, as PIL resizes them.
    pil = np.asarray(Image.fromarray(images[20]).resize((8, 8), Image.BILINEAR)).astype(int)
    assert np.abs(image[20].numpy().transpose(1, 2, 0).astype(int) - pil).max() <= 1
    full = seg_of(dog=rect(3, 1, 9, 5, h=6, w=10), h=6, w=10).astype(np.uint8)
    nearest = np.asarray(Image.fromarray(full).resize((8, 8), Image.NEAREST)).astype(np.int64)
    assert np.array_equal(seg[20].numpy(), nearest) and (nearest == 3).any()


def test_category_subset_and_pascal_preset(root):
    # Given out of id order; classes follow category ids. Car and backpack become background.
    bundle = build_data(data_cfg(root, categories=["dog", "person"]))
    assert bundle.targets["seg"].class_names == ["background", "person", "dog"]
    assert bundle.targets["labels"].class_names == ["person", "dog"]
    keep = ["person", "dog"]
    seg = by_id(bundle, "train", "seg")
    assert np.array_equal(seg[5].numpy(), seg_of(person=rect(1, 1, 7, 7), crowd=rect(6, 0, 8, 8), classes=keep))
    assert np.array_equal(seg[9].numpy(), seg_of(person=rect(0, 0, 2, 2) | rect(6, 6, 8, 8), classes=keep))
    assert [v.tolist() for v in by_id(bundle, "train", "labels").values()] == [[0, 0], [1, 1], [1, 0]]
    # A preset names categories the file must have (real COCO has all 20): refused here, ...
    with pytest.raises(KdmtlError) as err:
        build_data(data_cfg(root, category_set="pascal20"))
    assert "unknown COCO category 'airplane'" in one_line(err)
    # ... so give both files the 17 VOC categories they lack (ids 100.., no annotations).
    assert len(coco.PASCAL20) == 20 and len(set(coco.PASCAL20)) == 20
    others = [n for n in coco.PASCAL20 if n not in CID]
    for folder in ("train2017", "val2017"):
        path = root / "annotations" / f"instances_{folder}.json"
        data = json.loads(path.read_text())
        data["categories"] += [{"id": 100 + i, "name": n} for i, n in enumerate(others)]
        path.write_text(json.dumps(data))
    pascal = build_data(data_cfg(root, category_set="pascal20"))
    names = ["person", "car", "dog", *others]      # backpack (not a VOC class) is dropped
    assert pascal.targets["labels"].class_names == names and pascal.targets["seg"].num_classes == 21
    assert np.array_equal(by_id(pascal, "train", "seg")[9].numpy(),
                          seg_of(car=rect(0, 4, 4, 8), person=rect(0, 0, 2, 2) | rect(6, 6, 8, 8), classes=names))
    assert by_id(pascal, "train", "labels")[9].tolist() == [1, 1] + [0] * 18
    assert pascal.fingerprint != bundle.fingerprint


def test_with_cls_drop_empty_and_size_limits(root):
    # with_cls: images without a non-crowd kept instance (2: none, 12: crowd only) are dropped.
    bundle = build_data(data_cfg(root, with_cls=True, val_size=1))
    assert bundle.targets["cls"].kind == "classification" and bundle.targets["cls"].class_names == ALL
    assert image_ids(bundle, "train") == [5, 9] and image_ids(bundle, "val") == [20]
    assert image_ids(bundle, "test") == [7, 11]
    cls = {**by_id(bundle, "train", "cls"), **by_id(bundle, "val", "cls"), **by_id(bundle, "test", "cls")}
    # the largest non-crowd instance: person (36 px, not the 16 px crowd), car (16 of 16/9/8), dog, person, dog
    assert {i: int(v) for i, v in cls.items()} == {5: 0, 9: 1, 20: 2, 7: 0, 11: 2}
    assert bundle.splits["train"]["cls"].dtype == torch.int64
    # drop_empty: only the images without any kept annotation go (12's crowd counts).
    dropped = build_data(data_cfg(root, drop_empty=True, val_size=1))
    assert image_ids(dropped, "train") == [5, 9, 12] and image_ids(dropped, "val") == [20]
    assert image_ids(dropped, "test") == [7, 11] and "cls" not in dropped.targets
    # sizes are upper limits, the first images by id
    capped = build_data(data_cfg(root, train_size=2, test_size=2))
    assert image_ids(capped, "train") == [2, 5] and image_ids(capped, "val") == [12, 20]
    assert image_ids(capped, "test") == [3, 7]


def _block_decoding(monkeypatch):
    """Make pycocotools unimportable and image files unreadable."""
    monkeypatch.setitem(sys.modules, "pycocotools", None)
    monkeypatch.setitem(sys.modules, "pycocotools.mask", None)

    def no_open(*args, **kwargs):
        raise AssertionError("an image was opened on a cache hit")

    monkeypatch.setattr(Image, "open", no_open)


def test_cache_hit_needs_neither_pycocotools_nor_images(root, monkeypatch):
    first = build_data(data_cfg(root, with_cls=True, val_size=1))
    folder = Path(first.info["cache"])
    assert folder.parent == root / ".kdmtl" and folder.name == first.fingerprint
    assert {p.name for p in folder.iterdir()} == {"meta.json", "train.pt", "val.pt", "test.pt"}
    _block_decoding(monkeypatch)
    second = build_data(data_cfg(root, with_cls=True, val_size=1))
    assert second.fingerprint == first.fingerprint and second.targets == first.targets
    for split in ("train", "val", "test"):
        assert set(second.splits[split]) == set(first.splits[split])
        for key, tensor in first.splits[split].items():
            assert second.splits[split][key].dtype == tensor.dtype and torch.equal(second.splits[split][key], tensor)
    # Other settings, or other annotation bytes: another fingerprint, so decoding (pycocotools) again.
    with pytest.raises(KdmtlError, match=r"^data=coco needs pycocotools: pip install 'kdmtl\[coco\]'$"):
        build_data(data_cfg(root, with_cls=True, val_size=1, image_size=16))
    path = root / "annotations" / "instances_val2017.json"
    path.write_text(path.read_text() + " ")
    with pytest.raises(KdmtlError, match="needs pycocotools"):
        build_data(data_cfg(root, with_cls=True, val_size=1))


def test_cache_root_setting(root, tmp_path):
    bundle = build_data(data_cfg(root, cache_root=str(tmp_path / "elsewhere")))
    assert Path(bundle.info["cache"]) == tmp_path / "elsewhere" / bundle.fingerprint
    assert not (root / ".kdmtl").exists()


def test_thread_pool_decodes_as_the_serial_loop(root, tmp_path, monkeypatch):
    serial = build_data(data_cfg(root, cache_root=str(tmp_path / "a")))
    monkeypatch.setattr(coco, "SERIAL_BELOW", 1)
    pooled = build_data(data_cfg(root, cache_root=str(tmp_path / "b")))
    assert pooled.fingerprint == serial.fingerprint
    for split in ("train", "val", "test"):
        for key, tensor in serial.splits[split].items():
            assert torch.equal(pooled.splits[split][key], tensor)


def test_unwritable_cache(root, tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(KdmtlError) as err:
        build_data(data_cfg(root, cache_root=str(tmp_path / "file")))
    assert f"cannot write the COCO cache to {tmp_path / 'file'}" in one_line(err)
    assert "set data.cache_root to a writable directory" in one_line(err)


def one_line(err) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


def test_missing_files_name_the_path(root):
    (root / "train2017" / "000009.png").unlink()
    with pytest.raises(KdmtlError) as err:
        build_data(data_cfg(root))
    assert f"COCO image not found: {root / 'train2017' / '000009.png'}" in one_line(err)
    (root / "annotations" / "instances_val2017.json").unlink()
    with pytest.raises(KdmtlError) as err:
        build_data(data_cfg(root))
    assert f"COCO annotation file not found: {root / 'annotations' / 'instances_val2017.json'}" in one_line(err)
    with pytest.raises(KdmtlError) as err:
        build_data(data_cfg(root.parent / "nowhere"))
    assert "instances_train2017.json" in one_line(err) and "https://cocodataset.org" in one_line(err)


@pytest.mark.parametrize("data, message", [
    ({"categories": ["person", "sofa"]}, "unknown COCO category 'sofa'"),
    ({"categories": ["person", "dgo"]}, "did you mean dog?"),
    ({"categories": ["dog", "dog"]}, "names dog more than once"),
    ({"categories": []}, "empty list"),
    ({"categories": ["dog"], "category_set": "pascal20"}, "both choose the categories"),
    ({"category_set": "voc"}, "data.category_set=voc: choose one of all, pascal20"),
    ({"val_size": 5}, "data.val_size must be between 1 and 4"),
])
def test_setting_errors(root, data, message):
    with pytest.raises(KdmtlError) as err:
        build_data(data_cfg(root, **data))
    assert message in one_line(err)


def test_mismatched_image_size_and_bad_json(root):
    Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(root / "train2017" / "000005.png")
    with pytest.raises(KdmtlError) as err:
        build_data(data_cfg(root))
    assert "000005.png is 4x4 but its annotation file says 8x8" in one_line(err)
    (root / "annotations" / "instances_train2017.json").write_text("{not json")
    with pytest.raises(KdmtlError) as err:
        build_data(data_cfg(root))
    assert "instances_train2017.json is not readable json" in one_line(err)


def test_registration_and_yaml(tmp_path):
    assert DATASETS.settings("coco") is coco.CocoSettings
    conf = OmegaConf.load(REPO / "conf" / "data" / "coco.yaml")
    assert conf.name == "coco" and conf.image_size == 224 and conf.batch_size == 32 and conf.eval_batch_size == 64
    assert list(conf.resized_crop_scale) == [0.08, 1.0] and conf.hflip is True
    assert list(conf.mean) == [0.485, 0.456, 0.406] and list(conf.std) == [0.229, 0.224, 0.225]
    conf.root = str(tmp_path)
    cfg = validate(OmegaConf.create({"data": OmegaConf.to_container(conf)}), TrainConfig).data
    for key in ("category_set", "categories", "drop_empty", "with_cls", "cache_root"):
        assert key in conf and cfg[key] == getattr(coco.CocoSettings(), key)     # the yaml keeps the defaults
    # every key is commented in the yaml
    for line in (REPO / "conf" / "data" / "coco.yaml").read_text().splitlines():
        if line and not line.startswith("#") and not line.startswith(("mean:", "std:")):
            assert "#" in line, line


def test_missing_pycocotools_message(root, monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.startswith("pycocotools"):
            raise ImportError("No module named 'pycocotools'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(KdmtlError) as err:
        build_data(data_cfg(root))
    assert one_line(err) == "data=coco needs pycocotools: pip install 'kdmtl[coco]'"
