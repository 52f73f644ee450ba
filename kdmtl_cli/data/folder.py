"""`folder`: your own images and labels, listed in one manifest file; no code to write.

The manifest (``data.manifest``: absolute, or relative to ``data.root``) is a CSV file with a
header row (``.csv``) or a JSON-lines file, one JSON object per line (``.jsonl``). Every row is
one image:

- ``image``: the image file, relative to the manifest's folder (or absolute); any format PIL
  reads (PNG, JPEG, BMP, TIFF...), converted to RGB (grey replicated, alpha dropped; EXIF
  orientation is not applied: the pixels as stored);
- ``split``: ``train``, ``val`` or ``test``;
- one column per target declared in ``data.targets`` (other columns are ignored).

``data.targets`` names the target columns and their task kind::

    targets:
      label: {kind: classification, classes: [cat, dog, bird]}   # classes: a count or the names
      tags:  {kind: multilabel, classes: 4}
      seg:   {kind: segmentation, classes: 5}
      depth: {kind: depth}
      normal: {kind: normals}
      age:   {kind: regression}

A target's cell, by kind (the tensor each becomes, per image, is in brackets):

- ``classification``: a class id in [0, classes) (or, when ``classes`` lists names, a name)
  [int64];
- ``multilabel``: the ids (or names) of the labels present: a JSON list in JSONL; in CSV ids
  (or names without spaces) separated by spaces, ``;`` or ``,``; empty = none present [uint8
  0/1 vector of `classes`];
- ``segmentation``: a single-channel PNG (mode L or P: the stored index is the class id, not
  the palette colour) or an integer ``.npy`` [H,W] of class ids in [0, classes); 255 = ignored
  pixel [int64 HxW];
- ``depth``: a single-channel PNG (8- or 16-bit), stored value x ``data.depth_scale`` (default
  0.001: millimetres to metres, as Kinect / RealSense PNGs), or a float ``.npy`` [H,W] (or a
  32-bit float TIFF) read as is, NaN / inf becoming 0; 0 = no measurement, negative values are
  refused [float32 HxW];
- ``normals``: a float ``.npy`` [H,W,3] of (x right, y down, z away from the camera) in
  [-1, 1], or an 8-bit RGB PNG mapped by v / 255 * 2 - 1, where a black (0, 0, 0) pixel is an
  invalid (all-zero) normal; all-zero = invalid [float16 3xHxW];
- ``regression``: a finite number [float32].

Dense maps (segmentation, depth, normals) must have their image's size; their cell may be left
empty (JSON null) for an image without that label: every pixel ignored / invalid.

Example, ``my_data/manifest.csv`` (quote a cell holding commas)::

    image,split,label,tags,seg,depth,normal,age
    img/0001.jpg,train,0,1 3,seg/0001.png,depth/0001.png,normal/0001.npy,3.5
    img/0002.png,train,dog,,seg/0002.png,depth/0002.npy,normal/0002.png,7
    img/0003.jpg,val,2,0;2,seg/0003.png,,normal/0003.npy,1.25
    img/0004.jpg,test,1,2,seg/0004.png,depth/0004.png,,4

the same as ``my_data/manifest.jsonl``::

    {"image": "img/0001.jpg", "split": "train", "label": 0, "tags": [1, 3], "seg": "seg/0001.png", "depth": "depth/0001.png", "normal": "normal/0001.npy", "age": 3.5}
    {"image": "img/0002.png", "split": "train", "label": "dog", "tags": [], "seg": "seg/0002.png", "depth": "depth/0002.npy", "normal": "normal/0002.png", "age": 7}
    {"image": "img/0003.jpg", "split": "val", "label": 2, "tags": [0, 2], "seg": "seg/0003.png", "depth": null, "normal": "normal/0003.npy", "age": 1.25}
    {"image": "img/0004.jpg", "split": "test", "label": 1, "tags": [2], "seg": "seg/0004.png", "depth": "depth/0004.png", "normal": null, "age": 4}

To use it, put two YAMLs in a config directory ``myconf/``: ``myconf/data/my_data.yaml``::

    defaults: [folder, _self_]
    manifest: /abs/path/my_data/manifest.csv
    targets:
      label: {kind: classification, classes: [cat, dog, bird]}
      seg: {kind: segmentation, classes: 5}

and ``myconf/tasks/my_tasks.yaml`` (tasks reading those targets)::

    label: {kind: classification}
    seg: {kind: segmentation}

then ``kdmtl train --config-dir myconf data=my_data tasks=my_tasks``. The same keys may be given
on the command line: ``data=folder data.manifest=... 'data.targets={label: {kind: ...}}'``.
A target given as its kind alone (``depth: depth``) is short for ``{kind: depth}``.

Size: every image is brought to ``data.image_size`` x ``data.image_size`` by ``data.resize``:

- ``stretch``: resized to image_size x image_size (the aspect ratio is not kept);
- ``shorter_center_crop``: resized so that its shorter side is image_size (the longer side
  long * image_size / short, rounded half up), then the centre image_size x image_size window is kept
  (offset (new_long - image_size) // 2).

Images are resized bilinearly with antialiasing (torch.nn.functional.interpolate,
antialias=True, rounded to uint8); dense maps by nearest neighbour, output pixel i taking
source pixel floor((i + 0.5) * source / resized) along each axis, so labels are never mixed.

Splits, by each row's ``split``, in manifest order; ``data.train_size`` / ``val_size`` /
``test_size`` are upper limits (the first rows of each split). A manifest without ``val`` rows:
``val`` = the LAST ``data.val_size`` ``train`` rows (``train`` = the first ``data.train_size``
rows before them), so ``data.val_size`` must then be below the number of train rows.
``data.val_size=0``: no validation split. Only the selected rows' files are read, once per run.

Targets' TargetSpecs: regression and depth carry the train split's mean / std (depth over its
valid pixels), so heads predict in target units from the first step.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from kdmtl_cli.data import DATASETS, SPLITS, DataBundle, TargetSpec, fingerprint_splits
from kdmtl_cli.errors import KdmtlError
from kdmtl_cli.ranges import above

KINDS = ("classification", "multilabel", "segmentation", "depth", "normals", "regression")
NEEDS_CLASSES = ("classification", "multilabel", "segmentation")
DENSE = ("segmentation", "depth", "normals")
RESIZES = ("stretch", "shorter_center_crop")
RESERVED = ("image", "split")       # manifest columns that are not targets
TARGET_KEYS = ("kind", "classes")   # the keys of one data.targets entry
IGNORE = 255                        # segmentation: pixel left out of loss and metrics
MANIFEST_SUFFIXES = (".csv", ".jsonl")
NORMALS_TOLERANCE = 1.01            # |component| above this: not a [-1, 1] normal map


@dataclass
class FolderSettings:
    # the manifest: a .csv (header row) or .jsonl file with columns image, split and one per target;
    # absolute, or relative to data.root (format and example: kdmtl_cli/data/folder.py)
    manifest: Optional[str] = None
    # target columns of the manifest: {column: {kind: classification | multilabel | segmentation | depth |
    # normals | regression, classes: a count or a list of names (classification, multilabel, segmentation)}}
    targets: Dict[str, Any] = field(default_factory=dict)
    # how images of any size become image_size x image_size: stretch | shorter_center_crop
    # (resize the shorter side to image_size, keep the centre square)
    resize: str = "stretch"
    # depth PNGs: depth = stored value x depth_scale (0.001: millimetres -> metres); .npy depth is read as is
    depth_scale: float = above(0, default=0.001)


@dataclass(frozen=True)
class _Target:
    name: str
    kind: str
    num_classes: Optional[int] = None
    class_names: Optional[List[str]] = None


@dataclass
class _Row:
    line: int                  # line of the manifest file (1 = the first; the CSV header is line 1)
    image: str
    split: str
    cells: Dict[str, Any]


class _Where:
    """A manifest row, for error messages: '<manifest>, line <n>'."""

    def __init__(self, manifest: Path, line: int):
        self.manifest, self.line = manifest, line

    def __str__(self) -> str:
        return f"{self.manifest}, line {self.line}"


# --- settings ------------------------------------------------------------------------------------

_DEFAULTS = FolderSettings()


def _setting(cfg, name: str):
    """`data.<name>`, or its FolderSettings default when the node lacks it (or holds null)."""
    value = cfg.get(name, None)
    return getattr(_DEFAULTS, name) if value is None else value


def _parse_classes(name: str, kind: str, classes) -> tuple:
    key = f"data.targets.{name}.classes"
    fix = f"set {key} to a class count or a list of class names"
    if classes is None:
        raise KdmtlError(f"data.targets.{name} ({kind}) needs classes: {fix}")
    least = 1 if kind == "multilabel" else 2
    if isinstance(classes, int) and not isinstance(classes, bool):
        count, names = classes, None
    elif isinstance(classes, (list, tuple)):
        names = [str(c) if not isinstance(c, str) else c for c in classes]
        if any(not n.strip() for n in names) or len(set(names)) != len(names):
            raise KdmtlError(f"{key}={list(classes)}: class names must be distinct and non-empty")
        count = len(names)
    else:
        raise KdmtlError(f"{key}={classes!r}: {fix}")
    if count < least:
        raise KdmtlError(f"{key}: a {kind} target needs at least {least} classes (got {count})")
    if kind == "segmentation" and count > IGNORE:
        raise KdmtlError(f"{key}: at most {IGNORE} segmentation classes (got {count}); {IGNORE} marks "
                         "ignored pixels")
    return count, names


def _parse_targets(cfg) -> Dict[str, _Target]:
    from omegaconf import DictConfig, OmegaConf

    raw = _setting(cfg, "targets")
    if isinstance(raw, DictConfig):
        raw = OmegaConf.to_container(raw, resolve=True)
    example = "e.g. data.targets={label: {kind: classification, classes: 10}}"
    if not raw:
        raise KdmtlError(f"data=folder: data.targets is empty; declare the manifest's target columns, {example} "
                         "(format: kdmtl_cli/data/folder.py)")
    if not isinstance(raw, dict):
        raise KdmtlError(f"data.targets must map column names to {{kind: ..., classes: ...}}, {example}")
    targets = {}
    for name, spec in raw.items():
        name = str(name)
        if name in RESERVED:
            raise KdmtlError(f"data.targets.{name}: '{name}' is the manifest's {name} column, not a target; "
                             "rename the target column")
        if isinstance(spec, str):
            spec = {"kind": spec}
        if not isinstance(spec, dict):
            raise KdmtlError(f"data.targets.{name} must be {{kind: ..., classes: ...}} (got {spec!r})")
        unknown = sorted(set(spec) - set(TARGET_KEYS))
        if unknown:
            raise KdmtlError(f"data.targets.{name}: unknown key {unknown[0]}; a target has "
                             f"{', '.join(TARGET_KEYS)}")
        kind = spec.get("kind")
        if kind not in KINDS:
            raise KdmtlError(f"data.targets.{name}.kind={kind!r} is not a target kind data=folder reads; "
                             f"choose one of {', '.join(KINDS)}")
        if kind in NEEDS_CLASSES:
            count, names = _parse_classes(name, kind, spec.get("classes"))
        elif spec.get("classes") is not None:
            raise KdmtlError(f"data.targets.{name}.classes: a {kind} target has no classes; remove it "
                             f"(classes are read for {', '.join(NEEDS_CLASSES)})")
        else:
            count, names = None, None
        targets[name] = _Target(name, kind, count, names)
    return targets


def _manifest_path(cfg) -> Path:
    value = _setting(cfg, "manifest")
    if value is None or not str(value).strip():
        raise KdmtlError("data=folder needs data.manifest: the .csv or .jsonl file listing your images "
                         "(absolute, or relative to data.root); format and example: kdmtl_cli/data/folder.py")
    path = Path(str(value)).expanduser()
    if not path.is_absolute():
        path = Path(str(cfg.root)).expanduser() / path
    if path.suffix.lower() not in MANIFEST_SUFFIXES:
        raise KdmtlError(f"manifest {path}: unknown format '{path.suffix}'; data.manifest must be a .csv (with a "
                         "header row) or a .jsonl file")
    if not path.is_file():
        raise KdmtlError(f"manifest {path} not found (data.manifest={value}; a relative path is under "
                         f"data.root={cfg.root}); set data.manifest to your .csv or .jsonl file")
    return path


# --- the manifest --------------------------------------------------------------------------------

def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        why = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise KdmtlError(f"cannot read manifest {path} ({why}); it must be a UTF-8 .csv or .jsonl text file") \
            from None


def _rows_csv(path: Path, text: str, columns: List[str]) -> List[_Row]:
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
        if header is None:
            raise KdmtlError(f"manifest {path} is empty; its first line must be a header naming the columns "
                             f"{', '.join(columns)}")
        header = [h.strip() for h in header]
        for column in columns:
            if column not in header:
                raise KdmtlError(f"manifest {path}, line 1: no column '{column}' (the header has "
                                 f"{', '.join(header)}); add the column, or change data.targets")
        rows = []
        for record in reader:
            if not any(cell.strip() for cell in record):
                continue                    # blank line
            where = _Where(path, reader.line_num)
            if len(record) != len(header):
                raise KdmtlError(f"{where}: {len(record)} cells, the header has {len(header)}; quote cells "
                                 "that hold commas")
            cells = dict(zip(header, record, strict=True))
            rows.append(_row(where, cells, columns))
    except csv.Error as err:
        raise KdmtlError(f"manifest {path}, line {reader.line_num}: not valid CSV ({err})") from None
    return rows


def _rows_jsonl(path: Path, text: str, columns: List[str]) -> List[_Row]:
    rows = []
    for number, line in enumerate(text.split("\n"), 1):    # not splitlines: JSON may hold U+2028
        if not line.strip():
            continue
        where = _Where(path, number)
        try:
            cells = json.loads(line)
        except json.JSONDecodeError as err:
            raise KdmtlError(f"{where}: not valid JSON ({err.msg}); each line must be one JSON object") from None
        if not isinstance(cells, dict):
            raise KdmtlError(f"{where}: a JSON {type(cells).__name__}, expected one object "
                             '{"image": ..., "split": ..., <targets>}')
        for column in columns:
            if column not in cells:
                raise KdmtlError(f"{where}: no column '{column}' (the line has {', '.join(map(str, cells))}); add "
                                 "it, or change data.targets")
        rows.append(_row(where, cells, columns))
    return rows


def _row(where: _Where, cells: Dict[str, Any], columns: List[str]) -> _Row:
    image = cells["image"]
    if not isinstance(image, str) or not image.strip():
        raise KdmtlError(f"{where}: the image cell is empty; give the image file's path")
    split = cells["split"]
    split = split.strip().lower() if isinstance(split, str) else split
    if split not in SPLITS:
        raise KdmtlError(f"{where}: unknown split {cells['split']!r}; use train, val or test")
    return _Row(where.line, image.strip(), split, {c: cells[c] for c in columns[2:]})


def _read_manifest(path: Path, targets: Dict[str, _Target]) -> List[_Row]:
    text = _read_text(path)
    columns = [*RESERVED, *targets]
    if path.suffix.lower() == ".csv":
        return _rows_csv(path, text, columns)
    return _rows_jsonl(path, text, columns)


def _select(path: Path, rows: List[_Row], cfg) -> Dict[str, List[_Row]]:
    """The rows of each split, by `data.*_size` (upper limits, first rows); val carved from the
    end of train when the manifest has no val rows."""
    by_split = {split: [r for r in rows if r.split == split] for split in SPLITS}
    for split in ("train", "test"):
        if not by_split[split]:
            raise KdmtlError(f"manifest {path} has no {split} rows; add rows with split={split}")
    train, val_size = by_split["train"], int(cfg.val_size)
    if val_size <= 0:
        val = []
    elif by_split["val"]:
        val = by_split["val"][:val_size]
    else:
        if val_size >= len(train):
            suggest = max(1, len(train) // 10) if len(train) > 1 else 0
            raise KdmtlError(f"manifest {path} has no val rows, and data.val_size={val_size} is not below its "
                             f"{len(train)} train rows (the last data.val_size of them become the validation "
                             f"split): add rows with split=val, or set data.val_size={suggest}")
        train, val = train[:-val_size], train[-val_size:]
    return {"train": train[:int(cfg.train_size)], "val": val, "test": by_split["test"][:int(cfg.test_size)]}


# --- cells ---------------------------------------------------------------------------------------

def _class_id(value, target: _Target, where: _Where, what: str = "class id") -> int:
    """A class (or label) id from an int, an integral float, a numeric string or a class name."""
    n = target.num_classes
    index = None
    if isinstance(value, bool):
        index = None
    elif isinstance(value, int):
        index = value
    elif isinstance(value, float) and value.is_integer():
        index = int(value)
    elif isinstance(value, str):
        text = value.strip()
        if re.fullmatch(r"[+-]?\d+", text):
            index = int(text)
        elif target.class_names and text in target.class_names:
            index = target.class_names.index(text)
    names = f" or one of {', '.join(target.class_names)}" if target.class_names else ""
    if index is None:
        raise KdmtlError(f"{where}: {target.name}={value!r} is not a {what} (an integer in [0, {n}){names}); "
                         "fix the manifest")
    if not 0 <= index < n:
        raise KdmtlError(f"{where}: {target.name} {what} {index} is outside [0, {n}); fix the manifest or "
                         f"data.targets.{target.name}.classes")
    return index


def _multilabel(value, target: _Target, where: _Where) -> np.ndarray:
    if value is None:
        items = []
    elif isinstance(value, (list, tuple)):
        items = list(value)
    elif isinstance(value, str):
        items = [t for t in re.split(r"[\s;,]+", value.strip().strip("[]")) if t]
    else:
        items = [value]
    vector = np.zeros(target.num_classes, dtype=np.uint8)
    for item in items:
        vector[_class_id(item, target, where, what="label id")] = 1
    return vector


def _number(value, target: _Target, where: _Where) -> float:
    number = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            number = None
    if number is None or not math.isfinite(number):
        raise KdmtlError(f"{where}: {target.name}={value!r} is not a finite number; fix the manifest")
    return number


def _file(value, base: Path, where: _Where, what: str) -> Path:
    path = Path(value.strip()).expanduser()
    path = path if path.is_absolute() else base / path
    if not path.is_file():
        raise KdmtlError(f"{where}: {what} file {path} not found; paths in the manifest are relative to its "
                         f"folder {base}")
    return path


def _open_image(path: Path, where: _Where, what: str):
    """The decoded PIL image, or one line naming the file and the manifest row."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise KdmtlError(f"{where}: cannot read {what} {path} as an image ({err}); replace it with a PNG or "
                         "JPEG file") from None


def _load_npy(path: Path, where: _Where, what: str) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise KdmtlError(f"{where}: cannot read {what} {path} as a .npy array ({err}); replace the file") from None


def _check_size(arr_hw, image_hw, path: Path, where: _Where, what: str) -> None:
    if tuple(arr_hw) != tuple(image_hw):
        raise KdmtlError(f"{where}: {what} {path} is {arr_hw[1]}x{arr_hw[0]} (WxH) but its image is "
                         f"{image_hw[1]}x{image_hw[0]}; a dense map must have its image's size")


def _segmentation(path: Path, target: _Target, where: _Where) -> np.ndarray:
    what = f"{target.name} mask"
    if path.suffix.lower() == ".npy":
        arr = _load_npy(path, where, what)
        arr = arr[..., 0] if arr.ndim == 3 and arr.shape[-1] == 1 else arr
        if arr.ndim != 2 or not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool):
            raise KdmtlError(f"{where}: {what} {path} holds {arr.dtype} {list(arr.shape)}; expected integer "
                             "class ids [H,W]")
    else:
        im = _open_image(path, where, what)
        if im.mode not in ("L", "P", "1", "I", "I;16", "I;16B", "I;16L"):
            raise KdmtlError(f"{where}: {what} {path} is a {im.mode} image; save the class ids as a "
                             "single-channel PNG (mode L or P), 255 = ignore")
        arr = np.asarray(im)
    arr = arr.astype(np.int64)
    bad = (arr != IGNORE) & ((arr < 0) | (arr >= target.num_classes))
    if bad.any():
        raise KdmtlError(f"{where}: {what} {path} holds class id {int(arr[bad][0])}, outside "
                         f"[0, {target.num_classes}) ({IGNORE} = ignore); fix the mask or "
                         f"data.targets.{target.name}.classes")
    return arr


def _depth(path: Path, target: _Target, where: _Where, scale: float) -> np.ndarray:
    what = f"{target.name} map"
    if path.suffix.lower() == ".npy":
        arr = _load_npy(path, where, what)
        arr = arr[..., 0] if arr.ndim == 3 and arr.shape[-1] == 1 else arr
        if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.number):
            raise KdmtlError(f"{where}: {what} {path} holds {arr.dtype} {list(arr.shape)}; expected depth [H,W]")
        arr = arr.astype(np.float32)
        arr[~np.isfinite(arr)] = 0.0
    else:
        im = _open_image(path, where, what)
        if im.mode not in ("L", "I", "I;16", "I;16B", "I;16L", "F"):
            raise KdmtlError(f"{where}: {what} {path} is a {im.mode} image; depth must be a single-channel "
                             "8- or 16-bit PNG (or a float .npy)")
        arr = np.asarray(im).astype(np.float64)
        arr = (arr if im.mode == "F" else arr * scale).astype(np.float32)
        arr[~np.isfinite(arr)] = 0.0
    if (arr < 0).any():
        raise KdmtlError(f"{where}: {what} {path} holds negative depth ({float(arr[arr < 0][0]):g}); "
                         "depth is >= 0, with 0 = no measurement")
    return arr


def _normals(path: Path, target: _Target, where: _Where) -> np.ndarray:
    what = f"{target.name} map"
    if path.suffix.lower() == ".npy":
        arr = _load_npy(path, where, what)
        if arr.ndim != 3 or arr.shape[-1] != 3 or not np.issubdtype(arr.dtype, np.number):
            raise KdmtlError(f"{where}: {what} {path} holds {arr.dtype} {list(arr.shape)}; expected normals "
                             "[H,W,3] in [-1, 1]")
        arr = arr.astype(np.float32)
        if not np.isfinite(arr).all() or np.abs(arr).max(initial=0.0) > NORMALS_TOLERANCE:
            raise KdmtlError(f"{where}: {what} {path} holds values outside [-1, 1]; normals are unit vectors "
                             "(all zero = invalid)")
    else:
        im = _open_image(path, where, what)
        if im.mode not in ("RGB", "RGBA"):
            raise KdmtlError(f"{where}: {what} {path} is a {im.mode} image; normals must be an 8-bit RGB PNG "
                             "(v / 255 * 2 - 1) or a .npy [H,W,3]")
        rgb = np.asarray(im.convert("RGB"))
        arr = rgb.astype(np.float32) / 255.0 * 2.0 - 1.0
        arr[(rgb == 0).all(-1)] = 0.0       # black = invalid
    return arr.transpose(2, 0, 1)           # [3,H,W]


# --- geometry ------------------------------------------------------------------------------------

def _plan(h: int, w: int, size: int, resize: str):
    """(resized h, resized w, top, left) of the crop that follows the resize."""
    if resize == "stretch":
        return size, size, 0, 0
    if h <= w:
        nw = max(size, int(w * size / h + 0.5))
        return size, nw, 0, (nw - size) // 2
    nh = max(size, int(h * size / w + 0.5))
    return nh, size, (nh - size) // 2, 0


def _nearest_index(source: int, resized: int, start: int, size: int) -> np.ndarray:
    """Source index of output pixels start..start+size-1: floor((i + 0.5) * source / resized)."""
    i = np.arange(start, start + size, dtype=np.int64)
    return np.minimum((2 * i + 1) * source // (2 * resized), source - 1)


def _resize_image(rgb: np.ndarray, plan, size: int) -> torch.Tensor:
    import torch.nn.functional as F

    nh, nw, top, left = plan
    image = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)
    if (nh, nw) != tuple(image.shape[1:]):
        resized = F.interpolate(image[None].float(), size=(nh, nw), mode="bilinear", align_corners=False,
                                antialias=True)[0]
        image = resized.round_().clamp_(0, 255).to(torch.uint8)
    return image[:, top:top + size, left:left + size].contiguous()


def _resize_dense(arr: np.ndarray, plan, size: int) -> np.ndarray:
    """Nearest-neighbour resize and crop of a map [..., H, W]."""
    nh, nw, top, left = plan
    h, w = arr.shape[-2:]
    rows = _nearest_index(h, nh, top, size)
    cols = _nearest_index(w, nw, left, size)
    return np.ascontiguousarray(arr[..., rows[:, None], cols[None, :]])


# --- reading -------------------------------------------------------------------------------------

_DTYPES = {"classification": torch.int64, "multilabel": torch.uint8, "segmentation": torch.int64,
           "depth": torch.float32, "normals": torch.float16, "regression": torch.float32}


def _shape(target: _Target, size: int) -> tuple:
    return {"classification": (), "multilabel": (target.num_classes,), "segmentation": (size, size),
            "depth": (size, size), "normals": (3, size, size), "regression": ()}[target.kind]


def _empty_map(target: _Target, h: int, w: int) -> np.ndarray:
    """A dense map for an empty cell: every pixel ignored / invalid."""
    if target.kind == "segmentation":
        return np.full((h, w), IGNORE, dtype=np.int64)
    if target.kind == "depth":
        return np.zeros((h, w), dtype=np.float32)
    return np.zeros((3, h, w), dtype=np.float32)


def _read_row(row: _Row, manifest: Path, targets: Dict[str, _Target], size: int, resize: str,
              depth_scale: float) -> Dict[str, Any]:
    where = _Where(manifest, row.line)
    base = manifest.parent
    image_path = _file(row.image, base, where, "image")
    im = _open_image(image_path, where, "image")
    h, w = im.height, im.width
    plan = _plan(h, w, size, resize)
    out: Dict[str, Any] = {"image": _resize_image(np.array(im.convert("RGB")), plan, size)}
    for name, target in targets.items():
        value = row.cells[name]
        if target.kind == "classification":
            out[name] = _class_id(value, target, where)
        elif target.kind == "multilabel":
            out[name] = _multilabel(value, target, where)
        elif target.kind == "regression":
            out[name] = _number(value, target, where)
        else:
            if value is None or (isinstance(value, str) and not value.strip()):
                arr = _empty_map(target, h, w)
            elif not isinstance(value, str):
                raise KdmtlError(f"{where}: {name}={value!r} is not a file path; give the {target.kind} map's "
                                 "file, relative to the manifest's folder")
            else:
                path = _file(value, base, where, f"{name} ({target.kind})")
                if target.kind == "segmentation":
                    arr = _segmentation(path, target, where)
                elif target.kind == "depth":
                    arr = _depth(path, target, where, depth_scale)
                else:
                    arr = _normals(path, target, where)
                _check_size(arr.shape[-2:], (h, w), path, where, f"{name} map")
            out[name] = _resize_dense(arr, plan, size)
    return out


def _read_split(rows: List[_Row], manifest: Path, targets: Dict[str, _Target], size: int, resize: str,
                depth_scale: float) -> Dict[str, torch.Tensor]:
    """The tensors of one split, filled row by row (no per-sample copies kept)."""
    n = len(rows)
    split = {"image": torch.empty((n, 3, size, size), dtype=torch.uint8)}
    split.update({name: torch.empty((n, *_shape(t, size)), dtype=_DTYPES[t.kind]) for name, t in targets.items()})
    for index, row in enumerate(rows):
        for name, value in _read_row(row, manifest, targets, size, resize, depth_scale).items():
            split[name][index] = torch.as_tensor(value, dtype=split[name].dtype) if name != "image" else value
    return split


def _stats(values: torch.Tensor):
    """(mean, std) of train-split values; an undefined or zero std becomes 1 (as shapes.py)."""
    values = values.double()
    if values.numel() == 0:
        return 0.0, 1.0
    mean = float(values.mean())
    std = float(values.std()) if values.numel() > 1 else float("nan")
    return mean, (std if std > 0 else 1.0)


# no_validation_ok: data.val_size=0 trains on every train row, with an empty val split.
@DATASETS.register("folder", settings=FolderSettings, no_validation_ok=True)
def build_folder(cfg) -> DataBundle:
    """`cfg`: the `data` node (the common `data` keys + FolderSettings')."""
    targets = _parse_targets(cfg)
    resize = _setting(cfg, "resize")
    if resize not in RESIZES:
        raise KdmtlError(f"data.resize={resize!r}: choose one of {', '.join(RESIZES)}")
    depth_scale = float(_setting(cfg, "depth_scale"))
    if not (math.isfinite(depth_scale) and depth_scale > 0):
        raise KdmtlError(f"data.depth_scale must be > 0 (got {depth_scale:g})")
    size = int(cfg.image_size)
    manifest = _manifest_path(cfg)
    rows = _select(manifest, _read_manifest(manifest, targets), cfg)
    splits = {split: _read_split(rows[split], manifest, targets, size, resize, depth_scale) for split in SPLITS}
    specs = {}
    for name, t in targets.items():
        mean = std = None
        if t.kind == "regression":
            mean, std = _stats(splits["train"][name])
        elif t.kind == "depth":
            depth = splits["train"][name]
            mean, std = _stats(depth[depth > 0])
        specs[name] = TargetSpec(t.kind, t.num_classes, list(t.class_names) if t.class_names else None, mean, std)
    extra = json.dumps({"data": "folder", "image_size": size, "resize": resize, "depth_scale": depth_scale,
                        "targets": {n: [t.kind, t.num_classes, t.class_names] for n, t in targets.items()}},
                       sort_keys=True)
    return DataBundle(name="folder", targets=specs, splits=splits, mean=list(cfg.mean), std=list(cfg.std),
                      fingerprint=fingerprint_splits(splits, extra=extra), info={"path": str(manifest)})
