"""`rkd`: Relational Knowledge Distillation (W. Park, D. Kim, Y. Lu, M. Cho, CVPR 2019) as
RepDistiller's `RKDLoss` (HobbitLong/RepDistiller distiller_zoo/RKD.py, commit b84f547): the
student copies the teacher's relations between the samples of a batch, not its features, so the
two may have any widths.

With e_i the embedding of sample i (student s, teacher t):

- distance: psi_D(i, j) = ||e_i - e_j|| / mu, mu the mean of the non-zero distances of the batch;
  loss_d = smooth_l1(psi_D^s, psi_D^t), mean over all N x N entries (the zero diagonal included);
- angle: psi_A(i, j, k) = <normalize(e_j - e_i), normalize(e_k - e_i)>;
  loss_a = smooth_l1(psi_A^s, psi_A^t), mean over all N x N x N entries;
- `rkd/<student feature>` = distance_weight * loss_d + angle_weight * loss_a (RKDLoss w_d = 25,
  w_a = 50), weighted by `loss.rkd.weight` = RepDistiller's beta (scripts/run_cifar_distill.sh
  `--distill rkd -a 0 -b 1`, classification weight `-r` left at its default 1).

The embedding: RepDistiller applies RKDLoss to `feat[-1]` (helper/loops.py `f_s = feat_s[-1]`),
the penultimate feature of its CIFAR models: the last stage's output, average-pooled over the
whole map and flattened (models/resnet.py `f4`). Here the named module's output, if 4-D
(N, C, H, W), is global-average-pooled to (N, C); any other shape is flattened to (N, -1) as
RKDLoss's `view` does. Default: `trunk.stages.2`, the last stage that both the default student
(conf/student/small.yaml) and the default teacher (conf/teacher/multitask.yaml) have, whose
global average is exactly what their classification head sees.
Distances are RKDLoss.pdist: sqrt(clamp(|a|^2 + |b|^2 - 2 a.b, min=eps)), diagonal set to 0.
The teacher side is detached (RepDistiller computes it under no_grad).

mdistiller (megvii-research/mdistiller mdistiller/distillers/RKD.py `rkd_loss`, cfg.py `CFG.RKD`,
commit a08d46f) computes the same loss with the same defaults (DISTANCE_WEIGHT 25, ANGLE_WEIGHT
50, LOSS.FEAT_WEIGHT 1.0, CE_WEIGHT 1.0) on `pooled_feat`, the same pooled penultimate feature.
Its only difference: it exposes pdist's `squared` and `eps` (PDIST.SQUARED False,
PDIST.EPSILON 1e-12), which RepDistiller fixes at the same values; they are settings here too.
A batch of one sample has no relations (the official code gives nan): the term is 0 then.
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
from kdmtl_cli.ranges import above, at_least


def embedding(feature: Tensor) -> Tensor:
    """One vector per sample: (N, C, H, W) global-average-pooled to (N, C); other shapes (N, -1)."""
    if feature.dim() == 4:
        return feature.mean(dim=(2, 3))
    return feature.reshape(feature.shape[0], -1)


def pairwise_distances(e: Tensor, squared: bool, eps: float) -> Tensor:
    """RKDLoss.pdist: (N, N) Euclidean (or squared) distances between the rows of e, 0 on the diagonal."""
    square = e.pow(2).sum(dim=1)
    distances = (square.unsqueeze(1) + square.unsqueeze(0) - 2 * e @ e.t()).clamp(min=eps)
    if not squared:
        distances = distances.sqrt()
    diagonal = torch.eye(len(e), dtype=torch.bool, device=e.device)
    return distances.masked_fill(diagonal, 0.0)


def normalized_distances(e: Tensor, squared: bool, eps: float) -> Tensor:
    """Distances divided by their mean over the pairs of distinct samples (the positive entries)."""
    distances = pairwise_distances(e, squared, eps)
    return distances / distances[distances > 0].mean()


def angles(e: Tensor) -> Tensor:
    """(N * N * N,) cosines <normalize(e_j - e_i), normalize(e_k - e_i)>, flattened as RKDLoss's."""
    differences = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)   # [i, j] = e_j - e_i
    return torch.bmm(differences, differences.transpose(1, 2)).reshape(-1)


def rkd_loss(student_feature: Tensor, teacher_feature: Tensor, distance_weight: float, angle_weight: float,
             squared: bool = False, eps: float = 1e-12) -> Tensor:
    """distance_weight * smooth_l1(psi_D) + angle_weight * smooth_l1(psi_A) between the batch
    relations of the two features' embeddings (`embedding`), in ``compute_dtype``."""
    if student_feature.shape[0] != teacher_feature.shape[0]:
        raise ValueError(f"rkd_loss: batch sizes must match (got {student_feature.shape[0]} "
                         f"and {teacher_feature.shape[0]})")
    dtype = compute_dtype(student_feature)
    student = embedding(student_feature.to(dtype))
    teacher = embedding(teacher_feature.detach().to(dtype))
    if len(student) < 2:
        return student.sum() * 0.0   # no pair of samples; stays in the graph so backward() works
    loss_d = F.smooth_l1_loss(normalized_distances(student, squared, eps),
                              normalized_distances(teacher, squared, eps))
    loss_a = F.smooth_l1_loss(angles(student), angles(teacher))
    return distance_weight * loss_d + angle_weight * loss_a


@dataclass
class RKDConfig(FeaturePairsConfig):
    """Relational KD as RepDistiller's `RKDLoss` (conf/loss/rkd.yaml); weight is its beta."""
    weight: float = at_least(0, default=1.0)
    distance_weight: float = at_least(0, default=25.0)   # RKDLoss w_d
    angle_weight: float = at_least(0, default=50.0)      # RKDLoss w_a
    squared: bool = False                                # pdist: squared distances (mdistiller PDIST.SQUARED)
    eps: float = above(0, default=1e-12)                 # pdist clamp (mdistiller PDIST.EPSILON)
    student: List[str] = field(default_factory=lambda: ["trunk.stages.2"])
    teacher: List[str] = field(default_factory=lambda: ["trunk.stages.2"])


def as_maps(features: dict) -> dict:
    """The pair checks are written for feature maps: a tensor of another shape is shown to them
    as (N, D, 1, 1), the vector it becomes here, so that vector features pass them too."""
    return {name: value.reshape(value.shape[0], -1, 1, 1)
            if isinstance(value, torch.Tensor) and value.dim() not in (0, 4) else value
            for name, value in features.items()}


@KD_METHODS.register("rkd", settings=RKDConfig)
class RelationalKD(FeaturePairMethod):
    name = "rkd"

    def setup(self, student_features, teacher_features):
        self.checked_terms(as_maps(student_features), as_maps(teacher_features))   # nothing learned

    def __call__(self, student_out, teacher_out, batch, progress):
        s_feats, t_feats, cfg = student_out["features"], teacher_out["features"], self.cfg
        return {term.name: rkd_loss(s_feats[term.student], t_feats[term.teacher], float(cfg.distance_weight),
                                    float(cfg.angle_weight), bool(cfg.squared), float(cfg.eps))
                for term in self.terms}
