"""Task kinds by name. A kind says how big its head's output is, its loss, its
torchmetrics metrics and which of them are higher-is-better. A `Task` is a named
instance of a kind bound to one data set target (the same kind may appear twice)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch
from torch import Tensor

from kdmtl_cli.data import TargetSpec
from kdmtl_cli.errors import KdmtlError
from kdmtl_cli.registry import Registry


class TaskKind:
    """Base of every task kind; subclasses register themselves in TASK_KINDS."""

    name: str = ""
    dense: bool = False                          # per-pixel output at input resolution
    needs_classes: bool = False
    higher_is_better: Dict[str, bool] = {}       # metric name -> direction

    def out_channels(self, spec: TargetSpec) -> int:
        raise NotImplementedError

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        raise NotImplementedError

    def metrics(self, spec: TargetSpec) -> Dict[str, "torch.nn.Module"]:
        raise NotImplementedError

    def prepare_for_metrics(self, output: Tensor, target: Tensor):
        return output, target


TASK_KINDS: Registry = Registry("task kind", "tasks.<name>.kind")


@dataclass
class Task:
    name: str
    kind: TaskKind
    spec: TargetSpec
    target: str          # key of the data set target feeding this task

    @property
    def out_channels(self) -> int:
        return self.kind.out_channels(self.spec)


def _load_kinds() -> None:
    from kdmtl_cli.tasks import classification, depth, segmentation  # noqa: F401


def build_tasks(tasks_cfg, data_targets: Dict[str, TargetSpec]) -> Dict[str, Task]:
    _load_kinds()
    if not tasks_cfg:
        raise KdmtlError("no tasks configured; choose a tasks group option, e.g. tasks=cls_seg_depth")
    tasks = {}
    for name, task_cfg in tasks_cfg.items():
        kind = TASK_KINDS.get(task_cfg.kind)()
        target = task_cfg.get("target") or name
        if target not in data_targets:
            raise KdmtlError(f"task '{name}' reads target '{target}', which the data set does not provide; "
                             f"available targets: {', '.join(data_targets)} (set tasks.{name}.target)")
        spec = data_targets[target]
        if spec.kind != kind.name:
            raise KdmtlError(f"task '{name}' is a {kind.name} task but target '{target}' holds "
                             f"{spec.kind} labels; set tasks.{name}.kind={spec.kind}")
        tasks[name] = Task(name=name, kind=kind, spec=spec, target=target)
    return tasks


def task_signature(tasks: Dict[str, Task]) -> Dict[str, Dict[str, Optional[int]]]:
    """What a model's heads were built for: stored in checkpoints, checked on load."""
    return {name: {"kind": t.kind.name, "num_classes": t.spec.num_classes, "out_channels": t.out_channels}
            for name, t in tasks.items()}
