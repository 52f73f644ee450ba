"""`ofd`: overhaul of feature distillation (Heo, Kim, Yun, Park, Kwak and Choi, "A Comprehensive
Overhaul of Feature Distillation", ICCV 2019) as the authors' code, clovaai/overhaul-distillation
(76344a8, CIFAR-100/distiller.py L9-72 and CIFAR-100/train_with_distillation.py L73-91, L137-144),
with the weights of megvii-research/mdistiller (a08d46f, mdistiller/distillers/OFD.py L11-161 and
mdistiller/engine/cfg.py L99-105), which runs the same loss in the mdistiller CIFAR-100 benchmark.

Per (student, teacher) pair of PRE-ReLU maps (the residual sums before a block's final ReLU:
`trunk.stages.<i>.<last block>.preact`, clovaai `extract_feature(x, preReLU=True)`, mdistiller
`preact_feats[1:]`), a learned connector maps the student map to the teacher's channels
(build_feature_connector L15-27: 1x1 conv C_s -> C_t without bias, weights N(0, 2 / (k * k * C_t)),
then BatchNorm2d(C_t) with weight 1 and bias 0). The teacher side is clipped from below by a
per-channel margin m_c (get_margin_from_BN L29-41), read from the teacher's batch-norm before that
ReLU (its weight = std s, bias = mean mu of the pre-ReLU response): with Phi the normal CDF,

    m_c = mu - s * phi(mu / s) / Phi(-mu / s)     if Phi(-mu / s) > 0.001   (E[x | x < 0], x ~ N(mu, s^2))
    m_c = -3 s                                     otherwise,

and the loss is the partial L2 (distillation_loss L9-13): with t' = max(t, m),

    d(s, t) = sum over N, C, H, W of (s - t')^2 * [(s > t') or (t' > 0)],

so a student value below a negative (clipped) teacher value costs nothing. Each of the n pairs is
divided by 2^(n - 1 - i) (Distiller.forward L66-70: the last stage counts fully, the one before
half...), the sum by the batch size and by 1000 (train_with_distillation.py L91
`loss_CE + loss_distill.sum() / batch_size / 1000`). Here one term per pair, `ofd/<student feature>`
(`@<task>` for per-task teachers), = d(s, t) / N (mdistiller OFD.py feat_loss L19 `.mean(dim=0).sum()`),
weighted `loss.ofd.weight * loss.ofd.stage_decay ** (n - 1 - i)` (weight 1e-3 = clovaai's 1 / 1000 =
mdistiller's CFG.OFD.LOSS.FEAT_WEIGHT 0.001; stage_decay 0.5 = clovaai's and mdistiller's 1 / 2^...).
The connectors live in `self.modules` (optimised with the student, as clovaai L137-144 and
mdistiller's get_learnable_parameters L111-112; checkpointed); their state dict is clovaai's
`Connectors[i]`'s (`0.weight`, `1.weight`, `1.bias`, `1.running_*`). The margins are non-persistent
buffers, recomputed from the teacher at every set-up (`Method.bind_teacher`); the teacher's
batch-norms are named in `loss.ofd.teacher_bn`, one per pair (`[task:]module path`; with per-task
teachers an unprefixed path is read in the teacher of each term's task).

Where the two official codes differ, kdmtl follows:

- the loss: clovaai's distillation_loss. mdistiller's feat_loss (L11-19) writes the same mask as three
  cases ((s - m)^2 where s > m >= t; (s - t)^2 where s > t > m, t <= 0; (s - t)^2 where t > 0); it
  equals clovaai's because every margin is <= 0 (both branches above are negative).
- the weights: mdistiller's CIFAR-100 config (configs/cifar100/ofd.yaml sets no OFD keys, so
  cfg.py L102-105: CE_WEIGHT 1.0, FEAT_WEIGHT 0.001, CONNECTOR.KERNEL_SIZE 1), which is clovaai's
  `/ 1000` with the loss per sample; mdistiller's ImageNet config uses FEAT_WEIGHT 1e-4
  (configs/imagenet/r50_mv1/ofd.yaml L23-25) -- set `loss.ofd.weight=1e-4` for it.
- spatial sizes: mdistiller's (OFD.py L154-160): the teacher map is adaptive-average-pooled to the size of
  the connector's output when they differ (clovaai needs equal sizes).
- the connector kernel: mdistiller's CONNECTOR.KERNEL_SIZE (OFD.py L41-60: padding (k - 1) // 2), default 1
  = clovaai's 1x1 conv.

Named differences from both:

- The teacher runs in eval mode (kdmtl's frozen teacher, objective.py), so its pre-ReLU maps use its
  BN running statistics. clovaai puts the teacher in train mode during distillation
  (train_with_distillation.py L75 `d_net.t_net.train()`: batch statistics, running stats updated),
  and so does mdistiller (OFD.train L114-121 overrides _base.py L12-20, which keeps the teacher in eval,
  and sets every child, the teacher included, to train mode).
- Margins are computed in float64 with torch.special.ndtr for Phi (the official uses Python floats
  and scipy.stats.norm.cdf, then stores them as a float32 FloatTensor); in a float32 run they are
  rounded to float32 when used, as the official's.
- A teacher BN channel with weight 0 makes the official divide by zero (ZeroDivisionError); here
  its margin is the limit for s -> 0, min(mu, 0).
- Margins are not saved in checkpoints (clovaai registers them as buffers `margin1..3` of its
  Distiller, L54-55; mdistiller keeps them in a plain list, OFD.py L90-109): they are a function of the frozen teacher.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from kdmtl_cli.distill import KD_METHODS
from kdmtl_cli.distill.logit import compute_dtype
from kdmtl_cli.distill.pairs import FeaturePairMethod, FeaturePairsConfig, as_list, split_name, teacher_names
from kdmtl_cli.errors import KdmtlError
from kdmtl_cli.ranges import above, at_least

# The default run: student=small (convnet, depth 1) and teacher=multitask (convnet, depth 2), three
# stages each: the last block's pre-ReLU sum of every stage, and (teacher) that block's BN before
# the ReLU (convnet's conv2 = Sequential(conv, BatchNorm2d)).
STUDENT = [f"trunk.stages.{i}.0.preact" for i in range(3)]
TEACHER = [f"trunk.stages.{i}.1.preact" for i in range(3)]
TEACHER_BN = [f"trunk.stages.{i}.1.conv2.1" for i in range(3)]


@dataclass
class OFDConfig(FeaturePairsConfig):
    """Overhaul of feature distillation as clovaai / mdistiller (conf/loss/ofd.yaml)."""
    weight: float = at_least(0, default=1e-3)          # clovaai `/ 1000`; mdistiller OFD.LOSS.FEAT_WEIGHT
    stage_decay: float = above(0, default=0.5)         # pair i of n weighted stage_decay ** (n - 1 - i)
    connector_kernel: int = at_least(1, default=1)     # mdistiller OFD.CONNECTOR.KERNEL_SIZE
    student: List[str] = field(default_factory=lambda: list(STUDENT))
    teacher: List[str] = field(default_factory=lambda: list(TEACHER))
    teacher_bn: List[str] = field(default_factory=lambda: list(TEACHER_BN))   # one per pair: margins


def margins_from_bn(weight: Tensor, bias: Tensor) -> Tensor:
    """Per-channel margins (float64) from the BN before a ReLU, as the official get_margin_from_BN:
    E[x | x < 0] for x ~ N(bias, |weight|^2) where Phi(-bias / |weight|) > 0.001, else -3 |weight|
    (min(bias, 0), the limit, where the weight is 0)."""
    s, m = weight.detach().double().abs(), bias.detach().double()
    zero = s == 0
    s_safe = torch.where(zero, torch.ones_like(s), s)
    p = torch.special.ndtr(-m / s_safe)
    truncated = -s_safe * torch.exp(-(m / s_safe) ** 2 / 2) / math.sqrt(2 * math.pi) / p + m
    margin = torch.where(p > 0.001, truncated, -3 * s_safe)
    return torch.where(zero, m.clamp(max=0), margin)


class Connector(nn.Sequential):
    """One pair's connector (clovaai build_feature_connector: conv C_s -> C_t, BN(C_t); state dict
    keys as its `Connectors[i]`), with the teacher margins as a non-persistent [1, C_t, 1, 1] buffer."""

    def __init__(self, student_channels: int, teacher_channels: int, kernel_size: int, margin: Tensor):
        conv = nn.Conv2d(student_channels, teacher_channels, kernel_size, stride=1,
                         padding=(kernel_size - 1) // 2, bias=False)
        bn = nn.BatchNorm2d(teacher_channels)
        super().__init__(conv, bn)
        n = kernel_size * kernel_size * teacher_channels
        with torch.no_grad():
            conv.weight.normal_(0, math.sqrt(2.0 / n))
            bn.weight.fill_(1)
            bn.bias.zero_()
        self.register_buffer("margin", margin.view(1, -1, 1, 1).clone(), persistent=False)


def partial_l2(source: Tensor, target: Tensor, margin: Tensor) -> Tensor:
    """The official distillation_loss: sum of (s - t')^2 where s > t' or t' > 0, t' = max(t, margin)."""
    target = torch.maximum(target, margin)
    mask = (source > target) | (target > 0)
    return (F.mse_loss(source, target, reduction="none") * mask.to(source.dtype)).sum()


def ofd_loss(student_feature: Tensor, teacher_feature: Tensor, connector: Connector) -> Tensor:
    """OFD of one map pair: partial L2 of connector(student) against the teacher (pooled to the
    connector output's size), per sample (the sum divided by the batch size), in ``compute_dtype``
    of the student (the connector must hold that dtype: float32 under autocast)."""
    dtype = compute_dtype(student_feature)
    # Autocast would run the convolution in float16/bfloat16 again: keep it in `dtype`.
    with torch.autocast(student_feature.device.type, enabled=False):
        source = connector(student_feature.to(dtype))
        target = teacher_feature.detach().to(dtype)
        if target.shape[-2:] != source.shape[-2:]:
            target = F.adaptive_avg_pool2d(target, source.shape[-2:])
        return partial_l2(source, target, connector.margin.to(dtype)) / source.shape[0]


def _inner(model):
    from kdmtl_cli.distill.objective import _inner as inner

    return inner(model)


@KD_METHODS.register("ofd", settings=OFDConfig)
class OverhaulFeatureDistillation(FeaturePairMethod):
    name = "ofd"

    def __init__(self, cfg, tasks, teacher_tasks):
        super().__init__(cfg, tasks, teacher_tasks)
        self.bn_names = as_list(cfg.teacher_bn)
        if len(self.bn_names) != len(self.pairs):
            raise KdmtlError(f"loss.ofd.teacher_bn must name one teacher batch-norm per pair ({len(self.pairs)}), "
                             f"got {len(self.bn_names)}")
        self._teacher: Optional[nn.Module] = None

    def bind_teacher(self, teacher):
        self._teacher = teacher

    def _batch_norm(self, i: int, task: Optional[str]) -> nn.BatchNorm2d:
        """The teacher BN of pair i (in the teacher of `task` with per-task teachers), checked."""
        key = f"loss.ofd.teacher_bn[{i}] '{self.bn_names[i]}'"
        bn_task, path, index = split_name(self.bn_names[i])
        if index is not None:
            raise KdmtlError(f"{key}: name a batch-norm module, without /<i>")
        model = self._teacher
        if model is None:
            raise KdmtlError("loss=ofd reads the teacher's batch-norms: bind_teacher must come before setup")
        teachers = getattr(model, "teachers", None)
        if teachers is not None:
            if bn_task is not None and task is not None and bn_task != task:
                raise KdmtlError(f"{key}: its task prefix differs from the teacher feature's ({task})")
            bn_task = bn_task or task
            if bn_task is None or bn_task not in teachers:
                raise KdmtlError(f"{key}: with per-task teachers prefix it with one of {', '.join(teachers)}")
            model = _inner(teachers[bn_task])
        elif bn_task is not None:
            raise KdmtlError(f"{key} has a task prefix, but the teacher is one multi-task model; drop the prefix")
        modules = dict(model.named_modules())
        if path not in modules:
            norms = [n for n, m in modules.items() if isinstance(m, nn.BatchNorm2d)]
            raise KdmtlError(f"{key}: the teacher has no module '{path}'; its BatchNorm2d layers: "
                             f"{', '.join(norms[-8:]) or 'none'}")
        bn = modules[path]
        if not isinstance(bn, nn.BatchNorm2d):
            raise KdmtlError(f"{key} is a {type(bn).__name__}, not a BatchNorm2d")
        if bn.weight is None or bn.bias is None:
            raise KdmtlError(f"{key} has no affine weight and bias (affine=False) to read margins from")
        return bn

    def setup(self, student_features, teacher_features):
        terms = self.checked_terms(student_features, teacher_features)
        owners = [(i, task) for i, (_, t) in enumerate(self.pairs)
                  for task, _ in teacher_names(t, teacher_features, self.teacher_tasks)]
        assert len(owners) == len(terms), (owners, [term.name for term, _, _ in terms])
        n, weight, decay = len(self.pairs), float(self.cfg.weight), float(self.cfg.stage_decay)
        for (term, student, teacher), (i, task) in zip(terms, owners):
            bn = self._batch_norm(i, task)
            if bn.num_features != teacher.shape[1]:
                raise KdmtlError(f"loss.ofd.teacher_bn[{i}] '{self.bn_names[i]}' has {bn.num_features} channels, "
                                 f"the teacher feature '{term.teacher}' {teacher.shape[1]}; name the BN before "
                                 "that feature's ReLU")
            margin = margins_from_bn(bn.weight, bn.bias).to(bn.weight.device)
            self.modules[term.key] = Connector(student.shape[1], teacher.shape[1], int(self.cfg.connector_kernel),
                                               margin)
            self._weights[term.name] = weight * decay ** (n - 1 - i)

    def __call__(self, student_out, teacher_out, batch, progress):
        s_feats, t_feats = student_out["features"], teacher_out["features"]
        return {term.name: ofd_loss(s_feats[term.student], t_feats[term.teacher], self.modules[term.key])
                for term in self.terms}
