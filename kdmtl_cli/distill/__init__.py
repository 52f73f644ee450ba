"""Distillation methods by name (`loss=kd`, `loss=[kd,at]`). Each method is one file with a
class registered here: it maps (student outputs, teacher outputs, batch) to named loss terms
such as ``kd/cls`` or ``at/trunk.stages.2`` and says each term's weight; the trainer never
knows which methods run. Methods with learned parts (FitNet regressors, KD4MTL adaptors)
build them once feature shapes are known (`setup`) and hand their parameters to the optimiser.
"""

from __future__ import annotations

from typing import Dict, List

import torch

from kdmtl_cli.distill.weights import per_task_weights
from kdmtl_cli.errors import KdmtlError
from kdmtl_cli.registry import Registry

KD_METHODS: Registry = Registry("distillation method", "loss")


class Method:
    """Base of every distillation method."""

    name: str = ""
    student_features: List[str] = []     # module paths the student must expose
    teacher_features: List[str] = []     # module paths the teacher must expose

    def __init__(self, cfg, tasks, teacher_tasks: List[str]):
        self.cfg, self.tasks, self.teacher_tasks = cfg, tasks, teacher_tasks
        self.modules = torch.nn.ModuleDict()   # learned parts (adaptors, regressors)
        self._weights: Dict[str, float] = {}

    def per_task_term_weights(self, task_names: List[str]) -> Dict[str, float]:
        """`loss.<method>.weight` (a number or {task: number}) as weights of the `<method>/<task>` terms."""
        weights = per_task_weights(self.cfg.weight, task_names, f"loss.{self.name}.weight")
        return {f"{self.name}/{task}": w for task, w in weights.items()}

    def bind_data(self, data) -> None:
        """Called once with the run's DataBundle before `setup` (CRD sizes its memory bank by the
        training split and draws negatives from its labels); most methods need nothing from it."""

    def bind_teacher(self, teacher: torch.nn.Module) -> None:
        """Called with the frozen teacher (under its wrappers' pass-through layers) before `setup`:
        for methods that read teacher parameters, not only its outputs (OFD's margins from the
        batch-norm before each ReLU). Most methods need nothing from it."""

    def setup(self, student_features: Dict[str, torch.Tensor], teacher_features: Dict[str, torch.Tensor]) -> None:
        """Called once with one batch's features, before the optimiser is built."""

    def param_groups(self, base_lr: float) -> List[dict]:
        params = list(self.modules.parameters())
        return [{"params": params, "lr": base_lr}] if params else []

    def weight(self, term: str, progress: dict) -> float:
        return self._weights[term]

    def __call__(self, student_out: dict, teacher_out: dict, batch: dict, progress: dict) -> Dict[str, torch.Tensor]:
        raise NotImplementedError


class LabelTaskMethod(Method):
    """A method on the teacher's label tasks (kinds with `softmax_labels`: class logits with a
    softmax over dim 1, i.e. classification and segmentation), one term per task."""

    def __init__(self, cfg, tasks, teacher_tasks):
        super().__init__(cfg, tasks, teacher_tasks)
        self.label_tasks = [t for t in teacher_tasks if tasks[t].kind.softmax_labels]
        if not self.label_tasks:
            raise KdmtlError(f"loss={self.name} needs a classification or segmentation task covered by the teacher")
        self._weights = self.per_task_term_weights(self.label_tasks)


def method_names(loss_cfg) -> List[str]:
    from kdmtl_cli.plugins import load_builtin

    load_builtin()   # every module of kdmtl_cli/distill/ registers its method
    return [name for name in KD_METHODS.names() if loss_cfg.get(name) is not None]


def build_methods(loss_cfg, tasks, teacher_tasks: List[str]) -> List[Method]:
    return [KD_METHODS.get(name)(loss_cfg[name], tasks, teacher_tasks) for name in method_names(loss_cfg)]
