"""The trunk contract shared by every architecture: a `stem`, then `stages` (a ModuleList, so
feature methods can name `trunk.stages.<i>`); forward returns each stage's output, finest first.
Subclasses set `channels` and `reductions` (channels and downsampling of each returned map).
A trunk may define `init_head(head)`: MultiTaskModel calls it on every task head it builds, so
a head gets the initialisation the reference model gives its classifier / prediction layers."""

from __future__ import annotations

import math

import torch.nn as nn


class StagedTrunk(nn.Module):
    def forward(self, x):
        x = self.stem(x)
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features


class ReferenceInit:
    """For trunks whose reference model has its own initialisation: `init_reference(init, body,
    head)` at the end of `__init__` applies `body` to the trunk when `init` is "official", and
    `init_head` then applies `head` to every task head MultiTaskModel builds."""

    def init_reference(self, init: str, body, head=None) -> None:
        self.official_init = check_init(init)
        self._head_init = head
        if self.official_init:
            body(self)

    def init_head(self, head: nn.Module) -> None:
        if self.official_init and self._head_init is not None:
            self._head_init(head)


def check_init(init: str) -> bool:
    """True for the reference models' own initialisation ("official"), False for PyTorch's
    default ("pytorch")."""
    if init not in ("official", "pytorch"):
        raise ValueError(f"init must be 'official' or 'pytorch' (got {init!r})")
    return init == "official"


def fan_out_normal_init(module: nn.Module) -> None:
    """RepDistiller's `_initialize_weights` for wrn.py / vgg.py / mobilenetv2.py, over `module`'s
    modules in order: conv weight ~ N(0, 2 / (k_h * k_w * out_channels)), conv bias 0; BN weight 1,
    bias 0. (Linear layers belong to the classifier head, see `init_head` of those trunks.)"""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            m.weight.data.normal_(0, math.sqrt(2. / n))
            if m.bias is not None:
                m.bias.data.zero_()
        elif isinstance(m, nn.BatchNorm2d):
            m.weight.data.fill_(1)
            m.bias.data.zero_()


def init_linear_normal(module: nn.Module) -> None:
    """RepDistiller's classifier init in vgg.py / mobilenetv2.py: Linear weight ~ N(0, 0.01), bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            m.weight.data.normal_(0, 0.01)
            m.bias.data.zero_()


def zero_linear_bias(module: nn.Module) -> None:
    """RepDistiller's classifier init in wrn.py: Linear bias 0 (weight left at PyTorch's default)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            m.bias.data.zero_()
