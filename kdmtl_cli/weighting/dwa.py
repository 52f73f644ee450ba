"""Dynamic Weight Average: Liu, Johns & Davison, "End-to-End Multi-Task Learning with
Attention" (MTAN), CVPR 2019.

    w_k(t) = K * exp(r_k(t-1) / T) / sum_i exp(r_i(t-1) / T),   r_k(t-1) = L_k(t-1) / L_k(t-2)

where L_k(t) is task k's mean training loss over epoch t (given by ``end_epoch``) and T is
`weighting.temperature`. w_k = 1 during the first two epochs (fewer than two epochs recorded).
total = sum_k w_k L_k. A task that learns slowly (ratio near or above 1) gets more weight.

The official code: github lorenmt/mtan, im2im_pred/utils.py multi_task_trainer (`index == 0 or
index == 1`: weights 1; `w_i = avg_cost[index - 1, .] / avg_cost[index - 2, .]` with avg_cost the
epoch mean of the per-batch training losses; `3 * np.exp(w_i / T) / sum_j np.exp(w_j / T)`;
`--temp` default 2.0 in model_segnet_mtan.py), as LibMTL/weighting/DWA.py (`self.epoch > 1`,
`task_num * F.softmax(w_i / T)`). Here the softmax subtracts the largest ratio first (the same
value, no overflow) and a zero epoch loss is read as 1e-12.
"""

from __future__ import annotations

from dataclasses import dataclass

import math

import torch

from kdmtl_cli.errors import KdmtlError
from kdmtl_cli.ranges import above
from kdmtl_cli.weighting import WEIGHTINGS, Weighting, number

_TINY = 1e-12  # keeps the ratio finite when an epoch's mean loss is exactly 0


def dwa_weights(previous: list[float], last: list[float], temperature: float) -> list[float]:
    """K * softmax(r / T) with r_k = last_k / previous_k, in float64."""
    ratios = [a / max(b, _TINY) for a, b in zip(last, previous)]
    top = max(ratios)  # subtracted before exp: same softmax, no overflow
    exps = [math.exp((r - top) / temperature) for r in ratios]
    return [len(exps) * e / sum(exps) for e in exps]


@dataclass
class DWASettings:
    """`weighting.*` keys of dwa."""
    temperature: float = above(0, default=2.0)    # T of the softmax over loss-descent rates


@WEIGHTINGS.register("dwa", settings=DWASettings)
class DWA(Weighting):
    """w_k = K softmax_k(L_k(t-1) / L_k(t-2) / T) from epoch-mean losses; 1 for two epochs."""

    name = "dwa"

    def __init__(self, cfg, task_names, seed=0):
        super().__init__(cfg, task_names, seed)
        self.temperature = number(cfg, "temperature")
        if self.temperature <= 0:
            raise KdmtlError(f"weighting.temperature must be > 0 (got {self.temperature:g})")
        self.history: list[list[float]] = []  # the last two epochs' mean losses, oldest first
        # float64 (computed so), cast to the losses' dtype in combine
        self.register_buffer("weights", torch.ones(self.num_tasks, dtype=torch.float64))

    def combine(self, losses):
        stacked = self.stack(losses)
        weights = self.weights.to(stacked.dtype)
        return (weights * stacked).sum(), self.as_dict(weights.clone())

    def end_epoch(self, mean_losses: dict[str, float]) -> None:
        self.history = (self.history + [[float(mean_losses[t]) for t in self.task_names]])[-2:]
        if len(self.history) == 2:
            self.weights.copy_(torch.tensor(dwa_weights(*self.history, self.temperature), dtype=torch.float64))

    def get_extra_state(self):
        return {"history": [list(row) for row in self.history]}

    def set_extra_state(self, state):
        self.history = [list(map(float, row)) for row in state["history"]]
