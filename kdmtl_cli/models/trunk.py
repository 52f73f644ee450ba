"""The trunk contract shared by every architecture: a `stem`, then `stages` (a ModuleList, so
feature methods can name `trunk.stages.<i>`); forward returns each stage's output, finest first.
Subclasses set `channels` and `reductions` (channels and downsampling of each returned map)."""

from __future__ import annotations

import torch.nn as nn


class StagedTrunk(nn.Module):
    def forward(self, x):
        x = self.stem(x)
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features
