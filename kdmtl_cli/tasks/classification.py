"""Classification: one label per image.

- head: pooled linear, one logit per class (`num_classes` outputs);
- loss: cross-entropy;
- metrics: `accuracy` (micro), `f1` and `recall` (macro over classes), all higher-is-better;
- flip: the label does not change;
- kd: KL(softmax(t/T) || softmax(s/T)) * T^2, mean over the batch;
- shown as text: the class name per image, with its probability for logits.
"""

from __future__ import annotations

from typing import ClassVar

import torch.nn.functional as F

from kdmtl_cli.distill.logit import kl_with_temperature
from kdmtl_cli.tasks import TASK_KINDS, TaskKind


def class_name(spec, index: int) -> str:
    names = spec.class_names
    return names[index] if names and 0 <= index < len(names) else f"class {index}"


@TASK_KINDS.register("classification")
class Classification(TaskKind):
    name = "classification"
    dense = False
    needs_classes = True
    softmax_labels = True
    higher_is_better: ClassVar[dict[str, bool]] = {"accuracy": True, "f1": True, "recall": True}

    def out_channels(self, spec):
        return spec.num_classes

    def loss(self, output, target):
        return F.cross_entropy(output.float(), target)

    def metrics(self, spec):
        # torchmetrics is imported here, at the first evaluation (see tasks.batch_mean)
        from torchmetrics.classification import (
            MulticlassAccuracy,
            MulticlassF1Score,
            MulticlassRecall,
        )

        n = spec.num_classes
        return {"accuracy": MulticlassAccuracy(n, average="micro"),
                "f1": MulticlassF1Score(n, average="macro"),
                "recall": MulticlassRecall(n, average="macro")}

    def prepare_for_metrics(self, output, target):
        return output.argmax(1), target

    def distill(self, student_out, teacher_out, temperature, dense_norm):
        return kl_with_temperature(student_out, teacher_out, temperature)

    def describe(self, output, spec):
        """Logits [N, C] -> "name (p=0.87)"; labels [N] -> "name"."""
        output = output.detach().cpu()
        if output.dim() == 1:
            return [class_name(spec, int(label)) for label in output.tolist()]
        probs = output.float().softmax(1)
        best, index = probs.max(1)
        return [f"{class_name(spec, i)} (p={p:.2f})" for p, i in zip(best.tolist(), index.tolist())]
