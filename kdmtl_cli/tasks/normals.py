"""Surface normals: a unit 3-vector per pixel; the target is float [N,3,H,W] (x, y, z
components in dim 1), an all-zero vector marks an invalid pixel.

- head: dense decoder with three channels; the prediction is normalised wherever it is used;
- loss: mean over valid pixels of 1 - cos(prediction, target);
- metrics on valid pixels, from the angle in degrees between the normalised prediction and the
  target (cosine clamped to [-1, 1] before acos): `mean_angle` and `median_angle` (lower is
  better), `within_11_25`, `within_22_5`, `within_30` (fraction of valid pixels with an angle
  below that many degrees, higher is better); by default over every valid pixel of the split,
  with `test.metric_reduction=batch_mean` each computed on one evaluation batch's valid
  pixels and then averaged over batches, as the official NYUv2 code;
- flip: the map is mirrored and its x component negated (x points right in the image);
- kd: mean over the pixels where the teacher predicts a non-zero vector of 1 - cos(student,
  teacher) (no target is at hand there);
- shown as an image: (n + 1) / 2 as RGB for the normalised vector, invalid pixels black.
"""

from __future__ import annotations

import functools
import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from kdmtl_cli.tasks import TASK_KINDS, LegendItem, TaskKind, batch_mean

_EPS = 1e-12


def valid_pixels(vectors: Tensor) -> Tensor:
    """[N,3,H,W] -> bool [N,H,W]: the vector is not all zero."""
    return vectors.ne(0).any(dim=1)


def cosine_map(a: Tensor, b: Tensor) -> Tensor:
    """Cosine between the vectors of two [N,3,H,W] maps, per pixel: [N,H,W] in [-1, 1].
    a.b / (|a| |b|) with |v| at least _EPS, as F.normalize does, but 5-7x faster forward and
    backward on CPU (F.normalize's backward over dim 1 of NCHW dominated the normals step)."""
    a, b = a.float(), b.float()
    inv_norms = (a * a).sum(1).clamp_min(_EPS ** 2).rsqrt() * (b * b).sum(1).clamp_min(_EPS ** 2).rsqrt()
    return ((a * b).sum(1) * inv_norms).clamp(-1.0, 1.0)


def mean_one_minus_cos(a: Tensor, b: Tensor, valid: Tensor) -> Tensor:
    cos = cosine_map(a, b)
    return ((1.0 - cos) * valid).sum() / valid.sum().clamp_min(1)


def _at_least_float32(x: Tensor) -> Tensor:
    return x if x.dtype == torch.float64 else x.float()


def angles_deg(pred: Tensor, target: Tensor) -> Tensor:
    """Angle in degrees between rows of two [M,3] tensors (both normalised first; float32, or
    float64 for float64 input)."""
    cos = (F.normalize(_at_least_float32(pred), dim=1, eps=_EPS)
           * F.normalize(_at_least_float32(target), dim=1, eps=_EPS)).sum(1)
    return torch.rad2deg(torch.acos(cos.clamp(-1.0, 1.0)))


def median(values: Tensor) -> Tensor:
    """The median of a 1-D tensor, the mean of the two middle values for an even count (as
    np.median)."""
    n = values.numel()
    ordered = values.sort().values
    return ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2


def batch_angle_stat(stat):
    """One batch's statistic of its valid pixels' angles: "mean", "median" or a threshold in
    degrees (fraction of angles below it); None for a batch without valid pixels."""
    def fn(pred: Tensor, target: Tensor):
        if pred.shape[0] == 0:
            return None
        angles = angles_deg(pred, target).double()
        if stat == "mean":
            return angles.mean()
        if stat == "median":
            return median(angles)
        return (angles < stat).double().mean()
    return fn


@functools.cache
def _metric_classes():
    """(AngleStat, MedianAngle), made when the first normals metric is (torchmetrics is imported
    at the first evaluation, not at start-up: see tasks.batch_mean)."""
    from torchmetrics import Metric
    from torchmetrics.utilities import dim_zero_cat

    class AngleStat(Metric):
        """Mean angle, or the fraction of angles below `threshold` degrees, over every pixel seen:
        two running sums. update(pred [M,3], target [M,3]) takes valid pixels only."""

        full_state_update = False
        higher_is_better = None

        def __init__(self, threshold=None, **kwargs):
            super().__init__(**kwargs)
            self.threshold = threshold
            self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

        def update(self, pred: Tensor, target: Tensor) -> None:
            angles = angles_deg(pred, target)
            values = angles if self.threshold is None else (angles < self.threshold).float()
            self.total += values.double().sum()
            self.count += angles.numel()

        def compute(self) -> Tensor:
            return (self.total / self.count.clamp_min(1)).float() if self.count > 0 \
                else torch.tensor(math.nan)

    class MedianAngle(Metric):
        """Median angle over every pixel seen (the mean of the two middle angles for an even
        count). It needs them all: a list state concatenated at compute (and across processes)."""

        full_state_update = False
        higher_is_better = False

        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.add_state("angles", default=[], dist_reduce_fx="cat")

        def update(self, pred: Tensor, target: Tensor) -> None:
            self.angles.append(angles_deg(pred, target))

        def compute(self) -> Tensor:
            angles = dim_zero_cat(self.angles) if len(self.angles) else torch.zeros(0)
            if angles.numel() == 0:
                return torch.tensor(math.nan)
            return median(angles)

    return AngleStat, MedianAngle


@TASK_KINDS.register("normals")
class Normals(TaskKind):
    name = "normals"
    dense = True
    needs_classes = False
    higher_is_better: ClassVar[dict[str, bool]] = {"mean_angle": False, "median_angle": False,
                        "within_11_25": True, "within_22_5": True, "within_30": True}

    def out_channels(self, spec):
        return 3

    def loss(self, output, target):
        return mean_one_minus_cos(output, target, valid_pixels(target))

    def metrics(self, spec):
        AngleStat, MedianAngle = _metric_classes()
        return {"mean_angle": AngleStat(), "median_angle": MedianAngle(),
                "within_11_25": AngleStat(11.25), "within_22_5": AngleStat(22.5), "within_30": AngleStat(30.0)}

    def batch_metrics(self, spec):
        return {"mean_angle": batch_mean(batch_angle_stat("mean")),
                "median_angle": batch_mean(batch_angle_stat("median")),
                "within_11_25": batch_mean(batch_angle_stat(11.25)), "within_22_5": batch_mean(batch_angle_stat(22.5)),
                "within_30": batch_mean(batch_angle_stat(30.0))}

    def prepare_for_metrics(self, output, target):
        """[N,3,H,W] maps -> (prediction, target) as [M,3] rows of the M valid pixels (float32 at
        least: half-precision outputs are upcast, float64 stays float64)."""
        valid = valid_pixels(target)
        return (_at_least_float32(output).permute(0, 2, 3, 1)[valid],
                _at_least_float32(target).permute(0, 2, 3, 1)[valid])

    def flip_target(self, target):
        flipped = target.flip(-1)
        x = flipped.narrow(-3, 0, 1)
        return torch.cat([-x, flipped.narrow(-3, 1, flipped.shape[-3] - 1)], dim=-3)

    def distill(self, student_out, teacher_out, temperature, dense_norm):
        return mean_one_minus_cos(student_out, teacher_out, valid_pixels(teacher_out))

    def legend(self, spec):
        return [LegendItem("normals: RGB = (unit normal + 1) / 2, x -> R, y -> G, z -> B; black: invalid")]

    def show(self, output, spec):
        vectors = output.detach().float()
        valid = valid_pixels(vectors).unsqueeze(1)
        return ((F.normalize(vectors, dim=1, eps=_EPS) + 1) / 2 * valid).clamp(0, 1)
