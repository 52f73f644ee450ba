"""ShuffleNet V1 (groups 3) and V2 (1x) for CIFAR, laid out as RepDistiller's
`ShuffleNetv1.py` / `ShuffleNetv2.py` (`ShuffleV1`, `ShuffleV2`).

shufflenetv1: 1x1 stem conv 3 -> 24 + BN + ReLU, stages of 4 / 8 / 4 bottlenecks to 240 / 480 /
960 channels; the first block of a stage has stride 2 and concatenates an average-pooled
shortcut. Features at 1/2, 1/4, 1/8.
shufflenetv2: 1x1 stem conv 3 -> 24 + BN + ReLU (RepDistiller's ShuffleNetv2.py l. 110; the
3x3 stem is commented out there), stages of one down-sampling block + 3 / 7 / 3
split blocks to 116 / 232 / 464 channels, then 1x1 conv to 1024 + BN + ReLU (in the last
stage, which the classifier pools). Features at 1/2, 1/4, 1/8.

`trunk.stages.<i>` is RepDistiller's f1, f2, f3 for V1; for V2 f1, f2 and, deliberately
different, the 1024-channel conv2 output for the last stage (conv2 + BN + ReLU sit inside it so
that the last stage is what the classifier pools; same network, same parameters): V2's f3 is
`trunk.stages.2.3`. Neither reference initialises explicitly: PyTorch's default init, as there.
cfg.width / depth / stages / stem_stride / weights / small_input are ignored."""

from __future__ import annotations

from typing import List

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdmtl_cli.models import TRUNKS
from kdmtl_cli.models.trunk import StagedTrunk


def channel_shuffle(x, groups: int):
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


# ---------------------------------------------------------------- V1
class ShuffleV1Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, groups: int):
        super().__init__()
        self.stride = stride
        mid = c_out // 4
        self.g1 = 1 if c_in == 24 else groups  # the first block after the stem has a plain 1x1 conv
        self.conv1 = nn.Conv2d(c_in, mid, 1, groups=self.g1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, c_out, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.AvgPool2d(3, 2, 1) if stride == 2 else nn.Identity()

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = channel_shuffle(out, self.g1)
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        res = self.shortcut(x)
        return F.relu(torch.cat([out, res], 1) if self.stride == 2 else out + res)


class ShuffleNetV1Trunk(StagedTrunk):
    def __init__(self, out_planes=(240, 480, 960), num_blocks=(4, 8, 4), groups: int = 3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 24, 1, bias=False), nn.BatchNorm2d(24), nn.ReLU(inplace=True))
        self.stages = nn.ModuleList()
        c_in = 24
        for c_out, n in zip(out_planes, num_blocks):
            blocks = []
            for b in range(n):
                # stride-2 blocks concatenate the pooled input, so their branch makes c_out - c_in
                blocks.append(ShuffleV1Block(c_in, c_out - c_in if b == 0 else c_out, 2 if b == 0 else 1, groups))
                c_in = c_out
            self.stages.append(nn.Sequential(*blocks))
        self.channels: List[int] = list(out_planes)
        self.reductions: List[int] = [2, 4, 8]


# ---------------------------------------------------------------- V2
class ShuffleV2Block(nn.Module):
    """Stride 1: split channels in half, transform one half, concatenate, shuffle."""

    def __init__(self, channels: int):
        super().__init__()
        c = channels // 2
        self.branch = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True),
                                    nn.Conv2d(c, c, 3, 1, 1, groups=c, bias=False), nn.BatchNorm2d(c),
                                    nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True))

    def forward(self, x):
        c = x.shape[1] // 2
        x1, x2 = x[:, :c], x[:, c:]
        return channel_shuffle(torch.cat([x1, self.branch(x2)], 1), 2)


class ShuffleV2DownBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        mid = c_out // 2
        self.left = nn.Sequential(nn.Conv2d(c_in, c_in, 3, 2, 1, groups=c_in, bias=False), nn.BatchNorm2d(c_in),
                                  nn.Conv2d(c_in, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True))
        self.right = nn.Sequential(nn.Conv2d(c_in, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
                                   nn.Conv2d(mid, mid, 3, 2, 1, groups=mid, bias=False), nn.BatchNorm2d(mid),
                                   nn.Conv2d(mid, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True))

    def forward(self, x):
        return channel_shuffle(torch.cat([self.left(x), self.right(x)], 1), 2)


class ShuffleNetV2Trunk(StagedTrunk):
    def __init__(self, out_channels=(116, 232, 464, 1024), num_blocks=(3, 7, 3)):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 24, 1, bias=False), nn.BatchNorm2d(24), nn.ReLU(inplace=True))
        self.stages = nn.ModuleList()
        c_in = 24
        for i, (c_out, n) in enumerate(zip(out_channels[:3], num_blocks)):
            blocks: List[nn.Module] = [ShuffleV2DownBlock(c_in, c_out)] + [ShuffleV2Block(c_out) for _ in range(n)]
            if i == 2:
                blocks.append(nn.Sequential(nn.Conv2d(c_out, out_channels[3], 1, bias=False),
                                            nn.BatchNorm2d(out_channels[3]), nn.ReLU(inplace=True)))
            self.stages.append(nn.Sequential(*blocks))
            c_in = c_out
        self.channels: List[int] = [out_channels[0], out_channels[1], out_channels[3]]
        self.reductions: List[int] = [2, 4, 8]


TRUNKS.register("shufflenetv1")(lambda cfg: ShuffleNetV1Trunk())
TRUNKS.register("shufflenetv2")(lambda cfg: ShuffleNetV2Trunk())
