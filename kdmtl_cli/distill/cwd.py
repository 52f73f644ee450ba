"""`cwd`: channel-wise distillation, "Channel-wise Knowledge Distillation for Dense Prediction"
(C. Shu, Y. Liu, J. Gao, Z. Yan, C. Shen, ICCV 2021), as the authors' code, irfanICMLL/TorchDistiller
c2caaca SemSeg-distill/utils/criterion.py `CriterionCWD` with `ChannelNorm` (norm_type `channel`,
divergence `kl`), the same rule as open-mmlab/mmrazor 90c7af1 mmrazor/models/losses/cwd.py
`ChannelWiseDivergence.forward`. Each channel's map is a distribution over its H*W positions:

    cwd = tau^2 / (N * C) * sum_{n,c} KL(softmax_hw(t_nc / tau) || softmax_hw(s_nc / tau))

Logits: one term `cwd/<task>` per dense label task the teacher covers (segmentation; the official
code distils the segmentation logits, TorchDistiller kd_model.py `criterion_cwd(preds_S[0],
preds_T[0])`, mmrazor `decode_head.conv_seg`). Defaults: the authors' README command
`bash exp_cwd.sh channel kl 3 4 ...` (exp_cwd.sh: WEIGHT=$3 -> `--lambda-cwd 3`, TEMPERATURE=$4 ->
`--temperature 4`). mmrazor's Cityscapes config uses tau=1, loss_weight=5
(`loss.cwd.tau=1 loss.cwd.weight=5`).

Feature maps (`loss.cwd.student/teacher`, empty by default): terms `cwd/<student feature>`, weighted
`loss.cwd.feature_weight`, same tau (the authors' `--cwd-feat` reuses `criterion_cwd`, `--lambda-cwd`
and `--temperature`). Where channel counts differ the student map first goes through the authors'
learned align (kd_model.py `self.linear`: Conv2d(C_s, C_t, 1, bias=False) + InPlaceABNSync(C_t) + ReLU;
ReLU after the ABN's own activation is ReLU either way, so here conv + BatchNorm2d + ReLU), kept in
self.modules and so in checkpoints. Equal channel counts need no align (mmrazor's FPN configs use none).
Spatial sizes must be equal (mmrazor `assert preds_S.shape[-2:] == preds_T.shape[-2:]`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from kdmtl_cli.distill import KD_METHODS, LabelTaskMethod
from kdmtl_cli.distill.logit import compute_dtype
from kdmtl_cli.distill.pairs import (Term, check_pair_shapes, feature_pairs, require_feature,
                                     teacher_names)
from kdmtl_cli.errors import KdmtlError
from kdmtl_cli.ranges import above, at_least


def cwd_loss(student_map: Tensor, teacher_map: Tensor, tau: float) -> Tensor:
    """tau^2 * sum over (n, c) of KL(teacher || student) over the H*W positions, / (N * C), in
    ``compute_dtype``; maps [N, C, H, W] of one shape."""
    if student_map.dim() != 4 or student_map.shape != teacher_map.shape:
        raise ValueError(f"cwd_loss: maps must be [N, C, H, W] of one shape "
                         f"(got {tuple(student_map.shape)} and {tuple(teacher_map.shape)})")
    n, c = student_map.shape[:2]
    dtype = compute_dtype(student_map)
    s = student_map.to(dtype).reshape(n * c, -1) / tau
    t = teacher_map.detach().to(dtype).reshape(n * c, -1) / tau
    log_p_t = F.log_softmax(t, dim=1)
    kl = (log_p_t.exp() * (log_p_t - F.log_softmax(s, dim=1))).sum()
    return kl * tau ** 2 / (n * c)


def channel_align(student_channels: int, teacher_channels: int) -> nn.Module:
    """The authors' `self.linear` (TorchDistiller kd_model.py): 1x1 conv without bias, BN, ReLU."""
    return nn.Sequential(nn.Conv2d(student_channels, teacher_channels, kernel_size=1, bias=False),
                         nn.BatchNorm2d(teacher_channels), nn.ReLU())


@dataclass
class CWDConfig:
    """Channel-wise distillation as the authors' TorchDistiller (conf/loss/cwd.yaml)."""
    weight: Any = at_least(0, default=3.0)           # logits terms: a number or {task: number}; --lambda-cwd
    tau: float = above(0, default=4.0)               # --temperature; the terms are scaled by tau^2
    feature_weight: float = at_least(0, default=3.0)   # feature terms (the authors reuse --lambda-cwd)
    student: List[str] = field(default_factory=list)   # feature pairs, `[task:]path[/i]`, paired by position
    teacher: List[str] = field(default_factory=list)


@KD_METHODS.register("cwd", settings=CWDConfig)
class ChannelWiseDistillation(LabelTaskMethod):
    name = "cwd"

    def __init__(self, cfg, tasks, teacher_tasks):
        super().__init__(cfg, tasks, teacher_tasks)
        self.dense_tasks = [t for t in self.label_tasks if tasks[t].kind.dense]
        if not self.dense_tasks:
            raise KdmtlError("loss=cwd needs a segmentation task covered by the teacher "
                             "(channel-wise maps need dense logits)")
        self._weights = self.per_task_term_weights(self.dense_tasks)
        has_pairs = bool(list(cfg.student)) or bool(list(cfg.teacher))
        self.pairs = feature_pairs(cfg, "loss.cwd") if has_pairs else []
        self.student_features = [s for s, _ in self.pairs]
        self.teacher_features = [t for _, t in self.pairs]
        self.terms: List[Term] = []

    def setup(self, student_features, teacher_features):
        self.terms, self._weights = [], self.per_task_term_weights(self.dense_tasks)
        for s, t in self.pairs:
            student = require_feature(student_features, s, "loss.cwd", "student")
            for task, captured in teacher_names(t, teacher_features, self.teacher_tasks):
                teacher = require_feature(teacher_features, captured, "loss.cwd", "teacher")
                check_pair_shapes(f"loss.cwd pair {s} -> {captured}", student, teacher, need_same_size=True)
                name = f"cwd/{s}" + (f"@{task}" if task else "")
                if name in self._weights:
                    raise KdmtlError(f"loss.cwd: the pair {s} -> {captured} repeats term {name}; list each pair once")
                term = Term(name, s, captured, name.partition("/")[2].replace(".", "__"))
                if student.shape[1] != teacher.shape[1]:
                    self.modules[term.key] = channel_align(student.shape[1], teacher.shape[1])
                self.terms.append(term)
                self._weights[name] = float(self.cfg.feature_weight)

    def __call__(self, student_out, teacher_out, batch, progress):
        tau = float(self.cfg.tau)
        terms = {f"cwd/{task}": cwd_loss(student_out["outputs"][task], teacher_out["outputs"][task], tau)
                 for task in self.dense_tasks}
        s_feats, t_feats = student_out["features"], teacher_out["features"]
        for term in self.terms:
            student = s_feats[term.student]
            if term.key in self.modules:
                student = self.modules[term.key](student)
            terms[term.name] = cwd_loss(student, t_feats[term.teacher], tau)
        return terms
