"""Distillation methods by name (`loss=kd`, `loss=[kd,at]`). Each method is one file with a
class registered here: it maps (student outputs, teacher outputs, batch) to named loss terms
such as ``kd/cls`` or ``at/trunk.stages.2`` and says each term's weight; the trainer never
knows which methods run. Methods with learned parts (FitNet regressors, KD4MTL adaptors)
build them once feature shapes are known (`setup`) and hand their parameters to the optimiser.
"""

from __future__ import annotations

from typing import Dict, List, Optional

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
        # teacher=ensemble: the teacher this instance distils from (its position in teacher.members)
        # and its label in term names (`kd:t1/cls`); None and the method's name otherwise
        self.member: Optional[int] = None
        self.label: str = self.name
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

    def adds_main_terms(self) -> bool:
        """Whether the method adds terms in the main training (ab and fsp, as RepDistiller, only train in
        their init stage): when no method does, the main training runs without the teacher."""
        return True

    # ---- init stage (RepDistiller helper/pretrain.py `init`), run by engine/init_stage.py -----------
    # A method with an init stage has the settings `init_epochs` (0: none) and `init_lr` (null: optim.lr)
    # and overrides `init_modules` and `init_terms`; by default a method has none.
    def init_epochs(self) -> int:
        """Epochs of the method's init stage, before the main training (`loss.<method>.init_epochs`)."""
        return int(self.cfg.get("init_epochs", 0) or 0) if hasattr(self.cfg, "get") else 0

    def init_lr(self, base_lr: float) -> float:
        """The init stage's SGD learning rate: `loss.<method>.init_lr`, or `base_lr` (optim.lr) when null."""
        lr = self.cfg.get("init_lr", None) if hasattr(self.cfg, "get") else None
        return float(base_lr if lr is None else lr)

    def init_modules(self, student: torch.nn.Module) -> List[torch.nn.Module]:
        """The modules the init stage trains (put in train mode, their parameters given to its SGD;
        RepDistiller's `init_trainable_list`): learned parts of the method and/or student modules."""
        return []

    def student_trunk(self, student: torch.nn.Module) -> torch.nn.Module:
        """RepDistiller's `model_s.get_feat_modules()` (the stem and the stages, not the classifier):
        here the student's `trunk`, everything before the task heads."""
        from kdmtl_cli.distill.objective import _inner

        trunk = getattr(_inner(student), "trunk", None)
        if not isinstance(trunk, torch.nn.Module):
            raise KdmtlError("the init stage trains the student's trunk, but this student has no `trunk` module "
                             "(a whole model without kdmtl's trunk + heads split); set "
                             f"loss.{self.name}.init_epochs=0")
        return trunk

    def init_terms(self, student_out: dict, teacher_out: dict, batch: dict) -> Dict[str, torch.Tensor]:
        """The init stage's named loss terms of one batch; the stage minimises their plain sum."""
        raise NotImplementedError(f"loss.{self.name} has no init stage")


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


def build_methods(loss_cfg, tasks, teacher_tasks: List[str], members: int = 0) -> List[Method]:
    """The chosen methods, in registry order; with `members` teachers (teacher=ensemble) one instance
    of each per teacher, each with its own learned parts and terms (`<method>:t<k>/...`)."""
    if not members:
        return [KD_METHODS.get(name)(loss_cfg[name], tasks, teacher_tasks) for name in method_names(loss_cfg)]
    methods = []
    for k in range(members):
        for method in build_methods(loss_cfg, tasks, teacher_tasks):
            method.member, method.label = k, f"{method.name}:t{k}"
            methods.append(method)
    return methods
