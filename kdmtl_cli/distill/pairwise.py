"""`pairwise`: pair-wise (pixel-pair) distillation of "Structured Knowledge Distillation for Semantic
Segmentation" (Liu, Chen, Liu, Qin, Luo, Wang; CVPR 2019) and its extension "Structured Knowledge
Distillation for Dense Prediction" (TPAMI 2020), as the authors' code irfanICMLL/structure_knowledge_distillation
(master, ce208e1e5ba9177ecfc42519a2c64148d396fb71, the TPAMI version; the CVPR'19 code on branch
`cvpr_19` f6e6565 is an earlier variant, `CriterionSDcos`: a softmax over cosine scores and an MSE,
which kdmtl does not follow):

- utils/criterion.py L228-245 `CriterionPairWiseforWholeFeatAfterPool`: kernel = stride =
  (int(H_t * scale), int(W_t * scale)) from the TEACHER map's size, `nn.MaxPool2d(..., padding=0,
  ceil_mode=True)` on both maps, then `sim_dis_compute`;
- utils/utils.py L170-183 `L2`, `similarity`, `sim_dis_compute`: each position's channel vector
  divided by its L2 norm + 1e-8 (the norm DETACHED: a constant in the gradient), the [HW x HW]
  cosine matrix per sample, loss = sum (S_t - S_s)^2 / (HW)^2 / N, i.e. the mean over N x HW x HW;
- networks/kd_model.py L82 `feat_ind=-5`, L144-146 `G_loss + args.lambda_pa * temp1`: the feature is
  networks/pspnet_combine.py L187-189 `x_feat_after_psp`, the PSP module's output that the 1x1
  classifier `head` reads (the last feature map before the classifier); the teacher runs under
  `torch.no_grad` (kd_model.py L121-122);
- run_train_val.sh L22-23 `--lambda-pa 0.5 --pool-scale 0.5` (utils/train_options.py L58-59 defaults
  1.0 and 0.5; kdmtl takes the run script's, as its other methods take the official run scripts').

kdmtl: one term per (student, teacher) feature pair, `pairwise/<student feature>`, weighted
`loss.pairwise.weight` = lambda_pa, default the last trunk stage `trunk.stages.2` on both sides (channel
counts may differ: only the HW x HW similarities are compared). No learned part.

The paper's other terms: the pixel-wise term (per-pixel KL to the teacher's class distribution) is
kdmtl's `kd` term of segmentation tasks (`kd/seg`), so `loss=[kd,pairwise]` is pixel-wise + pair-wise
(with kd's own weight and temperature, not the official lambda_pi = 10 at T = 1). The holistic term is
NOT built: it is a GAN (a Wasserstein discriminator with gradient penalty, trained by its own SGD and
learning rate against the student, kd_model.py L71-75, L153-164), which does not fit a loss plug-in
that maps outputs to terms; it is a separate piece of work.

Deliberate differences:

- **Sizes bridged**: the official pools both maps with the teacher's kernel and needs equal sizes (same
  network stride). When the student and teacher maps differ, kdmtl first adaptive-average-pools the
  larger to (min H, min W) (`pooled_to_common_size`, as at/nst/sp do), then pools as the official.
  Equal sizes: exactly the official.
- **Kernel at least 1**: the official int(size * scale) is 0 for a side shorter than 1 / scale and
  MaxPool2d then fails; kdmtl uses max(1, int(size * scale)) (no pooling along that side).
- **Precision**: the official casts to float32 (`feat.float()`); kdmtl computes in `compute_dtype`
  (float64 stays float64; float16/bfloat16 go to float32, autocast off).
- **Teacher detached**: the official `feat_T.detach()` is a no-op (not assigned) but the teacher ran
  under no_grad; kdmtl detaches the teacher map explicitly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from kdmtl_cli.distill import KD_METHODS
from kdmtl_cli.distill.functional import check_map_pair, pooled_to_common_size
from kdmtl_cli.distill.logit import compute_dtype
from kdmtl_cli.distill.pairs import FeaturePairMethod, FeaturePairsConfig
from kdmtl_cli.errors import KdmtlError
from kdmtl_cli.ranges import above, at_least

NORM_EPS = 1e-8   # utils/utils.py L171 `L2(f_) = ||f_||_2 over channels + 1e-8`


@dataclass
class PairwiseConfig(FeaturePairsConfig):
    """Pair-wise distillation as irfanICMLL/structure_knowledge_distillation (conf/loss/pairwise.yaml);
    weight is lambda_pa."""
    weight: float = at_least(0, default=0.5)        # run_train_val.sh L22 `--lambda-pa 0.5`
    pool_scale: float = above(0, default=0.5, note="at most 1: the pooling window as a fraction of the map")
    student: List[str] = field(default_factory=lambda: ["trunk.stages.2"])
    teacher: List[str] = field(default_factory=lambda: ["trunk.stages.2"])


def check_pool_scale(pool_scale: float) -> float:
    pool_scale = float(pool_scale)
    if not 0 < pool_scale <= 1:
        raise ValueError(f"pool_scale must be in (0, 1] (got {pool_scale})")
    return pool_scale


def pool_kernel(size: Tuple[int, int], pool_scale: float) -> Tuple[int, int]:
    """The official (int(H * scale), int(W * scale)), each at least 1."""
    return tuple(max(1, int(side * pool_scale)) for side in size)


def position_similarity(feature: Tensor) -> Tensor:
    """[N, HW, HW] cosine similarities between the positions' channel vectors, the norm held constant
    in the gradient (official `L2(feat).detach()`)."""
    norm = torch.linalg.vector_norm(feature, dim=1, keepdim=True).detach() + NORM_EPS
    flat = (feature / norm).flatten(2)                  # [N, C, HW]
    return torch.bmm(flat.transpose(1, 2), flat)


def pairwise_loss(student_feature: Tensor, teacher_feature: Tensor, pool_scale: float = 0.5) -> Tensor:
    """Pair-wise distillation of one [N, C, H, W] pair: mean over N x HW x HW of (S_t - S_s)^2 after the
    official max-pool, in ``compute_dtype`` of the student."""
    pool_scale = check_pool_scale(pool_scale)
    check_map_pair("pairwise_loss", student_feature, teacher_feature)
    dtype = compute_dtype(student_feature)
    with torch.autocast(student_feature.device.type, enabled=False):
        s, t = pooled_to_common_size(student_feature.to(dtype), teacher_feature.detach().to(dtype))
        kernel = pool_kernel(tuple(t.shape[-2:]), pool_scale)
        s = F.max_pool2d(s, kernel, stride=kernel, padding=0, ceil_mode=True)
        t = F.max_pool2d(t, kernel, stride=kernel, padding=0, ceil_mode=True)
        return (position_similarity(t) - position_similarity(s)).pow(2).mean()


@KD_METHODS.register("pairwise", settings=PairwiseConfig)
class PairwiseDistillation(FeaturePairMethod):
    name = "pairwise"

    def __init__(self, cfg, tasks, teacher_tasks):
        super().__init__(cfg, tasks, teacher_tasks)
        if not float(cfg.pool_scale) <= 1:
            raise KdmtlError(f"loss.pairwise.pool_scale must be in (0, 1] (got {cfg.pool_scale}): "
                             "the max-pool window is that fraction of the teacher map")

    def setup(self, student_features, teacher_features):
        self.checked_terms(student_features, teacher_features)   # no learned part

    def __call__(self, student_out, teacher_out, batch, progress):
        s_feats, t_feats = student_out["features"], teacher_out["features"]
        scale = float(self.cfg.pool_scale)
        return {term.name: pairwise_loss(s_feats[term.student], t_feats[term.teacher], scale)
                for term in self.terms}
