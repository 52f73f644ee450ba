"""Multi-label classification: any subset of L labels per image; the target is [N, L] of 0/1
(float or uint8), and the spec's `num_classes` is L.

- head: pooled linear, one logit per label;
- loss: binary cross-entropy with logits, mean over labels and batch;
- metrics (all higher-is-better): `map` (average precision per label, macro mean; a label with
  no positive target in the split scores 0, as torchmetrics defines it), `f1` (macro over
  labels, a label predicted when its probability > 0.5) and `exact_match` (fraction of images
  whose whole label set is right);
- flip: the labels do not change;
- kd: per label, binary KL(sigmoid(t/T) || sigmoid(s/T)) * T^2, mean over labels and batch;
- shown as text: the labels present (logit > 0, i.e. probability > 0.5; for a 0/1 target:
  the ones), comma-separated, or "(none)".
"""

from __future__ import annotations

from typing import ClassVar

import torch.nn.functional as F
from torch import Tensor

from kdmtl_cli.tasks import TASK_KINDS, TaskKind
from kdmtl_cli.tasks.classification import class_name


def binary_kl_with_temperature(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Per element KL(b_t || b_s) of Bernoulli(sigmoid(t/T)) and Bernoulli(sigmoid(s/T)),
    mean over all elements, times T^2. Log-probabilities come from logsigmoid, so saturated
    logits stay finite."""
    t = temperature
    s, te = student_logits.float() / t, teacher_logits.float() / t
    log_ps, log_qs = F.logsigmoid(s), F.logsigmoid(-s)      # log p_s, log (1 - p_s)
    log_pt, log_qt = F.logsigmoid(te), F.logsigmoid(-te)
    kl = log_pt.exp() * (log_pt - log_ps) + log_qt.exp() * (log_qt - log_qs)
    return kl.mean() * t * t


@TASK_KINDS.register("multilabel")
class MultiLabel(TaskKind):
    name = "multilabel"
    dense = False
    needs_classes = True
    higher_is_better: ClassVar[dict[str, bool]] = {"map": True, "f1": True, "exact_match": True}

    def out_channels(self, spec):
        return spec.num_classes

    def loss(self, output, target):
        return F.binary_cross_entropy_with_logits(output.float(), target.float())

    def metrics(self, spec):
        # torchmetrics is imported here, at the first evaluation (see tasks.batch_mean)
        from torchmetrics.classification import (
            MultilabelAveragePrecision,
            MultilabelExactMatch,
            MultilabelF1Score,
        )

        n = spec.num_classes
        return {"map": MultilabelAveragePrecision(n, average="macro"),
                "f1": MultilabelF1Score(n, threshold=0.5, average="macro"),
                "exact_match": MultilabelExactMatch(n, threshold=0.5)}

    def prepare_for_metrics(self, output, target):
        # Probabilities, not logits: torchmetrics only applies a sigmoid when some value lies
        # outside [0, 1], so logits that happen to lie inside it would be misread.
        return output.float().sigmoid(), target.long()

    def distill(self, student_out, teacher_out, temperature, dense_norm):
        return binary_kl_with_temperature(student_out, teacher_out, temperature)

    def describe(self, output, spec):
        present = (output.detach().cpu().float() > 0).tolist()
        return [", ".join(class_name(spec, i) for i, on in enumerate(row) if on) or "(none)" for row in present]
