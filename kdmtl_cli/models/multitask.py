"""Shared trunk + one head per task. Returns the data contract's
``{"outputs": {task: Tensor}, "features": {module path: Tensor}}``; features are taken
by forward hooks on named modules, so no model is rewritten for feature KD."""

from __future__ import annotations

from typing import Dict, Iterable

import torch.nn as nn

from kdmtl_cli.errors import KdmtlError
from kdmtl_cli.models.heads import DenseDecoder, PooledLinearHead, ScaledHead, TrunkFeatures


def check_module_names(model: nn.Module, names: Iterable[str]) -> None:
    """Every name must be a module path of `model`; the error lists the paths that exist."""
    modules = dict(model.named_modules())
    for name in names:
        if name not in modules:
            raise KdmtlError(f"no module named '{name}' in the model; available: "
                             f"{', '.join(n for n in modules if n and n.count('.') <= 2)}")


class MultiTaskModel(nn.Module):
    def __init__(self, trunk: nn.Module, tasks: Dict[str, object], decoder_width: int):
        super().__init__()
        self.trunk = trunk
        self.heads = nn.ModuleDict()
        for name, task in tasks.items():
            own = trunk.build_head(task) if hasattr(trunk, "build_head") else None
            if own is not None:          # a trunk with per-task branches (MTAN) builds its heads
                self.heads[name] = own
            elif task.kind.dense:
                self.heads[name] = DenseDecoder(trunk.channels, decoder_width, task.out_channels)
            else:
                self.heads[name] = PooledLinearHead(trunk.channels[-1], task.out_channels)
            if hasattr(trunk, "init_head"):  # the reference model's init of its classifier / predictors
                trunk.init_head(self.heads[name])
            if task.kind.scaled_output:  # regression-like: predict in target units
                spec = task.spec
                self.heads[name] = ScaledHead(self.heads[name], spec.mean or 0.0, spec.std or 1.0)
        self._captured: Dict[str, object] = {}
        self._hooks = []

    def shared_parameters(self):
        """The parameters every task's loss reaches: the trunk's (what gradient-based weightings combine)."""
        return self.trunk.parameters()

    def capture_features(self, names: Iterable[str]) -> None:
        """Record the outputs of these modules (by path, e.g. 'trunk.stages.2') on every forward."""
        check_module_names(self, names)
        modules = dict(self.named_modules())
        for name in names:
            self._hooks.append(modules[name].register_forward_hook(
                lambda _m, _i, out, name=name: self._captured.__setitem__(name, out)))

    def forward(self, image):
        self._captured = {}
        features = self.trunk(image)
        if not isinstance(features, TrunkFeatures):
            features = TrunkFeatures(features)
        size = image.shape[-2:]
        outputs = {name: head(features, size) for name, head in self.heads.items()}
        return {"outputs": outputs, "features": dict(self._captured)}


class WholeModel(nn.Module):
    """A user's whole model (`student.model` / `teacher.model`): forward(image) -> {task: output}
    with every task of the run, each shaped as its kind's head would give it ([N, C] for image-level
    tasks, [N, C, H, W] at the image's size for dense ones). kdmtl adds no heads; feature
    distillation addresses its modules as `model.<path>`."""

    def __init__(self, model: nn.Module, tasks: Dict[str, object]):
        super().__init__()
        self.model = model
        self.task_names = list(tasks)
        self._captured: Dict[str, object] = {}
        self._hooks = []

    capture_features = MultiTaskModel.capture_features

    def shared_parameters(self):
        """The model's own `shared_parameters()` when it defines one (its shared trunk, for
        gradient-based weightings), else every parameter."""
        own = getattr(self.model, "shared_parameters", None)
        return own() if callable(own) else self.model.parameters()

    def forward(self, image):
        self._captured = {}
        outputs = self.model(image)
        if not isinstance(outputs, dict) or set(outputs) != set(self.task_names):
            got = sorted(outputs) if isinstance(outputs, dict) else type(outputs).__name__
            raise KdmtlError(f"model: {type(self.model).__name__}.forward must return {{task: output}} for the tasks "
                             f"{self.task_names}; it returned {got}")
        return {"outputs": {name: outputs[name] for name in self.task_names}, "features": dict(self._captured)}
