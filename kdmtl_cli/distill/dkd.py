"""`dkd`: Decoupled KD (Zhao et al., CVPR 2022) on classification and, per pixel, segmentation
tasks: (alpha * TCKD + beta * NCKD) * T^2, its weight ramped linearly over `warmup_epochs`."""

from __future__ import annotations

from kdmtl_cli.distill import KD_METHODS, Method
from kdmtl_cli.distill.functional import dkd_loss
from kdmtl_cli.distill.weights import per_task_weights
from kdmtl_cli.errors import KdmtlError

LABEL_KINDS = ("classification", "segmentation")


@KD_METHODS.register("dkd")
class DecoupledKD(Method):
    name = "dkd"

    def __init__(self, cfg, tasks, teacher_tasks):
        super().__init__(cfg, tasks, teacher_tasks)
        self.label_tasks = [t for t in teacher_tasks if tasks[t].kind.name in LABEL_KINDS]
        if not self.label_tasks:
            raise KdmtlError("loss=dkd needs a classification or segmentation task covered by the teacher")
        if cfg.temperature <= 0 or cfg.warmup_epochs < 0:
            raise KdmtlError("loss.dkd.temperature must be > 0 and loss.dkd.warmup_epochs >= 0")
        weights = per_task_weights(cfg.weight, self.label_tasks, "loss.dkd.weight")
        self._weights = {f"dkd/{task}": w for task, w in weights.items()}

    def weight(self, term, progress):
        warmup = float(self.cfg.warmup_epochs)
        ramp = 1.0 if warmup == 0 else min(progress["epoch"] / warmup, 1.0)
        return self._weights[term] * ramp

    def __call__(self, student_out, teacher_out, batch, progress):
        return {f"dkd/{name}": dkd_loss(student_out["outputs"][name], teacher_out["outputs"][name],
                                        batch["targets"][self.tasks[name].target], float(self.cfg.alpha),
                                        float(self.cfg.beta), float(self.cfg.temperature))
                for name in self.label_tasks}
