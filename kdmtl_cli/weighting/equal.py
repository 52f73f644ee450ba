"""Equal weighting: total = sum_k L_k, every task weight w_k = 1 (the plain multi-task baseline)."""

from __future__ import annotations

import torch

from kdmtl_cli.weighting import WEIGHTINGS, Weighting


@WEIGHTINGS.register("equal")
class Equal(Weighting):
    """total = sum_k L_k; w_k = 1."""

    name = "equal"

    def combine(self, losses):
        stacked = self.stack(losses)
        return stacked.sum(), self.as_dict(torch.ones_like(stacked))
