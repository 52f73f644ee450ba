"""Logit distillation (Hinton et al., 2015) for every task kind of a multi-task student.

- classification: KL(softmax(t/T) || softmax(s/T)) * T^2, summed over classes, mean over the batch;
- segmentation: the same KL at every pixel, mean over batch and pixels;
- depth: L1 (or L2) between student and teacher predictions, mean over pixels.
The T^2 factor keeps the gradient scale of the soft term independent of T.
"""

from __future__ import annotations

from typing import Dict

import torch.nn.functional as F
from torch import Tensor

from kdmtl_cli.distill import KD_METHODS
from kdmtl_cli.errors import KdmtlError


def kl_with_temperature(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """KL(teacher || student) of temperature-softened distributions over dim 1, times T^2."""
    t = temperature
    log_p_student = F.log_softmax(student_logits.float() / t, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / t, dim=1)
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(dim=1)
    return kl.mean() * t * t


def dense_regression_kd(student: Tensor, teacher: Tensor, norm: str) -> Tensor:
    diff = student.float() - teacher.float()
    return diff.abs().mean() if norm == "l1" else diff.pow(2).mean()


@KD_METHODS.register("kd")
class LogitKD:
    def __init__(self, loss_cfg, tasks):
        if loss_cfg.temperature <= 0:
            raise KdmtlError(f"loss.temperature must be > 0 (got {loss_cfg.temperature})")
        if loss_cfg.dense_kd not in ("l1", "l2"):
            raise KdmtlError(f"loss.dense_kd must be l1 or l2 (got '{loss_cfg.dense_kd}')")
        self.temperature = float(loss_cfg.temperature)
        self.dense_kd = loss_cfg.dense_kd
        self.tasks = tasks

    uses_teacher = True

    def __call__(self, student_out: Dict[str, Tensor], teacher_out: Dict[str, Tensor], batch) -> Dict[str, Tensor]:
        terms = {}
        for name, t_out in teacher_out.items():
            s_out = student_out[name]
            if self.tasks[name].kind.name in ("classification", "segmentation"):
                terms[f"kd/{name}"] = kl_with_temperature(s_out, t_out, self.temperature)
            else:
                terms[f"kd/{name}"] = dense_regression_kd(s_out, t_out, self.dense_kd)
        return terms


@KD_METHODS.register("none")
class NoDistillation:
    """The vanilla student: task losses only."""

    uses_teacher = False

    def __init__(self, loss_cfg, tasks):
        pass

    def __call__(self, student_out, teacher_out, batch):
        return {}
