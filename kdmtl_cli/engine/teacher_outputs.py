"""The teacher-output cache (`teacher.cache=views|deterministic`): the frozen teacher's outputs
(every task output and every feature a distillation method reads) stored once per *view* of
each training sample, so distillation steps skip the teacher's forward pass.

Why views and not indices: a cache keyed by sample index alone hands the student, under random
augmentation, teacher targets computed on some other crop or flip (torchdistill's removed
cache). Teacher and student must see the same input (Beyer et al., CVPR 2022). Here, as in FKD
(Shen & Xing, ECCV 2022), each sample has K fixed augmentations (flip, crop offsets or random
resized-crop window; a `ViewTable` drawn from the run's seed); the cache stores the teacher's outputs on each, and
every epoch the loader picks one of the K views per sample and builds exactly that input with
the same code (`TensorLoader.make_batch`) that built the cached one. `deterministic` is K = 1
without augmentation (the student then trains on unaugmented images; the run says so).

Layout, under ``<cache_dir>/teacher_outputs/<key>/``: one ``.npy`` array per stored entry,
[N, K, ...] (memory-mapped when read), plus `meta.json`. fp16 by default (`teacher.cache_dtype`).
With `teacher.cache_topk=k`, classification logits keep their k largest values, their class
indices and the log-sum-exp; the others are rebuilt as one shared value so that the softmax at
T = 1 is exact on the top k and spreads the remaining mass evenly (the error is in README).
Each view also stores a CRC-32 of its input image; the first batch of every epoch is checked
against it, so a replay that drifted is an error, never silent.

The key hashes the teacher's weights and buffers, the data (fingerprint, normalisation, size,
augmentation settings), the views (K, seed), the stored entries, dtype, top-k and precision:
any change builds a new entry; an entry whose files are incomplete or damaged is rebuilt. An
entry is built in a temporary directory and renamed into place when complete, so a crash
never leaves a half-written cache that a later run would read.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import uuid
import zlib
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch

from kdmtl_cli.data.loader import ViewTable
from kdmtl_cli.engine.checkpoint import atomic_write_text
from kdmtl_cli.engine import preemption
from kdmtl_cli.engine.hardware import device_memory_budget
from kdmtl_cli.engine.locks import file_lock
from kdmtl_cli.errors import KdmtlError

FORMAT_VERSION = 1
MODES = ("off", "views", "deterministic", "exact")   # exact: kdmtl_cli/engine/teacher_exact.py
DTYPES = {"float16": np.float16, "float32": np.float32}


def weights_digest(module: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer (non-persistent ones included: a teacher fed
    through an input renormalisation differs by those), by name, dtype, shape and bytes."""
    h = hashlib.sha256()
    named = sorted([*module.named_parameters(), *module.named_buffers()], key=lambda kv: kv[0])
    for name, tensor in named:
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def image_crc(images: torch.Tensor) -> np.ndarray:
    """CRC-32 of each image's float32 bytes in standard (NCHW-contiguous) layout."""
    flat = images.detach().float().cpu().contiguous().numpy()
    return np.array([zlib.crc32(row.tobytes()) for row in flat], dtype=np.int64)


def flatten_outputs(out: dict) -> Dict[str, torch.Tensor]:
    entries = {f"outputs/{k}": v for k, v in out["outputs"].items()}
    entries.update({f"features/{k}": v for k, v in out["features"].items()})
    return entries


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def check_settings(teacher_cfg) -> None:
    mode = str(teacher_cfg.cache)
    if mode not in MODES:
        raise KdmtlError(f"unknown teacher.cache '{mode}'; choose off, views, exact or deterministic")
    root = teacher_cfg._get_root() if hasattr(teacher_cfg, "_get_root") else None
    data_cfg = root.get("data", None) if root is not None and root is not teacher_cfg else None
    if mode in ("views", "exact") and data_cfg is not None and data_cfg.get("scale_crop", None):
        raise KdmtlError(scale_crop_refusal(mode))
    if mode == "exact" and data_cfg is not None and data_cfg.get("resized_crop_scale", None) is not None:
        raise KdmtlError(RESIZED_CROP_REFUSAL)
    if int(teacher_cfg.cache_views) < 1:
        raise KdmtlError(f"teacher.cache_views must be at least 1 (got {teacher_cfg.cache_views})")
    if teacher_cfg.cache_topk is not None and int(teacher_cfg.cache_topk) < 1:
        raise KdmtlError(f"teacher.cache_topk must be a positive number of classes or null (got "
                         f"{teacher_cfg.cache_topk})")
    if teacher_cfg.cache_dtype is not None and str(teacher_cfg.cache_dtype) not in DTYPES:
        raise KdmtlError(f"unknown teacher.cache_dtype '{teacher_cfg.cache_dtype}'; choose float16, float32 or "
                         "null (float32 for cache=exact, float16 otherwise)")


def cache_dtype(teacher_cfg) -> str:
    """`teacher.cache_dtype`, null meaning float32 for `exact` (its outputs then equal the live
    teacher's bit for bit) and float16 for the stored views (half the bytes)."""
    if teacher_cfg.cache_dtype is not None:
        return str(teacher_cfg.cache_dtype)
    return "float32" if str(teacher_cfg.cache) == "exact" else "float16"


def scale_crop_refusal(mode: str) -> str:
    return (f"teacher.cache={mode} does not store random scale-crop views; set data.scale_crop=null, or "
            "teacher.cache=deterministic (unaugmented views) or teacher.cache=off")


# exact keys a view by an enumerable slot (teacher_exact.view_slots); resized-crop windows are not
# enumerable, and a drawn window almost never recurs, so such a cache would never be read back
RESIZED_CROP_REFUSAL = ("teacher.cache=exact does not store random resized-crop views (a window almost never "
                        "recurs); set teacher.cache=views (K stored windows per sample), teacher.cache=deterministic "
                        "or teacher.cache=off, or data.resized_crop_scale=null")


def plan_views(mode: str, num_views: int, num_samples: int, *, hflip: bool, crop_padding: int, seed: int,
               say=print, resized_crop=None) -> ViewTable:
    """The stored augmentations: K per sample for `views`, one unaugmented for `deterministic`.
    `resized_crop`: the train loader's (`TensorLoader.resized_crop`), when on: each view gets a window."""
    if mode == "deterministic":
        if hflip or crop_padding or resized_crop is not None:
            say("teacher.cache=deterministic: the student trains on unaugmented images (no flip, no crop), "
                "the views the cache stores; use teacher.cache=views to keep the augmentation")
        return ViewTable(torch.zeros(num_samples, 1, dtype=torch.bool), None)
    if not hflip and not crop_padding and resized_crop is None:
        if num_views > 1:
            say(f"teacher.cache=views: the data has no random augmentation, so 1 view per sample is stored, "
                f"not {num_views}")
        num_views = 1
    return ViewTable.draw(num_samples, num_views, hflip=hflip, crop_padding=crop_padding, seed=seed,
                          resized_crop=resized_crop)


class TeacherOutputCache:
    """Stored teacher outputs for the (index, view) pairs of one training split."""

    def __init__(self, root: Path, meta: dict, views: ViewTable, device: torch.device,
                 resident: Optional[bool] = None):
        """`resident`: hold the arrays in the device's memory instead of reading them from the
        memory maps each step; by default when they fit in a quarter of a CUDA device's free memory."""
        self.root, self.meta, self.views, self.device = root, meta, views, device
        arrays = {name: np.load(root / file, mmap_mode="r") for name, file in array_files(meta["entries"]).items()}
        if resident is None:
            resident = sum(a.nbytes for a in arrays.values()) <= device_memory_budget(device)
        self.resident = bool(resident)
        self.arrays = {name: torch.from_numpy(np.array(a)).to(device) for name, a in arrays.items()} \
            if self.resident else arrays
        self.crc = np.load(root / "input_crc.npy", mmap_mode="r")
        self.check_next = True          # verify the inputs of the next batch against the stored CRCs

    # ---- reading ---------------------------------------------------------------------------
    def covers(self, batch: dict) -> bool:
        """Whether this training batch's teacher outputs come from here (its views were replayed)."""
        return "view" in batch

    def teacher_outputs(self, batch: dict) -> dict:
        return self.lookup(batch["index"], batch["view"], batch["image"])

    def lookup(self, index: torch.Tensor, view: torch.Tensor, image: Optional[torch.Tensor] = None) -> dict:
        """The teacher's {"outputs", "features"} for these samples' views, as float32 on the
        device; with `image` (and once per epoch) its bytes are checked against the cache's."""
        i = index.detach().cpu().numpy()
        v = view.detach().cpu().numpy()
        if image is not None and self.check_next:
            self.check_next = False
            if not np.array_equal(image_crc(image), self.crc[i, v]):
                raise KdmtlError(f"the student's inputs differ from the views cached in {self.root} (a replay "
                                 "mismatch); delete that directory to rebuild the cache, or set teacher.cache=off")
        return read_entries(self.meta["entries"], self.arrays, (i, v), self.device)

    def new_epoch(self) -> None:
        self.check_next = True

    def epoch_metrics(self) -> Dict[str, float]:
        return {}          # every covered step reads the cache: nothing to report

    def close(self) -> None:
        """Nothing to release: the entry is read-only once built."""


def read_entries(entries: dict, arrays: dict, rows, device: torch.device) -> dict:
    """{"outputs", "features"} of the stored `rows` (an index tuple) of every entry, float32 on
    `device`; `arrays` hold numpy memory maps or tensors (resident on the device)."""
    def take(name):
        array = arrays[name]
        if isinstance(array, torch.Tensor):
            return array[tuple(torch.as_tensor(r, device=array.device) for r in rows)]
        return torch.from_numpy(np.ascontiguousarray(array[rows]))

    out: dict = {"outputs": {}, "features": {}}
    for name, spec in entries.items():
        group, _, key = name.partition("/")
        if "topk" in spec:
            values, idx, lse = (take(f"{name}:{part}").to(device) for part in ("values", "index", "lse"))
            value = rebuild_logits(values.float(), idx.long(), lse.float(), spec["classes"])
        else:
            value = take(name)
        out[group][key] = value.to(device).float()
    return out


def topk_parts(logits: torch.Tensor, k: int):
    """(top-k values, their indices, log-sum-exp) of logits [B, C]."""
    values, index = logits.float().topk(k, dim=1)
    return values, index, torch.logsumexp(logits.float(), dim=1)


def rebuild_logits(values: torch.Tensor, index: torch.Tensor, lse: torch.Tensor, classes: int) -> torch.Tensor:
    """Logits whose softmax equals the true one on the stored top k and shares the remaining
    mass 1 - sum_topk p equally among the other C - k classes."""
    k = values.shape[1]
    if k >= classes:
        return torch.zeros(values.shape[0], classes, device=values.device).scatter(1, index, values)
    top_mass = torch.exp(values - lse[:, None]).sum(1).clamp(max=1 - 1e-7)
    fill = lse + torch.log1p(-top_mass) - math.log(classes - k)
    out = fill[:, None].expand(-1, classes).clone()
    return out.scatter(1, index, values)


# ---- building / opening -------------------------------------------------------------------
def cache_key(content: dict) -> str:
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _open_existing(entry: Path, content: dict, views: ViewTable, device) -> Optional[TeacherOutputCache]:
    """The cache at `entry` if it is complete and intact; None when it must be rebuilt; an
    error when it was built for other settings (never used silently)."""
    meta_path = entry / "meta.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return None
    if meta.get("content") != content:
        raise KdmtlError(f"the teacher output cache at {entry} was built for other settings than this run's "
                         "(same key); delete that directory to rebuild it")
    try:
        cache = TeacherOutputCache(entry, meta, views, device)
        n, k = meta["num_samples"], meta["num_views"]
        for name, (shape, dtype) in array_specs(meta["entries"], n, k).items():
            if tuple(cache.arrays[name].shape) != shape or cache.arrays[name].dtype != dtype:
                return None
        if tuple(cache.crc.shape) != (n, k):
            return None
    except (OSError, ValueError, KeyError):
        return None
    return cache


def open_or_build(*, cache_dir: str, teacher, loader, hardware, teacher_cfg, data, views: ViewTable,
                  task_kinds: Dict[str, str], seed: int, say=print, progress_mode: str = "plain") -> TeacherOutputCache:
    """Open the cache entry for this teacher, data and views, building it first if needed.
    `task_kinds` ({task: kind name}) says which outputs are classification logits (top-k)."""
    mode, topk = str(teacher_cfg.cache), teacher_cfg.cache_topk
    if mode == "views" and getattr(loader, "scale_crop", None):   # check_settings refuses it first
        raise KdmtlError(scale_crop_refusal(mode))
    if mode == "views" and getattr(loader, "resized_crop", None) is not None and views.windows is None:
        # the student would silently train without the resized crop
        raise KdmtlError("teacher.cache=views with data.resized_crop_scale: the stored views have no resized-crop "
                         "windows (plan_views needs resized_crop=the train loader's); set teacher.cache=off")
    dtype_name = cache_dtype(teacher_cfg)
    n = loader.num_samples
    probe_index = torch.arange(min(n, loader.batch_size))
    probe = _teacher_batch(teacher, loader, hardware, probe_index, views, 0)
    entries = entry_specs(probe, topk, dtype_name, task_kinds)
    content = {
        "version": FORMAT_VERSION, "teacher": weights_digest(teacher), "mode": mode,
        "num_views": views.num_views, "view_seed": seed, "topk": topk, "dtype": dtype_name,
        "precision": hardware.precision, "channels_last": hardware.channels_last,
        "data": data_content(data, loader, hflip=bool(views.flips.any())),
        "entries": entries,
    }
    if views.windows is not None:   # the resized-crop windows themselves (absent: keys as before)
        content["windows"] = hashlib.sha256(views.windows.contiguous().numpy().tobytes()).hexdigest()[:20]
    key = cache_key(content)
    entry = Path(cache_dir).expanduser() / "teacher_outputs" / key
    # Sweep jobs sharing this teacher build the entry once: the others wait, then reuse it.
    with file_lock(entry.parent.parent / "locks" / f"teacher_outputs-{key}.lock",
                   on_wait=lambda: say(f"teacher outputs: another job is building {entry}; waiting")):
        return _open_or_build_locked(entry, content, entries, teacher, loader, hardware, views, topk, probe,
                                     dtype_name, say, progress_mode)


def entry_specs(probe: dict, topk, dtype_name: str, task_kinds: Dict[str, str]) -> dict:
    """Stored entry name -> {shape, dtype[, topk, classes]}, from one batch of teacher outputs."""
    entries = {}
    for name, value in flatten_outputs(probe).items():
        spec = {"shape": list(value.shape[1:]), "dtype": dtype_name}
        task = name.partition("/")[2]
        if (topk is not None and name.startswith("outputs/") and task_kinds.get(task) == "classification"
                and int(topk) < value.shape[1]):
            spec.update(topk=int(topk), classes=int(value.shape[1]))
        entries[name] = spec
    return entries


def data_content(data, loader, *, hflip: bool) -> dict:
    """What of the data and its augmentation a cache key depends on."""
    return {"name": data.name, "fingerprint": data.fingerprint, "mean": list(data.mean), "std": list(data.std),
            "num_samples": loader.num_samples, "image": list(loader.images.shape[1:]), "hflip": hflip,
            "crop_padding": loader.crop_padding, "pad_values": loader.pad_values}


def _open_or_build_locked(entry: Path, content: dict, entries: dict, teacher, loader, hardware, views: ViewTable,
                          topk, probe, dtype_name: str, say, progress_mode: str) -> TeacherOutputCache:
    n = loader.num_samples
    # Builds killed halfway (kill -9) leave their directory; under this lock none is running.
    for stale in entry.parent.glob(f".{entry.name}.building-*"):
        shutil.rmtree(stale, ignore_errors=True)
    if entry.exists():
        cache = _open_existing(entry, content, views, hardware.device)
        if cache is not None:
            say(f"teacher outputs: reusing the cache at {entry}")
            return cache
        say(f"teacher outputs: the cache at {entry} is incomplete or damaged; rebuilding it")
        shutil.rmtree(entry, ignore_errors=True)
    total = n * views.num_views * (8 + sum(bytes_per_view(spec) for spec in entries.values()))
    entry.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(entry.parent).free
    if total > free:
        raise KdmtlError(f"the teacher output cache needs {fmt_bytes(total)} but {entry.parent} has "
                         f"{fmt_bytes(free)} free; free space, use teacher.cache_topk / fewer teacher.cache_views, "
                         "or teacher.cache=off")
    features = sum(1 for name in entries if name.startswith("features/"))
    say(f"teacher outputs: caching {n} samples x {views.num_views} view(s) ({len(probe['outputs'])} outputs, "
        f"{features} features, {dtype_name}{f', top-{topk} logits' if topk else ''}): {fmt_bytes(total)} "
        f"at {entry}")
    meta = {"content": content, "num_samples": n, "num_views": views.num_views, "entries": entries,
            "bytes": total}
    _build(entry, meta, teacher, loader, hardware, views, progress_mode)
    return TeacherOutputCache(entry, meta, views, hardware.device)


def array_files(entries: dict) -> Dict[str, str]:
    """Array name -> file name; a top-k entry is three arrays (values, index, lse)."""
    files, i = {}, 0
    for name, spec in entries.items():
        for array in ([f"{name}:values", f"{name}:index", f"{name}:lse"] if "topk" in spec else [name]):
            files[array], i = f"entry_{i}.npy", i + 1
    return files


def array_specs(entries: dict, n: int, k: int) -> Dict[str, tuple]:
    """Array name -> (shape, numpy dtype)."""
    specs = {}
    for name, spec in entries.items():
        if "topk" in spec:
            t = spec["topk"]
            specs.update({f"{name}:values": ((n, k, t), DTYPES[spec["dtype"]]), f"{name}:index": ((n, k, t), np.int32),
                          f"{name}:lse": ((n, k), np.float32)})
        else:
            specs[name] = ((n, k, *spec["shape"]), DTYPES[spec["dtype"]])
    return specs


def bytes_per_view(spec: dict) -> int:
    if "topk" in spec:
        return spec["topk"] * (np.dtype(DTYPES[spec["dtype"]]).itemsize + 4) + 4
    return int(np.prod(spec["shape"], dtype=np.int64)) * np.dtype(DTYPES[spec["dtype"]]).itemsize


@torch.no_grad()
def _teacher_batch(teacher, loader, hardware, index: torch.Tensor, views: ViewTable, v: int,
                   with_image: bool = False):
    flip = views.flips[index, v]
    crop = views.crop_plan(index, v)
    where = loader.images.device
    batch = loader.make_batch(index.to(where), flip.to(where), crop.to(where) if crop is not None else None)
    image = batch["image"].to(hardware.device)
    teacher.eval()
    with hardware.autocast():
        out = teacher(hardware.to_input(image))
    return (out, image) if with_image else out


def _build(entry: Path, meta: dict, teacher, loader, hardware, views: ViewTable, progress_mode: str) -> None:
    from kdmtl_cli.engine.logging import Progress

    tmp = entry.parent / f".{entry.name}.building-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        n, k = meta["num_samples"], meta["num_views"]
        files = array_files(meta["entries"])
        arrays = {name: np.lib.format.open_memmap(tmp / files[name], mode="w+", dtype=dtype, shape=shape)
                  for name, (shape, dtype) in array_specs(meta["entries"], n, k).items()}
        crc = np.lib.format.open_memmap(tmp / "input_crc.npy", mode="w+", dtype=np.int64, shape=(n, k))
        step = loader.batch_size
        batches = math.ceil(n / step)
        with Progress(progress_mode, "teacher outputs", k) as progress:
            for v in range(k):
                progress.start_epoch(v + 1, batches, v)
                for start in range(0, n, step):
                    index = torch.arange(start, min(n, start + step))
                    out, image = _teacher_batch(teacher, loader, hardware, index, views, v, with_image=True)
                    crc[start:start + len(index), v] = image_crc(image)
                    flat = flatten_outputs(out)
                    rows = slice(start, start + len(index))
                    for name, spec in meta["entries"].items():
                        if "topk" in spec:
                            values, idx, lse = topk_parts(flat[name], spec["topk"])
                            arrays[f"{name}:values"][rows, v] = stored_array(values, spec["dtype"], name)
                            arrays[f"{name}:index"][rows, v] = idx.cpu().numpy().astype(np.int32)
                            arrays[f"{name}:lse"][rows, v] = lse.cpu().numpy().astype(np.float32)
                        else:
                            arrays[name][rows, v] = stored_array(flat[name], spec["dtype"], name)
                    progress.batch()
                    # A stop signal: the partial entry is discarded (below); the next start rebuilds it.
                    preemption.check(f"while the teacher-output cache was built ({start + len(index)} of {n} "
                                     f"samples, view {v + 1} of {k})")
                progress.end_epoch(v + 1, "stored")
        for array in (*arrays.values(), crc):
            array.flush()
        del arrays, crc
        atomic_write_text(json.dumps(meta, indent=1), tmp / "meta.json")
        try:
            os.replace(tmp, entry)          # atomic: the entry appears complete or not at all
        except OSError:
            if not (entry / "meta.json").exists():   # not another process's finished build
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def stored_array(value: torch.Tensor, dtype_name: str, name: str) -> np.ndarray:
    array = value.detach().float().cpu().numpy()
    if dtype_name == "float16" and np.abs(array).max(initial=0.0) > np.finfo(np.float16).max:
        raise KdmtlError(f"teacher {name} has values beyond float16's range ({np.abs(array).max():.3g}); "
                         "use teacher.cache_dtype=float32")
    return array.astype(DTYPES[dtype_name])

