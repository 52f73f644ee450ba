"""Models of your own, three ways:

1. a trunk registered by name (`student=tiny_cnn`, `student.arch=tiny_cnn`) with typed settings;
2. any torch.nn.Module trunk named by import path (`student.trunk._target_: my_trunk.PlainTrunk`);
3. a whole model returning the task outputs by name (`student.model._target_: my_trunk.StripesNet`).

The trunk contract: forward(image) returns the feature maps, a list ordered deepest last. A trunk
may say each map's channels and stride (`channels`, `reductions`); kdmtl measures them otherwise.
kdmtl then attaches a head per task (pooled linear for image-level tasks, a decoder for dense ones).
"""

from dataclasses import dataclass

import torch
import torch.nn as nn

from kdmtl_cli.models import TRUNKS


def block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class PlainTrunk(nn.Module):
    """Two stages; says nothing about its maps (kdmtl measures them)."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.stages = nn.ModuleList([block(3, width, 1), block(width, 2 * width, 2)])

    def forward(self, x):
        maps = []
        for stage in self.stages:
            x = stage(x)
            maps.append(x)
        return maps


@dataclass
class TinyCNNSettings:
    channels: int = 8        # channels of the first stage (doubled at the second)


@TRUNKS.register("tiny_cnn", settings=TinyCNNSettings)
def build_tiny_cnn(cfg) -> nn.Module:
    trunk = PlainTrunk(cfg.channels)
    trunk.channels, trunk.reductions = [cfg.channels, 2 * cfg.channels], [1, 2]
    return trunk


class StripesNet(nn.Module):
    """A whole model for tasks/stripes: returns {task: output} itself (no kdmtl heads)."""

    def __init__(self, width: int = 8, classes: int = 2):
        super().__init__()
        self.body = nn.Sequential(block(3, width, 1), block(width, width, 1))
        self.orient = nn.Linear(width, 2)
        self.mask = nn.Conv2d(width, classes, 1)
        self.period = nn.Linear(width, 1)

    def forward(self, image):
        x = self.body(image)
        pooled = x.mean(dim=(2, 3))
        return {"orient": self.orient(pooled), "mask": self.mask(x), "period": self.period(pooled) + 6.0}
