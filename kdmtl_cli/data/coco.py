"""`coco`: COCO 2017 instance annotations as multi-label classification and semantic segmentation
(plus, optionally, single-label classification), read with pycocotools (``pip install
'kdmtl[coco]'``; nothing is downloaded).

Layout: ``data.root`` is the COCO 2017 root, as unpacked from https://cocodataset.org/#download
(2017 Train images, 2017 Val images, 2017 Train/Val annotations)::

    <data.root>/train2017/<file_name>                       (the ``images[].file_name`` of the json)
    <data.root>/val2017/<file_name>
    <data.root>/annotations/instances_train2017.json
    <data.root>/annotations/instances_val2017.json

Splits: the public test2017 has no annotations, and kdmtl selects models on ``val``, never on
``test``. So, over the *eligible* images (below) sorted by image id: ``val`` = the LAST
``data.val_size`` train2017 images, ``train`` = the first ``data.train_size`` train2017 images
before them, ``test`` = the first ``data.test_size`` val2017 images (sizes are upper limits).

Categories: ``data.category_set`` names a preset, ``all`` (the 80 categories) or ``pascal20``
(the 20 PASCAL VOC classes under their COCO names); ``data.categories``, a list of COCO category
names (``"dining table"``, ``"tv"``...), replaces the preset (then leave ``category_set`` at
``all``). Every requested name must be a category of both annotation files (a misspelt one is
refused with the closest names). The K kept categories become classes in increasing COCO category-id order, whatever
the order of the list. Annotations of other categories are ignored: their pixels are background.

Eligible images: every image by default, those without any annotation of a kept category
included (labels all 0, seg all background); ``data.drop_empty=true`` drops them. With
``data.with_cls=true`` the images without a non-crowd instance of a kept category are dropped
too (their ``cls`` would be undefined). The split rule is applied after this filtering.

Targets:

- ``labels`` (multilabel, K): uint8 [N,K], 1 for each kept category with at least one
  annotation in the image -- crowd annotations count (a crowd of people shows people), as in
  the usual COCO multi-label protocol (ML-GCN, ASL: every annotation of the image);
- ``seg`` (segmentation, K+1: ``background`` + the K names): int64 [N,S,S], 0 background, the
  class c in 1..K of category c (in category-id order), 255 (ignored) on crowd regions.
  Painting order, at the original resolution: the crowd regions first, then the non-crowd
  instances by decreasing mask area (ties: lower annotation id first), so smaller objects end
  on top of larger ones and a non-crowd instance wins over a crowd region it overlaps.
  Masks are rasterised as pycocotools' ``COCO.annToMask``: polygons and uncompressed RLE
  (``counts`` a list) through ``frPyObjects``, compressed RLE (``counts`` a string) as is
  (polygons of fewer than 3 points are skipped: pycocotools would read 4 numbers as a box);
- ``cls`` (classification, K; only with ``data.with_cls=true``): int64 [N], the category of the
  non-crowd instance with the largest mask area (ties: lowest annotation id).

Images: uint8 [N,3,S,S], S = ``data.image_size``, each resized from the original to S x S
(aspect ratio not kept; bilinear with antialiasing, as torchvision's ``Resize`` on tensors),
the label maps with nearest neighbour (pixel centres, PIL's / torch's ``nearest-exact``).
This is the tutorials' "resize for evaluation", done once for every split. Deliberate
difference from the ImageNet/COCO tutorials: the training augmentation (``RandomResizedCrop``
with ``data.resized_crop_scale`` + ``data.hflip``, applied by the shared loader) crops from
the stored S x S image, not from the full-resolution original.

Memory: per image 3*S^2 bytes of image plus 8*S^2 of int64 label map (the segmentation
convention): about 0.55 MB at S=224, i.e. ~62 GB for all of train2017; cap it with
``data.train_size``.

Cache: decoding and rasterising run once; each split is saved atomically as
``<cache>/<fingerprint>/<split>.pt`` (uint8 tensors plus ``image_id``) next to a ``meta.json``,
with ``<cache>`` = ``data.cache_root`` or ``<data.root>/.kdmtl``. The fingerprint, which is also
``DataBundle.fingerprint``, is a sha256 over the bytes of both annotation files, the settings
that change the tensors (image_size, kept categories, the three sizes, drop_empty, with_cls) and
``CACHE_VERSION``. Image files are not hashed: after replacing images, delete the cache folder.
A cache hit reads neither the json nor an image, and does not need pycocotools.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

from kdmtl_cli.data import DATASETS, SPLITS, DataBundle, TargetSpec
from kdmtl_cli.errors import KdmtlError

CACHE_VERSION = 1   # bump when the decoded tensors change, to invalidate caches
IGNORE = 255        # the segmentation ignore label (kdmtl_cli/tasks/segmentation.py)
SERIAL_BELOW = 16   # splits with fewer images are decoded in this thread; larger ones by a thread pool

# The 20 PASCAL VOC classes under their COCO names (VOC: aeroplane, diningtable, motorbike,
# pottedplant, sofa, tvmonitor).
PASCAL20 = ("person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "boat", "bird", "cat",
            "dog", "horse", "sheep", "cow", "bottle", "chair", "couch", "potted plant", "dining table", "tv")
CATEGORY_SETS = {"all": None, "pascal20": PASCAL20}

# COCO 2017 folder of each kdmtl split, and the annotation file of each folder.
SOURCE = {"train": "train2017", "val": "train2017", "test": "val2017"}
FOLDERS = ("train2017", "val2017")
ANNOTATIONS = "annotations/instances_{folder}.json"


@dataclass
class CocoSettings:
    # the categories kept: all (the 80 COCO categories) | pascal20 (the 20 PASCAL VOC classes,
    # COCO names); ignored when data.categories is set
    category_set: str = "all"
    # explicit COCO category names to keep (e.g. [person, dog, "dining table"]), instead of the
    # preset; classes follow COCO category-id order; null = data.category_set
    categories: Optional[List[str]] = None
    # drop images without any annotation of a kept category (default: kept, all background)
    drop_empty: bool = False
    # offer a `cls` target (classification: category of the largest non-crowd instance); images
    # without a non-crowd instance of a kept category are then dropped
    with_cls: bool = False
    # where the decoded splits are cached; null = <data.root>/.kdmtl
    cache_root: Optional[str] = None


def _settings(cfg) -> CocoSettings:
    """The coco keys of the `data` node (their defaults where the node lacks one)."""
    values = {}
    for f in dataclasses.fields(CocoSettings):
        # `in` first: a struct DictConfig's get() answers None, not the default, for an unknown key
        values[f.name] = cfg[f.name] if f.name in cfg else f.default
    if values["categories"] is not None:
        if isinstance(values["categories"], (str, bytes)):
            raise KdmtlError(f"data.categories={values['categories']}: expected a list of COCO category names "
                             "(e.g. [person, dog]) or null; presets go in data.category_set (all | pascal20)")
        values["categories"] = [str(name) for name in values["categories"]]
    return CocoSettings(**values)


def _wanted_names(s: CocoSettings) -> Optional[List[str]]:
    """The requested category names, sorted (None: all categories of the annotation file)."""
    if s.category_set not in CATEGORY_SETS:
        raise KdmtlError(f"data.category_set={s.category_set}: choose one of {', '.join(CATEGORY_SETS)}")
    if s.categories is not None:
        if s.category_set != "all":
            raise KdmtlError(f"data.categories and data.category_set={s.category_set} both choose the categories; "
                             "set data.category_set=all with a list, or data.categories=null with a preset")
        if not s.categories:
            raise KdmtlError("data.categories is an empty list; name at least one COCO category or set it to null")
        duplicated = sorted({n for n in s.categories if s.categories.count(n) > 1})
        if duplicated:
            raise KdmtlError(f"data.categories names {', '.join(duplicated)} more than once")
        return sorted(s.categories)
    preset = CATEGORY_SETS[s.category_set]
    return sorted(preset) if preset is not None else None


def _missing_hint(root: Path) -> str:
    return (f"data.root ({root}) must be the COCO 2017 root holding train2017/, val2017/ and "
            "annotations/instances_{train,val}2017.json (https://cocodataset.org/#download)")


def _annotation_paths(root: Path) -> Dict[str, Path]:
    paths = {folder: root / ANNOTATIONS.format(folder=folder) for folder in FOLDERS}
    for path in paths.values():
        if not path.is_file():
            raise KdmtlError(f"COCO annotation file not found: {path}; {_missing_hint(root)}")
    return paths


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 22), b""):
                digest.update(chunk)
    except OSError as err:
        raise KdmtlError(f"cannot read COCO annotation file {path} ({err.strerror})") from None
    return digest.hexdigest()


def _fingerprint(cfg, s: CocoSettings, names: Optional[List[str]], ann_paths: Dict[str, Path]) -> str:
    key = {"version": CACHE_VERSION, "image_size": int(cfg.image_size),
           "categories": names if names is not None else "all",
           "train_size": int(cfg.train_size), "val_size": int(cfg.val_size), "test_size": int(cfg.test_size),
           "drop_empty": bool(s.drop_empty), "with_cls": bool(s.with_cls),
           "annotations": {folder: _sha256(path) for folder, path in ann_paths.items()}}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


# -- reading the annotation files ----------------------------------------------------------------

def _load_json(path: Path) -> dict:
    try:
        with open(path, "rb") as handle:
            data = json.load(handle)
    except (OSError, ValueError) as err:
        raise KdmtlError(f"COCO annotation file {path} is not readable json ({str(err).splitlines()[0]}); "
                         "replace it with the original file") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list)
                                             for k in ("images", "annotations", "categories")):
        raise KdmtlError(f"COCO annotation file {path} lacks the images / annotations / categories lists "
                         "of an instances_*.json file")
    return data


def _resolve_categories(data: dict, names: Optional[List[str]], path: Path) -> List[dict]:
    """The kept categories ({id, name}) of one annotation file, in increasing id order."""
    categories = sorted(({"id": int(c["id"]), "name": str(c["name"])} for c in data["categories"]),
                        key=lambda c: c["id"])
    if names is None:
        return categories
    by_name = {c["name"]: c for c in categories}
    for name in names:
        if name not in by_name:
            close = difflib.get_close_matches(name, list(by_name), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise KdmtlError(f"unknown COCO category '{name}' in data.categories / data.category_set{hint}; "
                             f"{path} has: {', '.join(c['name'] for c in categories)}")
    return [c for c in categories if c["name"] in names]


class _Source:
    """One COCO folder (train2017 / val2017): its image records (sorted by id) and, per image,
    the annotations of the kept categories."""

    def __init__(self, root: Path, folder: str, data: dict, kept_ids: Dict[int, int], s: CocoSettings):
        self.folder = folder
        self.image_dir = root / folder
        anns: Dict[int, List[dict]] = {}
        for ann in data["annotations"]:
            if int(ann["category_id"]) in kept_ids:
                anns.setdefault(int(ann["image_id"]), []).append(ann)
        self.anns = anns
        records = sorted(data["images"], key=lambda r: int(r["id"]))
        self.eligible = []
        for record in records:
            image_anns = anns.get(int(record["id"]), [])
            if s.drop_empty and not image_anns:
                continue
            if s.with_cls and not any(not a.get("iscrowd", 0) for a in image_anns):
                continue
            self.eligible.append(record)


def _split_records(sources: Dict[str, _Source], cfg) -> Dict[str, List[dict]]:
    train_all = sources["train2017"].eligible
    total, val_size = len(train_all), int(cfg.val_size)
    if val_size < 1 or val_size >= total:
        raise KdmtlError(f"data.val_size must be between 1 and {total - 1} for coco (the last val_size of the "
                         f"{total} eligible train2017 images; got {val_size})")
    if int(cfg.train_size) < 1 or int(cfg.test_size) < 1:
        raise KdmtlError(f"data.train_size and data.test_size must be at least 1 (got {cfg.train_size}, "
                         f"{cfg.test_size})")
    cut = total - val_size
    test = sources["val2017"].eligible[:int(cfg.test_size)]
    if not test:
        path = sources["val2017"].image_dir.parent / ANNOTATIONS.format(folder="val2017")
        raise KdmtlError(f"no eligible val2017 image in {path} for the test split; check the file, "
                         "data.drop_empty and data.with_cls")
    return {"train": train_all[:min(int(cfg.train_size), cut)], "val": train_all[cut:], "test": test}


# -- decoding one image --------------------------------------------------------------------------

def _rle(mask_api, ann: dict, height: int, width: int):
    """The annotation's mask as compressed RLE (pycocotools' COCO.annToRLE), or None if empty."""
    segm = ann.get("segmentation")
    if isinstance(segm, list):
        polygons = [p for p in segm if len(p) >= 6]   # fewer than 3 points draw nothing
        return mask_api.merge(mask_api.frPyObjects(polygons, height, width)) if polygons else None
    if isinstance(segm, dict) and isinstance(segm.get("counts"), list):
        return mask_api.frPyObjects(segm, height, width)                     # uncompressed RLE
    if isinstance(segm, dict) and isinstance(segm.get("counts"), (str, bytes)):
        return segm                                                           # compressed RLE
    raise KdmtlError(f"COCO annotation {ann.get('id')} has an unreadable segmentation "
                     f"({type(segm).__name__}); replace the annotation file with the original")


def _resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H,W,3] -> uint8 [3,S,S], bilinear with antialiasing."""
    import torch.nn.functional as F

    chw = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
    if chw.shape[1:] == (size, size):
        return chw.numpy()
    out = F.interpolate(chw[None].float(), size=(size, size), mode="bilinear", align_corners=False,
                        antialias=True)[0]
    return out.round().clamp(0, 255).to(torch.uint8).numpy()


def _resize_labels(seg: np.ndarray, size: int) -> np.ndarray:
    """[H,W] -> [S,S], nearest neighbour at pixel centres (source index floor((i + 0.5) * H / S))."""
    height, width = seg.shape
    rows = np.minimum(((np.arange(size) + 0.5) * height / size).astype(np.int64), height - 1)
    cols = np.minimum(((np.arange(size) + 0.5) * width / size).astype(np.int64), width - 1)
    return seg[rows][:, cols]


def _decode(mask_api, source: _Source, record: dict, classes: Dict[int, int], num_classes: int, size: int):
    """(image [3,S,S], seg [S,S], labels [K], cls) of one image record; see the module docstring."""
    from PIL import Image

    path = source.image_dir / str(record["file_name"])
    height, width = int(record["height"]), int(record["width"])
    try:
        with Image.open(path) as im:
            image = np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise KdmtlError(f"COCO image not found: {path}; {_missing_hint(source.image_dir.parent)}") from None
    except OSError as err:
        raise KdmtlError(f"cannot read COCO image {path} ({str(err).splitlines()[0]}); "
                         "replace it with the original file") from None
    if image.shape[:2] != (height, width):
        raise KdmtlError(f"COCO image {path} is {image.shape[1]}x{image.shape[0]} but its annotation file says "
                         f"{width}x{height}; replace it with the original file")
    seg = np.zeros((height, width), dtype=np.uint8)
    labels = np.zeros(num_classes, dtype=np.uint8)
    crowds, instances = [], []
    for ann in source.anns.get(int(record["id"]), []):
        c = classes[int(ann["category_id"])]
        labels[c - 1] = 1
        rle = _rle(mask_api, ann, height, width)
        if rle is not None and tuple(int(v) for v in rle["size"]) != (height, width):
            raise KdmtlError(f"COCO annotation {ann.get('id')} has a {rle['size'][1]}x{rle['size'][0]} mask on "
                             f"the {width}x{height} image {path}; replace the annotation file with the original")
        if ann.get("iscrowd", 0):
            if rle is not None:
                crowds.append(rle)
        else:
            area = int(mask_api.area(rle)) if rle is not None else 0
            instances.append((-area, int(ann.get("id", 0)), c, rle))
    for rle in crowds:
        seg[mask_api.decode(rle) > 0] = IGNORE
    instances.sort(key=lambda t: (t[0], t[1]))       # largest first, so smaller ones are painted on top
    for _, _, c, rle in instances:
        if rle is not None:
            seg[mask_api.decode(rle) > 0] = c
    cls = instances[0][2] - 1 if instances else -1
    return _resize_image(image, size), _resize_labels(seg, size), labels, cls


def _decode_split(mask_api, source: _Source, records: List[dict], classes: Dict[int, int], size: int):
    n, k = len(records), len(classes)
    for record in records:         # every file checked before hours of decoding
        path = source.image_dir / str(record["file_name"])
        if not path.is_file():
            raise KdmtlError(f"COCO image not found: {path}; {_missing_hint(source.image_dir.parent)}")
    out = {"image": np.zeros((n, 3, size, size), dtype=np.uint8), "seg": np.zeros((n, size, size), dtype=np.uint8),
           "labels": np.zeros((n, k), dtype=np.uint8), "cls": np.zeros(n, dtype=np.int64)}

    def one(i):
        image, seg, labels, cls = _decode(mask_api, source, records[i], classes, k, size)
        out["image"][i], out["seg"][i], out["labels"][i], out["cls"][i] = image, seg, labels, cls

    workers = max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))
    if n < SERIAL_BELOW or workers == 1:
        for i in range(n):
            one(i)
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(one, range(n)))       # list(): re-raise the first error
    tensors = {name: torch.from_numpy(arr) for name, arr in out.items()}
    tensors["image_id"] = torch.tensor([int(r["id"]) for r in records], dtype=torch.int64)
    return tensors


# -- the cache -----------------------------------------------------------------------------------

def _cache_keys(s: CocoSettings):
    return {"image", "labels", "seg", "image_id"} | ({"cls"} if s.with_cls else set())


def _read_cached(folder: Path, s: CocoSettings):
    """meta and splits from the cache folder: (None, {}) when nothing usable is there yet."""
    from kdmtl_cli.engine.checkpoint import load_tensor_file

    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        return None, {}
    try:
        meta = json.loads(meta_path.read_text())
        names = [str(n) for n in meta["class_names"]]
    except (OSError, ValueError, KeyError, TypeError):
        raise KdmtlError(f"COCO cache file {meta_path} is unreadable; delete {folder} to rebuild it") from None
    splits = {}
    for split in SPLITS:
        path = folder / f"{split}.pt"
        if not path.is_file():
            continue
        tensors = load_tensor_file(path, what="COCO cache file")
        n = tensors["image"].shape[0] if isinstance(tensors.get("image"), torch.Tensor) else -1
        if set(tensors) != _cache_keys(s) or any(not isinstance(t, torch.Tensor) or t.shape[0] != n
                                                 for t in tensors.values()) \
                or tensors["labels"].shape[1:] != (len(names),):
            raise KdmtlError(f"COCO cache file {path} does not hold the expected tensors; "
                             f"delete {folder} to rebuild it")
        splits[split] = tensors
    return meta, splits


def _write(folder: Path, write, *args) -> None:
    try:
        write(*args)
    except OSError as err:
        raise KdmtlError(f"cannot write the COCO cache to {folder} ({err.strerror or err}); "
                         "set data.cache_root to a writable directory") from None


def _import_mask_api():
    try:
        from pycocotools import mask as mask_api
    except ImportError:
        raise KdmtlError("data=coco needs pycocotools: pip install 'kdmtl[coco]'") from None
    return mask_api


@DATASETS.register("coco", settings=CocoSettings)
def build_coco(cfg) -> DataBundle:
    from kdmtl_cli.engine.checkpoint import atomic_torch_save, atomic_write_text

    s = _settings(cfg)
    names = _wanted_names(s)
    root = Path(str(cfg.root)).expanduser()
    ann_paths = _annotation_paths(root)
    fingerprint = _fingerprint(cfg, s, names, ann_paths)
    base = Path(str(s.cache_root)).expanduser() if s.cache_root else root / ".kdmtl"
    folder = base / fingerprint
    meta, cached = _read_cached(folder, s)
    splits = dict(cached)
    if len(cached) < len(SPLITS):
        mask_api = _import_mask_api()
        data = {f: _load_json(p) for f, p in ann_paths.items()}
        kept = _resolve_categories(data["train2017"], names, ann_paths["train2017"])
        kept_val = {c["id"]: c["name"] for c in _resolve_categories(data["val2017"], names, ann_paths["val2017"])}
        if kept_val != {c["id"]: c["name"] for c in kept}:
            raise KdmtlError(f"{ann_paths['train2017']} and {ann_paths['val2017']} disagree on the categories "
                             "(ids or names); use the original COCO 2017 annotation files")
        classes = {c["id"]: i + 1 for i, c in enumerate(kept)}     # category id -> 1..K
        sources = {f: _Source(root, f, data[f], classes, s) for f in FOLDERS}
        del data
        records = _split_records(sources, cfg)
        meta = {"version": CACHE_VERSION, "class_names": [c["name"] for c in kept],
                "category_ids": [c["id"] for c in kept], "image_size": int(cfg.image_size),
                "sizes": {split: len(records[split]) for split in SPLITS},
                "drop_empty": bool(s.drop_empty), "with_cls": bool(s.with_cls),
                "annotations": {f: str(p) for f, p in ann_paths.items()}}
        _write(folder, atomic_write_text, json.dumps(meta, indent=1) + "\n", folder / "meta.json")
        for split in SPLITS:
            if split in splits:
                continue
            print(f"kdmtl: decoding COCO {SOURCE[split]} for the {split} split ({len(records[split])} images) "
                  f"into {folder} (once; later runs read it)", file=sys.stderr, flush=True)
            tensors = _decode_split(mask_api, sources[SOURCE[split]], records[split], classes, int(cfg.image_size))
            if not s.with_cls:
                tensors.pop("cls")
            _write(folder, atomic_torch_save, tensors, folder / f"{split}.pt")
            splits[split] = tensors
    names = list(meta["class_names"])
    bundle_splits = {}
    for split in SPLITS:
        tensors = splits[split]
        out = {"image": tensors["image"], "labels": tensors["labels"], "seg": tensors["seg"].long()}
        if s.with_cls:
            out["cls"] = tensors["cls"].long()
        bundle_splits[split] = out
    targets = {"labels": TargetSpec("multilabel", len(names), names),
               "seg": TargetSpec("segmentation", len(names) + 1, ["background", *names])}
    if s.with_cls:
        targets["cls"] = TargetSpec("classification", len(names), names)
    return DataBundle(name="coco", targets=targets, splits=bundle_splits, mean=list(cfg.mean), std=list(cfg.std),
                      fingerprint=fingerprint, info={"path": str(root), "cache": str(folder)})
