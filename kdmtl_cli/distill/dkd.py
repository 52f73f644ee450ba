"""`dkd`: Decoupled KD (Zhao et al., CVPR 2022) on classification and, per pixel, segmentation
tasks: (alpha * TCKD + beta * NCKD) * T^2, its weight ramped linearly over `warmup_epochs`."""

from __future__ import annotations

from kdmtl_cli.distill import KD_METHODS, LabelTaskMethod
from kdmtl_cli.distill.functional import dkd_loss
from kdmtl_cli.errors import KdmtlError


@KD_METHODS.register("dkd")
class DecoupledKD(LabelTaskMethod):
    name = "dkd"

    def __init__(self, cfg, tasks, teacher_tasks):
        super().__init__(cfg, tasks, teacher_tasks)
        if cfg.temperature <= 0 or cfg.warmup_epochs < 0:
            raise KdmtlError("loss.dkd.temperature must be > 0 and loss.dkd.warmup_epochs >= 0")

    def weight(self, term, progress):
        warmup = float(self.cfg.warmup_epochs)
        ramp = 1.0 if warmup == 0 else min(progress["epoch"] / warmup, 1.0)
        return self._weights[term] * ramp

    def __call__(self, student_out, teacher_out, batch, progress):
        return {f"dkd/{name}": dkd_loss(student_out["outputs"][name], teacher_out["outputs"][name],
                                        batch["targets"][self.tasks[name].target], float(self.cfg.alpha),
                                        float(self.cfg.beta), float(self.cfg.temperature))
                for name in self.label_tasks}
