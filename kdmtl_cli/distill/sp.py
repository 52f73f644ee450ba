"""`sp`: similarity-preserving KD (Tung & Mori, "Similarity-Preserving Knowledge Distillation",
ICCV 2019) as RepDistiller's `Similarity.similarity_loss` (HobbitLong/RepDistiller b84f547,
distiller_zoo/SP.py, "verified by original author").

Per batch of N samples, each feature is flattened to [N, D], its Gram matrix G = F F^T (N x N)
L2-normalised row by row (F.normalize, dim 1), and the loss is ||G_t - G_s||_F^2 / N^2.
RepDistiller applies it to feat[-2] only (helper/loops.py `--distill similarity`:
g_s = [feat_s[-2]]), the last stage's output map: here `trunk.stages.2` of the 3-stage convnet
student and teacher. One term per pair, `sp/<student feature>`, weighted by `loss.sp.weight` = beta
(scripts/run_cifar_distill.sh `--distill similarity -b 3000`). No learned part. Channel counts and
spatial sizes may differ (only N x N matrices are compared); [N, C] vectors are taken too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

import torch
import torch.nn.functional as F
from torch import Tensor

from kdmtl_cli.distill import KD_METHODS
from kdmtl_cli.distill.logit import compute_dtype
from kdmtl_cli.distill.pairs import FeaturePairMethod, FeaturePairsConfig
from kdmtl_cli.distill.pkt import vectors_as_maps
from kdmtl_cli.ranges import at_least


@dataclass
class SPConfig(FeaturePairsConfig):
    """Similarity-preserving KD as RepDistiller (conf/loss/sp.yaml); weight is beta."""
    weight: float = at_least(0, default=3000.0)
    student: List[str] = field(default_factory=lambda: ["trunk.stages.2"])
    teacher: List[str] = field(default_factory=lambda: ["trunk.stages.2"])


def normalized_gram(feature: Tensor) -> Tensor:
    """[N, ...] -> [N, N]: F F^T of the flattened samples, each row L2-normalised (eps 1e-12)."""
    flat = feature.reshape(feature.shape[0], -1)
    return F.normalize(flat @ flat.t(), p=2.0, dim=1)


def sp_loss(student_feature: Tensor, teacher_feature: Tensor) -> Tensor:
    """SP of one feature pair: sum_{i,j} (G_t - G_s)_{ij}^2 / N^2, in ``compute_dtype`` of the student."""
    n = student_feature.shape[0]
    if teacher_feature.shape[0] != n:
        raise ValueError(f"sp_loss: batch sizes must match (got {n} and {teacher_feature.shape[0]})")
    dtype = compute_dtype(student_feature)
    # Autocast would run the Gram matmul in float16/bfloat16 again: keep it in `dtype`.
    with torch.autocast(student_feature.device.type, enabled=False):
        diff = normalized_gram(teacher_feature.to(dtype)) - normalized_gram(student_feature.to(dtype))
        return diff.pow(2).sum() / (n * n)


@KD_METHODS.register("sp", settings=SPConfig)
class SimilarityPreserving(FeaturePairMethod):
    name = "sp"

    def setup(self, student_features, teacher_features):
        self.checked_terms(vectors_as_maps(student_features), vectors_as_maps(teacher_features))

    def __call__(self, student_out, teacher_out, batch, progress):
        s_feats, t_feats = student_out["features"], teacher_out["features"]
        return {term.name: sp_loss(s_feats[term.student], t_feats[term.teacher]) for term in self.terms}
