"""Classification: one label per image; pooled linear head; cross-entropy."""

from __future__ import annotations

import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score, MulticlassRecall

from kdmtl_cli.tasks import TASK_KINDS, TaskKind


@TASK_KINDS.register("classification")
class Classification(TaskKind):
    name = "classification"
    dense = False
    needs_classes = True
    higher_is_better = {"accuracy": True, "f1": True, "recall": True}

    def out_channels(self, spec):
        return spec.num_classes

    def loss(self, output, target):
        return F.cross_entropy(output.float(), target)

    def metrics(self, spec):
        n = spec.num_classes
        return {"accuracy": MulticlassAccuracy(n, average="micro"),
                "f1": MulticlassF1Score(n, average="macro"),
                "recall": MulticlassRecall(n, average="macro")}

    def prepare_for_metrics(self, output, target):
        return output.argmax(1), target
