"""The training objective: task losses plus the chosen distillation methods' terms, each
named and logged raw, grouped by task for the weighting strategy:

    L_t     = task_weight[t] * task/t  +  sum of the terms `<method>/t`, each times its weight
    extra   = sum of the terms that belong to no task (feature distillation: `at/...`, `fitnet/...`)
    step    = weighting({L_t}) + extra          (kdmtl_cli/weighting/; equal: sum_t L_t + extra)

So a task's distillation terms join its task's loss before weighting: a strategy that
down-weights a task down-weights its distillation too, and gradient-based strategies
(PCGrad, CAGrad, GradNorm) see each task's full gradient. `loss/task` (the unweighted sum
of the non-auxiliary task losses) is what validation reports by default.
The teacher runs frozen, in eval mode, under no_grad; learned parts of methods (FitNet
regressors, KD4MTL adaptors) live in `self.modules` and are optimised with the student.
With a teacher-output cache (`self.cache`), training batches that carry a stored `view` read
the teacher's outputs from it instead of running the teacher.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from kdmtl_cli.distill.pairs import module_path, split_name
from kdmtl_cli.distill.weights import per_task_weights
from kdmtl_cli.errors import KdmtlError


def _inner(model: torch.nn.Module) -> torch.nn.Module:
    """The model under wrappers that only pass the input on (Renormalize, DDP, torch.compile)."""
    for attr in ("teacher", "module", "_orig_mod"):
        if not hasattr(model, "_captured") and not hasattr(model, "teachers") and not hasattr(model, "members") \
                and hasattr(model, attr):
            return _inner(getattr(model, attr))
    return model


def capture(model: torch.nn.Module, names, side: str = "student") -> None:
    """Record these features (pairs.py names: `[task:]path[/i]`) on every forward of `model`, in
    its `features` output under the name as given. Per-task teachers (TaskTeachers) route a
    `task:` name to that task's teacher and an unprefixed name to every teacher (captured there
    as `<task>:<name>`). Fails, listing what exists, when a module path or task does not."""
    from kdmtl_cli.models.multitask import check_module_names

    names = sorted(set(names))
    model = _inner(model)
    members = getattr(model, "members", None)
    if members is not None:           # an ensemble: every teacher captures the same names
        for member in members:
            capture(member, names, side)
        return
    teachers = getattr(model, "teachers", None)
    if teachers is not None:
        unknown = [n for n in names if split_name(n)[0] is not None and split_name(n)[0] not in teachers]
        if unknown:
            raise KdmtlError(f"teacher feature '{unknown[0]}' names no per-task teacher; "
                             f"teachers: {', '.join(teachers)}")
        for task, teacher in teachers.items():
            mine = [n.split(":", 1)[1] for n in names if split_name(n)[0] == task]
            mine += [n for n in names if split_name(n)[0] is None]
            capture(teacher, mine, side)
        return
    for name in names:
        if split_name(name)[0] is not None:
            raise KdmtlError(f"{side} feature '{name}' has a task prefix, but the {side} is one multi-task "
                             "model; drop the prefix (prefixes name per-task teachers, teacher=per_task)")
    if not hasattr(model, "_captured"):          # a model with its own capture (no /i selectors)
        model.capture_features([module_path(n) for n in names])
        return
    check_module_names(model, [module_path(n) for n in names])
    modules = dict(model.named_modules())
    for name in names:
        _, path, index = split_name(name)

        def hook(_module, _inputs, out, name=name, index=index, model=model):
            if index is not None:
                try:
                    out = out[index]
                except (TypeError, IndexError):
                    raise KdmtlError(f"feature '{name}': the module's output has no element {index}") from None
            model._captured[name] = out

        model._hooks.append(modules[path].register_forward_hook(hook))


def check_student_modules(methods, student: torch.nn.Module) -> None:
    """Fail before any teacher is trained when a method names a student module that does not exist."""
    from kdmtl_cli.models.multitask import check_module_names

    for method in methods:
        try:
            check_module_names(student, [module_path(n) for n in method.student_features])
        except KdmtlError as err:
            raise KdmtlError(f"student feature for loss.{method.name}: {err}") from None


def preflight(methods, student: torch.nn.Module, teacher: torch.nn.Module, batch: dict) -> None:
    """Dry-run the methods' set-up on untrained models of the run's architectures (`teacher`:
    teachers.teacher_skeleton), before any teacher is trained: a bad feature name, a pair that
    is not two maps or a size a regressor cannot bridge fails here, in one line. The methods'
    learned parts built here are rebuilt by Objective.setup."""
    if not methods:
        return
    with torch.random.fork_rng(devices=[]):
        names = {"student": sorted({n for m in methods for n in m.student_features}),
                 "teacher": sorted({n for m in methods for n in m.teacher_features})}
        for model, side in ((student, "student"), (teacher, "teacher")):
            model.eval()
            try:
                if names[side]:
                    capture(model, names[side], side)
            except KdmtlError as err:
                raise KdmtlError(f"{side} feature for loss.{'/'.join(m.name for m in methods)}: {err}") from None
        image = batch["image"][:2].cpu().float()
        with torch.no_grad():
            s_feats = student.cpu().float()(image)["features"]
            t_out = teacher.cpu().float()(image)
        for method in methods:
            method.bind_teacher(teacher_part(teacher, method))
            method.setup(s_feats, teacher_answer(t_out, method)["features"])
            method.modules = torch.nn.ModuleDict()


def teacher_part(teacher: torch.nn.Module, method) -> torch.nn.Module:
    """The teacher module a method distils from: its member of an ensemble, or the whole teacher
    (under its pass-through wrappers)."""
    teacher = _inner(teacher)
    return teacher if method.member is None else _inner(teacher.members[method.member])


def teacher_answer(teacher_out: dict, method) -> dict:
    """The teacher output a method distils from: its member's (teacher=ensemble), or the teacher's."""
    return teacher_out if method.member is None else teacher_out["members"][method.member]


def ensemble_groups(methods, balance: bool) -> List[str]:
    """The weighting's extra groups: with teacher.balance, one per teacher of an ensemble (`teacher.<k>`)."""
    members = sorted({m.member for m in methods if m.member is not None})
    return [f"teacher.{k}" for k in members] if balance else []


class Objective:
    def __init__(self, tasks, task_weight, methods: List = (), teacher: Optional[torch.nn.Module] = None,
                 balance: bool = False):
        self.tasks = tasks
        self.methods = list(methods)
        self.teacher = teacher if self.methods else None
        self.task_weight = per_task_weights(task_weight, tasks, "loss.task_weight")
        self.modules = torch.nn.ModuleDict({m.label: m.modules for m in self.methods})
        # teacher=ensemble: each teacher's terms count 1 / (number of teachers), so that an ensemble of
        # one teacher's copies is that teacher; with `balance` they form the groups `teacher.<k>`
        members = {m.member for m in self.methods if m.member is not None}
        self.member_share = 1.0 / len(members) if members else 1.0
        self.extra_groups = ensemble_groups(self.methods, balance)
        # the methods with terms in the main training (ab and fsp train only in their init stage)
        self.main_methods = [m for m in self.methods if m.adds_main_terms()]
        self.progress = {"fraction": 0.0, "epoch": 0.0}
        self.cache = None                 # a TeacherOutputCache, set by the run when teacher.cache is on
        if self.methods and teacher is None:
            raise KdmtlError("the distillation methods need a teacher; use loss=none for a vanilla student")
        if self.teacher is not None:
            self.teacher.eval()
            for p in self.teacher.parameters():
                p.requires_grad_(False)

    # ---- set-up -------------------------------------------------------------------------
    def setup(self, student: torch.nn.Module, batch: dict, device) -> None:
        """Hook the features the methods name, run one batch to learn their shapes, build the
        methods' learned parts. Unknown module paths fail here, listing the available names."""
        if not self.methods:
            return
        student_names = sorted({n for m in self.methods for n in m.student_features})
        teacher_names = sorted({n for m in self.methods for n in m.teacher_features})
        for model, names, side in ((student, student_names, "student"), (self.teacher, teacher_names, "teacher")):
            try:
                if names:
                    capture(model, names, side)
            except KdmtlError as err:  # say which model and which config keys name features
                raise KdmtlError(f"{side} feature for loss.{'/'.join(m.name for m in self.methods)}: {err}") from None
        with torch.no_grad():
            was_training = student.training
            student.eval()
            image = batch["image"][:2]            # shapes are all it learns: two images will do
            s_feats = student(image)["features"]
            t_out = self.teacher(image)
            student.train(was_training)
        answers = [teacher_answer(t_out, m)["features"] for m in self.methods]
        for feats, names, side in [(s_feats, student_names, "student")] + [(a, teacher_names, "teacher") for a in answers]:
            # a name is captured as given, or (per-task teachers) as `<task>:<name>` in every task's teacher
            missing = [n for n in names if n not in feats and not any(k.endswith(":" + n) for k in feats)]
            if missing:
                raise KdmtlError(f"{side} feature for loss.{'/'.join(m.name for m in self.methods)}: "
                                 f"'{missing[0]}' was not captured; captured: {', '.join(sorted(feats)) or 'none'}")
        for method, t_feats in zip(self.methods, answers):
            method.bind_teacher(teacher_part(self.teacher, method))
            method.setup(s_feats, t_feats)  # each method checks the features it names
        self.modules = torch.nn.ModuleDict({m.label: m.modules for m in self.methods})
        self.modules.to(device)

    def param_groups(self, base_lr: float) -> List[dict]:
        return [group for m in self.methods for group in m.param_groups(base_lr)]

    def set_progress(self, fraction: float, epoch: float) -> None:
        """Where training is: fraction of all steps done, and epochs done (fractional)."""
        if self.cache is not None and int(epoch) != int(self.progress["epoch"]):
            self.cache.new_epoch()        # check the first batch of each epoch against the cache
        self.progress = {"fraction": fraction, "epoch": epoch}

    def epoch_metrics(self) -> Dict[str, float]:
        """The teacher-output cache's figures for the epoch that ended (hit rate...), if it keeps any."""
        return self.cache.epoch_metrics() if self.cache is not None else {}

    def train(self, mode: bool = True) -> None:
        self.modules.train(mode)

    # ---- terms --------------------------------------------------------------------------
    def task_terms(self, outputs: Dict[str, Tensor], targets: Dict[str, Tensor]) -> Dict[str, Tensor]:
        return {f"task/{name}": task.kind.loss(outputs[name], targets[task.target])
                for name, task in self.tasks.items()}

    def losses(self, student_out: dict, batch: dict) -> Tuple[Dict[str, Tensor], Optional[Tensor], Dict[str, Tensor]]:
        """({task: L_t}, extra or None, every named term) for one batch (see the module docstring)."""
        terms = self.task_terms(student_out["outputs"], batch["targets"])
        groups = {name: self.task_weight[name] * terms[f"task/{name}"] for name in self.tasks}
        for name in self.extra_groups:
            groups[name] = None
        extra = None
        if self.main_methods:
            if self.cache is not None and self.cache.covers(batch):
                teacher_out = self.cache.teacher_outputs(batch)
            else:
                with torch.no_grad():
                    teacher_out = self.teacher(batch["image"])
            for method in self.main_methods:
                answer = teacher_answer(teacher_out, method)
                share = 1.0 if method.member is None else self.member_share
                for name, value in method(student_out, answer, batch, self.progress).items():
                    weighted = method.weight(name, self.progress) * share * value
                    task = name.partition("/")[2]
                    if method.member is not None:      # `kd/cls` of teacher 1 is `kd:t1/cls`
                        name = f"{method.label}/{task}" if task else f"{name}:t{method.member}"
                    terms[name] = value
                    group = f"teacher.{method.member}" if self.extra_groups else task
                    if group in groups:
                        groups[group] = weighted if groups[group] is None else groups[group] + weighted
                    else:
                        extra = weighted if extra is None else extra + weighted
        for name in self.extra_groups:      # a teacher whose methods gave no term this batch
            if groups[name] is None:
                groups[name] = 0.0 * groups[next(iter(self.tasks))]
        main = [name for name, task in self.tasks.items() if not getattr(task, "auxiliary", False)]
        terms["loss/task"] = sum(terms[f"task/{name}"] for name in main).detach()
        return groups, extra, terms

    def __call__(self, student_out: dict, batch: dict) -> Tuple[Tensor, Dict[str, Tensor]]:
        """The equal-weighted objective sum_t L_t + extra and the named terms."""
        groups, extra, terms = self.losses(student_out, batch)
        total = sum(groups.values())
        if extra is not None:
            total = total + extra
        terms["loss/total"] = total
        return total, terms
