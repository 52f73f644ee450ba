"""`pkt`: probabilistic knowledge transfer (Passalis & Tefas, "Learning Deep Representations
with Probabilistic Knowledge Transfer", ECCV 2018) as RepDistiller's `PKT.cosine_similarity_loss`
(HobbitLong/RepDistiller b84f547, distiller_zoo/PKT.py, "code from author: passalis/probabilistic_kt").

Per batch, each side's vectors are L2-normalised (x / (||x|| + eps)), their cosine similarities
mapped to [0, 1] ((cos + 1) / 2) and normalised per row into conditional probabilities P (N x N);
the loss is mean_{i,j} P_t log((P_t + eps) / (P_s + eps)), eps = 1e-7 (the official default).

RepDistiller applies it to feat[-1] (helper/loops.py `--distill pkt`: f_s = feat_s[-1]), the
average-pooled, flattened output of the last stage. Here the named module's output is taken and,
when it is an [N, C, H, W] map, global-average-pooled to [N, C] (an [N, C] output is used as it
is); the default is the trunk's last stage, `trunk.stages.2` of the 3-stage convnet student and
teacher. One term per pair, `pkt/<student feature>`, weighted by `loss.pkt.weight` = beta
(scripts/run_cifar_distill.sh `--distill pkt -b 30000`). No learned part. Channel counts may differ:
only the N x N similarities are compared, so the loss depends on the (per-rank) batch. One
departure, in the gradient only: at an all-zero sample (a dead pooled feature) the official
sqrt(sum x^2) back-propagates nan into every sample; here it is the exact derivative, finite
(x / (||x|| + eps) has slope 1 / eps at 0, so it is large there).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List

import torch
from torch import Tensor

from kdmtl_cli.distill import KD_METHODS
from kdmtl_cli.distill.logit import compute_dtype
from kdmtl_cli.distill.pairs import FeaturePairMethod, FeaturePairsConfig
from kdmtl_cli.ranges import above, at_least


@dataclass
class PKTConfig(FeaturePairsConfig):
    """Probabilistic knowledge transfer as RepDistiller (conf/loss/pkt.yaml); weight is beta."""
    weight: float = at_least(0, default=30000.0)
    eps: float = above(0, default=1e-7)      # RepDistiller cosine_similarity_loss(eps=0.0000001)
    student: List[str] = field(default_factory=lambda: ["trunk.stages.2"])
    teacher: List[str] = field(default_factory=lambda: ["trunk.stages.2"])


def pooled(feature: Tensor) -> Tensor:
    """RepDistiller's feat[-1]: an [N, C, H, W] map global-average-pooled to [N, C]; [N, C] as is."""
    return feature.mean(dim=(2, 3)) if feature.dim() == 4 else feature


def similarity_probabilities(vectors: Tensor, eps: float) -> Tensor:
    """[N, D] -> [N, N]: row-normalised (cos + 1) / 2 between the samples, as the official code."""
    # sqrt(sum x^2) as the official code, taken by vector_norm: the same value, and at an all-zero
    # sample its gradient is 0 where sqrt's is nan, which leaves the exact derivative (I / eps).
    vectors = vectors / (torch.linalg.vector_norm(vectors, dim=1, keepdim=True) + eps)
    vectors = vectors.masked_fill(torch.isnan(vectors), 0.0)     # official: x[x != x] = 0
    similarity = (vectors @ vectors.t() + 1.0) / 2.0
    return similarity / similarity.sum(dim=1, keepdim=True)


def pkt_loss(student_feature: Tensor, teacher_feature: Tensor, eps: float = 1e-7) -> Tensor:
    """PKT of one feature pair (maps are pooled first), in ``compute_dtype`` of the student."""
    if student_feature.shape[0] != teacher_feature.shape[0]:
        raise ValueError(f"pkt_loss: batch sizes must match (got {student_feature.shape[0]} "
                         f"and {teacher_feature.shape[0]})")
    dtype = compute_dtype(student_feature)
    # Autocast would run the similarity matmul in float16/bfloat16 again; eps = 1e-7 needs float32.
    with torch.autocast(student_feature.device.type, enabled=False):
        p_s = similarity_probabilities(pooled(student_feature.to(dtype)), eps)
        p_t = similarity_probabilities(pooled(teacher_feature.to(dtype)), eps)
        return (p_t * torch.log((p_t + eps) / (p_s + eps))).mean()


def vectors_as_maps(features: Dict[str, object]) -> Dict[str, object]:
    """[N, C] features seen as [N, C, 1, 1] maps, for the pair checks that want maps: methods
    that flatten each sample (PKT, SP) take vectors as well."""
    return {name: f[:, :, None, None] if isinstance(f, Tensor) and f.dim() == 2 else f
            for name, f in features.items()}


@KD_METHODS.register("pkt", settings=PKTConfig)
class ProbabilisticKnowledgeTransfer(FeaturePairMethod):
    name = "pkt"

    def setup(self, student_features, teacher_features):
        self.checked_terms(vectors_as_maps(student_features), vectors_as_maps(teacher_features))

    def __call__(self, student_out, teacher_out, batch, progress):
        s_feats, t_feats = student_out["features"], teacher_out["features"]
        return {term.name: pkt_loss(s_feats[term.student], t_feats[term.teacher], float(self.cfg.eps))
                for term in self.terms}
