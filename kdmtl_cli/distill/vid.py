"""`vid`: variational information distillation (Ahn et al., "Variational Information Distillation for
Knowledge Transfer", CVPR 2019) as RepDistiller's `VIDLoss` (HobbitLong/RepDistiller b84f547,
distiller_zoo/VID.py L9-54, "code from author: ssahn0215/variational-information-distillation").

Per (student, teacher) map pair, a learned regressor predicts the teacher map from the student map
(VIDLoss.__init__ L26-32: 1x1 conv C_s -> C_t, ReLU, 1x1 conv C_t -> C_t, ReLU, 1x1 conv C_t -> C_t,
all without bias; RepDistiller builds `VIDLoss(s, t, t)`, mid channels = teacher channels,
train_student.py L219-223), and a learned per-channel variance sigma^2_c = softplus(log_scale_c) + eps
(L33-35, L48), log_scale initialised to softplus^-1(init_pred_var - eps) so that sigma^2 starts at
init_pred_var = 5.0 (L16-17: init_pred_var=5.0, eps=1e-5). The loss is the Gaussian negative log
likelihood without its constant, mean over N, C, H, W of 0.5 * ((mu - t)^2 / sigma^2 + log sigma^2)
(L50-53). When the spatial sizes differ the larger map is average-pooled to the smaller (L40-46).

RepDistiller applies one VIDLoss per feature of feat[1:-1] (every stage output after the stem,
helper/loops.py L166-170, summed) = `trunk.stages.0..2` here, and trains the regressors and
log-scales with the student (train_student.py L225-226: `trainable_list.append(criterion_kd)`).
Here each pair's regressor and log-scale are built in `setup` (nn.Conv2d's default initialisation,
as RepDistiller), live in `self.modules` (the optimiser trains them, checkpoints save and restore
them), one per term `vid/<student feature>` (`@<task>` for per-task teachers), each term weighted by
`loss.vid.weight` = beta (scripts/run_cifar_distill.sh L15 `--distill vid -a 0 -b 1`).

Named differences from RepDistiller:

- Spatial sizes: RepDistiller compares heights only and pools to a square (t_H, t_H); here both maps
  go to (min H, min W) (the same for square maps).
- sigma^2 is taken as F.softplus(log_scale) + eps, the official log(1 + exp(log_scale)) + eps computed
  without overflow (equal to it within float rounding; the official one is inf past log_scale ~ 88 in
  float32).

mdistiller (megvii-research/mdistiller a08d46f, mdistiller/distillers/VID.py) copies the same loss
(`vid_loss` L16-30) and defaults (engine/cfg.py L125-132: FEAT_WEIGHT 1.0, EPS 1e-5, INIT_PRED_VAR 5.0),
but keeps its log-scales in a plain Python list (L54, L63) that neither `get_learnable_parameters`
(L65-69) nor the state dict sees, so there sigma^2 stays at 5.0; it also takes feats[1:] (L48-49).
kdmtl follows RepDistiller: the log-scales are learned.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from kdmtl_cli.distill import KD_METHODS
from kdmtl_cli.distill.logit import compute_dtype
from kdmtl_cli.distill.functional import pooled_to_common_size
from kdmtl_cli.distill.pairs import FeaturePairMethod, FeaturePairsConfig
from kdmtl_cli.errors import KdmtlError
from kdmtl_cli.ranges import above, at_least

STAGES = ["trunk.stages.0", "trunk.stages.1", "trunk.stages.2"]


@dataclass
class VIDConfig(FeaturePairsConfig):
    """Variational information distillation as RepDistiller (conf/loss/vid.yaml); weight is beta."""
    weight: float = at_least(0, default=1.0)
    init_pred_var: float = above(0, default=5.0)   # VIDLoss init_pred_var: the variance sigma^2 at the start
    eps: float = above(0, default=1e-5)            # VIDLoss eps: the floor added to softplus(log_scale)
    student: List[str] = field(default_factory=lambda: list(STAGES))
    teacher: List[str] = field(default_factory=lambda: list(STAGES))


def initial_log_scale(init_pred_var: float, eps: float) -> float:
    """softplus^-1(init_pred_var - eps), the official np.log(np.exp(init_pred_var - eps) - 1.0)."""
    return math.log(math.exp(init_pred_var - eps) - 1.0)


class VariationalRegressor(nn.Module):
    """One pair's learned parts, named as RepDistiller's VIDLoss (its state dict loads there):
    `regressor` (the mean mu of the teacher map given the student map) and `log_scale` (sigma^2)."""

    def __init__(self, student_channels: int, teacher_channels: int, init_pred_var: float, eps: float):
        super().__init__()
        mid = teacher_channels      # RepDistiller VIDLoss(s, t, t)
        self.regressor = nn.Sequential(
            nn.Conv2d(student_channels, mid, kernel_size=1, bias=False), nn.ReLU(),
            nn.Conv2d(mid, mid, kernel_size=1, bias=False), nn.ReLU(),
            nn.Conv2d(mid, teacher_channels, kernel_size=1, bias=False))
        self.log_scale = nn.Parameter(torch.full((teacher_channels,), initial_log_scale(init_pred_var, eps)))


def vid_loss(student_feature: Tensor, teacher_feature: Tensor, part: VariationalRegressor, eps: float) -> Tensor:
    """VID of one map pair: mean of 0.5 * ((mu(s) - t)^2 / sigma^2 + log sigma^2), in
    ``compute_dtype`` of the student (the learned parts' parameters are cast to it)."""
    dtype = compute_dtype(student_feature)
    # Autocast would run the convolutions in float16/bfloat16 again: keep them in `dtype`.
    with torch.autocast(student_feature.device.type, enabled=False):
        s, t = pooled_to_common_size(student_feature.to(dtype), teacher_feature.to(dtype))
        mean = s
        for layer in part.regressor:
            mean = F.conv2d(mean, layer.weight.to(dtype)) if isinstance(layer, nn.Conv2d) else layer(mean)
        variance = (F.softplus(part.log_scale.to(dtype)) + eps).view(1, -1, 1, 1)
        return (0.5 * ((mean - t) ** 2 / variance + torch.log(variance))).mean()


@KD_METHODS.register("vid", settings=VIDConfig)
class VariationalInformationDistillation(FeaturePairMethod):
    name = "vid"

    def setup(self, student_features, teacher_features):
        init_pred_var, eps = float(self.cfg.init_pred_var), float(self.cfg.eps)
        if init_pred_var <= eps:
            raise KdmtlError(f"loss.vid.init_pred_var ({init_pred_var}) must exceed loss.vid.eps ({eps}): "
                             "the variance starts at init_pred_var = softplus(log_scale) + eps")
        for term, student, teacher in self.checked_terms(student_features, teacher_features):
            self.modules[term.key] = VariationalRegressor(student.shape[1], teacher.shape[1], init_pred_var, eps)

    def __call__(self, student_out, teacher_out, batch, progress):
        s_feats, t_feats = student_out["features"], teacher_out["features"]
        eps = float(self.cfg.eps)
        return {term.name: vid_loss(s_feats[term.student], t_feats[term.teacher], self.modules[term.key], eps)
                for term in self.terms}
