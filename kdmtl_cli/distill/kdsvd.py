"""`kdsvd`: "Self-supervised Knowledge Distillation Using Singular Value Decomposition" (S. H. Lee,
D. H. Kim, B. C. Song, ECCV 2018), as the first author's sseung0703/KD_methods_with_TF 9fb5414
(nets/Shared.py `KD_SVD` with dist_type 'SVD', nets/SVP.py `SVD` and `Align_rsv`; used from
nets/ResNet.py L115-116 on the `feat` collection, the ReLU output of each stage's last block).

For each (student, teacher) stage map, as [N, H*W, C] (TF's NHWC reshape):
- the teacher's first K = 1 right singular vector V_T [N, C, 1] and the student's first K + 3 = 4
  (Shared.py L41, L46-47: `SVD(tfm, K)`, `SVD(sfm, K+3)`), each l2-normalised (SVP.py L28-31);
- the student vector with the largest |cosine| to the teacher's, its sign flipped to match
  (`Align_rsv`), so student and teacher maps need the same channel count C;
- both multiplied by the teacher's l2-normalised singular value (Shared.py L57-59; 1 for K = 1).
Between consecutive stages (i - 1, i), a Gaussian kernel of the vectors' entries,
rbf = exp(-(v_i[:, a] - v_{i-1}[:, b])^2 / 8), and the term is sum (rbf_S - rbf_T)^2 (non-finite
entries zeroed, Shared.py L61-68). Term `kdsvd/<student feature i>` for every feature after the
first (per teacher task with per-task teachers); weight 1 (op_util.py L39: `class_loss + reg_loss
+ distillation_loss`). Gradients go through torch's SVD backward (the official code overrides TF's
with its own `Svd_`, SVP.py L92); its clipping of the distillation gradient by the norm of the
task gradient (op_util.py L46-51) is an optimiser rule kdmtl's loss terms do not carry.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import List

import torch
import torch.nn.functional as F
from torch import Tensor

from kdmtl_cli.distill import KD_METHODS
from kdmtl_cli.distill.logit import compute_dtype
from kdmtl_cli.distill.pairs import FeaturePairMethod, FeaturePairsConfig
from kdmtl_cli.errors import KdmtlError
from kdmtl_cli.ranges import above, at_least

L2_NORMALIZE_EPS = 1e-6     # tf.nn.l2_normalize(epsilon=1e-12) divides by sqrt(max(sum x^2, 1e-12))
RBF_SCALE = 8.0             # Shared.py L63-64: exp(-d^2 / 8)


def removenan(x: Tensor) -> Tensor:
    """SVP.py `removenan`: non-finite entries become 0."""
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


def singular_vectors(feature: Tensor, n: int):
    """SVP.py `SVD`: the first n singular values [N, n] and right singular vectors [N, C, n] of the
    map as [N, H*W, C], each l2-normalised (values over the n, vectors over C)."""
    x = feature.permute(0, 2, 3, 1).reshape(feature.shape[0], -1, feature.shape[1])
    _, s, vh = torch.linalg.svd(x, full_matrices=False)
    s, v = removenan(s), removenan(vh.transpose(-2, -1))
    return F.normalize(s[:, :n], dim=1, eps=L2_NORMALIZE_EPS), F.normalize(v[:, :, :n], dim=1, eps=L2_NORMALIZE_EPS)


def align_student(v_student: Tensor, v_teacher: Tensor) -> Tensor:
    """SVP.py `Align_rsv`: for each teacher vector, the student vector of largest |cosine|, signed."""
    cosine = v_student.transpose(1, 2) @ v_teacher
    best = cosine.abs().amax(dim=1, keepdim=True) == cosine.abs()
    mask = torch.where(best, torch.sign(cosine), torch.zeros_like(cosine))
    return v_student @ mask


def svd_vectors(student_map: Tensor, teacher_map: Tensor, k: int, extra: int):
    """(student, teacher) vectors of one stage, aligned and scaled by the teacher's singular values."""
    if student_map.shape[0] != teacher_map.shape[0] or student_map.shape[1] != teacher_map.shape[1]:
        raise ValueError(f"kdsvd: batch sizes and channel counts must match "
                         f"(got {tuple(student_map.shape)} and {tuple(teacher_map.shape)})")
    sigma_t, v_t = singular_vectors(teacher_map.detach(), k)
    _, v_s = singular_vectors(student_map, k + extra)
    v_s = align_student(v_s, v_t)
    sigma_t = sigma_t.unsqueeze(1)
    return v_s * sigma_t, v_t * sigma_t


def rbf(v: Tensor, v_before: Tensor) -> Tensor:
    return torch.exp(-(v.unsqueeze(2) - v_before.unsqueeze(1)).pow(2) / RBF_SCALE)


def kdsvd_relation_loss(vs: Tensor, vs_before: Tensor, vt: Tensor, vt_before: Tensor) -> Tensor:
    """Shared.py L61-68: sum (rbf_S - rbf_T)^2 between two consecutive stages, non-finite -> 0."""
    diff = (rbf(vs, vs_before) - rbf(vt, vt_before).detach()) ** 2
    return removenan(diff).sum()


def kdsvd_losses(student_maps: List[Tensor], teacher_maps: List[Tensor], k: int = 1, extra: int = 3) -> List[Tensor]:
    """One relation loss per consecutive pair of stages (len(maps) - 1 of them), in ``compute_dtype``."""
    dtype = compute_dtype(student_maps[0])
    with torch.autocast(student_maps[0].device.type, enabled=False):   # SVD in float32 at least
        vectors = [svd_vectors(s.to(dtype), t.to(dtype), k, extra) for s, t in zip(student_maps, teacher_maps)]
        return [kdsvd_relation_loss(vs, vs_b, vt, vt_b)
                for (vs_b, vt_b), (vs, vt) in zip(vectors[:-1], vectors[1:])]


@dataclass
class KDSVDConfig(FeaturePairsConfig):
    """KD-SVD as sseung0703/KD_methods_with_TF (conf/loss/kdsvd.yaml)."""
    weight: float = at_least(0, default=1.0)
    k: int = above(0, default=1)              # teacher singular vectors (Shared.py L41 `K = 1`)
    extra: int = at_least(0, default=3)       # student takes k + extra to align from (`SVD(sfm, K+3)`)
    student: List[str] = field(default_factory=lambda: ["trunk.stages.0", "trunk.stages.1", "trunk.stages.2"])
    teacher: List[str] = field(default_factory=lambda: ["trunk.stages.0", "trunk.stages.1", "trunk.stages.2"])


@KD_METHODS.register("kdsvd", settings=KDSVDConfig)
class SVDDistillation(FeaturePairMethod):
    name = "kdsvd"

    def setup(self, student_features, teacher_features):
        chains = defaultdict(list)      # per teacher task (or one chain): the pairs' terms in order
        for term, student, teacher in self.checked_terms(student_features, teacher_features):
            if student.shape[1] != teacher.shape[1]:
                raise KdmtlError(f"loss.kdsvd pair {term.student} -> {term.teacher}: channel counts differ "
                                 f"({student.shape[1]} vs {teacher.shape[1]}); the official alignment compares "
                                 "singular vectors over channels: pick maps of equal width (e.g. student.width)")
            chains[term.name.partition("@")[2]].append(term)
        if any(len(chain) < 2 for chain in chains.values()):
            raise KdmtlError("loss.kdsvd needs at least two feature pairs (it relates consecutive stages)")
        self.chains = list(chains.values())
        self.terms = [term for chain in self.chains for term in chain[1:]]
        self._weights = {term.name: float(self.cfg.weight) for term in self.terms}

    def __call__(self, student_out, teacher_out, batch, progress):
        s_feats, t_feats = student_out["features"], teacher_out["features"]
        terms = {}
        for chain in self.chains:
            losses = kdsvd_losses([s_feats[t.student] for t in chain], [t_feats[t.teacher] for t in chain],
                                  int(self.cfg.k), int(self.cfg.extra))
            terms.update({term.name: loss for term, loss in zip(chain[1:], losses)})
        return terms
