"""Pure PyTorch losses of the distillation methods beyond Hinton's logit KD.

Each function takes tensors and returns a scalar loss; weights that a method multiplies
its term by (DKD warm-up, AT's beta, ...) are left to the caller. Teacher tensors are used
as given: pass ``teacher.detach()`` (or outputs produced under ``torch.no_grad()``) so
that no gradient reaches the teacher. Losses are computed in the inputs' dtype, except that
float16/bfloat16 inputs (autocast) are upcast to float32 (``compute_dtype``); float64 inputs
stay float64, which is how tests/test_official_distill.py checks each loss against its
official implementation to 1e-9.

Methods and papers:

- DKD: B. Zhao, Q. Cui, R. Song, Y. Qiu, J. Liang, "Decoupled Knowledge Distillation",
  CVPR 2022 (reference: megvii-research/mdistiller, mdistiller/distillers/DKD.py ``dkd_loss``);
- AT: S. Zagoruyko, N. Komodakis, "Paying More Attention to Attention: Improving the
  Performance of Convolutional Neural Networks via Attention Transfer", ICLR 2017
  (reference: HobbitLong/RepDistiller, distiller_zoo/AT.py ``Attention``);
- FitNet: A. Romero, N. Ballas, S. E. Kahou, A. Chassang, C. Gatta, Y. Bengio,
  "FitNets: Hints for Thin Deep Nets", ICLR 2015 (reference: HobbitLong/RepDistiller,
  distiller_zoo/FitNet.py ``HintLoss`` and models/util.py ``ConvReg``);
- KD4MTL: W.-H. Li, H. Bilen, "Knowledge Distillation for Multi-task Learning",
  ECCV 2020 Workshops (reference: VICO-UoE/KD4MTL, model_segnet_kdmtl.py);
- BAM teacher annealing: K. Clark, M.-T. Luong, U. Khandelwal, C. D. Manning, Q. V. Le,
  "BAM! Born-Again Multi-Task Networks for Natural Language Understanding", ACL 2019
  (reference: google-research/google-research, bam/task_specific/classification/
  classification_tasks.py ``ClassificationTask.get_prediction_module``).

Targets and ignored pixels: class dimension is 1. For dense logits ``[N, C, H, W]`` the
target is ``[N, H, W]`` and pixels whose target equals ``ignore_index`` (255, the
project's segmentation ignore label) are left out of the mean. For ``[N, C]`` logits
(classification) nothing is ignored and every target must be a class index, like the
project's classification cross-entropy: a label of 255 is a real class when C > 255.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdmtl_cli.distill.logit import compute_dtype, kl_with_temperature, standardize_logits

IGNORE_INDEX = 255

# The paper's way to drop the target class from the non-target distribution: subtract a
# large constant from the (softened) target logit, so that its probability is exp(-1000) = 0
# in float32 while every entry stays finite (a -inf logit would give 0 * inf = nan in the KL).
_DKD_MASK = 1000.0

__all__ = [
    "dkd_loss",
    "attention_map",
    "at_loss",
    "hint_loss",
    "HintRegressor",
    "ConvReg",
    "REGRESSORS",
    "kd4mtl_loss",
    "TaskAdaptor",
    "bam_targets",
    "bam_loss",
]


# ----------------------------------------------------------------------------- helpers
def _check_finite(name: str, value: float) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number (got {value!r})") from None
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite (got {value})")
    return value


def _check_positive(name: str, value: float) -> float:
    value = _check_finite(name, value)
    if value <= 0:
        raise ValueError(f"{name} must be > 0 (got {value})")
    return value


def _check_non_negative(name: str, value: float) -> float:
    value = _check_finite(name, value)
    if value < 0:
        raise ValueError(f"{name} must be >= 0 (got {value})")
    return value


def _check_progress(progress: float) -> float:
    progress = _check_finite("progress", progress)
    if not 0.0 <= progress <= 1.0:
        raise ValueError(f"progress must be in [0, 1] (got {progress})")
    return progress


def _check_same_shape(what: str, a: Tensor, b: Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{what}: shapes must match (got {tuple(a.shape)} and {tuple(b.shape)})")


def _check_logits_and_target(what: str, logits: Tensor, target: Tensor, ignore_index: Optional[int]) -> None:
    if logits.dim() < 2:
        raise ValueError(f"{what}: logits must be [N, C] or [N, C, H, W] (got {tuple(logits.shape)})")
    expected = logits.shape[:1] + logits.shape[2:]
    if target.shape != expected:
        raise ValueError(f"{what}: target must have shape {tuple(expected)} for logits "
                         f"{tuple(logits.shape)} (got {tuple(target.shape)})")
    if target.dtype.is_floating_point or target.dtype == torch.bool or target.is_complex():
        raise ValueError(f"{what}: target must hold integer class indices (got dtype {target.dtype})")
    num_classes = logits.shape[1]
    values = target
    if logits.dim() > 2 and ignore_index is not None:
        values = target[target != ignore_index]
    if values.numel() and bool(((values < 0) | (values >= num_classes)).any()):
        allowed = f"[0, {num_classes})"
        if logits.dim() > 2 and ignore_index is not None:
            allowed += f" or ignore_index={ignore_index}"
        raise ValueError(f"{what}: target values must be class indices in {allowed} "
                         f"(got min {int(values.min())}, max {int(values.max())})")


def _valid_mask(logits: Tensor, target: Tensor, ignore_index: Optional[int]) -> Tensor:
    """Boolean mask shaped like ``target``: False at ignored pixels (dense inputs only)."""
    if logits.dim() > 2 and ignore_index is not None:
        return target != ignore_index
    return torch.ones_like(target, dtype=torch.bool)


def _rows(x: Tensor) -> Tensor:
    """[N, C, *spatial] -> [N * prod(spatial), C]: one row per sample/pixel, classes last."""
    return x.movedim(1, -1).reshape(-1, x.shape[1])


def _zero_loss(*tensors: Tensor) -> Tensor:
    # A zero that stays connected to the inputs, so that backward() works when every pixel
    # of the batch is ignored (the gradient is then zero, never nan from 0 / 0).
    return sum(t.to(compute_dtype(t)).sum() * 0.0 for t in tensors)


def _resize(x: Tensor, size: Sequence[int]) -> Tensor:
    size = tuple(int(s) for s in size)
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def _check_size(what: str, size) -> Tuple[int, int]:
    try:
        size = tuple(int(s) for s in size)
    except TypeError:
        raise ValueError(f"{what}: size must be a (height, width) pair (got {size!r})") from None
    if len(size) != 2 or min(size) <= 0:
        raise ValueError(f"{what}: size must be a (height, width) pair of positive ints (got {size})")
    return size


def _check_channels(what: str, student_channels: int, teacher_channels: int) -> None:
    for name, value in (("student_channels", student_channels), ("teacher_channels", teacher_channels)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{what}: {name} must be a positive int (got {value!r})")


# ------------------------------------------------------------------------------- DKD
def dkd_loss(student_logits: Tensor, teacher_logits: Tensor, target: Tensor, alpha: float,
             beta: float, temperature: float, ignore_index: Optional[int] = IGNORE_INDEX,
             standardize: bool = False) -> Tensor:
    """Decoupled Knowledge Distillation (Zhao et al., CVPR 2022).

    With ``p = softmax(z / T)`` over the classes (dim 1) and ``g`` the target class:

    - binary distributions ``b = (p_g, 1 - p_g)``; ``TCKD = KL(b_teacher || b_student)``;
    - non-target distribution ``p̂_c = p_c / (1 - p_g)`` for ``c != g``, computed as in the
      paper as ``softmax(z / T - 1000 * onehot(g))``; ``NCKD = KL(p̂_teacher || p̂_student)``;
    - ``loss = (alpha * TCKD + beta * NCKD) * T^2``, averaged over samples ([N, C]) or over
      the pixels of the batch whose target is not ``ignore_index`` ([N, C, H, W] with
      target [N, H, W]).

    ``standardize``: ``z`` is first Z-scored over the classes, student and teacher alike
    (``standardize_logits``: ``(z - mean) / (1e-7 + std)``, unbiased std), as Sun et al., "Logit
    Standardization in Knowledge Distillation" (CVPR 2024), whose DKD applies it at the top of
    ``dkd_loss(..., logit_stand)`` (sunshangquan/logit-standardization-KD mdistiller/distillers/DKD.py).

    Returns 0 (still connected to the graph) when every pixel is ignored. DKD's linear
    warm-up is not applied here: the caller multiplies by ``min(epoch / warmup, 1)``.
    """
    temperature = _check_positive("temperature", temperature)
    alpha = _check_non_negative("alpha", alpha)
    beta = _check_non_negative("beta", beta)
    _check_same_shape("dkd_loss: student_logits and teacher_logits", student_logits, teacher_logits)
    _check_logits_and_target("dkd_loss", student_logits, target, ignore_index)
    num_classes = student_logits.shape[1]
    if num_classes < 2:
        raise ValueError(f"dkd_loss: needs at least 2 classes (got {num_classes})")

    valid = _valid_mask(student_logits, target, ignore_index).reshape(-1)
    if not bool(valid.any()):
        return _zero_loss(student_logits, teacher_logits)
    # One row per sample/valid pixel, so that both KL terms average over valid rows only.
    dtype = compute_dtype(student_logits)
    s = _rows(student_logits.to(dtype))[valid]
    t = _rows(teacher_logits.to(dtype))[valid]
    if standardize:   # per row, i.e. per sample or pixel, over the classes
        s, t = standardize_logits(s), standardize_logits(t)
    g = target.reshape(-1)[valid].long()
    gt_mask = F.one_hot(g, num_classes).bool()
    T = temperature

    def binary_log_probs(z: Tensor) -> Tensor:
        # log(p_g) and log(1 - p_g) from log-softmax + logsumexp over the non-target classes:
        # log(1 - p_g) computed as log(1 - exp(.)) would be -inf when p_g rounds to 1.
        log_p = F.log_softmax(z / T, dim=1)
        log_p_target = log_p.gather(1, g.unsqueeze(1)).squeeze(1)
        log_p_other = torch.logsumexp(log_p.masked_fill(gt_mask, float("-inf")), dim=1)
        return torch.stack([log_p_target, log_p_other], dim=1)

    # The binary rows are already normalised log-probabilities, so log_softmax (inside
    # kl_with_temperature at T = 1) leaves them unchanged: this is KL(b_t || b_s), mean over rows.
    tckd = kl_with_temperature(binary_log_probs(s), binary_log_probs(t), 1.0) * (T * T)
    # kl_with_temperature divides by T, so subtracting 1000 * T here subtracts exactly 1000 from
    # the softened target logit, as the paper does; it already multiplies by T^2.
    shift = gt_mask.to(dtype) * (_DKD_MASK * T)
    nckd = kl_with_temperature(s - shift, t - shift, T)
    return alpha * tckd + beta * nckd


# -------------------------------------------------------------------------------- AT
def attention_map(feature: Tensor, p: float = 2.0) -> Tensor:
    """Spatial attention map of Attention Transfer, as RepDistiller's ``Attention.at``
    (distiller_zoo/AT.py): ``F.normalize(f.pow(p).mean(1).view(N, -1))``, i.e. ``Q = mean_c F_c^p``
    flattened to ``[N, H*W]`` and L2-normalised per sample (``Q / max(||Q||_2, 1e-12)``).
    ``F.pow(p)`` as in the code (the paper writes ``|F|^p``; the same for even p)."""
    p = _check_positive("p", p)
    if feature.dim() < 3:
        raise ValueError(f"attention_map: feature must be [N, C, H, W] (got {tuple(feature.shape)})")
    q = feature.to(compute_dtype(feature)).pow(p).mean(dim=1)
    return F.normalize(q.reshape(feature.shape[0], -1), p=2.0, dim=1)


def check_map_pair(what: str, student_feature: Tensor, teacher_feature: Tensor) -> None:
    """Both features [N, C, H, W] with the same batch size (channels and sizes may differ)."""
    if student_feature.dim() != 4 or teacher_feature.dim() != 4:
        raise ValueError(f"{what}: features must be [N, C, H, W] (got {tuple(student_feature.shape)} "
                         f"and {tuple(teacher_feature.shape)})")
    if student_feature.shape[0] != teacher_feature.shape[0]:
        raise ValueError(f"{what}: batch sizes must match (got {student_feature.shape[0]} "
                         f"and {teacher_feature.shape[0]})")


def pooled_to_common_size(student: Tensor, teacher: Tensor) -> Tuple[Tensor, Tensor]:
    """Both maps at (min H, min W): the larger side adaptive-average-pooled (RepDistiller pools
    to a square by height; the same for square maps)."""
    size = (min(student.shape[-2], teacher.shape[-2]), min(student.shape[-1], teacher.shape[-1]))
    if tuple(student.shape[-2:]) != size:
        student = F.adaptive_avg_pool2d(student, size)
    if tuple(teacher.shape[-2:]) != size:
        teacher = F.adaptive_avg_pool2d(teacher, size)
    return student, teacher


def at_loss(student_feature: Tensor, teacher_feature: Tensor, p: float = 2.0) -> Tensor:
    """Attention-transfer loss of one feature pair, as RepDistiller's ``Attention.at_loss``.

    ``loss = mean_{n, j} (Q_s[n, j] - Q_t[n, j])^2`` with ``Q = attention_map(F, p)`` (mean over
    batch AND positions; hence the caller's weight beta = 1000). Channel counts may differ.
    When the spatial sizes differ, the LARGER map is adaptive-average-pooled to the smaller
    one, student or teacher, as RepDistiller does. RepDistiller compares heights only and
    pools to a square (t_H, t_H) / (s_H, s_H); here both sides are pooled to
    (min(H_s, H_t), min(W_s, W_t)), which is the same for square maps and also works for
    non-square ones.
    """
    p = _check_positive("p", p)
    check_map_pair("at_loss", student_feature, teacher_feature)
    dtype = compute_dtype(student_feature)
    s, t = pooled_to_common_size(student_feature.to(dtype), teacher_feature.to(dtype))
    return (attention_map(s, p) - attention_map(t, p)).pow(2).mean()


# ---------------------------------------------------------------------------- FitNet
def hint_loss(regressed_student_feature: Tensor, teacher_feature: Tensor) -> Tensor:
    """FitNet hint loss, RepDistiller's ``HintLoss`` (``nn.MSELoss()``): ``mean((r(F_s) - F_t)^2)``
    over all elements. The student feature must already be regressed to the teacher's shape
    (``HintRegressor``)."""
    _check_same_shape("hint_loss: regressed student feature and teacher feature",
                      regressed_student_feature, teacher_feature)
    dtype = compute_dtype(regressed_student_feature)
    return F.mse_loss(regressed_student_feature.to(dtype), teacher_feature.to(dtype), reduction="mean")


def _shape4(what: str, shape) -> Tuple[int, int, int, int]:
    shape = tuple(int(v) for v in shape)
    if len(shape) != 4 or min(shape[1:]) <= 0:
        raise ValueError(f"{what}: shapes must be [N, C, H, W] (got {shape})")
    return shape


class ConvReg(nn.Module):
    """FitNet's regressor exactly as RepDistiller's ``ConvReg`` (models/util.py; the same class
    is mdistiller's distillers/_common.py ``ConvReg``), from the student and teacher feature
    shapes [N, C, H, W]:

    - ``s_H == 2 * t_H``: Conv2d(s_C, t_C, 3, stride 2, padding 1);
    - ``s_H * 2 == t_H``: ConvTranspose2d(s_C, t_C, 4, stride 2, padding 1);
    - ``s_H >= t_H``: Conv2d(s_C, t_C, kernel (1 + s_H - t_H, 1 + s_W - t_W));
    - otherwise: not supported (RepDistiller raises).

    Every conv has a bias (PyTorch's default); then BatchNorm2d(t_C) and, with ``use_relu``
    (RepDistiller's default, used by its FitNet), ReLU. PyTorch's default initialisation.
    """

    def __init__(self, student_shape, teacher_shape, use_relu: bool = True):
        super().__init__()
        _, s_C, s_H, s_W = _shape4("ConvReg", student_shape)
        _, t_C, t_H, t_W = _shape4("ConvReg", teacher_shape)
        self.use_relu = bool(use_relu)
        if s_H == 2 * t_H:
            self.conv = nn.Conv2d(s_C, t_C, kernel_size=3, stride=2, padding=1)
        elif s_H * 2 == t_H:
            self.conv = nn.ConvTranspose2d(s_C, t_C, kernel_size=4, stride=2, padding=1)
        elif s_H >= t_H and s_W >= t_W:
            self.conv = nn.Conv2d(s_C, t_C, kernel_size=(1 + s_H - t_H, 1 + s_W - t_W))
        else:
            raise ValueError(f"ConvReg: student size {s_H}x{s_W} cannot be regressed to teacher size "
                             f"{t_H}x{t_W} (RepDistiller supports s_H = 2 t_H, 2 s_H = t_H or s >= t)")
        self.bn = nn.BatchNorm2d(t_C)
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        x = self.bn(self.conv(x))
        return self.relu(x) if self.use_relu else x


class Conv1x1Regressor(nn.Module):
    """`loss.fitnet.regressor=conv1x1` (not RepDistiller's): 1x1 conv (no bias) + BatchNorm from
    student to teacher channels, then a bilinear resize (align_corners=False) to the teacher's
    size. Works for any size ratio, where ``ConvReg`` does not."""

    def __init__(self, student_shape, teacher_shape):
        super().__init__()
        _, s_C, _, _ = _shape4("Conv1x1Regressor", student_shape)
        _, t_C, t_H, t_W = _shape4("Conv1x1Regressor", teacher_shape)
        self.size = (t_H, t_W)
        self.conv = nn.Conv2d(s_C, t_C, kernel_size=1, bias=False)
        self.bn = nn.BatchNorm2d(t_C)

    def forward(self, x: Tensor) -> Tensor:
        return _resize(self.bn(self.conv(x)), self.size)


REGRESSORS = ("convreg", "conv1x1")


def HintRegressor(student_shape, teacher_shape, regressor: str = "convreg") -> nn.Module:
    """The FitNet regressor for these feature shapes: ``convreg`` (default, RepDistiller's
    ``ConvReg``; only its size cases) or ``conv1x1`` (any sizes; kdmtl's own)."""
    if regressor == "convreg":
        return ConvReg(student_shape, teacher_shape, use_relu=True)
    if regressor == "conv1x1":
        return Conv1x1Regressor(student_shape, teacher_shape)
    raise ValueError(f"unknown FitNet regressor '{regressor}'; choose one of {', '.join(REGRESSORS)}")


# ---------------------------------------------------------------------------- KD4MTL
KD4MTL_EPS = 1e-6   # VICO-UoE/KD4MTL model_segnet_kdmtl.py: x / (x.pow(2).sum(1) + 1e-6).sqrt()


def kd4mtl_normalize(feature: Tensor) -> Tensor:
    """KD4MTL's per-pixel channel normalisation: ``x / sqrt(sum_c x_c^2 + 1e-6)``."""
    return feature / (feature.pow(2).sum(1, keepdim=True) + KD4MTL_EPS).sqrt()


def kd4mtl_loss(adapted_student_feature: Tensor, teacher_feature: Tensor) -> Tensor:
    """Feature loss of Li & Bilen, "Knowledge Distillation for Multi-task Learning" (ECCV-W 2020),
    as VICO-UoE/KD4MTL model_segnet_kdmtl.py (``dist_0``): both features normalised over channels
    at every pixel (``kd4mtl_normalize``), then ``(s - t).pow(2).sum(1).mean()`` (squared L2 over
    channels, mean over batch and pixels). One feature pair; a task's term sums its pairs."""
    _check_same_shape("kd4mtl_loss: adapted student feature and teacher feature",
                      adapted_student_feature, teacher_feature)
    if adapted_student_feature.dim() < 2:
        raise ValueError(f"kd4mtl_loss: features must be [N, C, H, W] (got {tuple(teacher_feature.shape)})")
    dtype = compute_dtype(adapted_student_feature)
    s = kd4mtl_normalize(adapted_student_feature.to(dtype))
    t = kd4mtl_normalize(teacher_feature.to(dtype))
    return (s - t).pow(2).sum(dim=1).mean()


class TaskAdaptor(nn.Module):
    """KD4MTL task-specific adaptor, as the official ``transformer`` (model_segnet_kdmtl.py):
    a 1x1 conv without bias from student to teacher channels, ``nn.init.xavier_normal_``
    weights. ``forward(x, size)`` resizes bilinearly to ``size`` if needed (kdmtl's extension
    for pairs of different sizes; the official pairs always have equal sizes)."""

    def __init__(self, student_channels: int, teacher_channels: int):
        super().__init__()
        _check_channels("TaskAdaptor", student_channels, teacher_channels)
        self.conv = nn.Conv2d(student_channels, teacher_channels, kernel_size=1, bias=False)
        nn.init.xavier_normal_(self.conv.weight)

    def forward(self, x: Tensor, size) -> Tensor:
        size = _check_size("TaskAdaptor", size)
        return _resize(self.conv(x), size)


# ------------------------------------------------------------------------------- BAM
def bam_targets(teacher_logits: Tensor, target: Tensor, progress: float,
                ignore_index: Optional[int] = IGNORE_INDEX) -> Tensor:
    """Teacher-annealed soft targets of BAM! (Clark et al., ACL 2019), as the official
    ``ClassificationTask.get_prediction_module`` with ``teacher_annealing=True``:

    ``y = progress * onehot(target) + (1 - progress) * softmax(teacher_logits / 1.0)`` over dim 1,
    with ``progress`` in [0, 1] (official: ``percent_done = global_step / num_train_steps``):
    pure teacher at the start, pure ground truth at the end. Same shape as ``teacher_logits``;
    at ignored pixels (dense inputs, target == ignore_index) every class gets 0.
    """
    progress = _check_progress(progress)
    _check_logits_and_target("bam_targets", teacher_logits, target, ignore_index)
    num_classes = teacher_logits.shape[1]
    dtype = compute_dtype(teacher_logits)
    valid = _valid_mask(teacher_logits, target, ignore_index)
    # Ignored pixels get a placeholder class for one_hot, then their whole row is zeroed.
    safe_target = torch.where(valid, target, torch.zeros_like(target)).long()
    one_hot = F.one_hot(safe_target, num_classes).movedim(-1, 1).to(dtype)
    soft = progress * one_hot + (1.0 - progress) * F.softmax(teacher_logits.to(dtype), dim=1)
    return soft * valid.unsqueeze(1).to(dtype)


def bam_loss(student_logits: Tensor, teacher_logits: Tensor, target: Tensor, progress: float,
             ignore_index: Optional[int] = IGNORE_INDEX, reduction: str = "mean") -> Tensor:
    """Cross-entropy with the teacher-annealed targets of ``bam_targets`` (official:
    ``-tf.reduce_sum(labels * log_probs, axis=-1)`` per example), MEAN over samples ([N, C]) or
    over the non-ignored pixels of the batch ([N, C, H, W]); ``reduction="sum"`` SUMS over them,
    as the official code does over the batch (kdmtl's task losses are means; the two differ by the
    batch size only). 0 (still in the graph) if all are ignored. At progress = 1 with the mean this
    is the ordinary cross-entropy.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"bam_loss: reduction must be 'mean' or 'sum' (got {reduction!r})")
    _check_same_shape("bam_loss: student_logits and teacher_logits", student_logits, teacher_logits)
    soft = bam_targets(teacher_logits, target, progress, ignore_index)
    valid = _valid_mask(student_logits, target, ignore_index)
    count = int(valid.sum())
    if count == 0:
        return _zero_loss(student_logits, teacher_logits)
    per_row = -(soft * F.log_softmax(student_logits.to(soft.dtype), dim=1)).sum(dim=1)
    # Ignored rows have all-zero targets, so they add 0 to the sum; divide by valid rows only.
    return per_row.sum() / count if reduction == "mean" else per_row.sum()
