"""`cc`: correlation congruence (Peng et al., "Correlation Congruence for Knowledge Distillation",
ICCV 2019) as RepDistiller's `Correlation` (HobbitLong/RepDistiller b84f547, distiller_zoo/CC.py
L7-17, code from the paper's authors) with its learned embeddings.

RepDistiller embeds feat[-1] of each network (the average-pooled, flattened last-stage output) with
a learned `LinearEmbed(feat[-1].shape[1], opt.feat_dim)` per side (train_student.py L211-218;
models/util.py L185-194: flatten, then nn.Linear with bias, NO L2 normalisation -- that is `Embed`,
which RepDistiller uses for CRD, not CC), `--feat_dim 128` (train_student.py L81), and trains both
embeddings with the student (trainable_list). With f_s, f_t the [N, D] embeddings
(helper/loops.py L162-165) and delta = |f_s - f_t|, the loss is
mean_i sum_d delta[i, d] * delta[i + 1, d] over consecutive samples i of the batch
(Correlation.forward L14-17), weighted by `loss.cc.weight` = beta
(scripts/run_cifar_distill.sh `--distill correlation -a 0 -b 0.02`).

Here the named module's output is taken and, when it is an [N, C, H, W] map, global-average-pooled
to [N, C] (an [N, C] output is used as it is); the default is the trunk's last stage,
`trunk.stages.2` of the 3-stage convnet student and teacher. The two embeddings of a pair are built
in `setup` from the pooled channel counts (nn.Linear's default initialisation, as RepDistiller),
live in `self.modules` (so the optimiser trains them and checkpoints save and restore them), one
pair of embeddings per term `cc/<student feature>` (`@<task>` for per-task teachers). The loss
pairs sample i with sample i + 1 of the (per-rank) batch, so it depends on the batch order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

import torch
import torch.nn as nn
from torch import Tensor

from kdmtl_cli.distill import KD_METHODS
from kdmtl_cli.distill.logit import compute_dtype
from kdmtl_cli.distill.pairs import FeaturePairMethod, FeaturePairsConfig
from kdmtl_cli.distill.pkt import pooled, vectors_as_maps
from kdmtl_cli.ranges import at_least


@dataclass
class CCConfig(FeaturePairsConfig):
    """Correlation congruence as RepDistiller (conf/loss/cc.yaml); weight is beta."""
    weight: float = at_least(0, default=0.02)
    feat_dim: int = at_least(1, default=128)     # RepDistiller --feat_dim: the embeddings' output size
    student: List[str] = field(default_factory=lambda: ["trunk.stages.2"])
    teacher: List[str] = field(default_factory=lambda: ["trunk.stages.2"])


class CorrelationEmbeddings(nn.Module):
    """RepDistiller's embed_s and embed_t (two `LinearEmbed`s) of one (student, teacher) pair."""

    def __init__(self, student_channels: int, teacher_channels: int, feat_dim: int):
        super().__init__()
        self.student = nn.Linear(student_channels, feat_dim)
        self.teacher = nn.Linear(teacher_channels, feat_dim)


def correlation_loss(student_embedding: Tensor, teacher_embedding: Tensor) -> Tensor:
    """[N, D] embeddings -> mean_i sum_d |s - t|[i, d] * |s - t|[i + 1, d] (official Correlation)."""
    if student_embedding.shape != teacher_embedding.shape:
        raise ValueError(f"correlation_loss: embeddings differ in shape ({tuple(student_embedding.shape)} "
                         f"vs {tuple(teacher_embedding.shape)})")
    delta = (student_embedding - teacher_embedding).abs()
    return (delta[:-1] * delta[1:]).sum(dim=1).mean()


def cc_loss(student_feature: Tensor, teacher_feature: Tensor, embeddings: CorrelationEmbeddings) -> Tensor:
    """CC of one feature pair: pool (maps), flatten, embed each side, correlation loss, in
    ``compute_dtype`` of the student (the embeddings' parameters are cast to it)."""
    dtype = compute_dtype(student_feature)
    # Autocast would run the linear layers in float16/bfloat16 again: keep them in `dtype`.
    with torch.autocast(student_feature.device.type, enabled=False):
        s = pooled(student_feature.to(dtype)).flatten(1)
        t = pooled(teacher_feature.to(dtype)).flatten(1)
        f_s = nn.functional.linear(s, embeddings.student.weight.to(dtype), embeddings.student.bias.to(dtype))
        f_t = nn.functional.linear(t, embeddings.teacher.weight.to(dtype), embeddings.teacher.bias.to(dtype))
        return correlation_loss(f_s, f_t)


@KD_METHODS.register("cc", settings=CCConfig)
class CorrelationCongruence(FeaturePairMethod):
    name = "cc"

    def setup(self, student_features, teacher_features):
        for term, student, teacher in self.checked_terms(vectors_as_maps(student_features),
                                                         vectors_as_maps(teacher_features)):
            self.modules[term.key] = CorrelationEmbeddings(pooled(student).flatten(1).shape[1],
                                                           pooled(teacher).flatten(1).shape[1],
                                                           int(self.cfg.feat_dim))

    def __call__(self, student_out, teacher_out, batch, progress):
        s_feats, t_feats = student_out["features"], teacher_out["features"]
        return {term.name: cc_loss(s_feats[term.student], t_feats[term.teacher], self.modules[term.key])
                for term in self.terms}
