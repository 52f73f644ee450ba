"""Teachers: loaded from a checkpoint, reused from the teacher cache, or trained once
with the same engine and cached. Checked against the student's tasks before use."""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict

from omegaconf import OmegaConf

from kdmtl_cli.build import make_loader, model_meta
from kdmtl_cli.data import TargetSpec
from kdmtl_cli.distill.logit import NoDistillation
from kdmtl_cli.distill.objective import Objective
from kdmtl_cli.engine.checkpoint import (atomic_write_text, load_checkpoint, load_tensor_file,
                                         read_safetensors_metadata, save_weights)
from kdmtl_cli.engine.logging import MetricsLog
from kdmtl_cli.engine.optim import build_optimizer, build_scheduler
from kdmtl_cli.engine.seeding import seed_everything
from kdmtl_cli.engine.teacher_cache import teacher_dir, teacher_key
from kdmtl_cli.engine.trainer import Trainer
from kdmtl_cli.errors import KdmtlError
from kdmtl_cli.models import build_model
from kdmtl_cli.tasks import TASK_KINDS, Task, task_signature


def _say(progress_mode: str, text: str) -> None:
    if progress_mode != "none":
        print(text, flush=True)


def _tasks_from_signature(signature: Dict) -> Dict[str, Task]:
    tasks = {}
    for name, sig in signature.items():
        kind = TASK_KINDS.get(sig["kind"])()
        tasks[name] = Task(name=name, kind=kind, spec=TargetSpec(sig["kind"], sig.get("num_classes")), target=name)
    return tasks


def _check_covers(source: str, signature: Dict, student_tasks: Dict[str, Task], wanted) -> None:
    for name in wanted:
        if name not in signature:
            raise KdmtlError(f"teacher {source} does not cover student task '{name}' (it has: "
                             f"{', '.join(signature) or 'none'}); set teacher.tasks to the tasks it covers, "
                             "e.g. teacher.tasks=[" + ",".join(n for n in wanted if n in signature) + "]")
        sig, task = signature[name], student_tasks[name]
        if sig["kind"] != task.kind.name:
            raise KdmtlError(f"teacher {source} task '{name}' is {sig['kind']} but the student's is "
                             f"{task.kind.name}")
        if sig.get("num_classes") != task.spec.num_classes:
            raise KdmtlError(f"teacher {source} task '{name}' has {sig.get('num_classes')} classes but the "
                             f"student's has {task.spec.num_classes}; use a teacher trained on the same labels")


def read_teacher_file(path: Path):
    """(model description, weights) from a kdmtl checkpoint (.pt, weights_only) or
    .safetensors weights with kdmtl metadata."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise KdmtlError(f"teacher checkpoint not found: {path}; check teacher.checkpoint")
    if path.suffix == ".safetensors":
        meta_text = read_safetensors_metadata(path).get("kdmtl_model_meta")
        if not meta_text:
            raise KdmtlError(f"{path} has no 'kdmtl_model_meta' metadata, so its architecture is unknown; "
                             "export teachers with kdmtl or use a kdmtl .pt checkpoint")
        return json.loads(meta_text), load_tensor_file(path, what="teacher weights")
    state = load_checkpoint(path)
    if "model_meta" not in state:
        raise KdmtlError(f"{path} has no model description (model_meta); it was not written by kdmtl train")
    return state["model_meta"], state["model"]


def build_teacher(path: Path, meta: Dict, weights: Dict):
    model = build_model(OmegaConf.create({**meta["model"], "weights": None}), _tasks_from_signature(meta["tasks"]))
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        detail = "; ".join(line.strip() for line in str(err).splitlines()[1:3])
        raise KdmtlError(f"weights in {path} do not match their recorded architecture ({detail})") from None
    return model


def prepare_teacher(cfg, tasks: Dict[str, Task], data, hardware, run_dir: Path):
    """Return the frozen teacher (on the run's device) for the student's tasks."""
    progress = cfg.log.progress
    wanted = list(cfg.teacher.tasks) if cfg.teacher.tasks else list(tasks)
    unknown = [n for n in wanted if n not in tasks]
    if unknown:
        raise KdmtlError(f"teacher.tasks names {', '.join(unknown)}, not student tasks ({', '.join(tasks)})")
    if cfg.teacher.checkpoint:
        path = Path(cfg.teacher.checkpoint)
        meta, weights = read_teacher_file(path)
        _check_covers(f"checkpoint {cfg.teacher.checkpoint}", meta["tasks"], tasks, wanted)
        model = build_teacher(path, meta, weights)
        _say(progress, f"teacher: loaded {cfg.teacher.checkpoint}")
        return hardware.prepare_model(model), {"source": str(cfg.teacher.checkpoint)}

    teacher_tasks = {n: tasks[n] for n in wanted}
    signature = task_signature(teacher_tasks)
    key = teacher_key(cfg.teacher, signature, cfg.data, data.fingerprint, cfg.seed,
                      cfg.hardware.precision, cfg.limit_train_batches)
    entry = teacher_dir(cfg.cache_dir, key)
    weights_path = entry / "teacher.safetensors"
    if weights_path.exists():
        meta, weights = read_teacher_file(weights_path)
        _check_covers(f"cache entry {entry}", meta["tasks"], tasks, wanted)
        model = build_teacher(weights_path, meta, weights)
        _say(progress, f"teacher: reusing cached teacher {entry}")
        return hardware.prepare_model(model), {"source": str(weights_path), "cached": True}

    _say(progress, f"teacher: no cached teacher for key {key}; training it ({cfg.teacher.optim.epochs} epochs)")
    start = time.perf_counter()
    model = train_teacher(cfg, teacher_tasks, data, hardware, run_dir / "teacher")
    meta = model_meta(cfg.teacher, signature)
    save_weights(model.state_dict(), weights_path, {"kdmtl_model_meta": json.dumps(meta)})
    info = {"key": key, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "trained_in_run": str(run_dir), "train_seconds": round(time.perf_counter() - start, 2),
            "config": OmegaConf.to_container(cfg.teacher, resolve=True), "tasks": signature}
    atomic_write_text(json.dumps(info, indent=2), entry / "teacher.json")
    _say(progress, f"teacher: trained in {info['train_seconds']:.1f}s and cached at {entry}")
    return model, {"source": str(weights_path), "cached": False}


def train_teacher(cfg, tasks: Dict[str, Task], data, hardware, teacher_run_dir: Path):
    seed_everything(cfg.seed)
    model = hardware.prepare_model(build_model(cfg.teacher, tasks))
    train_loader = make_loader(data, "train", tasks, cfg, hardware, train=True, limit=cfg.limit_train_batches)
    val_loader = make_loader(data, "val", tasks, cfg, hardware, train=False, limit=cfg.limit_eval_batches)
    optimizer = build_optimizer(model.parameters(), cfg.teacher.optim)
    scheduler = build_scheduler(optimizer, cfg.teacher.optim, len(train_loader))
    objective = Objective(tasks, OmegaConf.create({"task_weight": 1.0, "kd_weight": 0.0}), NoDistillation(None, tasks))
    log = MetricsLog(teacher_run_dir, cfg.log.tensorboard)
    trainer = Trainer(model=model, objective=objective, tasks=tasks, optimizer=optimizer, scheduler=scheduler,
                      hardware=hardware, train_loader=train_loader, val_loader=val_loader,
                      epochs=cfg.teacher.optim.epochs, checkpoint_dir=teacher_run_dir / "checkpoints", log=log,
                      progress_mode=cfg.log.progress, label="teacher", monitor="val/loss/task",
                      grad_clip_norm=cfg.teacher.optim.grad_clip_norm, log_every_n_steps=cfg.log.every_n_steps,
                      checkpoint_extra={"model_meta": model_meta(cfg.teacher, task_signature(tasks))})
    trainer.fit()
    log.close()
    # The teacher kept is the best by validation task loss, not the last epoch.
    model.load_state_dict(load_checkpoint(teacher_run_dir / "checkpoints" / "best.pt")["model"])
    model.eval()
    return model
