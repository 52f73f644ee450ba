"""Semantic segmentation: a class per pixel; decoder head at input resolution;
per-pixel cross-entropy; mIoU and pixel accuracy."""

from __future__ import annotations

import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

from kdmtl_cli.tasks import TASK_KINDS, TaskKind

IGNORE_INDEX = 255  # pixels with this label count in neither loss nor metrics


@TASK_KINDS.register("segmentation")
class Segmentation(TaskKind):
    name = "segmentation"
    dense = True
    needs_classes = True
    higher_is_better = {"miou": True, "pixel_acc": True}

    def out_channels(self, spec):
        return spec.num_classes

    def loss(self, output, target):
        return F.cross_entropy(output.float(), target, ignore_index=IGNORE_INDEX)

    def metrics(self, spec):
        n = spec.num_classes
        return {"miou": MulticlassJaccardIndex(n, average="macro", ignore_index=IGNORE_INDEX),
                "pixel_acc": MulticlassAccuracy(n, average="micro", ignore_index=IGNORE_INDEX)}

    def prepare_for_metrics(self, output, target):
        return output.argmax(1), target
