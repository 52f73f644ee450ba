"""`kd`: logit distillation (Hinton et al., 2015) for every task kind of a multi-task student.

Each task kind states its own rule (`TaskKind.distill`, kdmtl_cli/tasks/<kind>.py); this
method only asks each task the teacher covers for it, at `loss.kd.temperature` and with
`loss.kd.dense` (l1 | l2) for regression-like outputs:

- classification: KL(softmax(t/T) || softmax(s/T)) * T^2, summed over classes, mean over the batch;
- segmentation: the same KL at every pixel, mean over batch and pixels;
- multilabel: per label, binary KL(sigmoid(t/T) || sigmoid(s/T)) * T^2, mean over labels and batch;
- depth, regression: L1 (or L2) between student and teacher predictions, mean over elements;
- normals: 1 - cos(student, teacher) per pixel, mean over pixels.
The T^2 factor keeps the gradient scale of the soft term independent of T.
The KL is mdistiller's ``kd_loss`` (mdistiller/distillers/KD.py) and RepDistiller's ``DistillKL``
(distiller_zoo/KD.py): summed over classes, mean over the batch (over batch and pixels for
dense logits), times T^2. The official KD recipe weighs it 0.9 against cross-entropy 0.1
(mdistiller cfg.py KD.LOSS.KD_WEIGHT / CE_WEIGHT; RepDistiller scripts/run_cifar_distill.sh
``-r 0.1 -a 0.9``): `loss.task_weight=0.1 loss.kd.weight=0.9`, as the cifar100_*_kd experiments set.

`loss.kd.standardize=true`: logit standardisation (Sun et al., "Logit Standardization in Knowledge
Distillation", CVPR 2024): student and teacher logits are Z-scored over the classes before the KL
(`standardize_logits`, per sample; per pixel for segmentation). It applies to the tasks whose
outputs are class logits (`kind.softmax_labels`: classification, segmentation); the terms of the
other kinds (multilabel, depth, regression, normals) are unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kdmtl_cli.ranges import above, at_least

import torch
import torch.nn.functional as F
from torch import Tensor

from kdmtl_cli.distill import KD_METHODS, Method
from kdmtl_cli.errors import KdmtlError


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype a loss is computed in: float16/bfloat16 (autocast) are upcast to float32;
    float32 and float64 stay as they are (integer tensors: float32)."""
    if x.dtype in (torch.float16, torch.bfloat16) or not x.dtype.is_floating_point:
        return torch.float32
    return x.dtype


def kl_with_temperature(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """KL(teacher || student) of temperature-softened distributions over dim 1, times T^2
    (sum over classes, mean over the other positions), in ``compute_dtype``."""
    t = temperature
    dtype = compute_dtype(student_logits)
    log_p_student = F.log_softmax(student_logits.to(dtype) / t, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.to(dtype) / t, dim=1)
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(dim=1)
    return kl.mean() * t * t


# sunshangquan/logit-standardization-KD mdistiller/distillers/KD.py (and DKD.py) `normalize`:
# (logit - mean) / (1e-7 + stdv), the epsilon added to the std (not under a square root), so that
# a sample whose logits are all equal standardises to zeros instead of 0 / 0.
STANDARDIZE_EPS = 1e-7


def standardize_logits(logits: Tensor) -> Tensor:
    """Z-score over the classes (dim 1) of every sample (every pixel of [N, C, H, W] logits), as the
    official `normalize`: ``(z - mean_c z) / (1e-7 + std_c z)`` with torch.std's default, the
    unbiased std (divisor C - 1). The official code reduces over dim -1, the class dim of its [N, C]
    logits; over dim 1 the same holds for dense logits, where dim -1 would be the image width.
    In ``compute_dtype``."""
    if logits.dim() < 2 or logits.shape[1] < 2:
        # the unbiased std of a single class is 0 / 0
        raise ValueError(f"standardize_logits: needs [N, C, ...] logits with C >= 2 (got {tuple(logits.shape)})")
    z = logits.to(compute_dtype(logits))
    mean = z.mean(dim=1, keepdim=True)
    std = z.std(dim=1, keepdim=True)
    return (z - mean) / (STANDARDIZE_EPS + std)


def dense_regression_kd(student: Tensor, teacher: Tensor, norm: str) -> Tensor:
    """Mean |s - t| (norm l1) or mean (s - t)^2 (norm l2) over all elements."""
    dtype = compute_dtype(student)
    diff = student.to(dtype) - teacher.to(dtype)
    return diff.abs().mean() if norm == "l1" else diff.pow(2).mean()


@dataclass
class KDConfig:
    """Logit KD (Hinton et al., 2015) for every task the teacher covers (conf/loss/kd.yaml)."""
    # a number, or {task: number}; official recipe 0.9 with task_weight 0.1. No method defines a
    # negative distillation weight (it would push the student away from the teacher): every weight is >= 0.
    weight: Any = at_least(0, default=0.5)
    temperature: float = above(0, default=4.0)    # T; the KL terms are scaled by T^2
    dense: str = "l1"                     # depth/regression tasks: l1 | l2 to the teacher's prediction
    # Z-score the class logits (classification, segmentation) before the KL, as Sun et al. (CVPR 2024);
    # off by default. Their recipe with it on also sets T 2 and weight 9 (conf/loss/kd.yaml).
    standardize: bool = False


@KD_METHODS.register("kd", settings=KDConfig)
class LogitKD(Method):
    """kd/<task> for every task the teacher covers, by the task kind's rule (`kind.distill`); with
    `standardize`, class logits (classification, segmentation) are Z-scored first, other kinds as they are."""

    name = "kd"

    def __init__(self, cfg, tasks, teacher_tasks):
        super().__init__(cfg, tasks, teacher_tasks)
        if cfg.temperature <= 0:
            raise KdmtlError(f"loss.kd.temperature must be > 0 (got {cfg.temperature})")
        if cfg.dense not in ("l1", "l2"):
            raise KdmtlError(f"loss.kd.dense must be l1 or l2 (got '{cfg.dense}')")
        self._weights = self.per_task_term_weights(teacher_tasks)

    def __call__(self, student_out, teacher_out, batch, progress):
        terms = {}
        for name in self.teacher_tasks:
            s_out, t_out = student_out["outputs"][name], teacher_out["outputs"][name]
            kind = self.tasks[name].kind
            if self.cfg.standardize and kind.softmax_labels:   # class logits only: a Z-scored depth map means nothing
                s_out, t_out = standardize_logits(s_out), standardize_logits(t_out)
            terms[f"kd/{name}"] = kind.distill(s_out, t_out, float(self.cfg.temperature), self.cfg.dense)
        return terms
