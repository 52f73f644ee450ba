"""VGG-BN for CIFAR (RepDistiller / mdistiller `vgg.py` layout): five conv blocks of 3x3 conv
(with bias) + BN + ReLU, the last ReLU of each block applied after the block; 2x2 max-pool
between blocks 0-1, 1-2, 2-3, and between 3-4 only for inputs of 64 px or more (as the reference
does), then a global average pool and a Linear(512, classes) (our pooled linear head).

Trunk interface: `stages` = five blocks (pool in front for blocks 1-4; ReLU at the end); for
32 px inputs the features are at 1/1, 1/2, 1/4, 1/8, 1/8 (`reductions` describes that case).
cfg.width / depth / stages / stem_stride / weights / small_input are ignored."""

from __future__ import annotations

from typing import List

import torch.nn as nn

from kdmtl_cli.models import TRUNKS

_CONFIGS = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "vgg16": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "vgg19": [[64, 64], [128, 128], [256] * 4, [512] * 4, [512] * 4],
}


def _block(c_in: int, widths: List[int]) -> nn.Sequential:
    layers: List[nn.Module] = []
    for c_out in widths:
        layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
        c_in = c_out
    return nn.Sequential(*layers)  # ends with ReLU: the reference drops it and applies F.relu after


class VGGStage(nn.Module):
    """[max-pool] + conv block. `pool_min_size`: pool only when the input is at least this big
    (0: always); the reference skips the pool before block 4 for 32 px images."""

    def __init__(self, c_in: int, widths: List[int], pool: bool, pool_min_size: int = 0):
        super().__init__()
        self.pool = nn.MaxPool2d(2, 2) if pool else None
        self.pool_min_size = pool_min_size
        self.block = _block(c_in, widths)

    def forward(self, x):
        if self.pool is not None and x.shape[-2] >= self.pool_min_size:
            x = self.pool(x)
        return self.block(x)


class VGGTrunk(nn.Module):
    def __init__(self, config: List[List[int]]):
        super().__init__()
        self.stages = nn.ModuleList()
        c_in = 3
        for i, widths in enumerate(config):
            # block 4 sees 1/8 of the input: pooling when that is >= 8 px means inputs >= 64 px
            self.stages.append(VGGStage(c_in, widths, pool=i > 0, pool_min_size=8 if i == 4 else 0))
            c_in = widths[-1]
        self.channels: List[int] = [w[-1] for w in config]
        self.reductions: List[int] = [1, 2, 4, 8, 8]

    def forward(self, x):
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features


for _name, _config in _CONFIGS.items():
    TRUNKS.register(_name)(lambda cfg, _config=_config: VGGTrunk(_config))
