"""A multi-task weighting of your own: `weighting=first_loss`: each task's loss divided by its value
at the first step, so every task starts at 1 (times `weighting.scale`). Loss-based: `combine`
returns the total to backpropagate and the weights it used; its state (the first losses) is a
buffer, saved in checkpoints, so a resumed run continues exactly."""

from dataclasses import dataclass

import torch

from kdmtl_cli.weighting import WEIGHTINGS, Weighting


@dataclass
class FirstLossSettings:
    scale: float = 1.0       # the total weight of each task at the first step


@WEIGHTINGS.register("first_loss", settings=FirstLossSettings)
class FirstLoss(Weighting):
    name = "first_loss"
    gradient_based = False   # combine(losses); a gradient-based one implements combine_grads(G, losses)

    def __init__(self, cfg, task_names, seed=0):
        super().__init__(cfg, task_names, seed)
        self.scale = float(cfg.scale)
        self.register_buffer("first", torch.zeros(self.num_tasks))

    def combine(self, losses):
        stacked = self.stack(losses)
        if not bool((self.first > 0).all()):
            self.first.copy_(stacked.detach().clamp_min(1e-8))
        weights = self.scale / self.first
        return (weights * stacked).sum(), self.as_dict(weights)
