"""`kd4mtl`: Li & Bilen, "Knowledge Distillation for Multi-task Learning" (ECCV-W 2020).

One 1x1 adaptor (no bias) per task on the student's shared feature; the adapted student
feature and the task's teacher feature are L2-normalised over channels at every pixel; the
term is the squared L2 distance summed over channels, mean over batch and pixels, weighted
by the task's lambda. With `teacher=per_task` each task's adaptor targets its own teacher
(`<task>:<module path>`); with one multi-task teacher all target its shared feature. The
adaptors are optimised with their own learning rate (`adaptor_lr`)."""

from __future__ import annotations

from kdmtl_cli.distill import KD_METHODS, Method
from kdmtl_cli.distill.functional import TaskAdaptor, kd4mtl_loss
from kdmtl_cli.distill.pairs import check_pair_shapes, require_feature


@KD_METHODS.register("kd4mtl")
class KD4MTL(Method):
    name = "kd4mtl"

    def __init__(self, cfg, tasks, teacher_tasks):
        super().__init__(cfg, tasks, teacher_tasks)
        self._weights = self.per_task_term_weights(teacher_tasks)
        self.student_features = [cfg.student]
        self.teacher_features = [cfg.teacher]

    def teacher_feature_name(self, task: str, teacher_features) -> str:
        per_task = f"{task}:{self.cfg.teacher}"
        return per_task if per_task in teacher_features else self.cfg.teacher

    def setup(self, student_features, teacher_features):
        shared = require_feature(student_features, self.cfg.student, "loss.kd4mtl", "student")
        for task in self.teacher_tasks:
            target = require_feature(teacher_features, self.teacher_feature_name(task, teacher_features),
                                     "loss.kd4mtl", "teacher")
            check_pair_shapes(f"loss.kd4mtl {self.cfg.student} -> {task}", shared, target)
            self.modules[task] = TaskAdaptor(shared.shape[1], target.shape[1])

    def param_groups(self, base_lr):
        return [{"params": list(self.modules.parameters()), "lr": float(self.cfg.adaptor_lr)}]

    def __call__(self, student_out, teacher_out, batch, progress):
        shared = student_out["features"][self.cfg.student]
        terms = {}
        for task in self.teacher_tasks:
            target = teacher_out["features"][self.teacher_feature_name(task, teacher_out["features"])]
            terms[f"kd4mtl/{task}"] = kd4mtl_loss(self.modules[task](shared, target.shape[-2:]), target)
        return terms
