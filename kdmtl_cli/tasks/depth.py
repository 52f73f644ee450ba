"""Depth: a distance per pixel; decoder head with one channel; L1 over valid pixels
(target > 0; 0 marks missing depth); absolute and relative error."""

from __future__ import annotations

from torchmetrics.regression import MeanAbsoluteError, MeanAbsolutePercentageError

from kdmtl_cli.tasks import TASK_KINDS, TaskKind


@TASK_KINDS.register("depth")
class Depth(TaskKind):
    name = "depth"
    dense = True
    needs_classes = False
    higher_is_better = {"abs_err": False, "rel_err": False}

    def out_channels(self, spec):
        return 1

    def loss(self, output, target):
        valid = target > 0
        diff = (output.float().squeeze(1) - target).abs()
        return (diff * valid).sum() / valid.sum().clamp_min(1)

    def metrics(self, spec):
        # MAPE is |p - t| / |t| averaged over pixels: the relative error of depth papers.
        return {"abs_err": MeanAbsoluteError(), "rel_err": MeanAbsolutePercentageError()}

    def prepare_for_metrics(self, output, target):
        valid = target > 0
        return output.float().squeeze(1)[valid], target[valid]
