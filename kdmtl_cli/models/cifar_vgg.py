"""VGG-BN for CIFAR (RepDistiller / mdistiller `vgg.py` layout, the `*_bn` models that
RepDistiller's model_dict registers as vgg8 .. vgg19): five conv blocks of 3x3 conv (with bias)
+ BN + ReLU, the last ReLU of each block applied after the block; 2x2 max-pool between blocks
0-1, 1-2, 2-3, and between 3-4 only when the input is exactly 64 px high (`if h == 64`,
models/vgg.py l. 83), then a global average pool and a Linear(512, classes) (our pooled linear
head).

Trunk interface: `stages` = five blocks (pool in front for blocks 1-4; ReLU at the end), i.e.
`trunk.stages.<i>` is RepDistiller's f0 .. f4; its `preact` f_i is the output of the block's
last BN, `trunk.stages.<i>.block.<len - 2>`. Features at 1/1, 1/2, 1/4, 1/8, 1/8 (`reductions`;
1/16 for the last one with 64 px high inputs).
Initialisation as RepDistiller's `_initialize_weights` (models/vgg.py l. 118-131): conv weight
~ N(0, 2 / (k * k * out)), conv bias 0, BN 1 / 0, classifier Linear weight ~ N(0, 0.01), bias 0;
`init="pytorch"` keeps PyTorch's default.
cfg.width / depth / stages / stem_stride / weights / small_input are ignored."""

from __future__ import annotations

from typing import List

import torch.nn as nn

from kdmtl_cli.models import TRUNKS
from kdmtl_cli.models.trunk import ReferenceInit, fan_out_normal_init, init_linear_normal

_CONFIGS = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "vgg16": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "vgg19": [[64, 64], [128, 128], [256] * 4, [512] * 4, [512] * 4],
}


def _block(c_in: int, widths: List[int]) -> nn.Sequential:
    layers: List[nn.Module] = []
    for k, c_out in enumerate(widths):
        # the last ReLU is not in place, so a hook on the BN before it keeps the pre-activation
        last = k == len(widths) - 1
        layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=not last)]
        c_in = c_out
    return nn.Sequential(*layers)  # ends with ReLU: the reference drops it and applies F.relu after


class VGGStage(nn.Module):
    """[max-pool] + conv block; the trunk tells the last stage whether to pool (`pool=False`
    skips it)."""

    def __init__(self, c_in: int, widths: List[int], pool: bool):
        super().__init__()
        self.pool = nn.MaxPool2d(2, 2) if pool else None
        self.block = _block(c_in, widths)

    def forward(self, x, pool: bool = True):
        if self.pool is not None and pool:
            x = self.pool(x)
        return self.block(x)


class VGGTrunk(ReferenceInit, nn.Module):
    def __init__(self, config: List[List[int]], init: str = "official"):
        super().__init__()
        self.stages = nn.ModuleList()
        c_in = 3
        for i, widths in enumerate(config):
            self.stages.append(VGGStage(c_in, widths, pool=i > 0))
            c_in = widths[-1]
        self.channels: List[int] = [w[-1] for w in config]
        self.reductions: List[int] = [1, 2, 4, 8, 8]
        self.init_reference(init, fan_out_normal_init, init_linear_normal)

    def forward(self, x):
        pool_last = x.shape[-2] == 64          # RepDistiller: `if h == 64: x = self.pool3(x)`
        features = []
        for i, stage in enumerate(self.stages):
            x = stage(x, pool=pool_last) if i == len(self.stages) - 1 else stage(x)
            features.append(x)
        return features


for _name, _config in _CONFIGS.items():
    TRUNKS.register(_name)(lambda cfg, _config=_config: VGGTrunk(_config))
