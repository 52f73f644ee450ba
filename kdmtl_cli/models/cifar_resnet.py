"""CIFAR ResNets of the KD model zoo (RepDistiller / mdistiller `resnet.py` layout):
a 3x3 stem conv (3 -> w0) + BN + ReLU, then three stages of (depth - 2) / 6 post-activation
basic blocks with widths w1, w2, w3 (strides 1, 2, 2); 1x1 conv + BN projection shortcuts
where the shape changes. resnet8..resnet110 use widths [16, 16, 32, 64]; resnet8x4 and
resnet32x4 use [32, 64, 128, 256].

Trunk interface: `stem` then `stages` (layer1..layer3), features at 1/1, 1/2, 1/4 of the
input: `trunk.stages.<i>` is RepDistiller's f1, f2, f3 (block outputs after the final ReLU); its
`preact` features, the sums before that ReLU, are `trunk.stages.<i>.<last block>.preact`. The last stage is what
the reference classifier pools. Initialisation as RepDistiller's ResNet.__init__ (models/resnet.py
l. 130-135): every conv kaiming-normal (fan_out, relu), BN weight 1 / bias 0; the fc keeps
PyTorch's default (`init="pytorch"` keeps PyTorch's default everywhere). Built from scratch
(cfg.weights / width / depth / stages / stem_stride / small_input are ignored)."""

from __future__ import annotations

from typing import List

import torch.nn as nn
import torch.nn.functional as F

from kdmtl_cli.models import TRUNKS
from kdmtl_cli.models.trunk import StagedTrunk, check_init


class CifarBasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        # `preact`: the sum before the final ReLU, RepDistiller's `preact` feature, hookable by module
        # path (`trunk.stages.<i>.<last block>.preact`); that ReLU is not in place so the hooked sum survives.
        self.preact = nn.Identity()
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(self.preact(out + identity))


class CifarResNetTrunk(StagedTrunk):
    def __init__(self, depth: int, widths: List[int], init: str = "official"):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n + 2 (got {depth})")
        n = (depth - 2) // 6
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
        self.stages = nn.ModuleList()
        c_in = widths[0]
        for i, c_out in enumerate(widths[1:]):
            stride = 1 if i == 0 else 2
            blocks = [CifarBasicBlock(c_in if b == 0 else c_out, c_out, stride if b == 0 else 1) for b in range(n)]
            self.stages.append(nn.Sequential(*blocks))
            c_in = c_out
        self.channels: List[int] = list(widths[1:])
        self.reductions: List[int] = [1, 2, 4]
        if check_init(init):
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                    nn.init.constant_(m.weight, 1)
                    nn.init.constant_(m.bias, 0)


_ARCHS = {f"resnet{d}": (d, [16, 16, 32, 64]) for d in (8, 14, 20, 32, 44, 56, 110)}
_ARCHS.update({"resnet8x4": (8, [32, 64, 128, 256]), "resnet32x4": (32, [32, 64, 128, 256])})

for _name, (_depth, _widths) in _ARCHS.items():
    TRUNKS.register(_name)(lambda cfg, _depth=_depth, _widths=_widths: CifarResNetTrunk(_depth, _widths))
