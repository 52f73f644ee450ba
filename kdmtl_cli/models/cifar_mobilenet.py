"""MobileNetV2 for CIFAR as in RepDistiller's `mobilenetv2.py`, registered as `mobilenetv2`
with its `mobile_half` settings (width multiplier 0.5, expansion T = 6): a stride-2 3x3 stem,
seven groups of inverted residuals (every block, even t = 1, has the expand 1x1 conv), then a
1x1 conv to 1280 channels + BN + ReLU, which the classifier pools.

Trunk interface: `stem`, then `stages` = [groups 0-1, group 2, groups 3-4, groups 5-6 + last
conv], features at 1/2, 1/4, 1/8, 1/16 with 12, 16, 48, 1280 channels. `trunk.stages.0` .. `.2`
are RepDistiller's f1, f2, f3; its f4 (group 6's output, 80 channels) is `trunk.stages.3.1`.
Deliberate difference: the last 1x1 conv (RepDistiller's conv2) sits in the last stage so that
the last stage is what the classifier pools (same network, same parameters).
Initialisation as RepDistiller's `_initialize_weights` (models/mobilenetv2.py l. 162-175): conv
weight ~ N(0, 2 / (k * k * out)), BN 1 / 0, classifier Linear weight ~ N(0, 0.01), bias 0;
`init="pytorch"` keeps PyTorch's default.
cfg.width / depth / stages / stem_stride / weights / small_input are ignored."""

from __future__ import annotations

from typing import List

import torch.nn as nn

from kdmtl_cli.models import TRUNKS
from kdmtl_cli.models.trunk import ReferenceInit, StagedTrunk, fan_out_normal_init, init_linear_normal


def _conv_bn(c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1, relu: bool = True):
    layers = [nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(c_out)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return layers


class InvertedResidual(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, expand: int):
        super().__init__()
        hidden = c_in * expand
        self.use_residual = stride == 1 and c_in == c_out
        self.conv = nn.Sequential(*_conv_bn(c_in, hidden, 1), *_conv_bn(hidden, hidden, 3, stride, groups=hidden),
                                  *_conv_bn(hidden, c_out, 1, relu=False))

    def forward(self, x):
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2Trunk(ReferenceInit, StagedTrunk):
    # t, c, n, s per group (t = T where given as None)
    SETTING = [(1, 16, 1, 1), (None, 24, 2, 1), (None, 32, 3, 2), (None, 64, 4, 2),
               (None, 96, 3, 1), (None, 160, 3, 2), (None, 320, 1, 1)]
    STAGE_GROUPS = [(0, 1), (2,), (3, 4), (5, 6)]

    def __init__(self, expand: int = 6, width_mult: float = 0.5, init: str = "official"):
        super().__init__()
        c_in = int(32 * width_mult)
        self.stem = nn.Sequential(*_conv_bn(3, c_in, 3, 2))
        groups = []
        for t, c, n, s in self.SETTING:
            c_out = int(c * width_mult)
            blocks = []
            for b in range(n):
                blocks.append(InvertedResidual(c_in, c_out, s if b == 0 else 1, expand if t is None else t))
                c_in = c_out
            groups.append(nn.Sequential(*blocks))
        last = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.stages = nn.ModuleList()
        self.channels: List[int] = []
        for i, members in enumerate(self.STAGE_GROUPS):
            modules = [groups[g] for g in members]
            if i == len(self.STAGE_GROUPS) - 1:
                modules.append(nn.Sequential(*_conv_bn(c_in, last, 1)))
            self.stages.append(nn.Sequential(*modules))
            self.channels.append(last if i == len(self.STAGE_GROUPS) - 1
                                 else int(self.SETTING[members[-1]][1] * width_mult))
        self.reductions: List[int] = [2, 4, 8, 16]
        self.init_reference(init, fan_out_normal_init, init_linear_normal)


TRUNKS.register("mobilenetv2")(lambda cfg: MobileNetV2Trunk(expand=6, width_mult=0.5))
