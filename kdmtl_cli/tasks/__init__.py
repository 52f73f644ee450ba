"""Task kinds by name, one file each (classification, multilabel, segmentation, depth,
normals, regression). A kind says everything the rest of the program needs about a task:

- its head: ``dense`` (decoder at input resolution) or pooled linear, ``out_channels``, and
  ``scaled_output`` (the head predicts in target units through the train-split mean/std);
- its ``loss``, its torchmetrics ``metrics`` (fed by ``prepare_for_metrics``) and, for every
  metric it reports, whether higher is better (``higher_is_better``); ``batch_metrics``: the
  same metrics computed per evaluation batch and averaged over batches
  (``test.metric_reduction=batch_mean``, the official NYUv2/Cityscapes code's way);
- how its target changes when the image is flipped left-right (``flip_target``);
- its logit-distillation rule (``distill``, the `kd` method's term) and whether its outputs are
  class logits with a softmax over dim 1 (``softmax_labels``, what label-only methods need);
- how to show a prediction or a target: ``show`` (an RGB image batch, dense kinds) or
  ``describe`` (one line per sample, image-level kinds).

A `Task` is a named instance of a kind bound to one data set target (the same kind may appear
twice, and two tasks may read the same target).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, ClassVar, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from kdmtl_cli.data import TargetSpec
from kdmtl_cli.errors import KdmtlError
from kdmtl_cli.registry import Registry

METRIC_REDUCTIONS = ("split", "batch_mean")   # test.metric_reduction


def batch_mean(fn: Callable[[Tensor, Tensor], Optional[Tensor]]):
    """A metric computed on each update() call's batch alone, then averaged over the batches
    with equal weight (float64 sums), as the official NYUv2/Cityscapes test loops do
    (``avg_cost[...] += cost / test_batch``). ``fn(pred, target)`` gives the batch's value, or
    None when the batch holds no valid pixel: such a batch is skipped (the official code would
    divide by zero there and turn the average into NaN)."""
    return _batch_mean_class()(fn)


@functools.cache
def _batch_mean_class():
    # torchmetrics is imported when the first metric is made (the first evaluation), not when
    # a task kind is: importing it costs seconds (it pulls in torchvision, scipy, matplotlib)
    # that would otherwise delay every command, and its first training step, for nothing.
    import torchmetrics

    class BatchMean(torchmetrics.Metric):
        full_state_update = False
        higher_is_better = None

        def __init__(self, fn, **kwargs):
            super().__init__(**kwargs)
            self.fn = fn
            self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state("batches", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

        def update(self, pred: Tensor, target: Tensor) -> None:
            value = self.fn(pred, target)
            if value is not None:
                self.total += value.detach().double()
                self.batches += 1

        def compute(self) -> Tensor:
            return self.total / self.batches if self.batches > 0 else torch.tensor(math.nan, dtype=torch.float64)

    return BatchMean


@dataclass(frozen=True)
class LegendItem:
    """One entry of a picture's legend (TaskKind.legend): text, after a colour swatch (RGB 0..255)
    or a colour bar (RGB stops in [0, 1]) when one is given."""

    text: str
    colour: tuple[int, int, int] | None = None
    ramp: tuple[tuple[float, float, float], ...] | None = None


class TaskKind:
    """Base of every task kind; subclasses register themselves in TASK_KINDS."""

    name: str = ""
    dense: bool = False                          # per-pixel output at input resolution
    needs_classes: bool = False                  # the target spec must give num_classes
    scaled_output: bool = False                  # head output * train std + train mean (target units)
    softmax_labels: bool = False                 # outputs are class logits, softmax over dim 1
    # dense targets: the value a random crop pads with (a value the loss and metrics ignore)
    pad_value: ClassVar[float] = 0
    # the data set target kinds (TargetSpec.kind) this kind can learn from; empty: its own name only
    # (a Huber-loss kind of your own reads `regression` targets: reads_targets = ("regression",))
    reads_targets: ClassVar[tuple] = ()
    higher_is_better: ClassVar[dict[str, bool]] = {}  # every reported metric -> direction

    def out_channels(self, spec: TargetSpec) -> int:
        raise NotImplementedError

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        raise NotImplementedError

    @classmethod
    def has_batch_metrics(cls) -> bool:
        """Whether the kind defines per-batch metrics (asked without making them: that would
        import torchmetrics at start-up)."""
        return cls.batch_metrics is not TaskKind.batch_metrics

    def metrics(self, spec: TargetSpec) -> dict[str, torch.nn.Module]:
        raise NotImplementedError

    def batch_metrics(self, spec: TargetSpec) -> dict[str, torch.nn.Module] | None:
        """The same metrics as `metrics`, computed per evaluation batch and averaged over
        batches (`batch_mean`); None where the kind has no such rule."""
        return None

    def prepare_for_metrics(self, output: Tensor, target: Tensor):
        return output, target

    def flip_target(self, target: Tensor) -> Tensor:
        """The target of the left-right mirrored image (W is the last dim). Image-level
        targets do not change; dense maps are mirrored."""
        return target.flip(-1) if self.dense else target

    def distill(self, student_out: Tensor, teacher_out: Tensor, temperature: float, dense_norm: str) -> Tensor:
        """The `kd` term for this kind. Default: L1 or L2 (`dense_norm`) between the student's
        and the teacher's predictions, mean over all elements (for regression-like kinds)."""
        from kdmtl_cli.distill.logit import dense_regression_kd

        return dense_regression_kd(student_out, teacher_out, dense_norm)

    def show(self, output: Tensor, spec: TargetSpec) -> Tensor | None:
        """A float RGB batch [N,3,H,W] in [0, 1] picturing a prediction or a target (dense
        kinds), or None for image-level kinds, which `describe` instead."""
        return None

    def legend(self, spec: TargetSpec) -> list[LegendItem]:
        """What the colours of `show` mean, for the TensorBoard panel (engine/panel.py); none by default."""
        return []

    def describe(self, output: Tensor, spec: TargetSpec) -> list[str]:
        """One line per sample. Default: the sample's values (image-level kinds) or its size."""
        output = output.detach().float().cpu()
        if self.dense:
            return [f"{self.name} map {'x'.join(str(s) for s in sample.shape)}" for sample in output]
        return [", ".join(f"{v:.4g}" for v in sample.reshape(-1).tolist()) for sample in output]


TASK_KINDS: Registry = Registry("task kind", "tasks.<name>.kind")


@dataclass
class Task:
    name: str
    kind: TaskKind
    spec: TargetSpec
    target: str              # key of the data set target feeding this task
    auxiliary: bool = False  # trained (and distilled) like any task, left out of `loss/task`
    metric_reduction: str = "split"  # split: over every pixel of the split; batch_mean: per batch, averaged

    @property
    def out_channels(self) -> int:
        return self.kind.out_channels(self.spec)

    def metrics(self) -> dict[str, torch.nn.Module]:
        """Fresh metric objects for one evaluation, by `metric_reduction`."""
        if self.metric_reduction == "batch_mean":
            return self.kind.batch_metrics(self.spec)
        return self.kind.metrics(self.spec)


def _load_kinds() -> None:
    from kdmtl_cli.plugins import load_builtin

    load_builtin()   # every module of kdmtl_cli/tasks/ registers its kind


def check_metric_reduction(value) -> str:
    """`test.metric_reduction`, checked: split | batch_mean."""
    value = "split" if value is None else str(value)
    if value not in METRIC_REDUCTIONS:
        raise KdmtlError(f"test.metric_reduction must be one of {', '.join(METRIC_REDUCTIONS)} (got '{value}')")
    return value


def metric_reduction(tasks_cfg) -> str:
    """The run's `test.metric_reduction`, read from the config `tasks_cfg` belongs to (split
    when there is none, e.g. a run saved before the key existed)."""
    root = tasks_cfg._get_root() if isinstance(tasks_cfg, DictConfig) else None
    value = OmegaConf.select(root, "test.metric_reduction", default=None) if root is not None else None
    return check_metric_reduction(value)


def build_tasks(tasks_cfg, data_targets: dict[str, TargetSpec]) -> dict[str, Task]:
    _load_kinds()
    if not tasks_cfg:
        raise KdmtlError("no tasks configured; choose a tasks group option, e.g. tasks=cls_seg_depth")
    reduction = metric_reduction(tasks_cfg)
    tasks = {}
    for name, task_cfg in tasks_cfg.items():
        kind = TASK_KINDS.get(task_cfg.kind)()
        target = task_cfg.get("target") or name
        if target not in data_targets:
            raise KdmtlError(f"task '{name}' reads target '{target}', which the data set does not provide; "
                             f"available targets: {', '.join(data_targets)} (set tasks.{name}.target)")
        spec = data_targets[target]
        if spec.kind != kind.name and spec.kind not in kind.reads_targets:
            raise KdmtlError(f"task '{name}' is a {kind.name} task but target '{target}' holds "
                             f"{spec.kind} labels; set tasks.{name}.kind={spec.kind}")
        if kind.needs_classes and not spec.num_classes:
            raise KdmtlError(f"target '{target}' of task '{name}' gives no class count, which a "
                             f"{kind.name} task needs")
        # test.metric_reduction=batch_mean applies to the kinds with per-batch metrics (depth, normals)
        own = reduction if kind.has_batch_metrics() else "split"
        tasks[name] = Task(name=name, kind=kind, spec=spec, target=target,
                           auxiliary=bool(task_cfg.get("auxiliary", False)), metric_reduction=own)
    return tasks


def task_signature(tasks: dict[str, Task]) -> dict[str, dict[str, int | None]]:
    """What a model's heads were built for: stored in checkpoints, checked on load."""
    return {name: {"kind": t.kind.name, "num_classes": t.spec.num_classes, "out_channels": t.out_channels}
            for name, t in tasks.items()}
