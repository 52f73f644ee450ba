#!/usr/bin/env python
"""Benchmarks for kdmtl (figures go to the README; never asserted in tests).

  python scripts/bench.py throughput [--epochs 3] [--loss kd|none]
      Student training throughput (samples/s) of the kdmtl engine (TensorLoader +
      Objective + Trainer.fit) against a minimal hand-written PyTorch loop on the same
      model, batch, data and teacher, in one process; prints the ratio. Goal: >= 0.97.

  python scripts/bench.py methods [--losses none,kd,dkd,fitnet,at,kd4mtl,bam]   (`crd:loss.crd.nce_k=1024`: a loss with its overrides)
      Training throughput and step time of each distillation method through the engine,
      relative to the vanilla student (same model, data, batch; teacher forward included).

  python scripts/bench.py weighting [--weightings uncertainty,dwa,famo,gradnorm,pcgrad,cagrad]
      Step time of 1-4 image-level and 1-3 dense tasks with equal weighting and of each
      weighting strategy on 3 dense tasks, relative to a single-task step, beside the ratio of
      forward FLOPs. Goals: N heads <= (1 + 0.02N)x; gradient-based strategies within 1.1x of
      their theoretical (2N + 3)/3.

  python scripts/bench.py epoch-cost [--steps 5]
      Seconds per CIFAR-100 epoch of the RepDistiller pairs (teacher training step, KD student
      step) from a few timed batches, and the implied cost of a 240-epoch reproduction.

  python scripts/bench.py perf [--pairs resnet56:resnet20,resnet110:resnet32] [--samples 2048]
      The speed issue's ratios in one process, on RepDistiller pairs at 32x32 (CIFAR-100 recipe,
      batch 64, crop 4 + flip): engine vs a hand-written KD loop (goal >= 0.97), KD step with
      the teacher-output cache vs the live teacher (goal >= 0.9 x (1 + T/(3S)), T/S from FLOP
      counts), then the `data-path` ratios below.

  python scripts/bench.py data-path [--repeats 3]
      Samples/s of the data alone through the tensor-resident path and the DataLoader path, and
      the tensor path against the student's training throughput (goal >= 10x).

  python scripts/bench.py hardware [--steps 10]
      ms per training step for channels_last x precision x torch.compile (defaults by measurement).

  The default run against the vanilla student (time and per-seed wins): scripts/default_run.py.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def _setup(loss_name: str, teacher: bool = False, overrides=()):
    from kdmtl_cli.build import make_loader
    from kdmtl_cli.data import build_data
    from kdmtl_cli.distill import build_methods
    from kdmtl_cli.engine.hardware import setup_hardware
    from kdmtl_cli.models import build_model
    from kdmtl_cli.schema import TrainConfig, validate
    from kdmtl_cli.tasks import build_tasks

    from hydra import compose, initialize_config_module

    cache = os.environ.get("KDMTL_CACHE", tempfile.mkdtemp())
    with initialize_config_module(config_module="kdmtl_cli.conf", version_base="1.3"):
        raw = compose("train", overrides=[f"loss={loss_name}", f"cache_dir={cache}", *overrides])
    cfg = validate(raw, TrainConfig)
    cfg.log.progress, cfg.log.tensorboard = "none", False
    hardware = setup_hardware(cfg.hardware)
    data = build_data(cfg.data)
    tasks = build_tasks(cfg.tasks, data.targets)
    torch.manual_seed(0)
    want_teacher = teacher or loss_name != "none"
    teacher = hardware.prepare_model(build_model(cfg.teacher, tasks)).eval() if want_teacher else None
    student = hardware.prepare_model(build_model(cfg.student, tasks))
    loader = make_loader(data, "train", tasks, cfg, hardware, train=True, limit=None)
    val_loader = make_loader(data, "val", tasks, cfg, hardware, train=False, limit=1)
    return cfg, hardware, data, tasks, teacher, student, loader, val_loader, build_methods(cfg.loss, tasks, list(tasks))


def engine_speed(cfg, hardware, tasks, model, objective, optimizer, loader, val_loader, weighting=None,
                 grad_norms_every: int = 0) -> float:
    """Samples/s of one training epoch through the engine (Trainer.fit), from its epoch record."""
    from kdmtl_cli.engine.logging import MetricsLog
    from kdmtl_cli.engine.optim import build_scheduler
    from kdmtl_cli.engine.trainer import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(model=model, objective=objective, tasks=tasks, optimizer=optimizer,
                          scheduler=build_scheduler(optimizer, cfg.optim, len(loader)), hardware=hardware,
                          train_loader=loader, val_loader=val_loader, epochs=1,
                          checkpoint_dir=Path(tmp) / "ckpt", log=MetricsLog(Path(tmp), tensorboard=False),
                          progress_mode="none", label="bench", monitor="val/loss/task", weighting=weighting,
                          grad_norms_every_n_steps=grad_norms_every)
        trainer.fit()
        records = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    return next(r for r in records if r["type"] == "epoch")["train/samples_per_s"]


def engine_epoch(cfg, hardware, tasks, teacher, student, loader, val_loader, methods) -> float:
    from kdmtl_cli.distill.objective import Objective
    from kdmtl_cli.engine.optim import build_optimizer

    objective = Objective(tasks, cfg.loss.task_weight, methods, teacher)
    return engine_speed(cfg, hardware, tasks, student, objective, build_optimizer(student.parameters(), cfg.optim),
                        loader, val_loader)


def hand_epoch(cfg, hardware, data, tasks, teacher, student, epoch: int) -> float:
    """The same work written plainly: gather, normalise, flip, forward, losses, step."""
    device = hardware.device
    split = data.splits["train"]
    images = split["image"].to(device)
    cls, seg, depth = split["cls"].to(device), split["seg"].to(device), split["depth"].to(device)
    mean = torch.tensor(data.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(data.std, device=device).view(1, -1, 1, 1)
    optimizer = torch.optim.Adam(student.parameters(), lr=cfg.optim.lr)
    steps = (len(images) + cfg.data.batch_size - 1) // cfg.data.batch_size
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    gen = torch.Generator().manual_seed(epoch)
    order, flips = torch.randperm(len(images), generator=gen), torch.rand(len(images), generator=gen) < 0.5
    T = cfg.loss.kd.temperature if cfg.loss.kd is not None else 1.0
    kd_weight = cfg.loss.kd.weight if cfg.loss.kd is not None else 0.0
    student.train()
    start, seen = time.perf_counter(), 0
    for b in range(steps):
        idx = order[b * cfg.data.batch_size:(b + 1) * cfg.data.batch_size].to(device)
        flip = flips[idx.cpu()].to(device)
        x = (images[idx].float() / 255 - mean) / std
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        y_seg = torch.where(flip.view(-1, 1, 1), seg[idx].flip(-1), seg[idx])
        y_depth = torch.where(flip.view(-1, 1, 1), depth[idx].flip(-1), depth[idx])
        x = hardware.to_input(x)
        out = student(x)["outputs"]
        loss = F.cross_entropy(out["cls"], cls[idx]) + F.cross_entropy(out["seg"], y_seg) \
            + (out["depth"].squeeze(1) - y_depth).abs().mean()
        if teacher is not None:
            with torch.no_grad():
                t_out = teacher(x)["outputs"]
            for name in ("cls", "seg"):
                loss = loss + kd_weight * F.kl_div(F.log_softmax(out[name] / T, 1), F.log_softmax(t_out[name] / T, 1),
                                                   reduction="none", log_target=True).sum(1).mean() * T * T
            loss = loss + kd_weight * (out["depth"] - t_out["depth"]).abs().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        seen += idx.numel()
    float(loss.detach())  # wait for the device
    return seen / (time.perf_counter() - start)


def throughput(args) -> None:
    cfg, hardware, data, tasks, teacher, student, loader, val_loader, methods = _setup(args.loss)
    engine, hand = [], []
    for epoch in range(args.epochs):  # interleaved, so drifts in machine load hit both alike
        engine.append(engine_epoch(cfg, hardware, tasks, teacher, copy.deepcopy(student), loader, val_loader, methods))
        hand.append(hand_epoch(cfg, hardware, data, tasks, teacher, copy.deepcopy(student), epoch))
    e, h = statistics.median(engine), statistics.median(hand)
    print(f"device {hardware.device}, precision {hardware.precision}, batch {cfg.data.batch_size}, "
          f"{data.size('train')} train images, loss={args.loss}, {args.epochs} epochs each (median)")
    print(f"engine      {e:8.1f} samples/s   (per epoch: {', '.join(f'{v:.0f}' for v in engine)})")
    print(f"hand loop   {h:8.1f} samples/s   (per epoch: {', '.join(f'{v:.0f}' for v in hand)})")
    print(f"ratio engine/hand = {e / h:.3f}  (goal >= 0.97)")


def methods(args) -> None:
    """Cost per training step of each distillation method relative to the vanilla student."""
    from kdmtl_cli.distill.objective import Objective
    from kdmtl_cli.engine.optim import build_optimizer

    results = {}
    for entry in args.losses.split(","):   # `crd:loss.crd.nce_k=1024`: a loss with its own overrides (+-separated)
        loss, _, extra = entry.partition(":")
        speeds = []
        for _ in range(args.epochs):  # fresh models, hooks and learned parts every epoch
            cfg, hardware, data, tasks, teacher, model, loader, val_loader, methods_ = _setup(
                loss, teacher=True, overrides=extra.split("+") if extra else ())
            for method in methods_:
                method.bind_data(data)    # as run.py: CRD sizes its memory by the training split
            objective = Objective(tasks, cfg.loss.task_weight, methods_ if loss != "none" else [], teacher)
            objective.setup(model, next(iter(val_loader)), hardware.device)
            optimizer = build_optimizer([{"params": list(model.parameters())},
                                         *objective.param_groups(cfg.optim.lr)], cfg.optim)
            speeds.append(engine_speed(cfg, hardware, tasks, model, objective, optimizer, loader, val_loader))
        results[loss] = statistics.median(speeds)
    base = results.get("none")
    print(f"device {hardware.device}, batch {cfg.data.batch_size}, {data.size('train')} images, "
          f"{args.epochs} epochs each (median)")
    for loss, speed in results.items():
        ms_per_step = 1000 * cfg.data.batch_size / speed
        rel = f"{base / speed:5.2f}x the vanilla step time" if base else ""
        print(f"  loss={loss:10s} {speed:8.1f} samples/s  {ms_per_step:7.1f} ms/step  {rel}")


def _forward_flops(model, image) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.eval()(image[:1])
    model.train()
    return int(counter.get_total_flops())


def weighting(args) -> None:
    """Step time with 1..N tasks under equal weighting and of each weighting strategy on 3 tasks,
    relative to a single-task step (vanilla student, no teacher: the multi-task cost alone).
    Two families: image-level tasks (pooled linear heads: cls, near, present, count) and dense
    tasks (decoder heads: seg, depth, normal). A dense decoder costs as much as a good part of
    this small trunk, so that family's ratios are also set against the ratio of forward FLOPs
    (heads included): measured / FLOPs ratio is what the engine adds.
    Goals: N heads <= (1 + 0.02 N)x the single-task step (pooled heads, where the heads are
    light); gradient-based strategies within 1.1x of their theoretical (2N + 3) / 3."""
    from kdmtl_cli.distill.objective import Objective
    from kdmtl_cli.engine.optim import build_optimizer
    from kdmtl_cli.weighting import build_weighting

    image_level, dense = ["cls", "near", "present", "count"], ["seg", "depth", "normal"]
    runs = [(f"{n} image-level task{'s' * (n > 1)} equal", image_level[:n], "equal", 0) for n in (1, 2, 3, 4)]
    runs += [(f"{n} dense task{'s' * (n > 1)} equal", dense[:n], "equal", 0) for n in (1, 2, 3)]
    runs.append(("3 dense equal + grad norms/100", dense, "equal", 100))
    runs += [(f"3 dense {w}", dense, w, 0) for w in args.weightings.split(",")]
    speeds, flops = {}, {}
    for _ in range(args.epochs):  # interleaved, so drifts in machine load hit all alike
        for label, names, strategy, every in runs:
            cfg, hardware, data, _, _, _, loader, val_loader, _ = _setup(
                "none", overrides=["tasks=all", f"weighting={strategy}"])
            from kdmtl_cli.models import build_model
            from kdmtl_cli.tasks import build_tasks

            tasks = build_tasks({n: cfg.tasks[n] for n in names}, data.targets)
            torch.manual_seed(0)
            model = hardware.prepare_model(build_model(cfg.student, tasks))
            loader = make_loader_for(data, tasks, cfg, hardware, train=True)
            val_loader = make_loader_for(data, tasks, cfg, hardware, train=False)
            flops[label] = _forward_flops(model, next(iter(val_loader))["image"])
            chosen = build_weighting(cfg.weighting, list(tasks), seed=0)
            optimizer = build_optimizer([{"params": list(model.parameters())},
                                         *chosen.param_groups(cfg.optim.lr)], cfg.optim)
            speeds.setdefault(label, []).append(engine_speed(
                cfg, hardware, tasks, model, Objective(tasks, cfg.loss.task_weight), optimizer, loader,
                val_loader, weighting=chosen, grad_norms_every=every))
    step = {label: 1000 * cfg.data.batch_size / statistics.median(v) for label, v in speeds.items()}
    from kdmtl_cli.models import describe as describe_model

    print(f"device {hardware.device}, {torch.get_num_threads()} threads, batch {cfg.data.batch_size}, "
          f"student {describe_model(cfg.student)}, {data.size('train')} images, "
          f"{args.epochs} epochs each (median)")
    for label, names, strategy, every in runs:
        base = runs[0][0] if names[0] == image_level[0] else runs[4][0]
        ratio, flop_ratio = step[label] / step[base], flops[label] / flops[base]
        n = len(names)
        if strategy in ("pcgrad", "cagrad", "gradnorm"):
            theory = (2 * n + 3) / 3
            goal = f"theory {theory:.2f}x: ratio to theory {ratio / theory:.2f} (goal <= 1.1)"
        elif strategy == "equal" and every == 0 and n > 1:
            goal = f"goal <= {1 + 0.02 * n:.2f}x" if names[0] == image_level[0] else ""
        else:
            goal = ""
        print(f"  {label:32s} {step[label]:6.1f} ms/step  {ratio:5.2f}x single-task  "
              f"(forward FLOPs {flop_ratio:4.2f}x; measured/FLOPs {ratio / flop_ratio:4.2f})  {goal}")


def make_loader_for(data, tasks, cfg, hardware, train: bool):
    from kdmtl_cli.build import make_loader

    return make_loader(data, "train" if train else "val", tasks, cfg, hardware, train=train,
                       limit=None if train else 1)


def epoch_cost(args) -> None:
    """Seconds per CIFAR-100 epoch of each RepDistiller pair on this machine, from a few timed
    steps (batch 64, 32x32, fp32): the teacher's training step and the student's KD step
    (teacher forward under no_grad + student forward/backward + SGD), times 782 steps (all 50000
    training images, as the cifar100_* experiments train: data.val_size=0, the last batch partial)."""

    from kdmtl_cli.data import TargetSpec
    from kdmtl_cli.models import build_model, count_parameters
    from kdmtl_cli.schema import ModelConfig
    from kdmtl_cli.tasks import TASK_KINDS, Task, _load_kinds

    from omegaconf import OmegaConf

    _load_kinds()
    tasks = {"cls": Task("cls", TASK_KINDS.get("classification")(), TargetSpec("classification", 100), "cls")}
    x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 100, (64,))
    steps_per_epoch = -(-50000 // 64)

    def step_ms(model, teacher=None) -> float:
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        times = []
        for i in range(args.steps + 2):
            start = time.perf_counter()
            out = model(x)["outputs"]["cls"]
            loss = F.cross_entropy(out, y)
            if teacher is not None:
                with torch.no_grad():
                    t_out = teacher(x)["outputs"]["cls"]
                loss = loss + F.kl_div(F.log_softmax(out / 4, 1), F.log_softmax(t_out / 4, 1), reduction="batchmean",
                                       log_target=True) * 16
            opt.zero_grad()
            loss.backward()
            opt.step()
            if i >= 2:
                times.append(time.perf_counter() - start)
        return 1000 * statistics.median(times)

    print(f"{torch.get_num_threads()} threads, batch 64, fp32, {args.steps} timed steps each (median), "
          f"{steps_per_epoch} steps per epoch")
    print(f"  {'teacher -> student':28s} {'params':>14s} {'teacher s/epoch':>16s} {'KD student s/epoch':>19s}"
          f" {'240 epochs (T + S)':>19s}")
    for teacher_arch, student_arch in (("resnet56", "resnet20"), ("resnet110", "resnet32"),
                                       ("resnet32x4", "resnet8x4"), ("wrn_40_2", "wrn_16_2"), ("vgg13", "vgg8")):
        torch.manual_seed(0)
        teacher = build_model(OmegaConf.structured(ModelConfig(arch=teacher_arch)), tasks)
        student = build_model(OmegaConf.structured(ModelConfig(arch=student_arch)), tasks)
        t_ms = step_ms(teacher.train())
        s_ms = step_ms(student.train(), teacher.eval())
        t_epoch, s_epoch = t_ms * steps_per_epoch / 1000, s_ms * steps_per_epoch / 1000
        total_h = 240 * (t_epoch + s_epoch) / 3600
        print(f"  {teacher_arch + ' -> ' + student_arch:28s} {count_parameters(teacher) / 1e6:5.2f}M/"
              f"{count_parameters(student) / 1e6:4.2f}M {t_epoch:14.0f} s {s_epoch:17.0f} s {total_h:16.1f} h")


def data_path(args) -> None:
    """Samples/s of the data alone (one training epoch of the train split, no model) through the
    tensor-resident path and the DataLoader path (0 and 2 workers), on the default `shapes` data
    and on CIFAR-sized data (50000 random uint8 3x32x32 images, cls target, batch 64, crop 4,
    flip), beside the student's training throughput on the same data (default student on
    shapes, resnet20 on the CIFAR-sized data; no teacher). Goal: tensor path >= 10x training."""
    from omegaconf import OmegaConf

    from kdmtl_cli.build import make_loader
    from kdmtl_cli.distill.objective import Objective
    from kdmtl_cli.models import build_model
    from kdmtl_cli.schema import ModelConfig
    from kdmtl_cli.tasks import TASK_KINDS, Task, _load_kinds

    def data_speed(loader) -> float:
        loader.set_epoch(1)
        next(iter(loader))  # warm-up: starts the persistent workers (a once-per-run cost)
        start, seen = time.perf_counter(), 0
        for batch in loader:
            seen += batch["image"].shape[0]
        return seen / (time.perf_counter() - start)

    def train_speed(model, loader, tasks, steps: int) -> float:
        """Real training steps (forward, task losses, backward, SGD) on the loader's batches."""
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        objective = Objective(tasks, 1.0)  # the task losses, as the engine computes them
        model.train()
        loader.set_epoch(0)
        batches = iter(loader)
        start, seen = None, 0
        for step in range(steps + 3):
            if step == 3:  # the first steps allocate and tune kernels
                start, seen = time.perf_counter(), 0
            batch = next(batches)
            loss, _ = objective(model(hardware.to_input(batch["image"])), batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            seen += batch["image"].shape[0]
        float(loss.detach())
        return seen / (time.perf_counter() - start)

    def paths(data, split_name, tasks, cfg):
        runs = {}
        for _ in range(args.repeats):  # interleaved, so drifts in machine load hit every path alike
            for label, loader_name, workers in (("tensor", "tensor", 0), ("dataloader, 0 workers", "dataloader", 0),
                                                ("dataloader, 2 workers", "dataloader", 2)):
                cfg.data.loader, cfg.data.num_workers = loader_name, workers
                loader = make_loader(data, split_name, tasks, cfg, hardware, train=True, limit=None)
                runs.setdefault(label, []).append(data_speed(loader))
                del loader  # its worker processes end here, not during the next path's epoch
        cfg.data.loader = "tensor"
        return {label: statistics.median(v) for label, v in runs.items()}

    rows = []
    # the default shapes data, the default student
    cfg, hardware, data, tasks, _, student, _, _, _ = _setup("none")
    cfg = OmegaConf.merge(cfg, {})  # a plain copy whose data.* can be set per path
    speeds = paths(data, "train", tasks, cfg)
    loader = make_loader(data, "train", tasks, cfg, hardware, train=True, limit=None)
    trained = train_speed(student, loader, tasks, args.steps)
    rows.append((f"shapes ({data.size('train')} x {cfg.data.image_size}px, batch {cfg.data.batch_size}, flip)",
                 speeds, f"{cfg.student.arch} (default)", trained))

    # CIFAR-sized data, built directly: random pixels cost the same to move as real ones
    _load_kinds()
    cifar = _cifar_like(50000)
    spec = cifar.targets["cls"]
    cls_tasks = {"cls": Task("cls", TASK_KINDS.get("classification")(), spec, "cls")}
    cifar_cfg = OmegaConf.create({"data": {"batch_size": 64, "eval_batch_size": 512, "hflip": True,
                                           "crop_padding": 4, "loader": "tensor", "num_workers": 0}, "seed": 0})
    speeds = paths(cifar, "train", cls_tasks, cifar_cfg)
    torch.manual_seed(0)
    model = hardware.prepare_model(build_model(OmegaConf.structured(ModelConfig(arch="resnet20")), cls_tasks))
    loader = make_loader(cifar, "train", cls_tasks, cifar_cfg, hardware, train=True, limit=None)
    trained = train_speed(model, loader, cls_tasks, args.steps)
    rows.append(("CIFAR-sized (50000 x 32px, batch 64, crop 4, flip)", speeds, "resnet20", trained))

    print(f"device {hardware.device}, {torch.get_num_threads()} threads, torch {torch.__version__}; data: one "
          f"training epoch, median of {args.repeats}; training: {args.steps} steps (after 3 warm-up)")
    print(f"  {'data':52s} {'path':24s} {'samples/s':>10s} {'tensor/this':>12s} {'this/training':>14s}")
    for name, speeds, arch, trained in rows:
        tensor = speeds["tensor"]
        for label, speed in speeds.items():
            print(f"  {name:52s} {label:24s} {speed:10.0f} {tensor / speed:11.2f}x {speed / trained:13.1f}x")
        print(f"  {name:52s} {'training: ' + arch:24s} {trained:10.0f}")
    print("  goal: tensor path >= 10x the student's training throughput")


def hardware_knobs(args) -> None:
    """ms per training step (forward + loss + backward + SGD step; warm-up excluded; median of
    --steps) on this machine for each combination of hardware.channels_last x hardware.precision
    (32, bf16) x hardware.compile, through Hardware.prepare_model / to_input / autocast (the
    engine's own path). Models: resnet20 at 32x32, batch 64, 100 classes (CIFAR zoo trunk) and
    the default student on the default shapes data and tasks. Timed steps are interleaved across
    the combinations (one step each per round), so drifts in machine load hit all alike. The
    first compiled step's extra time (tracing + inductor codegen; inductor's on-disk cache as
    found) is reported separately."""
    from kdmtl_cli.data import TargetSpec
    from kdmtl_cli.distill.objective import Objective
    from kdmtl_cli.engine.hardware import Hardware, check_compile
    from kdmtl_cli.errors import KdmtlError
    from kdmtl_cli.models import build_model
    from kdmtl_cli.schema import ModelConfig
    from kdmtl_cli.tasks import TASK_KINDS, Task, _load_kinds

    from omegaconf import OmegaConf

    _load_kinds()
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    cpu = torch.device("cpu")
    compile_options = [False]
    if args.compile != "off":
        try:
            check_compile(cpu)
            compile_options.append(True)
        except KdmtlError as err:
            print(f"compile skipped: {err}")
    cfg, _, _, shape_tasks, _, _, loader, _, _ = _setup("none")
    cifar_tasks = {"cls": Task("cls", TASK_KINDS.get("classification")(), TargetSpec("classification", 100), "cls")}
    workloads = {  # name: (model config, tasks, one training batch)
        "resnet20": (OmegaConf.structured(ModelConfig(arch="resnet20")), cifar_tasks,
                     {"image": torch.randn(64, 3, 32, 32), "targets": {"cls": torch.randint(0, 100, (64,))}}),
        f"{cfg.student.arch} (default student)": (cfg.student, shape_tasks, next(iter(loader))),
    }

    def make_step(model_cfg, tasks, batch, hardware):
        torch.manual_seed(0)
        model = hardware.prepare_model(build_model(model_cfg, tasks)).train()
        objective = Objective(tasks, 1.0)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        image = hardware.to_input(batch["image"])

        def step() -> float:
            start = time.perf_counter()
            with hardware.autocast():
                loss, _ = objective(model(image), batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if not torch.isfinite(loss):
                raise SystemExit(f"non-finite loss under {hardware}")
            return time.perf_counter() - start

        return step

    runs = {}  # (model, channels_last, precision, compile): [step fn, first step s, timed steps]
    for name, (model_cfg, tasks, batch) in workloads.items():
        for compiled in compile_options:
            for precision in ("32", "bf16"):
                for channels_last in (False, True):
                    hardware = Hardware(device=cpu, precision=precision, channels_last=channels_last, scaler=None,
                                        compile=compiled, compile_mode=args.compile_mode)
                    step = make_step(model_cfg, tasks, batch, hardware)
                    first = step()  # compiles when compile is on
                    for _ in range(args.warmup - 1):
                        step()
                    runs[name, channels_last, precision, compiled] = [step, first, []]
                    print(f"  warmed up {name}, channels_last={channels_last}, precision={precision}, "
                          f"compile={compiled}: first step {first:.1f} s", flush=True)
    for _ in range(args.steps):
        for run in runs.values():
            run[2].append(run[0]())
    # Other processes on a 2-core machine slow multi-threaded steps far more than 1-thread ones
    # (OpenMP threads wait for each other): the load average says how quiet the machine was.
    print(f"\n{torch.get_num_threads()} threads, torch {torch.__version__}, batch 64, {args.steps} timed steps "
          f"after {args.warmup} warm-up, interleaved (median); compile mode {args.compile_mode}; "
          f"1-min load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after")
    print("| model | channels_last | precision | compile | ms/step | vs fp32 contiguous eager | compile s |")
    print("|---|---|---|---|---:|---:|---:|")
    for (name, channels_last, precision, compiled), (_, first, times) in runs.items():
        ms = 1000 * statistics.median(times)
        base = 1000 * statistics.median(runs[name, False, "32", False][2])
        compile_s = f"{first - ms / 1000:.1f}" if compiled else ""
        print(f"| {name} | {'on' if channels_last else 'off'} | {precision} | {'on' if compiled else 'off'} "
              f"| {ms:.1f} | {ms / base:.2f}x | {compile_s} |")


def _cifar_like(n: int, classes: int = 100, seed: int = 0):
    """A CIFAR-sized DataBundle in memory (random uint8 3x32x32 images, `cls` labels)."""
    from kdmtl_cli.data import DataBundle, TargetSpec

    g = torch.Generator().manual_seed(seed)
    split = lambda m: {"image": torch.randint(0, 256, (m, 3, 32, 32), generator=g, dtype=torch.uint8),  # noqa: E731
                       "cls": torch.randint(0, classes, (m,), generator=g)}
    return DataBundle(name="cifar_like", targets={"cls": TargetSpec("classification", classes)},
                      splits={"train": split(n), "val": split(64), "test": split(64)},
                      mean=[0.5071, 0.4865, 0.4409], std=[0.2673, 0.2564, 0.2762], fingerprint=f"random-{n}-{seed}")


def hand_kd_epoch(data, student, teacher, cfg, hardware, epoch: int) -> float:
    """A minimal hand-written KD epoch, the same work as the engine's: gather, pad-4 random
    crop, flip, normalise, student forward, teacher forward (no_grad), 0.1 CE + 0.9 KD(T=4),
    SGD step, scheduler step. Samples/s."""
    device, b, pad = hardware.device, cfg.data.batch_size, 4
    images, labels = data.splits["train"]["image"].to(device), data.splits["train"]["cls"].to(device)
    mean = torch.tensor(data.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(data.std, device=device).view(1, -1, 1, 1)
    n = len(images)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    steps = (n + b - 1) // b
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, [steps * 150, steps * 180], 0.1)
    gen = torch.Generator().manual_seed(epoch)
    order = torch.randperm(n, generator=gen)
    flips = torch.rand(n, generator=gen) < 0.5
    offsets = torch.randint(0, 2 * pad + 1, (n, 2), generator=gen)
    T = 4.0
    student.train()
    start, seen = time.perf_counter(), 0
    for s in range(steps):
        idx = order[s * b:(s + 1) * b]
        x = F.pad(images[idx.to(device)], (pad, pad, pad, pad))
        ys = offsets[idx, 0:1].to(device) + torch.arange(32, device=device)
        xs = offsets[idx, 1:2].to(device) + torch.arange(32, device=device)
        rows = torch.arange(len(idx), device=device).view(-1, 1, 1)
        x = x.permute(0, 2, 3, 1)[rows, ys[:, :, None], xs[:, None, :]].permute(0, 3, 1, 2)
        x = (x.float() / 255 - mean) / std
        x = torch.where(flips[idx].to(device).view(-1, 1, 1, 1), x.flip(-1), x)
        x = hardware.to_input(x)
        with hardware.autocast():
            out = student(x)["outputs"]["cls"]
            with torch.no_grad():
                t_out = teacher(x)["outputs"]["cls"]
            loss = 0.1 * F.cross_entropy(out, labels[idx.to(device)]) + 0.9 * T * T * F.kl_div(
                F.log_softmax(out / T, 1), F.log_softmax(t_out / T, 1), reduction="batchmean", log_target=True)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        seen += len(idx)
    float(loss.detach())  # wait for the device
    return seen / (time.perf_counter() - start)


def perf(args) -> None:
    """Issue-6 ratios in one process on the RepDistiller pairs at 32x32 (CIFAR-100 recipe, batch
    64, crop 4 + flip, fp32 unless --precision): engine vs a hand-written KD loop, the KD step
    with the teacher-output cache vs the live teacher (beside the FLOP bound 1 + T/(3S)), and the
    tensor-resident data path vs the DataLoader path and vs the student's training throughput."""
    from hydra import compose, initialize_config_module
    from torch.utils.flop_counter import FlopCounterMode

    from kdmtl_cli.distill import build_methods
    from kdmtl_cli.distill.objective import Objective
    from kdmtl_cli.engine import teacher_outputs
    from kdmtl_cli.engine.hardware import setup_hardware
    from kdmtl_cli.engine.optim import build_optimizer
    from kdmtl_cli.models import build_model
    from kdmtl_cli.schema import TrainConfig, validate
    from kdmtl_cli.tasks import build_tasks

    data = _cifar_like(args.samples)
    cache_root = tempfile.mkdtemp(prefix="kdmtl-bench-cache-")
    print(f"{torch.get_num_threads()} threads, {args.samples} CIFAR-sized training images, batch 64, "
          f"precision {args.precision}, {args.epochs} epochs per measurement (median), interleaved")
    for pair in args.pairs.split(","):
        teacher_arch, student_arch = pair.split(":")
        with initialize_config_module(config_module="kdmtl_cli.conf", version_base="1.3"):
            # The RepDistiller KD recipe (the same for every pair shipped) with this pair's models.
            raw = compose("train", overrides=["+experiment=cifar100_resnet56_resnet20_kd",
                                              f"teacher.arch={teacher_arch}", f"student.arch={student_arch}",
                                              f"hardware.precision={args.precision}", f"cache_dir={cache_root}"])
        cfg = validate(raw, TrainConfig)
        hardware = setup_hardware(cfg.hardware)
        tasks = build_tasks(cfg.tasks, data.targets)
        torch.manual_seed(0)
        teacher = hardware.prepare_model(build_model(cfg.teacher, tasks)).eval()
        student0 = hardware.prepare_model(build_model(cfg.student, tasks))
        methods = build_methods(cfg.loss, tasks, list(tasks))
        loader = make_loader_for(data, tasks, cfg, hardware, train=True)
        val_loader = make_loader_for(data, tasks, cfg, hardware, train=False)
        one = hardware.to_input(torch.randn(1, 3, 32, 32, device=hardware.device))
        flops = {}
        for name, model in (("T", teacher), ("S", student0)):
            with FlopCounterMode(display=False) as counter, torch.no_grad():
                model.eval()(one)
            flops[name] = counter.get_total_flops()
        bound = 1 + flops["T"] / (3 * flops["S"])
        table = teacher_outputs.plan_views("views", 4, loader.num_samples, hflip=True, crop_padding=4, seed=0,
                                           say=lambda _: None)
        cache = teacher_outputs.open_or_build(cache_dir=cache_root, teacher=teacher, loader=loader, hardware=hardware,
                                              teacher_cfg=cfg.teacher, data=data, views=table,
                                              task_kinds={"cls": "classification"}, seed=0, say=lambda _: None,
                                              progress_mode="none")

        def engine(with_cache: bool) -> float:
            student = copy.deepcopy(student0)
            objective = Objective(tasks, cfg.loss.task_weight, methods, teacher)
            objective.cache = cache if with_cache else None
            loader.views = table if with_cache else None
            try:
                return engine_speed(cfg, hardware, tasks, student, objective,
                                    build_optimizer(student.parameters(), cfg.optim), loader, val_loader)
            finally:
                loader.views = None

        live, cached, hand = [], [], []
        for epoch in range(args.epochs):
            live.append(engine(False))
            cached.append(engine(True))
            hand.append(hand_kd_epoch(data, copy.deepcopy(student0), teacher, cfg, hardware, epoch))
        live_m, cached_m, hand_m = (statistics.median(v) for v in (live, cached, hand))
        print(f"\n{teacher_arch} -> {student_arch}: forward FLOPs T {flops['T'] / 1e6:.1f}M, "
              f"S {flops['S'] / 1e6:.1f}M, "
              f"T/S {flops['T'] / flops['S']:.2f}, bound 1 + T/(3S) = {bound:.2f}")
        print(f"  engine, live teacher   {live_m:8.1f} samples/s  ({', '.join(f'{v:.0f}' for v in live)})")
        print(f"  hand-written KD loop   {hand_m:8.1f} samples/s  ({', '.join(f'{v:.0f}' for v in hand)})")
        print(f"  engine, cached teacher {cached_m:8.1f} samples/s  ({', '.join(f'{v:.0f}' for v in cached)})")
        print(f"  engine / hand = {live_m / hand_m:.3f} (goal >= 0.97)")
        print(f"  cache / live = {cached_m / live_m:.2f}; goal >= 0.9 x {bound:.2f} = {0.9 * bound:.2f}; "
              f"fraction of the bound {cached_m / live_m / bound:.2f}")
        # Training FLOP/s of the student (forward + backward ~ 3x forward), with the cache on.
        achieved = 3 * flops["S"] * cached_m / 1e12
        peak = f", {100 * achieved / args.peak_tflops:.1f}% of {args.peak_tflops} TFLOP/s" if args.peak_tflops else ""
        print(f"  student training with the cache: {achieved:.3f} TFLOP/s{peak}")
    print()
    data_path(args)   # the data-path ratios, in the same process


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("throughput")
    t.add_argument("--epochs", type=int, default=3)
    t.add_argument("--loss", choices=("kd", "none"), default="kd")
    m = sub.add_parser("methods")
    m.add_argument("--losses", default="none,kd,dkd,fitnet,at,kd4mtl,bam")
    m.add_argument("--epochs", type=int, default=2)
    w = sub.add_parser("weighting")
    w.add_argument("--weightings", default="uncertainty,dwa,famo,gradnorm,pcgrad,cagrad")
    w.add_argument("--epochs", type=int, default=5)
    e = sub.add_parser("epoch-cost")
    e.add_argument("--steps", type=int, default=5)
    dp = sub.add_parser("data-path")
    dp.add_argument("--repeats", type=int, default=3, help="data epochs per path (median)")
    dp.add_argument("--steps", type=int, default=30, help="timed training steps per student")
    p = sub.add_parser("perf")
    p.add_argument("--pairs", default="resnet56:resnet20,resnet110:resnet32", help="teacher:student,...")
    p.add_argument("--samples", type=int, default=2048, help="CIFAR-sized training images")
    p.add_argument("--epochs", type=int, default=3, help="epochs per measurement (median)")
    p.add_argument("--precision", default="32", choices=("32", "bf16"))
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's peak, to print the fraction reached")
    p.add_argument("--repeats", type=int, default=3, help="data-path: data epochs per path (median)")
    p.add_argument("--steps", type=int, default=30, help="data-path: timed training steps per student")
    h = sub.add_parser("hardware")
    h.add_argument("--steps", type=int, default=10)
    h.add_argument("--warmup", type=int, default=3)
    h.add_argument("--compile", choices=("auto", "off"), default="auto", help="off: skip the compiled rows")
    h.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's choice)")
    h.add_argument("--compile-mode", default="default", choices=("default", "reduce-overhead", "max-autotune"))
    args = parser.parse_args()
    {"throughput": throughput, "hardware": hardware_knobs, "methods": methods, "weighting": weighting,
     "epoch-cost": epoch_cost, "data-path": data_path, "perf": perf}[args.command](args)


if __name__ == "__main__":
    main()
