"""A small residual CNN whose size is set by two knobs: `width` (channels of the first
stage, doubled at every later stage) and `depth` (residual blocks per stage).
Parameters grow ~ width^2 * depth, so width 32/depth 2 is ~8x width 16/depth 1."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List

import torch.nn as nn

from kdmtl_cli.errors import KdmtlError
from kdmtl_cli.models import TRUNKS
from kdmtl_cli.models.trunk import StagedTrunk
from kdmtl_cli.ranges import at_least


def conv_bn_relu(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = conv_bn_relu(c_in, c_out, stride)
        self.conv2 = nn.Sequential(nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out))
        self.shortcut = nn.Identity() if (stride == 1 and c_in == c_out) else nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
        # `preact` names the sum before the final ReLU (a hookable feature: OFD, AB and ReviewKD
        # distil pre-ReLU maps); the ReLU is not in place, so a hook's tensor stays the sum.
        self.preact = nn.Identity()
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.preact(self.conv2(self.conv1(x)) + self.shortcut(x)))


class ConvNetTrunk(StagedTrunk):
    """Returns one feature map per stage, finest first (stage i at 1/2^i resolution)."""

    def __init__(self, width: int, depth: int, stages: int, stem_stride: int = 1):
        super().__init__()
        if width < 1 or depth < 1 or stages < 1:
            raise KdmtlError(f"convnet needs width, depth and stages >= 1 (got {width}, {depth}, {stages})")
        self.stem = conv_bn_relu(3, width, stem_stride)
        self.stages = nn.ModuleList()
        self.channels: List[int] = []
        c_in = width
        for i in range(stages):
            c_out = width * 2 ** i
            blocks = [BasicBlock(c_in if b == 0 else c_out, c_out, 2 if (i > 0 and b == 0) else 1)
                      for b in range(depth)]
            self.stages.append(nn.Sequential(*blocks))
            self.channels.append(c_out)
            c_in = c_out
        self.reductions = [stem_stride * 2 ** i for i in range(stages)]


@dataclass
class ConvNetSettings:
    """`student.*` / `teacher.*` keys of convnet (remembered in checkpoints)."""
    width: int = at_least(1, default=16)          # channels of the first stage (doubles per stage)
    depth: int = at_least(1, default=1)           # residual blocks per stage
    stages: int = at_least(1, default=3)          # stages (each after the first halves the resolution)
    stem_stride: int = at_least(1, default=1)     # 2 halves the resolution of every stage (4x cheaper)


@TRUNKS.register("convnet", settings=ConvNetSettings)
def build_convnet(cfg) -> ConvNetTrunk:
    return ConvNetTrunk(cfg.width, cfg.depth, cfg.stages, cfg.stem_stride)
