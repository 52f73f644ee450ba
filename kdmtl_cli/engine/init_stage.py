"""The init stage: RepDistiller's first training stage for two-stage methods (HobbitLong/RepDistiller
b84f547 helper/pretrain.py `init`, L11-95, called by train_student.py L236, L248, L261), run before the
main training for each method whose `loss.<method>.init_epochs` > 0 (ab, ft, fsp), in config order.

As the official `init`, per method:

- the teacher runs frozen, in eval mode, under no_grad (L12, L59-61), directly: not from the
  teacher-output cache (whose views are drawn for the main epochs);
- the student is put in eval mode (L13) and then the method's `init_modules` in train mode (L14):
  for ab and fsp these hold the student's trunk (`model_s.get_feat_modules()`), which thus trains
  with batch statistics while the heads stay in eval mode and untouched;
- plain SGD over the parameters of `init_modules` only (L28-31), lr = `loss.<method>.init_lr` or
  optim.lr when null (L22-27: 0.01 for factor on CIFAR ResNets/WRNs, else opt.learning_rate),
  momentum = optim.momentum and weight decay = optim.weight_decay (opt.momentum, opt.weight_decay);
- `init_epochs` epochs over the run's training loader (its `limit_train_batches`), each step
  minimising the plain sum of the method's `init_terms` (L63-74: no beta);
- one line per epoch (L87-91) and the epoch means (weighted by batch size, as its AverageMeter)
  in metrics.jsonl as a record `{"type": "init", "method", "init_epoch", "init/<term>"...}`.

A run resumed from a main-stage checkpoint skips the stage (the checkpoint holds its result: the
student's weights and the methods' modules); a run stopped during the stage has no checkpoint and
redoes it from the start, identically (the loader's plan of init epoch k is a function of (seed, -k);
nothing else draws random numbers), after dropping the init records of the stopped attempt.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Dict

import torch

from kdmtl_cli.engine import preemption
from kdmtl_cli.engine.logging import MetricsLog, say
from kdmtl_cli.errors import KdmtlError


def check_init_stages(methods, ranks) -> None:
    """Refuse, in one line, the init stages kdmtl cannot run yet (called before any work too)."""
    methods = [m for m in methods if m.init_epochs() > 0]
    if any(m.member is not None for m in methods):
        raise KdmtlError(f"the init stage of loss.{methods[0].name} is not supported with teacher=ensemble yet; "
                         f"set loss.{methods[0].name}.init_epochs=0")
    if methods and ranks.active:
        raise KdmtlError(f"the init stage of loss.{methods[0].name} is not supported with several processes yet; "
                         f"run on one process or set loss.{methods[0].name}.init_epochs=0")


def _drop_init_records(run_dir: Path) -> None:
    """metrics.jsonl without the records of an init stage that was stopped before it ended."""
    from kdmtl_cli.engine.checkpoint import atomic_write_text

    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return
    kept = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("type") != "init":
            kept.append(line)
    atomic_write_text("".join(line + "\n" for line in kept), path)


def run_init_stages(objective, student: torch.nn.Module, loader, hardware, cfg, run_dir: Path,
                    resume: bool, ranks) -> None:
    """Each method's init stage, in config order (see the module docstring); nothing when none has
    one or when the run resumes from a checkpoint of its main stage. What it cannot run was refused
    by check_init_stages before any work (run.py)."""
    methods = [m for m in objective.methods if m.init_epochs() > 0]
    if not methods:
        return
    progress_mode = cfg.log.progress
    if resume and (Path(run_dir) / "checkpoints" / "last.pt").exists():
        say(progress_mode, f"init stage of {', '.join(m.name for m in methods)}: skipped (the checkpoint "
                           "resumed holds its result)")
        return
    log = MetricsLog(run_dir, tensorboard=False) if ranks.is_main else None
    if log is not None:
        _drop_init_records(run_dir)
    views = getattr(loader, "views", None)
    loader.views = None            # the teacher runs on every batch: no stored views to replay
    try:
        for method in methods:
            _run_one(method, objective.teacher, student, loader, hardware, cfg, log, progress_mode)
    finally:
        loader.views = views
        loader.set_epoch(0)


def _run_one(method, teacher, student, loader, hardware, cfg, log, progress_mode) -> None:
    modules = method.init_modules(student)
    params = [p for module in modules for p in module.parameters() if p.requires_grad]
    if not params:
        raise KdmtlError(f"loss.{method.name}: its init stage has no parameters to train")
    lr = method.init_lr(cfg.optim.lr)
    optimizer = torch.optim.SGD(params, lr=lr, momentum=float(cfg.optim.momentum),
                                weight_decay=float(cfg.optim.weight_decay))
    scaler = torch.amp.GradScaler(hardware.device.type) if hardware.scaler is not None else None
    epochs = method.init_epochs()
    say(progress_mode, f"[init {method.name}] {epochs} epochs of SGD (lr {lr:g}) on "
                       f"{sum(p.numel() for p in params):,} parameters, before the main training")
    for epoch in range(1, epochs + 1):
        student.eval()
        for module in modules:
            module.train()
        loader.set_epoch(-epoch)   # init epoch k draws its own plan; main epoch e draws (seed, e) as always
        start = time.perf_counter()
        sums: Dict[str, torch.Tensor] = {}
        samples = 0
        for batch in loader:
            image = hardware.to_input(batch["image"])
            with hardware.autocast():
                student_out = student(image)
                with torch.no_grad():
                    teacher_out = teacher(image)
                terms = method.init_terms(student_out, teacher_out, batch)
            loss = sum(terms.values())
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            n = int(image.shape[0])
            samples += n
            for name, value in {**terms, f"{method.name}/init_loss": loss}.items():
                sums[name] = sums.get(name, 0.0) + value.detach().float() * n
        means = {f"init/{name}": float(total) / max(1, samples) for name, total in sums.items()}
        if log is not None:
            log.write({"type": "init", "method": method.name, "init_epoch": epoch, **means})
        loss_mean = means.get(f"init/{method.name}/init_loss", float("nan"))
        say(progress_mode, f"[init {method.name}] epoch {epoch}/{epochs}: loss {loss_mean:.4g} "
                           f"({time.perf_counter() - start:.1f} s)")
        preemption.check(f"during the init stage of loss.{method.name} (a new start redoes it)")
    student.train()
