"""Fixed weighting: total = sum_k w_k L_k with constant, user-given w_k >= 0.

`weighting.weights` is a number (the same weight for every task) or a mapping {task: weight}
that names each task exactly."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import math

import torch

from kdmtl_cli.distill.weights import per_task_weights
from kdmtl_cli.errors import KdmtlError
from kdmtl_cli.ranges import at_least
from kdmtl_cli.weighting import WEIGHTINGS, Weighting, field


@dataclass
class FixedSettings:
    """`weighting.*` keys of fixed."""
    weights: Any = at_least(0, default=1.0)       # a number, or {task: number}


@WEIGHTINGS.register("fixed", settings=FixedSettings)
class Fixed(Weighting):
    """total = sum_k w_k L_k; w from `weighting.weights`."""

    name = "fixed"

    def __init__(self, cfg, task_names, seed=0):
        super().__init__(cfg, task_names, seed)
        weights = per_task_weights(field(cfg, "weights"), self.task_names, "weighting.weights")
        bad = {t: w for t, w in weights.items() if not (math.isfinite(w) and w >= 0)}
        if bad:
            raise KdmtlError(f"weighting.weights must be finite and >= 0 (got {bad})")
        # a buffer, so it follows the module to the device and no step copies it from the host;
        # not saved: the config, not an old checkpoint, says what the weights are
        # float64, cast to the losses' dtype in combine (float64 losses get the exact weights)
        self.register_buffer("weights", torch.tensor([weights[t] for t in self.task_names], dtype=torch.float64),
                             persistent=False)

    def combine(self, losses):
        stacked = self.stack(losses)
        weights = self.weights.to(stacked.dtype)
        return (weights * stacked).sum(), self.as_dict(weights.clone())
