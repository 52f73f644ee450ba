"""`dkd`: Decoupled KD (Zhao et al., CVPR 2022) as mdistiller's `DKD` (mdistiller/distillers/DKD.py)
on classification and, per pixel, segmentation tasks: (alpha * TCKD + beta * NCKD) * T^2, times
the warm-up factor. mdistiller: `min(kwargs["epoch"] / self.warmup, 1.0)` with its trainer's
epoch counted from 1 (mdistiller/engine/trainer.py), so the factor is 1/W in the first epoch
and constant within an epoch: `loss.dkd.warmup_schedule=epoch` (default). `linear` (kdmtl's own)
ramps continuously from 0 with the fractional epochs done.

`loss.dkd.standardize=true`: student and teacher logits are Z-scored over the classes first (per
sample; per pixel for segmentation), as "Logit Standardization in Knowledge Distillation" (Sun et al.,
CVPR 2024) does to DKD (`dkd_loss`, kdmtl_cli/distill/functional.py). DKD only has terms for class-logit
tasks (classification, segmentation); the setting changes nothing else."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kdmtl_cli.ranges import above, at_least

from kdmtl_cli.distill import KD_METHODS, LabelTaskMethod
from kdmtl_cli.distill.functional import dkd_loss
from kdmtl_cli.errors import KdmtlError

WARMUP_SCHEDULES = ("epoch", "linear")


def dkd_warmup(epochs_done: float, warmup_epochs: float, schedule: str = "epoch") -> float:
    """The DKD weight factor after `epochs_done` (fractional) epochs of training."""
    if warmup_epochs == 0:
        return 1.0
    if schedule == "epoch":          # mdistiller: the current epoch number, 1-based
        return min((int(epochs_done) + 1) / warmup_epochs, 1.0)
    return min(epochs_done / warmup_epochs, 1.0)


@dataclass
class DKDConfig:
    """Decoupled KD (Zhao et al., CVPR 2022), as mdistiller (conf/loss/dkd.yaml)."""
    weight: Any = at_least(0, default=1.0)        # a number, or {task: number}
    alpha: float = at_least(0, default=1.0)       # target-class term (TCKD)
    beta: float = at_least(0, default=8.0)        # non-target-class term (NCKD)
    temperature: float = above(0, default=4.0)
    # weight factor min(epoch / warmup_epochs, 1)
    warmup_epochs: float = at_least(0, default=20.0, note="0 = no warm-up")
    warmup_schedule: str = "epoch"        # epoch: mdistiller's (1-based epoch, per epoch) | linear: continuous from 0
    # Z-score the logits before DKD, as Sun et al. (CVPR 2024); off by default. Their recipe with it on
    # also sets T 2 and alpha, beta times 9 (conf/loss/dkd.yaml).
    standardize: bool = False


@KD_METHODS.register("dkd", settings=DKDConfig)
class DecoupledKD(LabelTaskMethod):
    name = "dkd"

    def __init__(self, cfg, tasks, teacher_tasks):
        super().__init__(cfg, tasks, teacher_tasks)
        if cfg.temperature <= 0 or cfg.warmup_epochs < 0:
            raise KdmtlError("loss.dkd.temperature must be > 0 and loss.dkd.warmup_epochs >= 0")
        if cfg.warmup_schedule not in WARMUP_SCHEDULES:
            raise KdmtlError(f"loss.dkd.warmup_schedule must be one of {', '.join(WARMUP_SCHEDULES)} "
                             f"(got '{cfg.warmup_schedule}')")

    def weight(self, term, progress):
        ramp = dkd_warmup(progress["epoch"], float(self.cfg.warmup_epochs), self.cfg.warmup_schedule)
        return self._weights[term] * ramp

    def __call__(self, student_out, teacher_out, batch, progress):
        return {f"dkd/{name}": dkd_loss(student_out["outputs"][name], teacher_out["outputs"][name],
                                        batch["targets"][self.tasks[name].target], float(self.cfg.alpha),
                                        float(self.cfg.beta), float(self.cfg.temperature),
                                        standardize=bool(self.cfg.standardize))
                for name in self.label_tasks}
