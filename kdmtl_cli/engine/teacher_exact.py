"""`teacher.cache=exact`: the frozen teacher's outputs cached per (sample, augmentation) for the
augmentation actually drawn each epoch, so that training is bit-identical to `teacher.cache=off`
while a view drawn again skips the teacher.

With CIFAR's pad-4 crop and flip a sample has 2 x 9 x 9 = 162 views (flip, dy, dx); the stored
slot of a view is `flip * S^2 + dy * S + dx`, S = 2p + 1. Over a 240-epoch recipe about half of
the views drawn were drawn before; over 20 epochs about 6% (1 - (161/162)^(e-1) at epoch e).

Why the outputs are bit-identical, not merely close: a CPU or GPU kernel may pick another
algorithm for another batch size (a sub-batch of 3 images gives other low bits than the same 3
inside a batch of 64), but at one batch shape each sample's result depends on that sample alone.
So the teacher only ever runs on batches of the training batch's own shape: a step whose views
are not all stored runs the teacher on its missing views plus views that later steps of the same
epoch will draw (the epoch's plan is a pure function of (seed, epoch): `TensorLoader.epoch_plan`)
and stores them all; a batch of another shape (an epoch's last, smaller batch) runs the teacher
itself, as `off` does. The missing views of the step are the student's own input rows; the
views ahead are built by `TensorLoader.make_batch`, the code that will build them for the student
(its CRC-32 is stored and checked when the view is read, on the first batch of each epoch).

Exact with `teacher.cache_dtype=float32` (the default for this mode) and no `cache_topk`; with
float16 or top-k the stored outputs are rounded as for `views`, and the run says so.

Storage, on the CPU: under ``<cache_dir>/teacher_outputs/exact-<key>/``, arrays [N, V, ...] in
sparse memory-mapped files (a view's row is written when first drawn), a `stored` flag and the
input CRC per view, and `meta.json`. Its bound N x V x (bytes per view) is stated when the run
opens it and must fit on the disk. The key hashes what the teacher's bits depend on: weights,
data, augmentation, stored entries, dtype, precision, memory layout, the batch shape, the device
type, torch's version, the CPU's vector capability and thread count. Runs with the same key
share the entry (sweeps over student settings reuse each other's views); one run at a time
writes it, another one meanwhile keeps a private entry that is removed when it ends. A row is
flagged only after it is written, so a killed run leaves no row that reads as stored.
On a CUDA device the store lives in device memory when its bound fits a quarter of the free
memory (run-local: nothing to copy from memory maps each step).
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch

from kdmtl_cli.engine import teacher_outputs as stored
from kdmtl_cli.engine.checkpoint import atomic_write_text
from kdmtl_cli.engine.hardware import device_memory_budget
from kdmtl_cli.engine.locks import try_lock
from kdmtl_cli.errors import KdmtlError

FORMAT_VERSION = 1


def num_views(hflip: bool, crop_padding: int) -> int:
    side = 2 * crop_padding + 1
    return (2 if hflip else 1) * side * side


def view_slots(flip: torch.Tensor, crop: Optional[torch.Tensor], crop_padding: int) -> torch.Tensor:
    """The stored slot of each sample's augmentation: flip * S^2 + dy * S + dx, S = 2p + 1."""
    side = 2 * crop_padding + 1
    slot = flip.long().cpu() * side * side
    if crop is not None and crop_padding > 0:
        crop = crop.long().cpu()
        slot = slot + crop[:, 0] * side + crop[:, 1]
    return slot


class ExactTeacherCache:
    """Teacher outputs of the views drawn so far, filled as training draws them (module docstring)."""

    def __init__(self, *, root: Optional[Path], entries: dict, arrays: Dict[str, torch.Tensor],
                 flags: torch.Tensor, crc: torch.Tensor, teacher, loader, hardware, private: bool = False,
                 lock=None):
        self.root, self.entries, self.arrays, self.flags, self.crc = root, entries, arrays, flags, crc
        self.teacher, self.loader, self.hw = teacher, loader, hardware
        self.private, self.lock = private, lock      # lock: the shared entry's writer lock, held until close()
        self.check_next = True
        self._plan_epoch = None
        self.counts = {"samples": 0, "teacher_rows": 0, "teacher_batches": 0, "stored": 0, "live_samples": 0}

    # ---- what the objective calls ----------------------------------------------------------
    def covers(self, batch: dict) -> bool:
        """Training batches of the epoch's standard shape (an epoch's last, smaller batch runs the
        teacher itself: another shape may give other low bits)."""
        self._plan()
        if batch["image"].shape[0] == self.shape:
            return True
        self.counts["live_samples"] += int(batch["image"].shape[0])
        return False

    def teacher_outputs(self, batch: dict) -> dict:
        index = batch["index"].detach().cpu()
        slot = view_slots(batch["flip"], batch.get("crop"), self.loader.crop_padding)
        have = self.flags[index.to(self.flags.device), slot.to(self.flags.device)].cpu()
        if self.check_next and bool(have.any()):
            self.check_next = False
            rows = have.nonzero().flatten()
            expected = self.crc[index[rows].to(self.crc.device), slot[rows].to(self.crc.device)].cpu().numpy()
            if not np.array_equal(stored.image_crc(batch["image"][rows.to(batch["image"].device)]), expected):
                raise KdmtlError(f"the student's inputs differ from the views cached in {self.root} (a replay "
                                 "mismatch); delete that directory to rebuild the cache, or set teacher.cache=off")
        missing = (~have).nonzero().flatten()
        self.counts["samples"] += len(index)
        if len(missing):
            self._fill(batch, index, missing)
        return stored.read_entries(self.entries, self.arrays, (index.to(self.flags.device), slot.to(self.flags.device)),
                                   self.hw.device)

    def new_epoch(self) -> None:
        self.check_next = True

    def epoch_metrics(self) -> Dict[str, float]:
        """Since the last call (an epoch): `hit_rate`, the fraction of the teacher's forward work
        that `off` would have done and this cache skipped (rows run to fill it, padding included,
        and the live last batch count as work); the teacher's batches run; the views stored."""
        c, self.counts = self.counts, {k: 0 for k in self.counts}
        total = c["samples"] + c["live_samples"]
        work = c["teacher_rows"] + c["live_samples"]
        return {"teacher_cache/hit_rate": 1.0 - work / total if total else 0.0,
                "teacher_cache/teacher_batches": float(c["teacher_batches"]),
                "teacher_cache/views_stored": float(c["stored"])}

    # ---- filling -----------------------------------------------------------------------------
    def _plan(self) -> None:
        """This rank's sequence of (index, flip, crop) for the loader's current epoch."""
        loader = self.loader
        if self._plan_epoch == loader.epoch:
            return
        order, flips, crops, _ = loader.epoch_plan()
        rank, world = loader.shard
        chunks = [order[b * loader.batch_size:(b + 1) * loader.batch_size] for b in range(len(loader))]
        if world > 1:
            chunks = [torch.tensor_split(c, world)[rank] for c in chunks]
        self.shape = len(chunks[0]) if chunks else 0
        self.sequence = torch.cat(chunks) if chunks else torch.zeros(0, dtype=torch.long)
        self.position = torch.full((loader.num_samples,), -1, dtype=torch.long)
        self.position[self.sequence] = torch.arange(len(self.sequence))
        self.flips, self.crops = flips, crops
        self.slots = view_slots(flips, crops, loader.crop_padding)
        self._plan_epoch = loader.epoch

    def _fill(self, batch: dict, index: torch.Tensor, missing: torch.Tensor) -> None:
        """Run the teacher on one batch of the standard shape: this step's missing views, then
        views later steps of this epoch will draw, padded by repeating the first row."""
        need = self.shape - len(missing)
        ahead = self._views_ahead(index, need)
        images = [batch["image"][missing.to(batch["image"].device)]]
        if len(ahead):
            crop = self.crops[ahead] if self.crops is not None else None
            where = self.loader.images.device
            built = self.loader.make_batch(ahead.to(where), self.flips[ahead].to(where),
                                           crop.to(where) if crop is not None else None)["image"]
            images.append(built.to(self.hw.device))
        real = len(missing) + len(ahead)
        if real < self.shape:
            images.append(images[0][:1].expand(self.shape - real, *images[0].shape[1:]))
        image = self.hw.to_input(torch.cat(images))
        self.teacher.eval()
        with torch.no_grad(), self.hw.autocast():
            out = stored.flatten_outputs(self.teacher(image))
        rows_index = torch.cat([index[missing], ahead])
        rows_slot = torch.cat([view_slots(batch["flip"], batch.get("crop"), self.loader.crop_padding)[missing],
                               self.slots[ahead]])
        self._write(rows_index, rows_slot, {name: value[:real] for name, value in out.items()}, image[:real])
        self.counts["teacher_rows"] += self.shape
        self.counts["teacher_batches"] += 1
        self.counts["stored"] += real

    def _views_ahead(self, index: torch.Tensor, need: int) -> torch.Tensor:
        """Up to `need` samples whose view for this epoch comes after this step and is not stored."""
        if need <= 0:
            return torch.zeros(0, dtype=torch.long)
        start = int(self.position[index].max()) + 1
        found, stop = [], len(self.sequence)
        while start < stop and need > 0:
            window = self.sequence[start:start + 4 * need]
            have = self.flags[window.to(self.flags.device), self.slots[window].to(self.flags.device)].cpu()
            take = window[~have][:need]
            found.append(take)
            need -= len(take)
            start += len(window)
        return torch.cat(found) if found else torch.zeros(0, dtype=torch.long)

    def _write(self, index: torch.Tensor, slot: torch.Tensor, outputs: Dict[str, torch.Tensor],
               image: torch.Tensor) -> None:
        where = (index.to(self.flags.device), slot.to(self.flags.device))
        for name, spec in self.entries.items():
            value = outputs[name]
            parts = {}
            if "topk" in spec:
                values, idx, lse = stored.topk_parts(value, spec["topk"])
                parts = {f"{name}:values": stored.stored_array(values, spec["dtype"], name),
                         f"{name}:index": idx.cpu().numpy().astype(np.int32),
                         f"{name}:lse": lse.cpu().numpy().astype(np.float32)}
            else:
                parts = {name: stored.stored_array(value, spec["dtype"], name)}
            for array, rows in parts.items():
                self.arrays[array][where] = torch.from_numpy(rows).to(self.arrays[array].device)
        self.crc[where] = torch.from_numpy(stored.image_crc(image)).to(self.crc.device)
        self.flags[where] = True        # last: a row is flagged only once written

    def close(self) -> None:
        """Release the shared entry (another run may write it) or remove the private one."""
        if self.lock is not None:
            self.lock.close()
            self.lock = None
        if self.private and self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)


# ---- opening ---------------------------------------------------------------------------------
def open_exact(*, cache_dir: str, teacher, loader, hardware, teacher_cfg, data, task_kinds: Dict[str, str],
               epochs: int, say=print, resident: Optional[bool] = None) -> ExactTeacherCache:
    """The exact cache for this teacher, data, augmentation and batch shape: the shared entry,
    or a private one while another run writes the shared one; in device memory when it fits
    (`resident`, by default on a CUDA device with room)."""
    if getattr(loader, "scale_crop", None):                    # check_settings refuses it first
        raise KdmtlError(stored.scale_crop_refusal("exact"))
    if getattr(loader, "resized_crop", None) is not None:     # likewise: windows are not enumerable slots
        raise KdmtlError(stored.RESIZED_CROP_REFUSAL)
    dtype_name, topk = stored.cache_dtype(teacher_cfg), teacher_cfg.cache_topk
    n, v = loader.num_samples, num_views(loader.hflip, loader.crop_padding)
    rank, world = loader.shard
    shape = len(torch.tensor_split(torch.arange(min(n, loader.batch_size)), world)[rank])
    with torch.no_grad(), hardware.autocast():
        teacher.eval()
        probe_batch = loader.make_batch(torch.arange(min(n, 2)).to(loader.images.device),
                                        torch.zeros(min(n, 2), dtype=torch.bool, device=loader.images.device))
        probe = teacher(hardware.to_input(probe_batch["image"].to(hardware.device)))
    entries = stored.entry_specs(probe, topk, dtype_name, task_kinds)
    content = {
        "version": FORMAT_VERSION, "mode": "exact", "teacher": stored.weights_digest(teacher), "topk": topk,
        "dtype": dtype_name, "precision": hardware.precision, "channels_last": hardware.channels_last,
        "batch_shape": shape, "device": hardware.device.type, "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
        "data": stored.data_content(data, loader, hflip=bool(loader.hflip)), "entries": entries,
    }
    specs = {**stored.array_specs(entries, n, v), "stored": ((n, v), np.bool_), "input_crc": ((n, v), np.int64)}
    bound = sum(int(np.prod(shape_)) * np.dtype(dtype).itemsize for shape_, dtype in specs.values())
    approximate = dtype_name != "float32" or any("topk" in spec for spec in entries.values())
    drawn = min(n * v, max(1, epochs) * n)
    note = (f"teacher outputs (exact): {n} samples x {v} views, {len(entries)} stored output(s), {dtype_name}"
            f"{f', top-{topk} logits' if topk else ''}: at most {stored.fmt_bytes(bound)}; {epochs} epoch(s) draw "
            f"at most {drawn} views ({stored.fmt_bytes(bound * drawn / (n * v))})")
    if approximate:
        say("teacher.cache=exact with teacher.cache_dtype=float16 or teacher.cache_topk rounds the stored "
            "outputs: training is close to, not bit-identical with, teacher.cache=off")
    if resident is None:
        resident = bound <= device_memory_budget(hardware.device)
    common = dict(entries=entries, teacher=teacher, loader=loader, hardware=hardware)
    if resident:
        say(f"{note}, in {hardware.device} memory")
        arrays = {name: torch.zeros(shape_, dtype=torch.from_numpy(np.zeros(0, dtype)).dtype, device=hardware.device)
                  for name, (shape_, dtype) in specs.items()}
        flags, crc = arrays.pop("stored"), arrays.pop("input_crc")
        return ExactTeacherCache(root=None, arrays=arrays, flags=flags, crc=crc, **common)
    base = Path(cache_dir).expanduser() / "teacher_outputs"
    entry = base / f"exact-{stored.cache_key(content)}"
    base.mkdir(parents=True, exist_ok=True)
    _remove_dead_private_entries(base)
    free = shutil.disk_usage(base).free + _allocated(entry)
    if bound > free:
        raise KdmtlError(f"teacher.cache=exact needs up to {stored.fmt_bytes(bound)} but {base} has "
                         f"{stored.fmt_bytes(free)} free; free space, use teacher.cache_topk / teacher.cache_dtype="
                         "float16 (approximate), teacher.cache=views, or teacher.cache=off")
    lock = try_lock(base.parent / "locks" / f"{entry.name}.lock")
    private = lock is None
    if private:
        entry = Path(tempfile.mkdtemp(dir=base, prefix=f".exact-private-{os.getpid()}-"))
        say(f"{note}; another run is filling the shared entry, so this run fills a private one at {entry} "
            "(removed at its end)")
    else:
        reused = _open_entry(entry, content, specs)
        say(f"{note}, {'reusing' if reused else 'filling'} {entry}")
    if private or not _open_entry(entry, content, specs):
        _create_entry(entry, content, specs)
    arrays = {name: torch.from_numpy(np.load(entry / f"{name.replace('/', '.')}.npy", mmap_mode="r+"))
              for name in specs}
    flags, crc = arrays.pop("stored"), arrays.pop("input_crc")
    cache = ExactTeacherCache(root=entry, arrays=arrays, flags=flags, crc=crc, private=private, lock=lock, **common)
    atexit.register(cache.close)          # also when the run fails; kill -9: the kernel drops the lock
    return cache


def _open_entry(entry: Path, content: dict, specs: dict) -> bool:
    """Whether `entry` holds a complete store for `content` (a damaged one is removed)."""
    try:
        meta = json.loads((entry / "meta.json").read_text())
        if meta.get("content") != content:
            raise ValueError("other settings")
        for name, (shape, dtype) in specs.items():
            array = np.load(entry / f"{name.replace('/', '.')}.npy", mmap_mode="r")
            if tuple(array.shape) != tuple(shape) or array.dtype != dtype:
                raise ValueError(name)
        return True
    except (OSError, ValueError, KeyError):
        shutil.rmtree(entry, ignore_errors=True)
        return False


def _create_entry(entry: Path, content: dict, specs: dict) -> None:
    """Sparse, zero-filled arrays, then `meta.json` last: without it the entry is incomplete."""
    entry.mkdir(parents=True, exist_ok=True)
    for name, (shape, dtype) in specs.items():
        np.lib.format.open_memmap(entry / f"{name.replace('/', '.')}.npy", mode="w+", dtype=dtype, shape=shape).flush()
    atomic_write_text(json.dumps({"content": content}, indent=1), entry / "meta.json")


def _allocated(entry: Path) -> int:
    """Bytes already on disk in `entry` (its sparse files count what was written)."""
    if not entry.exists():
        return 0
    return sum(p.stat().st_blocks * 512 for p in entry.iterdir() if p.is_file())


def _remove_dead_private_entries(base: Path) -> None:
    """Private entries of runs that were killed before removing theirs."""
    for path in base.glob(".exact-private-*"):
        try:
            pid = int(path.name.split("-")[2])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except (ValueError, IndexError, PermissionError):
            continue
