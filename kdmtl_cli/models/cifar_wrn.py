"""Wide ResNets for CIFAR (RepDistiller / mdistiller `wrn.py` layout): 3x3 stem conv 3 -> 16,
three groups of (depth - 4) / 6 pre-activation blocks with widths 16k, 32k, 64k (strides
1, 2, 2; a 1x1 conv shortcut where the width changes), then a final BN + ReLU before pooling.

Trunk interface: `stem` (the first conv), `stages` = [block1, block2, (block3, BN, ReLU)];
features at 1/1, 1/2, 1/4. `trunk.stages.0` / `.1` are RepDistiller's f1 / f2 (group outputs,
no ReLU); `trunk.stages.2` is relu(bn1(f3)), the map the classifier pools, and
`trunk.stages.2.0` is f3 itself (the third group before the final BN + ReLU); RepDistiller's
`preact` f3 is `trunk.stages.2.1`. Deliberate difference: the final BN + ReLU sit inside the last
stage so that the last stage is what the classifier pools (same network, same parameters).
Initialisation as RepDistiller's WideResNet.__init__ (models/wrn.py l. 78-86): conv weight
~ N(0, 2 / (k * k * out)), BN 1 / 0, classifier bias 0 (weight PyTorch's default);
`init="pytorch"` keeps PyTorch's default.
cfg.width / depth / stages / stem_stride / weights / small_input are ignored."""

from __future__ import annotations

from typing import List

import torch.nn as nn

from kdmtl_cli.models import TRUNKS
from kdmtl_cli.models.trunk import ReferenceInit, StagedTrunk, fan_out_normal_init, zero_linear_bias


class WideBasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.equal = c_in == c_out
        self.shortcut = None if self.equal else nn.Conv2d(c_in, c_out, 1, stride, 0, bias=False)

    def forward(self, x):
        pre = self.relu1(self.bn1(x))
        # equal widths: identity on the raw input; otherwise the projection sees the pre-activation
        identity = x if self.equal else self.shortcut(pre)
        out = self.conv1(pre)
        out = self.conv2(self.relu2(self.bn2(out)))
        return out + identity


class WideResNetTrunk(ReferenceInit, StagedTrunk):
    def __init__(self, depth: int, widen: int, init: str = "official"):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n + 4 (got {depth})")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.stem = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        groups = []
        for i in range(3):
            c_in, c_out = widths[i], widths[i + 1]
            stride = 1 if i == 0 else 2
            groups.append(nn.Sequential(*[WideBasicBlock(c_in if b == 0 else c_out, c_out, stride if b == 0 else 1)
                                          for b in range(n)]))
        # not in place: a hook on the BN (`trunk.stages.2.1`) keeps the pre-activation
        groups[2] = nn.Sequential(groups[2], nn.BatchNorm2d(widths[3]), nn.ReLU())
        self.stages = nn.ModuleList(groups)
        self.channels: List[int] = widths[1:]
        self.reductions: List[int] = [1, 2, 4]
        self.init_reference(init, fan_out_normal_init, zero_linear_bias)


for _d, _k in ((16, 1), (16, 2), (40, 1), (40, 2)):
    TRUNKS.register(f"wrn_{_d}_{_k}")(lambda cfg, _d=_d, _k=_k: WideResNetTrunk(_d, _k))
