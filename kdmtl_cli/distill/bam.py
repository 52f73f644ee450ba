"""`bam`: teacher annealing (Clark et al., ACL 2019): cross-entropy to
p * one-hot + (1 - p) * softmax(teacher), p the fraction of training done, for
classification and segmentation tasks. The task loss stays; set loss.task_weight to 0
for those tasks to train on the annealed target alone, as in the paper."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kdmtl_cli.ranges import at_least

from kdmtl_cli.distill import KD_METHODS, LabelTaskMethod
from kdmtl_cli.distill.functional import bam_loss
from kdmtl_cli.errors import KdmtlError


@dataclass
class BAMConfig:
    """Teacher annealing (Clark et al., ACL 2019): target = p*one-hot + (1-p)*teacher softmax."""
    weight: Any = at_least(0, default=1.0)        # a number, or {task: number}
    reduction: str = "mean"               # mean over samples / pixels | sum (the official code sums over the batch)


@KD_METHODS.register("bam", settings=BAMConfig)
class TeacherAnnealing(LabelTaskMethod):
    name = "bam"

    def __init__(self, cfg, tasks, teacher_tasks):
        super().__init__(cfg, tasks, teacher_tasks)
        self.reduction = str(getattr(cfg, "reduction", "mean"))
        if self.reduction not in ("mean", "sum"):
            raise KdmtlError(f"loss.bam.reduction must be mean or sum (got {self.reduction!r}); "
                             f"sum is the official code's reduction over the batch")

    def __call__(self, student_out, teacher_out, batch, progress):
        p = min(max(progress["fraction"], 0.0), 1.0)
        return {f"bam/{name}": bam_loss(student_out["outputs"][name], teacher_out["outputs"][name],
                                        batch["targets"][self.tasks[name].target], p, reduction=self.reduction)
                for name in self.label_tasks}
