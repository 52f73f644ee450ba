"""`dist`: DIST, "Knowledge Distillation from A Stronger Teacher" (T. Huang, S. You, F. Wang,
C. Qian, C. Xu, NeurIPS 2022), as the official `DIST` (hunto/DIST_KD: classification in its
submodule hunto/image_classification_sota lib/models/losses/dist_kd.py, commit d9662f7; the
segmentation copy in segmentation/losses/dist_kd.py, commit 2418f18). Instead of KL's exact
match it asks the student's probabilities to be *correlated* with the teacher's, which a much
stronger teacher's sharper outputs allow:

    y = softmax(z / tau) over the classes (dim 1)
    inter = 1 - mean over samples of pearson(y_s[n, :], y_t[n, :])    (relation between classes)
    intra = 1 - mean over classes of pearson(y_s[:, c], y_t[:, c])    (relation across the batch)
    dist/<task> = tau^2 * (beta * inter + gamma * intra)

with pearson(a, b) = cos(a - mean(a), b - mean(b)) and cos(a, b) = a.b / (|a| |b| + 1e-8)
(official `cosine_similarity(eps=1e-8)`). Defaults are the official class's and its `--kd dist`
recipe: beta = gamma = tau = 1 (kd_loss.py `DIST(beta=1, gamma=1, tau=1)`; its CIFAR-100 recipe
`kd: dist_t4` uses tau = 4), weight 2 (`kd_loss_weight: 2.` with `ori_loss_weight: 1.` in
configs/strategies/distill/resnet_dist.yaml, dist_b2.yaml and dist_cifar.yaml).

Applies to classification logits (N, C) and, per pixel, to segmentation logits (N, C, H, W):
as the official segmentation `DIST.forward`, every pixel of every image is one row (it reshapes
`y.transpose(1, 3).reshape(-1, C)`), so `inter` averages over all pixels of the batch and
`intra` correlates each class over all of them. The official segmentation loss has no
temperature (tau = 1) and sees logits only: ignore-label pixels are NOT left out, here neither.
Its weight there is `--lambda-kd` 1.0 (segmentation/train_kd.py default, which its
train_scripts/train_kd/*.sh keep): `loss.dist.weight={cls: 2.0, seg: 1.0}` follows both recipes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

from kdmtl_cli.distill import KD_METHODS, LabelTaskMethod
from kdmtl_cli.distill.logit import compute_dtype
from kdmtl_cli.ranges import above, at_least

COSINE_EPS = 1e-8   # official dist_kd.py cosine_similarity(a, b, eps=1e-8)


def pearson_rows(a: Tensor, b: Tensor) -> Tensor:
    """The Pearson correlation of each row of a with the same row of b (rows centred, then cosine)."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + COSINE_EPS)


def dist_loss(student_logits: Tensor, teacher_logits: Tensor, beta: float, gamma: float, tau: float) -> Tensor:
    """tau^2 * (beta * inter-class + gamma * intra-class relation loss), in ``compute_dtype``;
    logits (N, C) or (N, C, *spatial), one row per sample or pixel."""
    if student_logits.shape != teacher_logits.shape or student_logits.dim() < 2:
        raise ValueError(f"dist_loss: logits must be [N, C] or [N, C, H, W] of one shape "
                         f"(got {tuple(student_logits.shape)} and {tuple(teacher_logits.shape)})")
    dtype = compute_dtype(student_logits)
    classes = student_logits.shape[1]
    rows_s = student_logits.to(dtype).movedim(1, -1).reshape(-1, classes)
    rows_t = teacher_logits.detach().to(dtype).movedim(1, -1).reshape(-1, classes)
    y_s, y_t = (rows_s / tau).softmax(dim=1), (rows_t / tau).softmax(dim=1)
    inter = 1 - pearson_rows(y_s, y_t).mean()
    intra = 1 - pearson_rows(y_s.t(), y_t.t()).mean()
    return tau ** 2 * (beta * inter + gamma * intra)


@dataclass
class DISTConfig:
    """DIST (Huang et al., NeurIPS 2022) as hunto/DIST_KD (conf/loss/dist.yaml)."""
    weight: Any = at_least(0, default=2.0)        # a number, or {task: number}; official kd_loss_weight
    beta: float = at_least(0, default=1.0)        # inter-class relation (per sample, over classes)
    gamma: float = at_least(0, default=1.0)       # intra-class relation (per class, over the batch)
    tau: float = above(0, default=1.0)            # softmax temperature; the terms are scaled by tau^2


@KD_METHODS.register("dist", settings=DISTConfig)
class DIST(LabelTaskMethod):
    name = "dist"

    def __call__(self, student_out, teacher_out, batch, progress):
        cfg = self.cfg
        return {f"dist/{name}": dist_loss(student_out["outputs"][name], teacher_out["outputs"][name],
                                          float(cfg.beta), float(cfg.gamma), float(cfg.tau))
                for name in self.label_tasks}
