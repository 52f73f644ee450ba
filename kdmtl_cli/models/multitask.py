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
