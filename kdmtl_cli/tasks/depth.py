"""Depth: a distance per pixel (0 marks missing depth).

- head: dense decoder with one channel, in target units (`scaled_output`: train mean/std);
- loss: L1 over valid pixels (target > 0);
- metrics on valid pixels: `abs_err` (mean absolute error) and `rel_err` (mean |p - t| / t),
  both lower-is-better; by default over every valid pixel of the split, with
  `test.metric_reduction=batch_mean` per evaluation batch (sum over the batch's valid
  pixels / their count), then averaged over batches, as the official NYUv2/Cityscapes code;
- flip: the map is mirrored;
- kd: L1 or L2 (`loss.kd.dense`) to the teacher's prediction, mean over pixels;
- shown as an image: `DEPTH_RAMP` colours, near = bright yellow .. far = dark blue, normalised
  per batch over the valid pixels (depth > 0); invalid pixels black.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from kdmtl_cli.tasks import TASK_KINDS, LegendItem, TaskKind, batch_mean

# Colour ramp from near (0) to far (1), RGB in [0, 1], evenly spaced stops, linear in between.
DEPTH_RAMP = ((1.0, 1.0, 0.6), (1.0, 0.65, 0.1), (0.85, 0.2, 0.3), (0.45, 0.1, 0.55), (0.1, 0.05, 0.35))


def batch_abs_err(pred, target):
    """One batch's mean |p - t| over its valid pixels (1-D tensors from prepare_for_metrics);
    None for a batch without valid pixels."""
    return (pred - target).abs().sum() / pred.numel() if pred.numel() else None


def batch_rel_err(pred, target):
    """One batch's mean |p - t| / t over its valid pixels; None for a batch without them."""
    return ((pred - target).abs() / target).sum() / pred.numel() if pred.numel() else None


def colour_ramp(t: torch.Tensor, ramp=DEPTH_RAMP) -> torch.Tensor:
    """Values [...] in [0, 1] -> RGB [..., 3] by linear interpolation between the ramp's stops."""
    stops = torch.tensor(ramp, dtype=torch.float32, device=t.device)
    pos = t.float().clamp(0, 1) * (len(ramp) - 1)
    low = pos.floor().long().clamp(max=len(ramp) - 2)
    frac = (pos - low).unsqueeze(-1)
    return stops[low] * (1 - frac) + stops[low + 1] * frac


@TASK_KINDS.register("depth")
class Depth(TaskKind):
    name = "depth"
    dense = True
    needs_classes = False
    scaled_output = True
    higher_is_better: ClassVar[dict[str, bool]] = {"abs_err": False, "rel_err": False}

    def out_channels(self, spec):
        return 1

    def loss(self, output, target):
        valid = target > 0
        diff = (output.float().squeeze(1) - target).abs()
        return (diff * valid).sum() / valid.sum().clamp_min(1)

    def metrics(self, spec):
        # torchmetrics is imported here, at the first evaluation (see tasks.batch_mean)
        from torchmetrics.regression import MeanAbsoluteError, MeanAbsolutePercentageError

        # MAPE is |p - t| / |t| averaged over pixels: the relative error of depth papers.
        return {"abs_err": MeanAbsoluteError(), "rel_err": MeanAbsolutePercentageError()}

    def batch_metrics(self, spec):
        return {"abs_err": batch_mean(batch_abs_err), "rel_err": batch_mean(batch_rel_err)}

    def prepare_for_metrics(self, output, target):
        valid = target > 0
        # float32 at least (half-precision outputs are upcast; float64 stays float64)
        output = output if output.dtype == torch.float64 else output.float()
        return output.squeeze(1)[valid], target[valid]

    def legend(self, spec):
        return [LegendItem("depth: near"), LegendItem("far", ramp=DEPTH_RAMP),
                LegendItem("(each column scaled to its own min..max; black: no depth)")]

    def show(self, output, spec):
        """A prediction [N,1,H,W] or a target [N,H,W] as colours; near is bright."""
        depth = output.detach().float()
        if depth.dim() == 4:
            depth = depth.squeeze(1)
        valid = depth > 0
        if bool(valid.any()):
            low, high = depth[valid].min(), depth[valid].max()
            t = (depth - low) / (high - low).clamp_min(1e-12)
        else:
            t = torch.zeros_like(depth)
        rgb = colour_ramp(t) * valid.unsqueeze(-1)
        return rgb.permute(0, 3, 1, 2).contiguous()
