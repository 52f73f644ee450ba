"""Scalar regression: one number per image; the target is float [N].

- head: pooled linear with one output, in target units (`scaled_output`: train mean/std). The
  head returns [N, 1]; this kind squeezes it to [N] (`as_scalar`) in its loss, metrics,
  distillation and description, so heads stay shared with the other image-level kinds;
- loss: L1;
- metrics: `mae` and `rmse`, both lower-is-better;
- flip: the value does not change;
- kd: L1 or L2 (`loss.kd.dense`) to the teacher's prediction, mean over the batch;
- shown as text: the value per image.
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from kdmtl_cli.distill.logit import dense_regression_kd
from kdmtl_cli.tasks import TASK_KINDS, TaskKind


def as_scalar(output: Tensor) -> Tensor:
    """Head output [N, 1] (or already [N]) -> float [N]."""
    output = output.float()
    return output.squeeze(1) if output.dim() == 2 else output


@TASK_KINDS.register("regression")
class Regression(TaskKind):
    name = "regression"
    dense = False
    needs_classes = False
    scaled_output = True
    higher_is_better: ClassVar[dict[str, bool]] = {"mae": False, "rmse": False}

    def out_channels(self, spec):
        return 1

    def loss(self, output, target):
        return (as_scalar(output) - target.float()).abs().mean()

    def metrics(self, spec):
        # torchmetrics is imported here, at the first evaluation (see tasks.batch_mean)
        from torchmetrics.regression import MeanAbsoluteError, MeanSquaredError

        return {"mae": MeanAbsoluteError(), "rmse": MeanSquaredError(squared=False)}

    def prepare_for_metrics(self, output, target):
        return as_scalar(output), target.float()

    def distill(self, student_out, teacher_out, temperature, dense_norm):
        return dense_regression_kd(as_scalar(student_out), as_scalar(teacher_out), dense_norm)

    def describe(self, output, spec):
        return [f"{v:.3f}" for v in as_scalar(output.detach().cpu()).tolist()]
