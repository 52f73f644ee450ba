#!/usr/bin/env python
"""kdmtl's engine against torchdistill 1.1.5 and a hand-written PyTorch loop on one KD job, from
identical weights and identical batches (figures go to the README; never asserted in tests).

  python scripts/bench_torchdistill.py [--rounds 5] [--steps 30] [--warmup 3] [--check-steps 3]
                                       [--threads N] [--peak-tflops T] [--variant "k=v k2=v2"]

Needs torchdistill: `pip install -e .[bench]` (torchdistill==1.1.5).

The job is the shipped experiment `+experiment=cifar100_resnet56_resnet20_kd`, composed by Hydra
and validated as `kdmtl train` does; every side reads its numbers from that composed config:
teacher and student architectures, loss.task_weight (CE), loss.kd.weight and temperature, batch
size, optim.* (SGD lr, momentum, Nesterov, weight decay, milestones, gamma), data.crop_padding,
data.hflip, data.mean/std, the seeds, hardware.* (channels_last, precision, deterministic).
Data: CIFAR-100-sized random uint8 images in memory (bench.py `_cifar_like`, given the
experiment's normalisation), (warm-up + steps) full batches: one epoch, the Trainer's first.

Processes. Every measurement runs in a fresh process of its own (this script with --worker),
which builds the same job (the same composed config, seeds, data, initial weights and epoch
plan) and runs one side: each side runs as its own program would, with the process-wide state it
sets itself and nothing another side set. That matters: kdmtl's `hardware.keep_freed_memory`
(kdmtl_cli/engine/host_memory.py) changes the C library's allocator for the whole process and
cannot be undone, and torchdistill's users run with the allocator's defaults. Each row also
prints the minor page faults per timed step (fresh pages the kernel had to zero-fill).

Sides; every measurement starts from deep copies of one initial student and one teacher (random
weights from the config's seed; the teacher frozen, in eval mode) and runs one epoch:
- torchdistill: a whole `torchdistill.core.distillation.DistillationBox`, built from a train
  config dict as its example script (examples/torchvision/image_classification.py) builds it
  from yaml: criterion `WeightedSumLoss` over its `KDLoss` (alpha = loss.task_weight on CE,
  beta = loss.kd.weight on T^2 x KL, batchmean), `SGD` and `MultiStepLR` from its registries, the
  teacher `requires_grad: False` (frozen by the box, which then runs it under no_grad),
  `forward_proc: forward_batch_only` for both (1.1.5 registers no default: the key is required).
  Per step, the example's calls: `forward_process(x, y)` (teacher forward, student forward, its
  io-dict extraction, the loss) and `post_forward_process(loss=loss)` (backward, optimizer
  step, zero_grad); `pre_epoch_process` / `post_epoch_process` around the epoch (untimed).
  Not exercised: torchdistill's datasets and data loaders (the box gets an empty dataset dict and
  is fed the batches below: its loaders cannot replay kdmtl's batches), and the example script's
  per-step `loss.item()` logging (a host sync per step that the other sides do not make).
  kdmtl models return {"outputs": {task: logits}, ...}: a one-line wrapper (`Logits`) hands the
  box the logits tensor its KDLoss reads at module path '.'. torchdistill never sets the
  teacher's mode (its example leaves a loaded teacher in train mode: BN on batch statistics);
  it is passed in eval mode, as kdmtl and RepDistiller run it, so all sides compute one loss.
  Two rows: torchdistill with its defaults (NCHW tensors), and with models and inputs in
  channels_last like the other sides (when the experiment sets hardware.channels_last), which
  separates the memory layout's share of a ratio from the rest.
- hand: plain PyTorch with kdmtl's settings (hardware.channels_last, fp32, and
  hardware.keep_freed_memory's allocator settings): student forward,
  teacher forward under no_grad, task_weight x CE + kd_weight x T^2 x KL(batchmean), SGD with
  the config's settings, a per-step MultiStepLR, zero_grad(set_to_none=True).
- kdmtl: the real engine, Trainer.fit through bench.py `engine_speed` with kdmtl's Objective,
  the TensorLoader of build.make_loader and the Hardware of `setup_hardware(cfg.hardware)`; one
  row per entry of KDMTL_VARIANTS (override strings composed on top of the experiment; --variant
  adds one). A variant the config refuses, or that fails on its first run, is skipped with a
  note. Rows with teacher.cache open it through run.py's `_teacher_output_cache`, as `kdmtl
  train` does, before Trainer.fit: building `views` is outside the timing. `exact` fills its
  store while training; one untimed measurement fills it first, and every measurement replays
  the same epoch, so where the store outlives a run (on disk: CPU) the timed epochs find every
  view stored (a 240-epoch run draws about half its views again); where it is private to a run
  (resident in GPU memory) each timed epoch fills it anew. The teacher-cache hit rate the engine
  reports is printed per round.

Fairness. Every side times data preparation + the training step, from the start of step
`--warmup` to the end of the last step, the device synchronised at those two points only.
Batches are built inside each side's timed loop from the resident uint8 images: kdmtl's by its
TensorLoader, the other sides' by `Job.make_batch`, the same gather, zero-pad crop, normalise and
flip written out in plain PyTorch, following the epoch's plan (order, flips, crop offsets) that
the TensorLoader draws for that epoch (drawn once, untimed; the engine's loader draws it as the
epoch starts, inside its warm-up). The check pass asserts that the batches of every row whose
losses it asserts are the TensorLoader's, bit for bit. Process-global torch flags: setup_hardware sets
`torch.use_deterministic_algorithms`, `torch.utils.deterministic.fill_uninitialized_memory`,
cudnn.benchmark (and the thread count when hardware.num_threads is set); they are saved before
and restored after every side, and the torchdistill and hand sides run with torch's defaults as
found at start-up (every measurement runs in a process of its own, so the restore only
matters between a worker's check pass, fill and timed run).
(torchdistill's example script also turns cudnn.benchmark on unless told not
to: on a GPU that is one difference from a stock torchdistill run; on a CPU it does nothing.)

Equal losses: a check pass first runs --check-steps steps of every side (one process per side)
from the same initial weights on the same batches and prints each side's losses beside
torchdistill's. Rows in fp32 on
identical batches, with the live teacher or the exact cache, must agree to rtol 1e-5 (the run
stops otherwise); bf16 rows and stored-view caches (other batches, fp16 outputs) are shown only.

Rounds: --rounds rounds, each running every side once, the order rotated by one per round, so
that drifts in machine load hit all alike. Reported: each side's median samples/s and every
round's value, a Markdown table with the ratio to torchdistill (defaults), each kdmtl row's step
time over the hand loop's, and, on a CUDA device (or with --peak-tflops), the kdmtl rows'
achieved FLOP/s: samples/s x (3 x student forward + teacher forward when it runs), forward FLOPs
per sample from torch.utils.flop_counter.FlopCounterMode, as a fraction of --peak-tflops.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F
import torch.utils.deterministic
from hydra import compose, initialize_config_module
from torch.utils.flop_counter import FlopCounterMode

from kdmtl_cli.build import make_loader
from kdmtl_cli.distill import build_methods
from kdmtl_cli.distill.objective import Objective
from kdmtl_cli.distill.weights import per_task_weights
from kdmtl_cli.engine import teacher_outputs
from kdmtl_cli.engine.hardware import Hardware, select_device, setup_hardware
from kdmtl_cli.engine.host_memory import keep_freed_memory
from kdmtl_cli.engine.optim import build_optimizer
from kdmtl_cli.models import build_model
from kdmtl_cli.run import _teacher_output_cache
from kdmtl_cli.schema import TrainConfig, validate
from kdmtl_cli.tasks import build_tasks

sys.path.insert(0, str(Path(__file__).resolve().parent))   # bench.py, beside this file
from bench import _cifar_like, engine_speed  # noqa: E402

EXPERIMENT = "cifar100_resnet56_resnet20_kd"
# One kdmtl row per entry: overrides (space-separated) composed on top of the experiment. A row
# may change how the engine runs (hardware.*, teacher.cache*), not the models or the data.
KDMTL_VARIANTS = [
    "",                                  # the experiment's own settings
    "hardware.deterministic=false",
    "hardware.keep_freed_memory=false",
    "teacher.cache=views",
    "teacher.cache=exact",
    "hardware.precision=bf16",
]
LOSS_RTOL = 1e-5
EPOCH = 1   # the Trainer's first epoch: every side replays its batches


# ---- process-global torch flags ----------------------------------------------------------------
def torch_flags() -> dict:
    return {"deterministic": torch.are_deterministic_algorithms_enabled(),
            "warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
            "fill_uninitialized_memory": torch.utils.deterministic.fill_uninitialized_memory,
            "cudnn.benchmark": torch.backends.cudnn.benchmark,
            "cudnn.deterministic": torch.backends.cudnn.deterministic,
            "threads": torch.get_num_threads(),
            # cuBLAS reads it once, when it starts: restoring it is bookkeeping only
            "CUBLAS_WORKSPACE_CONFIG": os.environ.get("CUBLAS_WORKSPACE_CONFIG")}


def set_torch_flags(flags: dict) -> None:
    torch.use_deterministic_algorithms(flags["deterministic"], warn_only=flags["warn_only"])
    torch.utils.deterministic.fill_uninitialized_memory = flags["fill_uninitialized_memory"]
    torch.backends.cudnn.benchmark = flags["cudnn.benchmark"]
    torch.backends.cudnn.deterministic = flags["cudnn.deterministic"]
    if torch.get_num_threads() != flags["threads"]:
        torch.set_num_threads(flags["threads"])
    if flags["CUBLAS_WORKSPACE_CONFIG"] is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    else:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = flags["CUBLAS_WORKSPACE_CONFIG"]


@contextlib.contextmanager
def flags_restored():
    """Whatever a side sets (setup_hardware does), the next side finds the flags as before."""
    saved = torch_flags()
    try:
        yield
    finally:
        set_torch_flags(saved)


# ---- the job -----------------------------------------------------------------------------------
def compose_config(overrides: List[str], cache_dir: str):
    with initialize_config_module(config_module="kdmtl_cli.conf", version_base="1.3"):
        raw = compose("train", overrides=[f"+experiment={EXPERIMENT}", f"cache_dir={cache_dir}", *overrides])
    cfg = validate(raw, TrainConfig)
    teacher_outputs.check_settings(cfg.teacher)   # as kdmtl train does before any work (check_protocol)
    cfg.log.progress, cfg.log.tensorboard = "none", False
    return cfg


class Logits(torch.nn.Module):
    """A kdmtl model as torchdistill's KDLoss expects one: the task's logits tensor as the output."""

    def __init__(self, model: torch.nn.Module, task: str):
        super().__init__()
        self.model, self.task = model, task

    def forward(self, x):
        return self.model(x)["outputs"][self.task]


@dataclass
class Job:
    """The composed experiment and what every side starts from: data, initial models, the epoch's plan."""
    cfg: object
    data: object
    tasks: dict
    teacher0: torch.nn.Module          # CPU, contiguous, never trained: each side copies it
    student0: torch.nn.Module
    device: torch.device
    order: torch.Tensor                # the epoch's plan, as the TensorLoader draws it
    flips: torch.Tensor
    crops: Optional[torch.Tensor]
    reference: list                    # the TensorLoader's first batches (image, target) on the CPU

    def __post_init__(self):
        (self.task, task), = self.tasks.items()
        self.target = task.target
        split = self.data.splits["train"]
        self.images = split["image"].to(self.device)
        self.labels = split[self.target].to(self.device)
        self.mean = torch.tensor(self.data.mean, device=self.device, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(self.data.std, device=self.device, dtype=torch.float32).view(1, -1, 1, 1)
        self.pad, self.hflip = int(self.cfg.data.crop_padding or 0), bool(self.cfg.data.hflip)
        self.batch_size = int(self.cfg.data.batch_size)
        self.steps_per_epoch = len(self.order) // self.batch_size
        self.task_weight = per_task_weights(self.cfg.loss.task_weight, self.tasks, "loss.task_weight")[self.task]
        self.kd_weight = per_task_weights(self.cfg.loss.kd.weight, self.tasks, "loss.kd.weight")[self.task]
        self.temperature = float(self.cfg.loss.kd.temperature)

    def batch_indices(self, steps: int):
        for b in range(steps):
            yield self.order[b * self.batch_size:(b + 1) * self.batch_size]

    def make_batch(self, index: torch.Tensor):
        """The hand-written batch: gather, zero-pad + crop at the plan's offsets, [0,1], normalise,
        flip; plain PyTorch, the same arithmetic as the TensorLoader's (checked bit for bit)."""
        idx = index.to(self.device)
        x = self.images.index_select(0, idx)
        if self.pad:
            h, w = x.shape[-2:]
            offsets = self.crops[index].to(self.device)
            x = F.pad(x, (self.pad,) * 4)
            ys = offsets[:, 0:1] + torch.arange(h, device=self.device)
            xs = offsets[:, 1:2] + torch.arange(w, device=self.device)
            rows = torch.arange(len(idx), device=self.device).view(-1, 1, 1)
            x = x.permute(0, 2, 3, 1)[rows, ys[:, :, None], xs[:, None, :]].permute(0, 3, 1, 2)
        x = (x.float() / 255 - self.mean) / self.std
        if self.hflip:
            x = torch.where(self.flips[index].to(self.device).view(-1, 1, 1, 1), x.flip(-1), x)
        return x, self.labels.index_select(0, idx)

    def copy_models(self, channels_last: bool):
        """Fresh copies of the initial teacher (frozen, eval) and student on the device."""
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        teacher = copy.deepcopy(self.teacher0).to(self.device, memory_format=fmt).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        return teacher, copy.deepcopy(self.student0).to(self.device, memory_format=fmt).train()


def build_job(cfg, steps_per_measurement: int) -> Job:
    device = select_device(cfg.hardware.device)
    n = steps_per_measurement * int(cfg.data.batch_size)
    data = dataclasses.replace(_cifar_like(n, seed=int(cfg.data.seed)),
                               mean=list(cfg.data.mean), std=list(cfg.data.std))
    tasks = build_tasks(cfg.tasks, data.targets)
    if len(tasks) != 1:
        raise SystemExit(f"{EXPERIMENT}: expected one task, got {', '.join(tasks)}")
    if str(cfg.optim.name) != "sgd" or str(cfg.optim.scheduler) != "multistep":
        raise SystemExit(f"{EXPERIMENT}: the torchdistill and hand sides are written for SGD + multistep, "
                         f"got optim.name={cfg.optim.name}, optim.scheduler={cfg.optim.scheduler}")
    torch.manual_seed(int(cfg.seed))
    teacher0, student0 = build_model(cfg.teacher, tasks), build_model(cfg.student, tasks)
    # The reference plan and batches: the TensorLoader the engine builds, at the Trainer's epoch.
    plain = Hardware(device=device, precision="32", channels_last=False, scaler=None)
    loader = make_loader(data, "train", tasks, cfg, plain, train=True, limit=None)
    loader.set_epoch(EPOCH)
    order, flips, crops, _ = loader.epoch_plan()
    (task,) = tasks.values()
    reference = [(b["image"].cpu(), b["targets"][task.target].cpu()) for b, _ in zip(loader, range(8))]
    return Job(cfg=cfg, data=data, tasks=tasks, teacher0=teacher0, student0=student0, device=device,
               order=order, flips=flips, crops=crops, reference=reference)


# ---- timing ------------------------------------------------------------------------------------
class Clock:
    """Times steps `warmup`.. of a loop: starts as step `warmup` begins (before its batch is
    built), stops at `stop()`; the device is synchronised at those two points only, so GPU steps
    still queue behind each other."""

    def __init__(self, device: torch.device, warmup: int):
        self.device, self.warmup, self.start, self.samples = device, warmup, None, 0
        self.faults = 0                                  # minor page faults of the timed steps

    @staticmethod
    def _minor_faults() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def begin(self, step: int) -> None:
        if step == self.warmup:
            self._sync()
            self.faults = self._minor_faults()
            self.start = time.perf_counter()

    def count(self, step: int, batch_size: int) -> None:
        if step >= self.warmup:
            self.samples += batch_size

    def stop(self) -> float:
        self._sync()
        seconds = time.perf_counter() - self.start
        self.faults = self._minor_faults() - self.faults
        return seconds


@dataclass
class Measurement:
    seconds: float
    samples: int
    losses: List[float] = field(default_factory=list)     # check pass: each step's total loss
    batches: list = field(default_factory=list)           # check pass: (image, target) on the CPU
    hit_rate: Optional[float] = None                      # kdmtl with a teacher cache: teacher work skipped
    faults: int = 0                                       # minor page faults while timed
    same_batches: Optional[bool] = None                   # check pass: batches equal the TensorLoader's

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds


def _keep(measurement_batches, x, y):
    measurement_batches.append((x.detach().contiguous().cpu().clone(), y.detach().cpu().clone()))


def timed_batches(job, clock, kept, count: int, channels_last: bool):
    """The side's batches (x, y), built inside its timing as the engine builds its own; copies
    go to `kept` (unless None) for the loss check."""
    for step, index in enumerate(job.batch_indices(count)):
        clock.begin(step)
        x, y = job.make_batch(index)
        clock.count(step, len(y))
        if kept is not None:
            _keep(kept, x, y)
        yield (x.contiguous(memory_format=torch.channels_last) if channels_last else x), y


# ---- the sides ---------------------------------------------------------------------------------
def run_hand(job: Job, steps: int, warmup: int, keep: bool) -> Measurement:
    cfg, o = job.cfg, job.cfg.optim
    channels_last = bool(cfg.hardware.channels_last)
    if cfg.hardware.keep_freed_memory:          # kdmtl's allocator setting (engine/host_memory.py)
        keep_freed_memory()
    teacher, student = job.copy_models(channels_last)
    optimizer = torch.optim.SGD(student.parameters(), lr=o.lr, momentum=o.momentum, nesterov=o.nesterov,
                                weight_decay=o.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, [m * job.steps_per_epoch for m in o.milestones],
                                                     o.gamma)
    a, b, T = job.task_weight, job.kd_weight, job.temperature
    clock, kept, losses = Clock(job.device, warmup), [], []
    for x, y in timed_batches(job, clock, kept if keep else None, warmup + steps, channels_last):
        out = student(x)["outputs"][job.task]
        with torch.no_grad():
            t_out = teacher(x)["outputs"][job.task]
        loss = a * F.cross_entropy(out, y) + b * T * T * F.kl_div(
            F.log_softmax(out / T, 1), F.log_softmax(t_out / T, 1), reduction="batchmean", log_target=True)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if keep:
            losses.append(loss.detach())
    seconds = clock.stop()
    return Measurement(seconds, clock.samples, [float(v) for v in losses], kept, faults=clock.faults)


def torchdistill_config(job: Job) -> dict:
    """A DistillationBox train config (torchdistill's yaml schema, as a dict) for the job."""
    o = job.cfg.optim
    kd = {"key": "KDLoss", "kwargs": {"student_module_path": ".", "student_module_io": "output",
                                      "teacher_module_path": ".", "teacher_module_io": "output",
                                      "temperature": job.temperature, "alpha": job.task_weight,
                                      "beta": job.kd_weight, "reduction": "batchmean"}}
    return {
        "num_epochs": int(o.epochs),
        "teacher": {"forward_proc": "forward_batch_only", "requires_grad": False},
        "student": {"forward_proc": "forward_batch_only", "requires_grad": True},
        "optimizer": {"key": "SGD", "kwargs": {"lr": float(o.lr), "momentum": float(o.momentum),
                                               "nesterov": bool(o.nesterov), "weight_decay": float(o.weight_decay)}},
        "scheduler": {"key": "MultiStepLR", "kwargs": {"milestones": [int(m) for m in o.milestones],
                                                       "gamma": float(o.gamma)}},
        "criterion": {"key": "WeightedSumLoss", "kwargs": {"sub_terms": {"kd": {"criterion": kd, "weight": 1.0}}}},
    }


def run_torchdistill(job: Job, channels_last: bool, steps: int, warmup: int, keep: bool) -> Measurement:
    from torchdistill.core.distillation import DistillationBox

    teacher, student = job.copy_models(channels_last)
    box = DistillationBox(Logits(teacher, job.task).eval(), Logits(student, job.task), dataset_dict={},
                          train_config=torchdistill_config(job), device=job.device, device_ids=None,
                          distributed=False, lr_factor=1)
    box.pre_epoch_process(epoch=EPOCH - 1)
    clock, kept, losses = Clock(job.device, warmup), [], []
    for x, y in timed_batches(job, clock, kept if keep else None, warmup + steps, channels_last):
        loss = box.forward_process(x, y, supp_dict=None)
        box.post_forward_process(loss=loss)
        if keep:
            losses.append(loss.detach())
    seconds = clock.stop()
    box.post_epoch_process()
    box.clean_modules()
    return Measurement(seconds, clock.samples, [float(v) for v in losses], kept, faults=clock.faults)


class TimedLoader:
    """The engine's train loader, passed through to Trainer.fit: the clock starts when the Trainer
    asks for batch `warmup` (the warm-up steps done; the batch not built yet) and stops when it
    finds the epoch over (the last step done); `keep` copies the batches it hands out, `limit`
    ends the epoch early."""

    def __init__(self, loader, clock: Clock, limit: int, keep: Optional[list]):
        self.loader, self.clock, self.limit, self.keep = loader, clock, limit, keep
        self.epochs_set = []

    def __len__(self) -> int:
        return min(len(self.loader), self.limit)

    def __getattr__(self, name):
        return getattr(self.loader, name)

    def set_epoch(self, epoch: int) -> None:
        self.epochs_set.append(epoch)
        self.loader.set_epoch(epoch)

    def __iter__(self):
        batches = iter(self.loader)
        for step in range(len(self)):
            self.clock.begin(step)
            batch = next(batches)
            self.clock.count(step, batch["image"].shape[0])
            if self.keep is not None:
                (target,) = batch["targets"].values()
                _keep(self.keep, batch["image"], target)
            yield batch
        self.seconds = self.clock.stop()


class MeasuredObjective(Objective):
    """The engine's objective, keeping what the Trainer reports once an epoch (teacher-cache hit
    rate) and, when `kept` is a list, each step's total loss (the sum of the task groups: the
    equal weighting's step loss)."""

    kept: Optional[list] = None
    epoch_record: dict = {}

    def losses(self, student_out, batch):
        groups, extra, terms = super().losses(student_out, batch)
        if self.kept is not None:
            self.kept.append((sum(groups.values()) + (extra if extra is not None else 0)).detach())
        return groups, extra, terms

    def epoch_metrics(self) -> dict:
        parent = getattr(super(), "epoch_metrics", None)   # the engine's, where it has one
        self.epoch_record = dict(parent()) if parent is not None else {}
        return self.epoch_record


def run_kdmtl(job: Job, cfg, steps: int, warmup: int, keep: bool) -> Measurement:
    hardware = setup_hardware(cfg.hardware)
    teacher = hardware.prepare_model(copy.deepcopy(job.teacher0)).eval()
    student = hardware.prepare_model(copy.deepcopy(job.student0))
    loader = make_loader(job.data, "train", job.tasks, cfg, hardware, train=True, limit=None)
    objective = MeasuredObjective(job.tasks, cfg.loss.task_weight, build_methods(cfg.loss, job.tasks, list(job.tasks)),
                                  teacher)
    objective.kept = [] if keep else None
    if str(cfg.teacher.cache) != "off":   # opened (built, for views) before the clock runs, as `kdmtl train` does
        objective.cache = _teacher_output_cache(cfg, teacher, loader, hardware, job.data, job.tasks)
    clock, kept = Clock(hardware.device, warmup), []
    timed = TimedLoader(loader, clock, warmup + steps, kept if keep else None)
    try:
        engine_speed(cfg, hardware, job.tasks, student, objective, build_optimizer(student.parameters(), cfg.optim),
                     timed, None)
    finally:
        # a run's end: an exact store is released (a shared entry: the next measurement reuses it)
        close = getattr(objective.cache, "close", None)
        if close is not None:
            close()
    if timed.epochs_set != [EPOCH]:
        raise SystemExit(f"the Trainer trained epochs {timed.epochs_set}; the other sides replay epoch {EPOCH}")
    hit_rate = objective.epoch_record.get("teacher_cache/hit_rate")
    return Measurement(timed.seconds, clock.samples, [float(v) for v in objective.kept or []], kept, hit_rate,
                       clock.faults)


@dataclass
class Side:
    label: str
    run: Callable[[int, int, bool], Measurement]     # (steps, warmup, keep)
    kind: str                                        # torchdistill | hand | kdmtl
    cfg: object = None                               # kdmtl rows: the composed config

    def measure(self, defaults: dict, steps: int, warmup: int, keep: bool = False) -> Measurement:
        with flags_restored():
            if self.kind != "kdmtl":
                set_torch_flags(defaults)            # torch's own defaults, whatever ran before
            return self.run(steps, warmup, keep)

    @property
    def loss_checked(self) -> bool:
        """Whether its losses must equal torchdistill's: fp32 on the same batches, live teacher or
        a cache that is exact."""
        return self.kind != "kdmtl" or (str(self.cfg.hardware.precision) == "32"
                                        and str(self.cfg.teacher.cache) in ("off", "exact"))


def build_sides(job: Job, variants: List[str], cache_dir: str) -> List[Side]:
    channels_last = bool(job.cfg.hardware.channels_last)
    sides = [Side("torchdistill 1.1.5 (defaults: NCHW)", lambda s, w, k: run_torchdistill(job, False, s, w, k),
                  "torchdistill")]
    if channels_last:
        sides.append(Side("torchdistill 1.1.5 + channels_last", lambda s, w, k: run_torchdistill(job, True, s, w, k),
                          "torchdistill"))
    sides.append(Side(f"hand-written PyTorch loop{' (channels_last)' if channels_last else ''}",
                      lambda s, w, k: run_hand(job, s, w, k), "hand"))
    for variant in variants:
        overrides = variant.split()
        label = "kdmtl" + (f", {' '.join(overrides)}" if overrides else " (experiment defaults)")
        try:
            cfg = compose_config(overrides, cache_dir)
        except Exception as err:  # noqa: BLE001 - a variant the config refuses is skipped, said why
            print(f"note: row '{label}' skipped: the config refuses it ({type(err).__name__}: "
                  f"{str(err).splitlines()[0] if str(err) else ''})")
            continue
        for key in ("student", "data"):
            if getattr(cfg, key) != getattr(job.cfg, key):
                raise SystemExit(f"variant '{variant}' changes {key}.*: rows must start from the same models and data")
        if cfg.teacher.arch != job.cfg.teacher.arch:
            raise SystemExit(f"variant '{variant}' changes the teacher")
        sides.append(Side(label, lambda s, w, k, cfg=cfg: run_kdmtl(job, cfg, s, w, k), "kdmtl", cfg))
    return sides


# ---- checks and report -------------------------------------------------------------------------
def check_losses(sides: List[Side], results: dict, job: Job) -> None:
    """Every side's first losses beside torchdistill's; fp32 rows on identical batches must agree."""
    ref_side = sides[0]
    ref = results[ref_side.label].losses
    k = len(ref)
    print(f"\nEqual losses: the first {k} steps of every side from the same initial weights "
          f"(reference: {ref_side.label}; rtol {LOSS_RTOL:g})")
    print(f"  {'mode':52s} {'batches':>9s} " + " ".join(f"{'step ' + str(i + 1):>11s}" for i in range(k))
          + f" {'max rel diff':>13s}  asserted")
    failures = []
    for side in sides:
        m = results[side.label]
        same = m.same_batches
        diff = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(m.losses, ref))
        if not side.loss_checked:
            asserted = "no: bf16" if str(side.cfg.hardware.precision) != "32" \
                else f"no: teacher.cache={side.cfg.teacher.cache}" + ("" if same else " (stored views)")
        elif not same:
            asserted = "FAILED: other batches"
            failures.append(f"{side.label}: its batches differ from the TensorLoader's")
        elif diff > LOSS_RTOL:
            asserted = "FAILED"
            failures.append(f"{side.label}: max relative difference {diff:.2e} > {LOSS_RTOL:g}")
        else:
            asserted = "yes"
        print(f"  {side.label:52s} {'identical' if same else 'other':>9s} "
              + " ".join(f"{v:11.7f}" for v in m.losses) + f" {diff:13.2e}  {asserted}")
    if failures:
        raise SystemExit("losses disagree:\n  " + "\n  ".join(failures))
    print("  every asserted row agrees")


def forward_flops(model: torch.nn.Module, image: torch.Tensor) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        copy.deepcopy(model).eval()(image)
    return int(counter.get_total_flops())


def report(sides: List[Side], speeds: dict, hits: dict, faults: dict, job: Job, args) -> None:
    med = {label: statistics.median(v) for label, v in speeds.items()}
    base = med[sides[0].label]
    hand = next(s.label for s in sides if s.kind == "hand")
    print(f"\nsamples/s per round (rotated order), median of {args.rounds}:")
    for side in sides:
        rates = [h for h in hits[side.label] if h is not None]
        hit = f"  teacher-cache hit rate {', '.join(f'{h:.2f}' for h in rates)}" if rates else ""
        print(f"  {side.label:52s} {med[side.label]:8.1f}  ({', '.join(f'{v:.1f}' for v in speeds[side.label])})"
              f"  page faults/step {statistics.median(faults[side.label]):,.0f}" + hit)
    print("\n| mode | samples/s | vs torchdistill |\n|---|---:|---:|")
    for side in sides:
        print(f"| {side.label} | {med[side.label]:.1f} | {med[side.label] / base:.2f}x |")
    ms = lambda label: 1000 * job.batch_size / med[label]  # noqa: E731
    print(f"\nstep time (ms, batch {job.batch_size}, data preparation included) against the hand loop's "
          f"{ms(hand):.1f} ms:")
    for side in sides:
        if side.kind == "kdmtl":
            print(f"  {side.label:52s} {ms(side.label):7.1f} ms   engine/hand = {ms(side.label) / ms(hand):.3f}")
    if job.device.type == "cuda" or args.peak_tflops:
        one = torch.zeros(1, 3, *job.images.shape[-2:])
        s_flops, t_flops = forward_flops(job.student0, one), forward_flops(job.teacher0, one)
        print(f"\nachieved FLOP/s (forward FLOPs per sample: student {s_flops / 1e6:.1f}M, teacher "
              f"{t_flops / 1e6:.1f}M; a step = 3 x student + teacher when it runs):")
        for side in sides:
            if side.kind != "kdmtl":
                continue
            per_sample = 3 * s_flops + (t_flops if str(side.cfg.teacher.cache) == "off" else 0)
            tflops = per_sample * med[side.label] / 1e12
            peak = f", {100 * tflops / args.peak_tflops:.1f}% of {args.peak_tflops:g}" if args.peak_tflops else ""
            print(f"  {side.label:52s} {tflops:8.3f} TFLOP/s{peak}")


def same_batches(m: Measurement, job: Job) -> bool:
    return len(m.batches) == len(m.losses) and all(torch.equal(x, rx) and torch.equal(y, ry)
                                                   for (x, y), (rx, ry) in zip(m.batches, job.reference))


def worker(args, sides: List[Side], job: Job, defaults: dict) -> None:
    """One measurement in this process (started by `measure_in_child`): the check pass of side
    --worker (with --check-steps > 0), the untimed fill of its teacher cache (--fill), then the
    timed run; the result as one `@@result {json}` line on stdout."""
    side, out = sides[args.worker], {}
    if args.check_steps:
        m = side.measure(defaults, args.check_steps, 0, keep=True)
        out["check"] = {"losses": m.losses, "same_batches": same_batches(m, job)}
    if args.fill:
        side.measure(defaults, args.steps, args.warmup)
    m = side.measure(defaults, args.steps, args.warmup)
    out["timed"] = {"seconds": m.seconds, "samples": m.samples, "hit_rate": m.hit_rate, "faults": m.faults}
    print("@@result " + json.dumps(out), flush=True)


def measure_in_child(args, cache_dir: str, index: int, check: bool = False, fill: bool = False) -> dict:
    """Side `index`'s measurement in a fresh process: each side runs as its own program would,
    with the process-wide state it sets itself (torch's flags, the allocator's settings: kdmtl's
    `hardware.keep_freed_memory` cannot be undone within a process) and nothing another side set."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(index), "--cache-dir", cache_dir,
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads),
           "--check-steps", str(args.check_steps if check else 0), *(["--fill"] if fill else [])]
    for variant in args.variant:
        cmd += ["--variant", variant]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("@@result ")), None)
    if proc.returncode != 0 or line is None:
        lines = [x for x in proc.stderr.splitlines() if x.strip()]
        return {"error": lines[-1] if lines else f"exit status {proc.returncode}", "stderr": proc.stderr[-3000:]}
    return json.loads(line[len("@@result "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="rounds; each runs every side once, rotated")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before them")
    parser.add_argument("--check-steps", type=int, default=3, help="steps whose losses are compared")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's choice)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's peak, for the FLOP/s fraction")
    parser.add_argument("--variant", action="append", default=[],
                        help="one more kdmtl row: overrides, space-separated (repeatable)")
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)   # measure_in_child
    parser.add_argument("--cache-dir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--fill", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.check_steps > args.warmup + args.steps or args.check_steps > 8:
        raise SystemExit("--check-steps must be at most 8 and at most --warmup + --steps")
    try:
        import torchdistill
    except ImportError:
        raise SystemExit("torchdistill is not installed: pip install -e .[bench]  (torchdistill==1.1.5)") from None
    defaults = torch_flags()             # torch's defaults, before any side has run
    load_before = os.getloadavg()[0]
    cache_dir = args.cache_dir or tempfile.mkdtemp(prefix="kdmtl-bench-torchdistill-")
    try:
        cfg = compose_config([], cache_dir)
        job = build_job(cfg, args.warmup + args.steps)
        sides = build_sides(job, list(dict.fromkeys(KDMTL_VARIANTS + args.variant)), cache_dir)
        if args.worker is not None:
            worker(args, sides, job, defaults)
            return
        print(f"{EXPERIMENT}: {cfg.teacher.arch} -> {cfg.student.arch}, {job.task_weight:g} x CE + "
              f"{job.kd_weight:g} x KD (T={job.temperature:g}), batch {job.batch_size}, SGD lr {cfg.optim.lr:g} "
              f"momentum {cfg.optim.momentum:g} wd {cfg.optim.weight_decay:g}, crop {job.pad} + "
              f"{'flip' if job.hflip else 'no flip'}, channels_last {bool(cfg.hardware.channels_last)}")
        print(f"device {job.device}, {torch.get_num_threads()} threads, torch {torch.__version__}, torchdistill "
              f"{torchdistill.__version__}; {len(job.order)} CIFAR-sized random images; per measurement "
              f"{args.warmup} warm-up + {args.steps} timed steps (data preparation + step); {args.rounds} rounds")

        # Check pass, one process per side: its first steps' losses and batches; a cache that
        # training fills (exact) is filled there by one untimed epoch (the store on disk outlives
        # the process: the timed measurements reuse it), a stored-view cache (views) is built there.
        results = {}
        worker_index = {side.label: i for i, side in enumerate(sides)}   # what --worker indexes
        for side in list(sides):
            fill = side.kind == "kdmtl" and str(side.cfg.teacher.cache) != "off"
            out = measure_in_child(args, cache_dir, worker_index[side.label], check=True, fill=fill)
            if "error" in out:
                if side.kind != "kdmtl" or side.cfg == job.cfg:
                    raise SystemExit(f"{side.label} failed: {out['error']}\n{out['stderr']}")
                print(f"note: row '{side.label}' skipped: it failed ({out['error']})")
                sides.remove(side)
                continue
            results[side.label] = Measurement(0.0, 0, out["check"]["losses"],
                                              same_batches=out["check"]["same_batches"])
        check_losses(sides, results, job)

        speeds, hits, faults = ({side.label: [] for side in sides} for _ in range(3))
        print()
        for r in range(args.rounds):
            for side in sides[r % len(sides):] + sides[:r % len(sides)]:
                out = measure_in_child(args, cache_dir, worker_index[side.label])
                if "error" in out:
                    raise SystemExit(f"{side.label} failed: {out['error']}\n{out['stderr']}")
                m = Measurement(**out["timed"])
                speeds[side.label].append(m.samples_per_s)
                hits[side.label].append(m.hit_rate)
                faults[side.label].append(m.faults / args.steps)
            print(f"  round {r + 1}/{args.rounds} done", flush=True)
        report(sides, speeds, hits, faults, job, args)
        print(f"\n1-min load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after "
              f"(other processes on the machine slow every side, not alike)")
    finally:
        if args.worker is None:
            shutil.rmtree(cache_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
