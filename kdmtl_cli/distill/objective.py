"""The training objective: task losses plus distillation terms, each named and weighted.

    loss/total = sum_t task_weight[t] * task/t  +  sum_t kd_weight[t] * kd/t

`loss/task` (the unweighted sum of task losses) is what validation reports by default.
The teacher runs frozen, in eval mode, under no_grad.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from kdmtl_cli.errors import KdmtlError


def per_task_weights(value, tasks, key: str) -> Dict[str, float]:
    """A number applies to every task; a mapping must name each task exactly."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return {name: float(value) for name in tasks}
    if hasattr(value, "items"):
        weights = dict(value.items())
        unknown = sorted(set(weights) - set(tasks))
        missing = sorted(set(tasks) - set(weights))
        if unknown or missing:
            raise KdmtlError(f"{key} must give a weight for each task ({', '.join(tasks)}); "
                             + (f"unknown: {', '.join(unknown)}" if unknown else f"missing: {', '.join(missing)}"))
        bad = {n: w for n, w in weights.items() if isinstance(w, bool) or not isinstance(w, (int, float))}
        if bad:
            raise KdmtlError(f"{key} values must be numbers (got {bad})")
        return {name: float(w) for name, w in weights.items()}
    raise KdmtlError(f"{key} must be a number or a mapping task -> number (got {value!r})")


class Objective:
    def __init__(self, tasks, loss_cfg, method, teacher: Optional[torch.nn.Module] = None):
        self.tasks = tasks
        self.method = method
        self.teacher = teacher
        self.task_weight = per_task_weights(loss_cfg.task_weight, tasks, "loss.task_weight")
        self.kd_weight = per_task_weights(loss_cfg.kd_weight, tasks, "loss.kd_weight")
        if teacher is not None:
            teacher.eval()
            for p in teacher.parameters():
                p.requires_grad_(False)

    def task_terms(self, outputs: Dict[str, Tensor], targets: Dict[str, Tensor]) -> Dict[str, Tensor]:
        return {f"task/{name}": task.kind.loss(outputs[name], targets[task.target])
                for name, task in self.tasks.items()}

    def __call__(self, student_out: dict, batch: dict) -> Tuple[Tensor, Dict[str, Tensor]]:
        terms = self.task_terms(student_out["outputs"], batch["targets"])
        if self.teacher is not None and getattr(self.method, "uses_teacher", False):
            with torch.no_grad():
                teacher_out = self.teacher(batch["image"])["outputs"]
            teacher_out = {k: v for k, v in teacher_out.items() if k in self.tasks}
            terms.update(self.method(student_out["outputs"], teacher_out, batch))
        total = None
        for name, value in terms.items():
            group, task = name.split("/", 1)
            weight = self.task_weight[task] if group == "task" else self.kd_weight.get(task, 1.0)
            contribution = weight * value
            total = contribution if total is None else total + contribution
        terms["loss/total"] = total
        terms["loss/task"] = sum(terms[f"task/{name}"] for name in self.tasks).detach()
        return total, terms
