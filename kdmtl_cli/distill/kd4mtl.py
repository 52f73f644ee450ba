"""`kd4mtl`: Li & Bilen, "Knowledge Distillation for Multi-task Learning" (ECCV-W 2020), as the
official VICO-UoE/KD4MTL model_segnet_kdmtl.py:

- several shared student features (official: two, the SegNet's pooled encoder bottleneck
  `feat[0]` and last decoder output `feat[1]`; kdmtl default `[trunk/-1, trunk/0]`: the trunk's
  coarsest and finest returned features, which for `segnet` are exactly those two), each paired
  with the same feature of each task's teacher;
- per task and feature a 1x1 adaptor without bias (`transformer`, xavier_normal_ init);
- adapted student and teacher features normalised over channels per pixel,
  x / sqrt(sum_c x^2 + 1e-6); squared L2 summed over channels, mean over batch and pixels;
- the task's term `kd4mtl/<task>` is the sum over its features, weighted by the task's
  lambda (`loss.kd4mtl.weight`; official lambda_ = [1, 1, 2] for semantic, depth, normal);
- adaptors trained with lr `adaptor_lr` (official `--alr` 0.1) and weight decay
  `adaptor_weight_decay` (official 5e-4), in their own Adam in the official code, here as a
  param group of the student's optimiser (so also under its schedule).
With `teacher=per_task` each task's adaptors target its own teacher; with one multi-task
teacher every task targets the shared teacher feature."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kdmtl_cli.ranges import above, at_least

from kdmtl_cli.distill import KD_METHODS, Method
from kdmtl_cli.distill.functional import TaskAdaptor, kd4mtl_loss
from kdmtl_cli.distill.pairs import check_pair_shapes, feature_pairs, require_feature, split_name
from kdmtl_cli.errors import KdmtlError


def _key(task: str, index: int) -> str:
    return f"{task}__{index}"


@dataclass
class KD4MTLConfig:
    """Li & Bilen (ECCV-W 2020), as VICO-UoE/KD4MTL (conf/loss/kd4mtl.yaml)."""
    weight: Any = at_least(0, default=1.0)        # lambda: a number, or {task: number}
    student: Any = field(default_factory=lambda: ["trunk/-1", "trunk/0"])   # shared features (a name or a list)
    teacher: Any = field(default_factory=lambda: ["trunk/-1", "trunk/0"])   # each task teacher's features
    adaptor_lr: float = above(0, default=0.1)     # the adaptors' learning rate (official --alr)
    # the adaptors' weight decay (official transformer_optimizer)
    adaptor_weight_decay: float = at_least(0, default=5e-4)
    adaptor_scheduled: bool = False       # official: the adaptors' optimiser has no schedule; true: the student's applies


@KD_METHODS.register("kd4mtl", settings=KD4MTLConfig)
class KD4MTL(Method):
    name = "kd4mtl"

    def __init__(self, cfg, tasks, teacher_tasks):
        super().__init__(cfg, tasks, teacher_tasks)
        self._weights = self.per_task_term_weights(teacher_tasks)
        self.pairs = feature_pairs(cfg, "loss.kd4mtl")
        for _, t in self.pairs:
            if split_name(t)[0] is not None:
                raise KdmtlError(f"loss.kd4mtl.teacher: '{t}' has a task prefix; name the module path only "
                                 "(each task's adaptor targets its own teacher's feature)")
        self.student_features = [s for s, _ in self.pairs]
        self.teacher_features = [t for _, t in self.pairs]

    def teacher_feature_name(self, task: str, name: str, teacher_features) -> str:
        per_task = f"{task}:{name}"
        return per_task if per_task in teacher_features else name

    def setup(self, student_features, teacher_features):
        for i, (s, t) in enumerate(self.pairs):
            shared = require_feature(student_features, s, "loss.kd4mtl.student", "student")
            for task in self.teacher_tasks:
                target = require_feature(teacher_features, self.teacher_feature_name(task, t, teacher_features),
                                         "loss.kd4mtl.teacher", "teacher")
                check_pair_shapes(f"loss.kd4mtl {s} -> {task}", shared, target)
                self.modules[_key(task, i)] = TaskAdaptor(shared.shape[1], target.shape[1])

    def param_groups(self, base_lr):
        return [{"params": list(self.modules.parameters()), "lr": float(self.cfg.adaptor_lr),
                 "weight_decay": float(self.cfg.adaptor_weight_decay),
                 "scheduled": bool(getattr(self.cfg, "adaptor_scheduled", False))}]

    def __call__(self, student_out, teacher_out, batch, progress):
        s_feats, t_feats = student_out["features"], teacher_out["features"]
        terms = {}
        for task in self.teacher_tasks:
            total = None
            for i, (s, t) in enumerate(self.pairs):
                target = t_feats[self.teacher_feature_name(task, t, t_feats)]
                term = kd4mtl_loss(self.modules[_key(task, i)](s_feats[s], target.shape[-2:]), target)
                total = term if total is None else total + term
            terms[f"kd4mtl/{task}"] = total
        return terms
