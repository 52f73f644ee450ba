"""Task heads: pooled linear for image-level tasks; a light FPN-style decoder for dense tasks."""

from __future__ import annotations

from typing import List

import torch
import torch.nn as nn
import torch.nn.functional as F


class TrunkFeatures(list):
    """The trunk's stage outputs, coarse last. `pooled` (the global average of the last stage)
    is computed once per forward and shared by every image-level head, so an extra
    classification head costs one small linear layer, not another pass over the feature map."""

    _pooled = None

    @property
    def pooled(self):
        if self._pooled is None:
            self._pooled = self[-1].mean((2, 3))
        return self._pooled


class PooledLinearHead(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.fc = nn.Linear(in_channels, out_channels)

    def forward(self, features: List, image_size):
        pooled = features.pooled if isinstance(features, TrunkFeatures) else features[-1].mean((2, 3))
        return self.fc(pooled)


class DenseDecoder(nn.Module):
    """Top-down: project every stage to `width` channels, upsample coarse-to-fine and add,
    refine once at the finest stage, predict, and upsample to the input size."""

    def __init__(self, in_channels: List[int], width: int, out_channels: int):
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, width, 1, bias=False) for c in in_channels)
        self.refine = nn.Sequential(nn.Conv2d(width, width, 3, 1, 1, bias=False),
                                    nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        self.predict = nn.Conv2d(width, out_channels, 1)

    def forward(self, features: List, image_size):
        x = self.lateral[-1](features[-1])
        for lateral, feature in zip(reversed(self.lateral[:-1]), reversed(features[:-1])):
            x = F.interpolate(x, size=feature.shape[-2:], mode="bilinear", align_corners=False)
            x = x + lateral(feature)
        x = self.predict(self.refine(x))
        if tuple(x.shape[-2:]) != tuple(image_size):
            x = F.interpolate(x, size=image_size, mode="bilinear", align_corners=False)
        return x


class ScaledHead(nn.Module):
    """Regression outputs in target units: head output * std + mean of the training targets.
    The statistics are buffers, so they travel with the weights."""

    def __init__(self, head: nn.Module, mean: float, std: float):
        super().__init__()
        self.head = head
        self.register_buffer("shift", torch.tensor(float(mean)))
        self.register_buffer("scale", torch.tensor(float(std)))

    def forward(self, features: List, image_size):
        return self.head(features, image_size) * self.scale + self.shift
