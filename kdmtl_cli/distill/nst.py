"""`nst`: neuron selectivity transfer (Huang & Wang, "Like What You Like: Knowledge Distill via
Neuron Selectivity Transfer", arXiv 2017) as RepDistiller's `NSTLoss.nst_loss`
(HobbitLong/RepDistiller b84f547, distiller_zoo/NST.py).

Each channel's map is flattened over positions and L2-normalised (F.normalize, dim 2); with the
squared polynomial kernel k(a, b) = (a . b)^2 between channels, the loss is the squared MMD
mean k(t, t) + mean k(s, s) - 2 mean k(s, t), each mean over the batch and all channel pairs
(the official `full_loss = True`; the teacher-only term is detached). When the spatial sizes
differ, the larger map, student or teacher, is adaptive-average-pooled to the smaller one;
RepDistiller compares heights only and pools to a square, here both sides go to
(min H, min W): the same for square maps. Channel counts may differ.

RepDistiller sums it over feat[1:-1] (helper/loops.py `--distill nst`), every stage output after
the stem: `trunk.stages.0..2` of the 3-stage convnet student and teacher. One term per pair,
`nst/<student feature>`, weighted by `loss.nst.weight` = beta (scripts/run_cifar_distill.sh
`--distill nst -b 50`). No learned part.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

import torch
import torch.nn.functional as F
from torch import Tensor

from kdmtl_cli.distill import KD_METHODS
from kdmtl_cli.distill.functional import check_map_pair, pooled_to_common_size
from kdmtl_cli.distill.logit import compute_dtype
from kdmtl_cli.distill.pairs import FeaturePairMethod, FeaturePairsConfig
from kdmtl_cli.ranges import at_least


@dataclass
class NSTConfig(FeaturePairsConfig):
    """Neuron selectivity transfer as RepDistiller (conf/loss/nst.yaml); weight is beta."""
    weight: float = at_least(0, default=50.0)
    student: List[str] = field(default_factory=lambda: ["trunk.stages.0", "trunk.stages.1", "trunk.stages.2"])
    teacher: List[str] = field(default_factory=lambda: ["trunk.stages.0", "trunk.stages.1", "trunk.stages.2"])


def poly_kernel_mean(a: Tensor, b: Tensor) -> Tensor:
    """Official `poly_kernel(a, b).mean()`: (a.unsqueeze(1) * b.unsqueeze(2)).sum(-1).pow(2) is
    (b a^T)^2, [N, C_b, C_a]; bmm avoids the [N, C_b, C_a, H*W] product."""
    return torch.bmm(b, a.transpose(1, 2)).pow(2).mean()


def nst_loss(student_feature: Tensor, teacher_feature: Tensor) -> Tensor:
    """NST of one [N, C, H, W] pair, in ``compute_dtype`` of the student."""
    check_map_pair("nst_loss", student_feature, teacher_feature)
    dtype = compute_dtype(student_feature)
    # Autocast would run the kernel matmuls in float16/bfloat16 again: keep them in `dtype`.
    with torch.autocast(student_feature.device.type, enabled=False):
        s, t = pooled_to_common_size(student_feature.to(dtype), teacher_feature.to(dtype))
        s = F.normalize(s.flatten(2), dim=2)
        t = F.normalize(t.flatten(2), dim=2)
        return poly_kernel_mean(t, t).detach() + poly_kernel_mean(s, s) - 2 * poly_kernel_mean(s, t)


@KD_METHODS.register("nst", settings=NSTConfig)
class NeuronSelectivityTransfer(FeaturePairMethod):
    name = "nst"

    def setup(self, student_features, teacher_features):
        self.checked_terms(student_features, teacher_features)   # no learned part

    def __call__(self, student_out, teacher_out, batch, progress):
        s_feats, t_feats = student_out["features"], teacher_out["features"]
        return {term.name: nst_loss(s_feats[term.student], t_feats[term.teacher]) for term in self.terms}
