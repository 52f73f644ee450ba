"""Teachers: loaded from a checkpoint, reused from the teacher cache, or trained once
with the same engine and cached. Checked against the student's tasks before use."""

from __future__ import annotations

import json
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, List, Optional

import torch
from omegaconf import OmegaConf

from kdmtl_cli.build import make_loader, model_meta
from kdmtl_cli.data import TargetSpec
from kdmtl_cli.distill.objective import Objective
from kdmtl_cli.engine.checkpoint import (atomic_write_text, load_checkpoint, load_tensor_file,
                                         read_safetensors_metadata, save_weights)
from kdmtl_cli.engine.locks import file_lock
from kdmtl_cli.engine.logging import MetricsLog, say
from kdmtl_cli.engine.optim import build_optimizer, build_scheduler
from kdmtl_cli.engine.seeding import seed_everything
from kdmtl_cli.engine.teacher_cache import teacher_dir, teacher_key
from kdmtl_cli.engine.trainer import Trainer
from kdmtl_cli.errors import KdmtlError
from kdmtl_cli.models import build_model, settings_from_checkpoint, without_init_only
from kdmtl_cli.tasks import TASK_KINDS, Task, task_signature


# Inside a teacher's cache entry: its checkpoints while it trains, removed once its weights are cached.
STAGING = "training"


def _tasks_from_signature(signature: Dict) -> Dict[str, Task]:
    from kdmtl_cli.tasks import _load_kinds

    _load_kinds()   # also when no config was composed (kdmtl export)
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
    model = build_model(settings_from_checkpoint(meta["model"]), _tasks_from_signature(meta["tasks"]),
                        from_checkpoint=True, key=f"{path}: model")
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        detail = "; ".join(line.strip() for line in str(err).splitlines()[1:3])
        raise KdmtlError(f"weights in {path} do not match their recorded architecture ({detail})") from None
    return model


class Renormalize(torch.nn.Module):
    """Feeds a teacher trained at another input normalisation: the student's input
    x = (img - m_s) / s_s becomes (img - m_t) / s_t = x * (s_s / s_t) + (m_s - m_t) / s_t."""

    def __init__(self, teacher: torch.nn.Module, student_norm: Dict, teacher_norm: Dict):
        super().__init__()
        self.teacher = teacher
        m_s, s_s = torch.tensor(student_norm["mean"]), torch.tensor(student_norm["std"])
        m_t, s_t = torch.tensor(teacher_norm["mean"]), torch.tensor(teacher_norm["std"])
        self.register_buffer("scale", (s_s / s_t).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("shift", ((m_s - m_t) / s_t).view(1, -1, 1, 1), persistent=False)

    def capture_features(self, names) -> None:
        self.teacher.capture_features(names)

    def forward(self, image):
        return self.teacher(image * self.scale + self.shift)


class TaskTeachers(torch.nn.Module):
    """Several single-task (or partial) teachers acting as one: each answers for its own
    tasks; features are prefixed with the task they come from (`seg:trunk.stages.2`)."""

    def __init__(self, teachers: Dict[str, torch.nn.Module]):
        super().__init__()
        self.teachers = torch.nn.ModuleDict(teachers)

    def capture_features(self, names) -> None:
        """`task:path` hooks one teacher; a bare `path` hooks every teacher."""
        for task, teacher in self.teachers.items():
            mine = [n.split(":", 1)[1] for n in names if n.startswith(task + ":")]
            mine += [n for n in names if ":" not in n]
            unknown = [n for n in names if ":" in n and n.split(":", 1)[0] not in self.teachers]
            if unknown:
                raise KdmtlError(f"teacher feature '{unknown[0]}' names no per-task teacher; "
                                 f"teachers: {', '.join(self.teachers)}")
            if mine:
                teacher.capture_features(sorted(set(mine)))

    def forward(self, image):
        outputs, features = {}, {}
        for task, teacher in self.teachers.items():
            out = teacher(image)
            outputs[task] = out["outputs"][task]
            features.update({f"{task}:{name}": value for name, value in out["features"].items()})
        return {"outputs": outputs, "features": features}


class TeacherEnsemble(torch.nn.Module):
    """Several teachers for the same tasks (teacher=ensemble). The methods distil from each member
    on its own (`members` in the output: one output dict per teacher); `outputs` is the members'
    mean, what the run tests and reports as the teacher."""

    def __init__(self, members: List[torch.nn.Module]):
        super().__init__()
        self.members = torch.nn.ModuleList(members)

    def forward(self, image):
        answers = [member(image) for member in self.members]
        outputs = {task: torch.stack([a["outputs"][task] for a in answers]).mean(0) for task in answers[0]["outputs"]}
        return {"outputs": outputs, "features": {}, "members": answers}


MEMBER_KEYS_REFUSED = ("mode", "members", "balance", "tasks", "checkpoints", "cache", "cache_views", "cache_topk",
                       "cache_dtype")


def member_configs(cfg) -> List:
    """teacher=ensemble: one run config per teacher, its `teacher` node the ensemble's settings with the
    member's own keys on top (mode multitask) and its `seed` the member's training seed (default: the
    run's seed + its position). Each is checked against the schema: a bad member key is one line."""
    from kdmtl_cli.schema import TrainConfig, validate

    members = list(cfg.teacher.members or [])
    if len(members) < 2:
        raise KdmtlError(f"teacher=ensemble needs at least two teachers in teacher.members (got {len(members)}); "
                         "e.g. teacher.members='[{},{}]' for two of this teacher trained with two seeds")
    if cfg.teacher.cache != "off":
        raise KdmtlError(f"teacher.cache={cfg.teacher.cache} is not available with teacher=ensemble; "
                         "use teacher.cache=off")
    if cfg.teacher.checkpoint or cfg.teacher.checkpoints:
        raise KdmtlError("teacher=ensemble takes its checkpoints per member: "
                         "teacher.members='[{checkpoint: A.pt},{checkpoint: B.pt}]'")
    base = OmegaConf.to_container(cfg, resolve=True)
    teacher = {k: v for k, v in base["teacher"].items() if k not in ("members", "balance")}
    teacher["mode"] = "multitask"
    configs = []
    for k, member in enumerate(members):
        member = OmegaConf.to_container(member, resolve=True) if not isinstance(member, dict) else dict(member)
        if not isinstance(member, dict):
            raise KdmtlError(f"teacher.members[{k}] must be a mapping of teacher keys (got {member!r})")
        refused = [key for key in member if key in MEMBER_KEYS_REFUSED]
        if refused:
            raise KdmtlError(f"teacher.members[{k}].{refused[0]} cannot differ between the teachers of an ensemble")
        seed = member.pop("seed", int(cfg.seed) + k)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise KdmtlError(f"teacher.members[{k}].seed must be an integer (got {seed!r})")
        node = OmegaConf.merge(OmegaConf.create(teacher), OmegaConf.create(member))
        one = OmegaConf.create({**base, "teacher": OmegaConf.to_container(node), "seed": seed})
        try:
            one = validate(one, TrainConfig)
        except KdmtlError as err:
            raise KdmtlError(f"teacher.members[{k}]: {err}") from None
        configs.append(one)
    return configs


def _with_input_norm(model, meta: Dict, data, progress: str = "plain"):
    """Wrap the teacher when it was trained at a normalisation other than the student's data."""
    student_norm = {"mean": list(data.mean), "std": list(data.std)}
    teacher_norm = meta.get("input_norm") or student_norm
    same = all(abs(a - b) < 1e-12 for key in ("mean", "std") for a, b in zip(student_norm[key], teacher_norm[key]))
    if same:
        return model
    say(progress, f"teacher: trained at input mean {teacher_norm['mean']} std {teacher_norm['std']}; "
                   "renormalising the student's input for it")
    return Renormalize(model, student_norm, teacher_norm)


def _obtain(cfg, tasks: Dict[str, Task], wanted, data, hardware, run_dir: Path, label: str,
            checkpoint: Optional[str], logs_dir: Path):
    """One teacher for `wanted` tasks: from a checkpoint, from the cache, or trained and cached."""
    progress = cfg.log.progress
    if checkpoint:
        path = Path(checkpoint)
        meta, weights = read_teacher_file(path)
        _check_covers(f"checkpoint {checkpoint}", meta["tasks"], tasks, wanted)
        model = _with_input_norm(build_teacher(path, meta, weights), meta, data, progress)
        say(progress, f"{label}: loaded {checkpoint}")
        return hardware.prepare_model(model), {"source": str(checkpoint)}

    teacher_tasks = {n: tasks[n] for n in wanted}
    signature = task_signature(teacher_tasks)
    key = teacher_key(cfg.teacher, signature, cfg.data, data.fingerprint, cfg.seed,
                      cfg.hardware.precision, cfg.limit_train_batches)
    entry = teacher_dir(cfg.cache_dir, key)
    weights_path = entry / "teacher.safetensors"

    def cached():
        meta, weights = read_teacher_file(weights_path)
        _check_covers(f"cache entry {entry}", meta["tasks"], tasks, wanted)
        model = _with_input_norm(build_teacher(weights_path, meta, weights), meta, data, progress)
        say(progress, f"{label}: reusing cached teacher {entry}")
        return hardware.prepare_model(model), {"source": str(weights_path), "cached": True}

    if weights_path.exists():
        return cached()
    # Sweep jobs needing this teacher train it once: the first takes the lock, the others wait
    # and then load it. The weights file is written atomically, so it exists only when complete.
    with file_lock(entry.parent.parent / "locks" / f"teacher-{key}.lock",
                   on_wait=lambda: say(progress, f"{label}: another job is training teacher {key}; waiting")):
        if weights_path.exists():
            return cached()
        staging = entry / STAGING
        if not (staging / "checkpoints" / "last.pt").exists():
            say(progress, f"{label}: no cached teacher for key {key}; training it ({cfg.teacher.optim.epochs} epochs)")
        start = time.perf_counter()
        model = train_teacher(cfg, teacher_tasks, data, hardware, logs_dir, label, checkpoint_dir=staging / "checkpoints")
        meta = model_meta(cfg.teacher, signature, data)
        save_weights(model.state_dict(), weights_path, {"kdmtl_model_meta": json.dumps(meta)})
        info = {"key": key, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "trained_in_run": str(run_dir),
                "train_seconds": round(time.perf_counter() - start, 2),
                "config": OmegaConf.to_container(cfg.teacher, resolve=True), "tasks": signature}
        atomic_write_text(json.dumps(info, indent=2), entry / "teacher.json")
        # Cached: its checkpoints join the logs of the run that finished training it (teacher/checkpoints/).
        kept = logs_dir / "checkpoints"
        shutil.rmtree(kept, ignore_errors=True)
        shutil.move(str(staging / "checkpoints"), str(kept))
        shutil.rmtree(staging, ignore_errors=True)
    say(progress, f"{label}: trained in {info['train_seconds']:.1f}s and cached at {entry}")
    return model, {"source": str(weights_path), "cached": False}


def teacher_task_names(cfg, tasks: Dict[str, Task]) -> List[str]:
    """The student tasks the teacher covers: `teacher.tasks`, or every student task."""
    wanted = list(cfg.teacher.tasks) if cfg.teacher.tasks else list(tasks)
    unknown = [n for n in wanted if n not in tasks]
    if unknown:
        raise KdmtlError(f"teacher.tasks names {', '.join(unknown)}, not student tasks ({', '.join(tasks)})")
    return wanted


def prepare_teacher(cfg, tasks: Dict[str, Task], data, hardware, run_dir: Path):
    """Return the frozen teacher (on the run's device) for the student's tasks, and where it came from.

    teacher.mode=multitask: one teacher for all `teacher.tasks` (default: every student task).
    teacher.mode=per_task: one single-task teacher per task, each loaded from
    `teacher.checkpoints.<task>` or trained once and cached on its own.
    """
    wanted = teacher_task_names(cfg, tasks)
    mode = cfg.teacher.mode
    if mode not in ("multitask", "per_task", "ensemble"):
        raise KdmtlError(f"unknown teacher.mode '{mode}'; choose multitask, per_task or ensemble")
    if mode == "ensemble":
        members, info = [], []
        for k, member_cfg in enumerate(member_configs(cfg)):
            model, source = _obtain(member_cfg, tasks, wanted, data, hardware, run_dir, f"teacher {k}",
                                    member_cfg.teacher.checkpoint, logs_dir=run_dir / "teacher" / f"member{k}")
            members.append(model)
            info.append({**source, "seed": int(member_cfg.seed)})
        sources = "; ".join(f"{k}: {i['source']}" for k, i in enumerate(info))
        return hardware.prepare_model(TeacherEnsemble(members)), {"source": sources, "members": info}
    stray = [n for n in cfg.teacher.checkpoints if n not in wanted]
    if stray:
        raise KdmtlError(f"teacher.checkpoints names {', '.join(stray)}, which the teacher does not cover "
                         f"(teacher tasks: {', '.join(wanted)})")
    if mode == "multitask":
        if cfg.teacher.checkpoints:
            raise KdmtlError("teacher.checkpoints (one per task) needs teacher=per_task; "
                             "for one multi-task teacher use teacher.checkpoint=PATH")
        return _obtain(cfg, tasks, wanted, data, hardware, run_dir, "teacher", cfg.teacher.checkpoint,
                       logs_dir=run_dir / "teacher")
    if cfg.teacher.checkpoint:
        raise KdmtlError("teacher=per_task takes one checkpoint per task: teacher.checkpoints.<task>=PATH "
                         "(teacher.checkpoint is for one multi-task teacher)")
    teachers, info = {}, {}
    for task in wanted:
        teachers[task], info[task] = _obtain(cfg, tasks, [task], data, hardware, run_dir, f"teacher:{task}",
                                             cfg.teacher.checkpoints.get(task), logs_dir=run_dir / "teacher" / task)
    sources = "; ".join(f"{task}: {i['source']}" for task, i in info.items())
    return hardware.prepare_model(TaskTeachers(teachers)), {"source": sources, "per_task": info}


def teacher_skeleton(cfg, tasks: Dict[str, Task]):
    """An untrained teacher of the run's architecture(s), for checks before any teacher is
    trained (feature names and shapes): per-task teachers as TaskTeachers; a teacher from a
    checkpoint built from the architecture recorded in it."""
    def one(wanted, checkpoint):
        if checkpoint:
            meta, _ = read_teacher_file(Path(checkpoint))
            return build_model(settings_from_checkpoint(meta["model"]), _tasks_from_signature(meta["tasks"]),
                               from_checkpoint=True, key=f"{checkpoint}: model")
        return build_model(without_init_only(cfg.teacher), {n: tasks[n] for n in wanted}, key="teacher")

    wanted = teacher_task_names(cfg, tasks)
    if cfg.teacher.mode == "ensemble":
        return TeacherEnsemble([teacher_skeleton(member_cfg, tasks) for member_cfg in member_configs(cfg)])
    if cfg.teacher.mode == "per_task":
        return TaskTeachers({task: one([task], cfg.teacher.checkpoints.get(task)) for task in wanted})
    return one(wanted, cfg.teacher.checkpoint)


TEACHER_KEEP = ("best", "last", "train_loss")


def kept_teacher_monitor(cfg, data) -> str:
    """teacher.keep=best: the epoch with the lowest val/loss/task; last (RepDistiller's
    ckpt_epoch_240.pth), or best without a validation split (data.val_size=0): the last epoch;
    train_loss: the lowest epoch-mean training task loss (KD4MTL's model_best)."""
    keep = cfg.teacher.get("keep", "best")
    if keep not in TEACHER_KEEP:
        raise KdmtlError(f"teacher.keep must be best, last or train_loss (got '{keep}')")
    if keep == "train_loss":
        return "train/loss/task"
    return "val/loss/task" if keep == "best" and data.size("val") else "last"


def train_teacher(cfg, tasks: Dict[str, Task], data, hardware, teacher_run_dir: Path, label: str = "teacher",
                  checkpoint_dir: Optional[Path] = None):
    """Train a teacher, logging into `teacher_run_dir`. Its checkpoints go to `checkpoint_dir`
    (the cache entry's staging area when trained for the cache): a teacher stopped by a signal
    or killed continues from its last checkpoint there, by whichever run needs it next."""
    seed_everything(cfg.seed)
    model = hardware.prepare_model(build_model(cfg.teacher, tasks))
    train_loader = make_loader(data, "train", tasks, cfg, hardware, train=True, limit=cfg.limit_train_batches)
    val_loader = make_loader(data, "val", tasks, cfg, hardware, train=False, limit=cfg.limit_eval_batches) \
        if data.size("val") else None      # data.val_size=0: no validation split, the last epoch is kept
    optimizer = build_optimizer(model.parameters(), cfg.teacher.optim)
    scheduler = build_scheduler(optimizer, cfg.teacher.optim, len(train_loader))
    objective = Objective(tasks, 1.0)
    log = MetricsLog(teacher_run_dir, cfg.log.tensorboard)
    trainer = Trainer(model=model, objective=objective, tasks=tasks, optimizer=optimizer, scheduler=scheduler,
                      hardware=hardware, train_loader=train_loader, val_loader=val_loader,
                      epochs=cfg.teacher.optim.epochs, checkpoint_dir=checkpoint_dir or teacher_run_dir / "checkpoints",
                      log=log,
                      progress_mode=cfg.log.progress, label=label, monitor=kept_teacher_monitor(cfg, data),
                      grad_clip_norm=cfg.teacher.optim.grad_clip_norm, log_every_n_steps=cfg.log.every_n_steps,
                      checkpoint_extra={"model_meta": model_meta(cfg.teacher, task_signature(tasks), data)})
    trainer.resume_from_last()
    try:
        trainer.fit()
    finally:
        log.close()
    # The teacher kept (teacher.keep): best.pt is the best by validation task loss, or the last epoch.
    model.load_state_dict(load_checkpoint(trainer.checkpoint_dir / "best.pt")["model"])
    model.eval()
    return model
