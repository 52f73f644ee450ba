"""Uncertainty weighting: Kendall, Gal & Cipolla, "Multi-Task Learning Using Uncertainty to
Weigh Losses for Scene Geometry and Semantics", CVPR 2018.

Each task k has a learned log-variance s_k = log sigma_k^2 (initialised 0, trained by the
model optimiser together with the network) and

    total = sum_k [ exp(-s_k) * L_k + s_k ],      reported weight w_k = exp(-s_k).

Convention: the same form is used for every task type, as in LibMTL's implementation. (The
paper derives 1/(2 sigma^2) L + log sigma for regression and 1/sigma^2 L + log sigma for
classification; those differ from this one only by constant factors absorbed by s_k's scale.)
"""

from __future__ import annotations

import torch

from kdmtl_cli.weighting import WEIGHTINGS, Weighting


@WEIGHTINGS.register("uncertainty")
class Uncertainty(Weighting):
    """total = sum_k exp(-s_k) L_k + s_k, s_k = log sigma_k^2 learned (init 0)."""

    name = "uncertainty"
    uses = ()

    def __init__(self, cfg, task_names, seed=0):
        super().__init__(cfg, task_names, seed)
        self.log_vars = torch.nn.Parameter(torch.zeros(self.num_tasks))

    def combine(self, losses):
        stacked = self.stack(losses)
        precision = torch.exp(-self.log_vars)
        total = (precision * stacked + self.log_vars).sum()
        return total, self.as_dict(precision)

    def param_groups(self, base_lr):
        # no weight decay: it would pull every s_k towards 0 (sigma = 1), which is no part of the method
        return [{"params": [self.log_vars], "lr": base_lr, "weight_decay": 0.0}]
