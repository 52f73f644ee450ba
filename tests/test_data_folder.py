"""data=folder: a user's images and label files listed in one CSV / JSONL manifest
(kdmtl_cli/data/folder.py). Small real files are written to tmp_path; the builder is called
directly and its tensors compared with expectations computed here (PIL's NEAREST resize for the
dense maps, PIL's BILINEAR for images within one grey level)."""

from __future__ import annotations

import csv
import json
from dataclasses import fields, make_dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from kdmtl_cli.data import DATASETS, TargetSpec
from kdmtl_cli.data.folder import FolderSettings, build_folder
from kdmtl_cli.errors import KdmtlError

try:                                        # the common `data` keys (schema.py)
    from kdmtl_cli.schema import DataCommon as _Common
except ImportError:                         # pragma: no cover - before the plug-in schema
    from kdmtl_cli.schema import DataConfig as _Common

REPO = Path(__file__).resolve().parents[1]
FolderDataConfig = make_dataclass("FolderDataConfig", [], bases=(FolderSettings, _Common))

S = 8  # data.image_size
TARGETS = {
    "cls": {"kind": "classification", "classes": ["cat", "dog", "bird"]},
    "tags": {"kind": "multilabel", "classes": 4},
    "seg": {"kind": "segmentation", "classes": 5},
    "depth": {"kind": "depth"},
    "normal": {"kind": "normals"},
    "age": {"kind": "regression"},
}

# One row per image: split, (H, W), image mode, cls cell, tags (ids), seg / depth / normal file
# format (None: empty cell), age. Sizes differ; no val rows after the two marked ones.
ROWS = [
    ("train", (8, 16), "RGB", 0, [1, 3], "png", "png16", "npy", 3.5),
    ("train", (12, 8), "L", "dog", [], "npy", "npy", "png", 7.0),
    ("train", (10, 20), "RGBA", 2, [0, 2], "pngP", None, None, 1.25),
    ("train", (8, 8), "RGB", 1, [2], None, "png8", "npy", -2.0),
    ("val", (16, 16), "RGB", 2, [0, 1, 2, 3], "png", "npy", "png", 0.5),
    ("val", (9, 9), "RGB", 0, [3], "png", "png16", "npy", 10.0),
    ("test", (8, 12), "P", 1, [1], "png", "npy", "npy", 4.0),
    ("test", (13, 7), "RGB", "bird", [0], "npy", "png16", "png", 2.0),
]


def make_cfg(tmp_path, **overrides):
    base = {"name": "folder", "root": str(tmp_path), "image_size": S, "train_size": 1000, "val_size": 1000,
            "test_size": 1000, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
            "targets": TARGETS, "manifest": "data/manifest.csv"}
    base.update(overrides)
    return OmegaConf.merge(OmegaConf.structured(FolderDataConfig), base)


def _write_image(path, arr, mode):
    if mode == "RGB":
        Image.fromarray(arr).save(path)
    elif mode == "L":
        Image.fromarray(arr[..., 0]).save(path)
    elif mode == "RGBA":
        alpha = np.full(arr.shape[:2] + (1,), 77, np.uint8)
        Image.fromarray(np.concatenate([arr, alpha], -1), mode="RGBA").save(path)
    elif mode == "P":
        Image.fromarray(arr).convert("P", palette=Image.ADAPTIVE, colors=16).save(path)


def write_dataset(folder: Path, seed: int = 0, rows=ROWS):
    """Files for `rows` under `folder` (img/, seg/, depth/, normal/); returns the manifest rows
    (dicts, cells as Python values) and the source arrays per row, as decoded here."""
    rng = np.random.default_rng(seed)
    for sub in ("img", "seg", "depth", "normal"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    manifest, sources = [], []
    for i, (split, (h, w), mode, cls, tags, seg_fmt, depth_fmt, normal_fmt, age) in enumerate(rows):
        src = {}
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        image_path = folder / "img" / f"{i}.png"
        _write_image(image_path, image, mode)
        src["image"] = np.asarray(Image.open(image_path).convert("RGB"))
        row = {"image": f"img/{i}.png", "split": split, "cls": cls, "tags": tags, "age": age}

        seg = rng.integers(0, 5, (h, w)).astype(np.uint8)
        seg[0, :3] = 255                                    # ignored pixels
        if seg_fmt is None:
            row["seg"], src["seg"] = None, np.full((h, w), 255, np.int64)
        else:
            name = f"seg/{i}.npy" if seg_fmt == "npy" else f"seg/{i}.png"
            if seg_fmt == "npy":
                np.save(folder / name, seg.astype(np.int32))
            elif seg_fmt == "pngP":
                im = Image.fromarray(seg, mode="L").convert("P")
                im.putpalette([c for k in range(256) for c in (k, 255 - k, (7 * k) % 256)])
                im.save(folder / name)
            else:
                Image.fromarray(seg, mode="L").save(folder / name)
            row["seg"], src["seg"] = name, seg.astype(np.int64)

        if depth_fmt is None:
            row["depth"], src["depth"] = None, np.zeros((h, w), np.float32)
        elif depth_fmt == "npy":
            depth = rng.uniform(0.5, 9.0, (h, w)).astype(np.float32)
            depth[:, 0] = 0
            depth[1, 1] = np.nan                            # read as 0 = invalid
            np.save(folder / f"depth/{i}.npy", depth)
            row["depth"] = f"depth/{i}.npy"
            src["depth"] = np.where(np.isfinite(depth), depth, 0).astype(np.float32)
        else:
            high = 65535 if depth_fmt == "png16" else 255
            raw = rng.integers(0, high + 1, (h, w))
            raw[:, 0] = 0
            raw[0, 0] = high
            Image.fromarray(raw.astype(np.uint16 if high > 255 else np.uint8)).save(folder / f"depth/{i}.png")
            row["depth"] = f"depth/{i}.png"
            src["depth"] = (raw.astype(np.float64) * 0.001).astype(np.float32)

        if normal_fmt is None:
            row["normal"], src["normal"] = None, np.zeros((h, w, 3), np.float32)
        elif normal_fmt == "npy":
            n = rng.normal(size=(h, w, 3)).astype(np.float32)
            n /= np.linalg.norm(n, axis=-1, keepdims=True)
            n[0] = 0                                        # invalid row
            np.save(folder / f"normal/{i}.npy", n)
            row["normal"], src["normal"] = f"normal/{i}.npy", n
        else:
            rgb = rng.integers(1, 256, (h, w, 3), dtype=np.uint8)
            rgb[-1, -1] = 0                                 # black = invalid
            Image.fromarray(rgb).save(folder / f"normal/{i}.png")
            n = rgb.astype(np.float32) / 255.0 * 2.0 - 1.0
            n[-1, -1] = 0
            row["normal"], src["normal"] = f"normal/{i}.png", n
        manifest.append(row)
        sources.append(src)
    return manifest, sources


def write_csv(path: Path, rows, columns=None):
    columns = columns or ["image", "split", "cls", "tags", "seg", "depth", "normal", "age"]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for k, row in enumerate(rows):
            cells = []
            for c in columns:
                v = row.get(c)
                if c == "tags":
                    v = (" " if k % 2 else ";").join(map(str, v))   # both CSV separators
                cells.append("" if v is None else v)
            writer.writerow(cells)


def write_jsonl(path: Path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("folder") / "data"
    rows, sources = write_dataset(folder)
    write_csv(folder / "manifest.csv", rows)
    write_jsonl(folder / "manifest.jsonl", rows)
    return folder, rows, sources


# --- independent expectations ----------------------------------------------------------------------

def plan(h, w, resize):
    """(resized h, resized w, top, left): the rule stated in the module docstring."""
    if resize == "stretch":
        return S, S, 0, 0
    if h <= w:
        nw = round(w * S / h)
        return S, nw, 0, (nw - S) // 2
    nh = round(h * S / w)
    return nh, S, (nh - S) // 2, 0


def nearest(arr2d, p):
    nh, nw, top, left = p
    out = Image.fromarray(np.asarray(arr2d, np.float32), mode="F").resize((nw, nh), Image.NEAREST)
    return np.asarray(out)[top:top + S, left:left + S]


def bilinear(rgb, p):
    nh, nw, top, left = p
    return np.asarray(Image.fromarray(rgb).resize((nw, nh), Image.BILINEAR))[top:top + S, left:left + S]


def expected_sample(row, src, resize):
    h, w = src["image"].shape[:2]
    p = plan(h, w, resize)
    names = TARGETS["cls"]["classes"]
    tags = np.zeros(4, np.uint8)
    tags[row["tags"]] = 1
    return {
        "image": bilinear(src["image"], p).transpose(2, 0, 1),
        "cls": names.index(row["cls"]) if isinstance(row["cls"], str) else row["cls"],
        "tags": tags,
        "seg": nearest(src["seg"], p).astype(np.int64),
        "depth": nearest(src["depth"], p).astype(np.float32),
        "normal": np.stack([nearest(src["normal"][..., c], p) for c in range(3)]).astype(np.float16),
        "age": np.float32(row["age"]),
    }


def check_split(split, indices, rows, sources, resize):
    assert split["image"].shape == (len(indices), 3, S, S) and split["image"].dtype == torch.uint8
    dtypes = {"cls": torch.int64, "tags": torch.uint8, "seg": torch.int64, "depth": torch.float32,
              "normal": torch.float16, "age": torch.float32}
    for name, dtype in dtypes.items():
        assert split[name].dtype == dtype, name
        assert split[name].shape[0] == len(indices)
    for j, i in enumerate(indices):
        exp = expected_sample(rows[i], sources[i], resize)
        diff = np.abs(split["image"][j].numpy().astype(int) - exp["image"].astype(int))
        assert diff.max() <= 1, (i, diff.max())
        assert int(split["cls"][j]) == exp["cls"]
        assert np.array_equal(split["tags"][j].numpy(), exp["tags"])
        assert np.array_equal(split["seg"][j].numpy(), exp["seg"]), i
        assert np.array_equal(split["depth"][j].numpy(), exp["depth"]), i
        assert np.array_equal(split["normal"][j].numpy(), exp["normal"]), i
        assert split["age"][j].item() == exp["age"]


# --- reading -------------------------------------------------------------------------------------

def test_registered_with_its_settings():
    assert DATASETS.get("folder") is build_folder
    assert DATASETS.settings("folder") is FolderSettings
    assert DATASETS.trait("folder", "no_validation_ok")      # data.val_size=0: an empty val split
    common = {f.name for f in fields(_Common)}
    assert not common & {f.name for f in fields(FolderSettings)}


@pytest.mark.parametrize("manifest", ["data/manifest.csv", "data/manifest.jsonl"])
@pytest.mark.parametrize("resize", ["stretch", "shorter_center_crop"])
def test_every_target_kind(dataset, manifest, resize):
    folder, rows, sources = dataset
    data = build_folder(make_cfg(folder.parent, manifest=manifest, resize=resize, val_size=5))
    assert data.name == "folder" and data.info == {"path": str(folder.parent / manifest)}
    assert data.mean == [0.485, 0.456, 0.406] and data.std == [0.229, 0.224, 0.225]
    check_split(data.splits["train"], [0, 1, 2, 3], rows, sources, resize)
    check_split(data.splits["val"], [4, 5], rows, sources, resize)
    check_split(data.splits["test"], [6, 7], rows, sources, resize)

    t = data.targets
    assert t["cls"] == TargetSpec("classification", 3, ["cat", "dog", "bird"])
    assert t["tags"] == TargetSpec("multilabel", 4, None)
    assert t["seg"] == TargetSpec("segmentation", 5, None)
    assert t["normal"] == TargetSpec("normals")
    ages = torch.tensor([r[-1] for r in ROWS[:4]], dtype=torch.float64)
    assert t["age"].kind == "regression"
    assert t["age"].mean == pytest.approx(float(ages.mean())) and t["age"].std == pytest.approx(float(ages.std()))
    depth = data.splits["train"]["depth"].double()
    valid = depth[depth > 0]
    assert t["depth"].kind == "depth"
    assert t["depth"].mean == pytest.approx(float(valid.mean())) and t["depth"].std == pytest.approx(float(valid.std()))


def test_shorter_center_crop_without_resampling(dataset):
    """An image whose shorter side is image_size is only cropped: its centre pixels, exactly."""
    folder, _, sources = dataset
    data = build_folder(make_cfg(folder.parent, resize="shorter_center_crop"))
    img = sources[0]["image"]                                # 8 x 16 -> columns 4..11
    assert np.array_equal(data.splits["train"]["image"][0].numpy(), img[:, 4:12].transpose(2, 0, 1))
    assert np.array_equal(data.splits["train"]["seg"][0].numpy(), sources[0]["seg"][:, 4:12])
    img = sources[1]["image"]                                # 12 x 8 grey -> rows 2..9, replicated
    assert np.array_equal(data.splits["train"]["image"][1].numpy(), img[2:10].transpose(2, 0, 1))
    assert (data.splits["train"]["image"][1][0] == data.splits["train"]["image"][1][2]).all()
    # stretch of 8 x 16: every row, odd columns (nearest, pixel centres)
    data = build_folder(make_cfg(folder.parent, resize="stretch"))
    assert np.array_equal(data.splits["train"]["seg"][0].numpy(), sources[0]["seg"][:, 1::2])
    assert data.splits["train"]["seg"][0][0, 0] == 255       # the ignore label survives


def test_csv_and_jsonl_agree_and_fingerprint(dataset):
    folder, _, _ = dataset
    a = build_folder(make_cfg(folder.parent))
    b = build_folder(make_cfg(folder.parent, manifest="data/manifest.jsonl"))
    assert a.fingerprint == b.fingerprint and len(a.fingerprint) == 16
    for split in a.splits:
        for name, tensor in a.splits[split].items():
            assert torch.equal(tensor, b.splits[split][name]), (split, name)
    assert build_folder(make_cfg(folder.parent, resize="shorter_center_crop")).fingerprint != a.fingerprint
    # an absolute manifest path: data.root is not used
    c = build_folder(make_cfg("/nonexistent", manifest=str(folder / "manifest.csv")))
    assert c.fingerprint == a.fingerprint


def test_sizes_are_upper_limits_and_val_carved_from_train(tmp_path):
    folder = tmp_path / "data"
    rows, sources = write_dataset(folder)
    train_only = [r for r in rows if r["split"] != "val"]
    keep = [i for i, r in enumerate(rows) if r["split"] != "val"]
    write_csv(folder / "manifest.csv", train_only)
    srcs = [sources[i] for i in keep]
    # no val rows: val = the last val_size train rows, train = the first train_size before them
    data = build_folder(make_cfg(tmp_path, val_size=1, train_size=2, test_size=1))
    check_split(data.splits["train"], [0, 1], train_only, srcs, "stretch")
    check_split(data.splits["val"], [3], train_only, srcs, "stretch")
    check_split(data.splits["test"], [4], train_only, srcs, "stretch")
    # val_size=0: an empty val split, typed like the others
    data = build_folder(make_cfg(tmp_path, val_size=0))
    assert data.size("train") == 4 and data.size("val") == 0 and data.size("test") == 2
    val = data.splits["val"]
    assert val["image"].shape == (0, 3, S, S) and val["seg"].shape == (0, S, S) and val["normal"].shape == (0, 3, S, S)
    assert val["tags"].shape == (0, 4) and val["cls"].dtype == torch.int64 and val["normal"].dtype == torch.float16
    # with val rows: val is capped to the first val_size of them
    write_csv(folder / "manifest.csv", rows)
    data = build_folder(make_cfg(tmp_path, val_size=1))
    check_split(data.splits["val"], [4], rows, sources, "stretch")
    assert data.size("train") == 4


def test_yaml_keys_are_known_and_documented():
    conf = OmegaConf.load(REPO / "conf" / "data" / "folder.yaml")
    known = {f.name for f in fields(_Common)} | {f.name for f in fields(FolderSettings)}
    assert set(conf) <= known, set(conf) - known
    assert conf.name == "folder" and conf.manifest is None and dict(conf.targets) == {}
    assert list(conf.mean) == [0.485, 0.456, 0.406] and list(conf.std) == [0.229, 0.224, 0.225]
    assert conf.resize == "stretch" and conf.depth_scale == 0.001
    merged = OmegaConf.merge(OmegaConf.structured(FolderDataConfig), conf)   # types fit the schema
    assert merged.train_size == conf.train_size


# --- errors: one line naming the file and the manifest line ----------------------------------------

def _error(cfg) -> str:
    with pytest.raises(KdmtlError) as info:
        build_folder(cfg)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.fixture
def small(tmp_path):
    """Three rows (train, val, test) of 8 x 8 images with every target; returns (folder, rows)."""
    folder = tmp_path / "data"
    rows, _ = write_dataset(folder, rows=[ROWS[3][:5] + ("png", "npy", "npy", 1.0),
                                          ("val",) + ROWS[3][1:5] + ("png", "npy", "npy", 2.0),
                                          ("test",) + ROWS[3][1:5] + ("png", "png16", "png", 3.0)])
    return folder, rows


def _csv(folder, rows, **kw):
    write_csv(folder / "manifest.csv", rows, **kw)
    return folder / "manifest.csv"


def test_error_manifest_missing_or_unset(tmp_path):
    msg = _error(make_cfg(tmp_path, manifest="nope/m.csv"))
    assert f"{tmp_path / 'nope' / 'm.csv'} not found" in msg and "data.root" in msg
    assert "data.manifest" in _error(make_cfg(tmp_path, manifest=None))
    assert ".csv" in _error(make_cfg(tmp_path, manifest="m.txt"))


def test_error_manifest_unreadable(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "manifest.csv").write_bytes(b"image,split\n\xff\xfe\xfa,train\n")
    msg = _error(make_cfg(tmp_path))
    assert f"cannot read manifest {tmp_path / 'data' / 'manifest.csv'}" in msg
    (tmp_path / "data" / "manifest.jsonl").write_text('{"image": "a.png", "split": "train"}\n{oops\n')
    msg = _error(make_cfg(tmp_path, manifest="data/manifest.jsonl", targets={"age": "regression"}))
    assert "manifest.jsonl, line 1: no column 'age'" in msg
    (tmp_path / "data" / "manifest.jsonl").write_text('{"image": "a.png", "split": "train", "age": 1}\n{oops\n')
    msg = _error(make_cfg(tmp_path, manifest="data/manifest.jsonl", targets={"age": "regression"}))
    assert "manifest.jsonl, line 2: not valid JSON" in msg


def test_error_missing_column(small):
    folder, rows = small
    path = _csv(folder, rows, columns=["image", "split", "cls", "tags", "seg", "depth", "age"])
    msg = _error(make_cfg(folder.parent))
    assert f"manifest {path}, line 1: no column 'normal'" in msg and "data.targets" in msg
    write_jsonl(folder / "manifest.jsonl", [rows[0], {k: v for k, v in rows[1].items() if k != "age"}])
    msg = _error(make_cfg(folder.parent, manifest="data/manifest.jsonl"))
    assert "manifest.jsonl, line 2: no column 'age'" in msg


def test_error_unknown_split(small):
    folder, rows = small
    rows[2]["split"] = "testing"
    path = _csv(folder, rows)
    assert f"{path}, line 4: unknown split 'testing'" in _error(make_cfg(folder.parent))


def test_error_missing_image_or_mask_file(small):
    folder, rows = small
    rows[1]["image"] = "img/missing.png"
    path = _csv(folder, rows)
    msg = _error(make_cfg(folder.parent))
    assert f"{path}, line 3: image file {folder / 'img' / 'missing.png'} not found" in msg
    rows[1]["image"], rows[2]["seg"] = "img/1.png", "seg/none.png"
    _csv(folder, rows)
    msg = _error(make_cfg(folder.parent))
    assert f"{path}, line 4: seg (segmentation) file {folder / 'seg' / 'none.png'} not found" in msg


def test_error_not_an_image(small):
    folder, rows = small
    (folder / "img" / "1.png").write_text("not a picture")
    path = _csv(folder, rows)
    msg = _error(make_cfg(folder.parent))
    assert f"{path}, line 3: cannot read image {folder / 'img' / '1.png'} as an image" in msg


def test_error_mask_size_differs_from_image(small):
    folder, rows = small
    Image.fromarray(np.zeros((6, 8), np.uint8)).save(folder / "seg" / "0.png")
    path = _csv(folder, rows)
    msg = _error(make_cfg(folder.parent))
    assert f"{path}, line 2: seg map {folder / 'seg' / '0.png'} is 8x6 (WxH) but its image is 8x8" in msg
    np.save(folder / "depth" / "1.npy", np.ones((8, 9), np.float32))
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / "seg" / "0.png")
    msg = _error(make_cfg(folder.parent))
    assert f"{path}, line 3: depth map {folder / 'depth' / '1.npy'} is 9x8 (WxH)" in msg


def test_error_class_id_out_of_range(small):
    folder, rows = small
    rows[0]["cls"] = 3
    path = _csv(folder, rows)
    msg = _error(make_cfg(folder.parent))
    assert f"{path}, line 2: cls class id 3 is outside [0, 3)" in msg and "data.targets.cls.classes" in msg
    rows[0]["cls"], rows[1]["tags"] = "parrot", [4]
    _csv(folder, rows)
    assert f"{path}, line 2: cls='parrot' is not a class id" in _error(make_cfg(folder.parent))
    rows[0]["cls"] = 1
    _csv(folder, rows)
    assert f"{path}, line 3: tags label id 4 is outside [0, 4)" in _error(make_cfg(folder.parent))
    rows[1]["tags"] = [1]
    seg = np.zeros((8, 8), np.uint8)
    seg[2, 3], seg[0, 0] = 5, 255                          # 255 is fine, 5 is not
    Image.fromarray(seg).save(folder / "seg" / "2.png")
    _csv(folder, rows)
    msg = _error(make_cfg(folder.parent))
    assert f"{path}, line 4: seg mask {folder / 'seg' / '2.png'} holds class id 5, outside [0, 5)" in msg
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / "seg" / "2.png")
    rows[2]["age"] = "n/a"
    write_jsonl(folder / "manifest.jsonl", rows)
    msg = _error(make_cfg(folder.parent, manifest="data/manifest.jsonl"))
    assert "manifest.jsonl, line 3: age='n/a' is not a finite number" in msg


def test_error_declared_target_kinds(small):
    folder, rows = small
    _csv(folder, rows)
    bad = {**TARGETS, "age": {"kind": "scalar"}}
    msg = _error(make_cfg(folder.parent, targets=bad))
    assert "data.targets.age.kind='scalar'" in msg and "regression" in msg
    bad = {**TARGETS, "seg": {"kind": "segmentation"}}
    assert "data.targets.seg (segmentation) needs classes" in _error(make_cfg(folder.parent, targets=bad))
    bad = {**TARGETS, "age": {"kind": "regression", "clases": 2}}
    assert "data.targets.age: unknown key clases" in _error(make_cfg(folder.parent, targets=bad))
    assert "data.targets is empty" in _error(make_cfg(folder.parent, targets={}))
    assert "data.resize='crop'" in _error(make_cfg(folder.parent, resize="crop"))


def test_error_split_without_rows(small):
    folder, rows = small
    path = _csv(folder, rows[:2])
    assert f"manifest {path} has no test rows; add rows with split=test" in _error(make_cfg(folder.parent))
    path = _csv(folder, [rows[0], rows[2]])
    msg = _error(make_cfg(folder.parent, val_size=1000000))
    assert f"manifest {path} has no val rows" in msg and "data.val_size=" in msg


def _literal_block(text: str, marker: str) -> str:
    """The indented literal block after the line of the docstring that contains `marker`."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if marker in line) + 1
    block = []
    for line in lines[start:]:
        if line.strip() and not line.startswith("    "):
            break
        block.append(line[4:])
    return "\n".join(block).strip() + "\n"


def test_docstring_example_builds(tmp_path):
    """The manifest examples of the module docstring are valid, and say the same thing."""
    import kdmtl_cli.data.folder as folder_module

    doc = folder_module.__doc__
    targets = OmegaConf.to_container(OmegaConf.create(_literal_block(doc, "names the target columns")))["targets"]
    root = tmp_path / "my_data"
    for sub in ("img", "seg", "depth", "normal"):
        (root / sub).mkdir(parents=True)
    rng = np.random.default_rng(1)
    for k in range(1, 5):
        h, w = 10 + k, 14 - k
        ext = "png" if k == 2 else "jpg"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"img/{k:04d}.{ext}")
        Image.fromarray(rng.integers(0, 5, (h, w)).astype(np.uint8)).save(root / f"seg/{k:04d}.png")
        Image.fromarray(rng.integers(0, 9000, (h, w)).astype(np.uint16)).save(root / f"depth/{k:04d}.png")
        np.save(root / f"depth/{k:04d}.npy", rng.uniform(0, 5, (h, w)).astype(np.float32))
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"normal/{k:04d}.png")
        np.save(root / f"normal/{k:04d}.npy", rng.uniform(-1, 1, (h, w, 3)).astype(np.float32))
    (root / "manifest.csv").write_text(_literal_block(doc, "my_data/manifest.csv"))
    (root / "manifest.jsonl").write_text(_literal_block(doc, "my_data/manifest.jsonl"))
    built = [build_folder(make_cfg(tmp_path, manifest=f"my_data/manifest.{ext}", targets=targets, val_size=1))
             for ext in ("csv", "jsonl")]
    assert built[0].fingerprint == built[1].fingerprint
    assert [built[0].size(s) for s in ("train", "val", "test")] == [2, 1, 1]
    assert built[0].splits["train"]["label"].tolist() == [0, 1]
    assert built[0].splits["val"]["tags"].tolist() == [[1, 0, 1, 0]]
    assert set(built[0].targets) == {"label", "tags", "seg", "depth", "normal", "age"}
