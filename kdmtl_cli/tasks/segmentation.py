"""Semantic segmentation: a class per pixel (255 = ignored).

- head: dense decoder at input resolution, one logit map per class;
- loss: per-pixel cross-entropy over the pixels not ignored;
- metrics: `miou` (macro Jaccard) and `pixel_acc` (micro accuracy), higher-is-better, ignored
  pixels left out;
- flip: the label map is mirrored;
- kd: the classification KL at temperature T (times T^2) at every pixel, mean over pixels;
- shown as an image: each class in a fixed colour (`PALETTE`, repeating after its length),
  ignored pixels black.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from kdmtl_cli.distill.logit import kl_with_temperature
from kdmtl_cli.tasks import TASK_KINDS, LegendItem, TaskKind

IGNORE_INDEX = 255  # pixels with this label count in neither loss nor metrics

# Class c is drawn in PALETTE[c % len(PALETTE)] (RGB, 0..255); class 0 is usually background.
PALETTE = (
    (96, 96, 96), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128),
    (220, 190, 255), (170, 110, 40), (255, 250, 200), (128, 0, 0),
)


def colour_labels(labels: torch.Tensor) -> torch.Tensor:
    """Label maps [N,H,W] -> RGB [N,3,H,W] in [0, 1]; IGNORE_INDEX (and negatives) black."""
    labels = labels.long()
    palette = torch.tensor(PALETTE, dtype=torch.float32, device=labels.device) / 255.0
    valid = (labels >= 0) & (labels != IGNORE_INDEX)
    rgb = palette[labels.clamp_min(0) % len(PALETTE)] * valid.unsqueeze(-1)
    return rgb.permute(0, 3, 1, 2).contiguous()


@TASK_KINDS.register("segmentation")
class Segmentation(TaskKind):
    name = "segmentation"
    dense = True
    needs_classes = True
    softmax_labels = True
    pad_value = IGNORE_INDEX   # padded pixels are ignored by the loss and the metrics
    higher_is_better: ClassVar[dict[str, bool]] = {"miou": True, "pixel_acc": True}

    def out_channels(self, spec):
        return spec.num_classes

    def loss(self, output, target):
        return F.cross_entropy(output.float(), target, ignore_index=IGNORE_INDEX)

    def metrics(self, spec):
        # torchmetrics is imported here, at the first evaluation (see tasks.batch_mean)
        from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

        n = spec.num_classes
        return {"miou": MulticlassJaccardIndex(n, average="macro", ignore_index=IGNORE_INDEX),
                "pixel_acc": MulticlassAccuracy(n, average="micro", ignore_index=IGNORE_INDEX)}

    def prepare_for_metrics(self, output, target):
        return output.argmax(1), target

    def distill(self, student_out, teacher_out, temperature, dense_norm):
        return kl_with_temperature(student_out, teacher_out, temperature)

    def legend(self, spec):
        names = list(spec.class_names or [])
        items = [LegendItem(f"{c} {names[c]}" if c < len(names) else str(c), colour=PALETTE[c % len(PALETTE)])
                 for c in range(int(spec.num_classes or 0))]
        return [LegendItem("classes:"), *items, LegendItem(f"ignored ({IGNORE_INDEX})", colour=(0, 0, 0))]

    def show(self, output, spec):
        """Logits [N,C,H,W] (coloured by their argmax) or a label map [N,H,W]."""
        output = output.detach()
        labels = output.argmax(1) if output.dim() == 4 else output
        return colour_labels(labels)
