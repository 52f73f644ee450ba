"""`ctkd`: Curriculum Temperature for KD (Li et al., AAAI 2023), as zhengli97/CTKD (7d52522) with
its global temperature (`--have_mlp 1 --mlp_name global`), on classification and, per pixel,
segmentation tasks.

`ctkd/<task>` is logit KD (`kl_with_temperature`: KL(softmax(t/T) || softmax(s/T)) * T^2, summed
over classes, mean over the batch -- and over pixels for seg; the official `DistillKL`,
distiller_zoo/KD.py L13-20, is `KLDivLoss(reduction='batchmean') * T * T`) with a learned T:

    T = t_start + t_span * sigmoid(GRL_lambda(p))      (helper/loops.py L132-135)

p the `Global_T` parameter (models/temp_global.py L9-17, `torch.ones(1)`: T starts at
1 + 20 sigmoid(1) = 15.62 and stays in (1, 21)). The gradient reversal layer is the identity
forward and multiplies p's gradient by lambda backward (`GradientReversalFunction`, L21-40: `dx =
lambda_ * grads`, no minus sign of its own): lambda runs the cosine curriculum `CosineDecay`
(train_student.py L186-202) from `lambda_start` 0 to `lambda_end` -1 over `lambda_epochs` 10, so the
temperature is pushed to *raise* the KD loss (adversarially), ever harder. The official loop sets
lambda once per epoch from the 1-based epoch number (train_student.py L409, L418-419:
`get_value(epoch)`), so the first epoch already has lambda = -(1 - cos(pi / 10)) / 2, and lambda
is constant within an epoch; here e = int(progress["epoch"]) + 1, as `dkd`'s warm-up.

p lives in `self.modules` (one `GlobalTemperature` per label task: the official code has one
task, and a cls and a seg head's logits need not share a temperature), so the student's optimiser
trains it with the student's lr, momentum and weight decay, as the official SGD over
`trainable_list` (train_student.py L309-311, L379-382), and checkpoints save and resume it.
Only the official default, the global temperature, is implemented; the instance-wise variant
(README "Instance-wise Temperature", code not in the repository) and `LinearDecay`
(`--cosine_decay 0`) are not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from kdmtl_cli.distill import KD_METHODS, LabelTaskMethod
from kdmtl_cli.distill.logit import compute_dtype, kl_with_temperature
from kdmtl_cli.errors import KdmtlError
from kdmtl_cli.ranges import above, at_least


@dataclass
class CTKDConfig:
    """Curriculum temperature KD, as zhengli97/CTKD (conf/loss/ctkd.yaml)."""
    weight: Any = at_least(0, default=0.9)          # a number, or {task: number}; official `-a 0.9`
    t_start: float = above(0, default=1.0)          # the lowest temperature (official --t_start)
    t_span: float = above(0, default=20.0)          # T = t_start + t_span * sigmoid(p) (official --t_end)
    initial_parameter: float = 1.0                  # p at the start (Global_T: torch.ones(1))
    lambda_start: float = 0.0                       # GRL factor at epoch 0 (official --decay_max)
    lambda_end: float = -1.0                        # ... from `lambda_epochs` on (official --decay_min)
    lambda_epochs: float = above(0, default=10.0)   # the cosine ramp's length (official --decay_loops)


def curriculum_lambda(epoch: float, start: float, end: float, epochs: float) -> float:
    """Official `CosineDecay(max_value=start, min_value=end, num_loops=epochs).get_value(epoch)`:
    start at epoch <= 0, end from `epochs` on, a half cosine between."""
    i = min(max(epoch, 0.0), epochs)
    return (math.cos(i * math.pi / epochs) + 1.0) * 0.5 * (start - end) + end


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by lambda (official GradientReversalFunction)."""

    @staticmethod
    def forward(ctx, x: Tensor, lambda_: float) -> Tensor:
        ctx.lambda_ = lambda_
        return x.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad.new_tensor(ctx.lambda_) * grad, None


def gradient_reversal(x: Tensor, lambda_: float) -> Tensor:
    return _ScaleGradient.apply(x, lambda_)


class GlobalTemperature(nn.Module):
    """The official `Global_T`: one learned scalar p per task, read through the gradient reversal layer."""

    def __init__(self, initial: float = 1.0):
        super().__init__()
        self.parameter = nn.Parameter(torch.full((1,), float(initial)))   # shape [1], as Global_T.global_T

    def forward(self, lambda_: float, t_start: float, t_span: float, dtype: torch.dtype) -> Tensor:
        """The temperature T as a 0-d tensor in `dtype` (p is cast to it; its gradient comes back in p's dtype)."""
        p = gradient_reversal(self.parameter.to(dtype), lambda_)
        return (t_start + t_span * torch.sigmoid(p)).reshape(())


def module_key(task: str) -> str:
    return task.replace(".", "__")     # ModuleDict keys may not hold a dot


@KD_METHODS.register("ctkd", settings=CTKDConfig)
class CurriculumTemperatureKD(LabelTaskMethod):
    name = "ctkd"

    def __init__(self, cfg, tasks, teacher_tasks):
        super().__init__(cfg, tasks, teacher_tasks)
        if cfg.t_start <= 0 or cfg.t_span <= 0 or cfg.lambda_epochs <= 0:
            raise KdmtlError("loss.ctkd.t_start, loss.ctkd.t_span and loss.ctkd.lambda_epochs must be > 0")

    def setup(self, student_features, teacher_features):
        # Built here, not in __init__: the preflight's set-up is discarded and this is called again.
        for task in self.label_tasks:
            self.modules[module_key(task)] = GlobalTemperature(float(self.cfg.initial_parameter))

    def curriculum(self, progress: dict) -> float:
        """lambda for this step: the official per-epoch value at the 1-based epoch number."""
        epoch = int(progress.get("epoch", 0.0)) + 1
        return curriculum_lambda(epoch, float(self.cfg.lambda_start), float(self.cfg.lambda_end),
                                 float(self.cfg.lambda_epochs))

    def temperature(self, task: str, progress: dict, dtype: torch.dtype = torch.float32) -> Tensor:
        module = self.modules[module_key(task)]
        # A scalar in `dtype`: autocast must not turn it into float16/bfloat16.
        with torch.autocast(module.parameter.device.type, enabled=False):
            return module(self.curriculum(progress), float(self.cfg.t_start), float(self.cfg.t_span), dtype)

    def __call__(self, student_out, teacher_out, batch, progress):
        terms = {}
        for name in self.label_tasks:
            s_out, t_out = student_out["outputs"][name], teacher_out["outputs"][name]
            temperature = self.temperature(name, progress, compute_dtype(s_out))
            terms[f"ctkd/{name}"] = kl_with_temperature(s_out, t_out, temperature)
        return terms
