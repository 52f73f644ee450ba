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

from kdmtl_cli.distill.weights import per_task_weights
from kdmtl_cli.errors import KdmtlError


def check_student_modules(methods, student: torch.nn.Module) -> None:
    """Fail before any teacher is trained when a method names a student module that does not exist."""
    from kdmtl_cli.models.multitask import check_module_names

    for method in methods:
        try:
            check_module_names(student, method.student_features)
        except KdmtlError as err:
            raise KdmtlError(f"student feature for loss.{method.name}: {err}") from None


class Objective:
    def __init__(self, tasks, task_weight, methods: List = (), teacher: Optional[torch.nn.Module] = None):
        self.tasks = tasks
        self.methods = list(methods)
        self.teacher = teacher if self.methods else None
        self.task_weight = per_task_weights(task_weight, tasks, "loss.task_weight")
        self.modules = torch.nn.ModuleDict({m.name: m.modules for m in self.methods})
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
                    model.capture_features(names)
            except KdmtlError as err:  # say which model and which config keys name features
                raise KdmtlError(f"{side} feature for loss.{'/'.join(m.name for m in self.methods)}: {err}") from None
        with torch.no_grad():
            was_training = student.training
            student.eval()
            s_feats = student(batch["image"])["features"]
            t_feats = self.teacher(batch["image"])["features"]
            student.train(was_training)
        for method in self.methods:
            method.setup(s_feats, t_feats)  # each method checks the features it names
            for name in method.teacher_features:  # a safety net for methods that do not
                if name not in t_feats and not any(k.endswith(":" + name) for k in t_feats):
                    raise KdmtlError(f"loss.{method.name}: the teacher has no feature '{name}'; "
                                     f"captured: {', '.join(sorted(t_feats))}")
        self.modules.to(device)

    def param_groups(self, base_lr: float) -> List[dict]:
        return [group for m in self.methods for group in m.param_groups(base_lr)]

    def set_progress(self, fraction: float, epoch: float) -> None:
        """Where training is: fraction of all steps done, and epochs done (fractional)."""
        if self.cache is not None and int(epoch) != int(self.progress["epoch"]):
            self.cache.new_epoch()        # check the first batch of each epoch against the cache
        self.progress = {"fraction": fraction, "epoch": epoch}

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
        extra = None
        if self.methods:
            if self.cache is not None and "view" in batch:
                teacher_out = self.cache.lookup(batch["index"], batch["view"], batch["image"])
            else:
                with torch.no_grad():
                    teacher_out = self.teacher(batch["image"])
            for method in self.methods:
                for name, value in method(student_out, teacher_out, batch, self.progress).items():
                    terms[name] = value
                    weighted = method.weight(name, self.progress) * value
                    task = name.partition("/")[2]
                    if task in groups:
                        groups[task] = groups[task] + weighted
                    else:
                        extra = weighted if extra is None else extra + weighted
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
