"""`bam`: teacher annealing (Clark et al., ACL 2019): cross-entropy to
p * one-hot + (1 - p) * softmax(teacher), p the fraction of training done, for
classification and segmentation tasks. The task loss stays; set loss.task_weight to 0
for those tasks to train on the annealed target alone, as in the paper."""

from __future__ import annotations

from kdmtl_cli.distill import KD_METHODS, Method
from kdmtl_cli.distill.functional import bam_loss
from kdmtl_cli.distill.weights import per_task_weights
from kdmtl_cli.errors import KdmtlError


@KD_METHODS.register("bam")
class TeacherAnnealing(Method):
    name = "bam"

    def __init__(self, cfg, tasks, teacher_tasks):
        super().__init__(cfg, tasks, teacher_tasks)
        self.label_tasks = [t for t in teacher_tasks if tasks[t].kind.name in ("classification", "segmentation")]
        if not self.label_tasks:
            raise KdmtlError("loss=bam needs a classification or segmentation task covered by the teacher")
        weights = per_task_weights(cfg.weight, self.label_tasks, "loss.bam.weight")
        self._weights = {f"bam/{task}": w for task, w in weights.items()}

    def __call__(self, student_out, teacher_out, batch, progress):
        p = min(max(progress["fraction"], 0.0), 1.0)
        return {f"bam/{name}": bam_loss(student_out["outputs"][name], teacher_out["outputs"][name],
                                        batch["targets"][self.tasks[name].target], p)
                for name in self.label_tasks}
