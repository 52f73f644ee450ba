"""Uncertainty weighting: Kendall, Gal & Cipolla, "Multi-Task Learning Using Uncertainty to
Weigh Losses for Scene Geometry and Semantics", CVPR 2018.

Each task k has a learned log-variance s_k = log sigma_k^2, initialised to -0.5 and trained by
the model optimiser together with the network (no weight decay), and

    total = sum_k [ L_k / (2 exp(s_k)) + s_k / 2 ],      reported weight w_k = 1 / (2 exp(s_k)).

This is the official form, the same for every task type: MTAN (github lorenmt/mtan,
im2im_pred/utils.py multi_task_trainer: `1 / (2 * torch.exp(logsigma[i])) * train_loss[i] +
logsigma[i] / 2`; im2im_pred/model_segnet_mtan.py: `logsigma = [-0.5, -0.5, -0.5]`, trained by
the model's Adam, weight decay 0), LibMTL (LibMTL/weighting/UW.py: `losses/(2*loss_scale.exp())
+ loss_scale/2`, `loss_scale` initialised to -0.5) and CAGrad's NYUv2 code.
"""

from __future__ import annotations

import torch

from kdmtl_cli.weighting import WEIGHTINGS, Weighting

INITIAL_LOG_VAR = -0.5   # MTAN model_segnet_mtan.py `logsigma`, LibMTL UW.py `loss_scale`


@WEIGHTINGS.register("uncertainty")
class Uncertainty(Weighting):
    """total = sum_k L_k / (2 exp(s_k)) + s_k / 2, s_k = log sigma_k^2 learned (init -0.5)."""

    name = "uncertainty"

    def __init__(self, cfg, task_names, seed=0):
        super().__init__(cfg, task_names, seed)
        self.log_vars = torch.nn.Parameter(torch.full((self.num_tasks,), INITIAL_LOG_VAR))

    def combine(self, losses):
        stacked = self.stack(losses)
        s = self.log_vars.to(stacked.dtype)   # in the losses' dtype (float64 in the tests)
        total = (stacked / (2 * torch.exp(s)) + s / 2).sum()
        return total, self.as_dict(1 / (2 * torch.exp(s)))

    def param_groups(self, base_lr):
        # no weight decay (MTAN's Adam has none): it would pull every s_k towards 0
        return [{"params": [self.log_vars], "lr": base_lr, "weight_decay": 0.0}]
