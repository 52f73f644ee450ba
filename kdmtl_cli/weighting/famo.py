"""FAMO: Liu et al., "FAMO: Fast Adaptive Multitask Optimization", NeurIPS 2023.

The official code: github Cranial-XIX/FAMO, famo.py class FAMO (the same formulas as
methods/weight_methods.py FAMO and LibMTL/weighting/FAMO.py). Task logits xi (init 0) with
their own Adam (lr `weighting.lr`, famo.py `w_lr=0.025`; weight decay `weighting.gamma`,
famo.py `gamma=0.01`), z = softmax(xi). With D_k = L_k + 1e-8 (famo.py's `min_losses` are
zeros and never set by its experiments, so losses must be >= 0):

    c = sum_k z_k / D_k                       (a constant: no gradient flows through it)
    total = sum_k z_k log(D_k) / c            so d total / d L_k = z_k / (c D_k)

and z_k / (c D_k) (which sum to 1) is the reported weight of L_k. After the backward the
engine clips the norm of the shared trunk's gradient to `weighting.max_norm` (famo.py
`backward`: `clip_grad_norm_(shared_parameters, max_norm)` after `loss.backward()`, max_norm=1.0;
0 turns it off). After the optimiser step (``after_step``), with
delta_k = log D_k(before) - log D_k(after), the logits get one Adam step with the gradient
J_softmax(xi)^T delta  (torch.autograd.grad(softmax(xi), xi, delta), famo.py `update`).

Difference from the official code (not a setting): the official training loops re-evaluate the
same batch after the optimiser step to measure the loss change (experiments/nyuv2/trainer.py,
an extra forward pass per step, under no_grad but in train mode). Here the loss change is
measured on consecutive batches instead: ``after_step`` of step t receives step t's losses
(computed after step t-1's update) and updates xi with delta = log D(t-1) - log D(t), the
change brought by step t-1's update. It costs nothing extra but is noisier, as the two batches
differ; the first step only records its losses. Given the same (before, after) losses the
update is the official one (tests/test_official_weighting.py).

Note on the official experiments: their run.sh files use gamma 0.001 (NYUv2, CelebA, QM9) or
0.01 (Cityscapes), and their clip (methods/weight_methods.py WeightMethod.backward) runs BEFORE
`loss.backward()`, on gradients just zeroed, so it changes nothing there: reproducing those
runs is `weighting.gamma=0.001 weighting.max_norm=0` (NYUv2).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kdmtl_cli.errors import KdmtlError
from kdmtl_cli.ranges import above, at_least
from kdmtl_cli.weighting import WEIGHTINGS, Weighting, number

EPS = 1e-8


@dataclass
class FAMOSettings:
    """`weighting.*` keys of famo."""
    lr: float = above(0, default=0.025)           # learning rate of its task logits (its own Adam)
    gamma: float = at_least(0, default=0.01)      # weight decay of its logits
    # clip the trunk gradient's norm to this after backward
    max_norm: float = at_least(0, default=1.0, note="0 = off")


@WEIGHTINGS.register("famo", settings=FAMOSettings)
class FAMO(Weighting):
    """total = sum_k z_k log(L_k + eps) / c; z = softmax(xi) adapted from the loss decreases."""

    name = "famo"

    def __init__(self, cfg, task_names, seed=0):
        super().__init__(cfg, task_names, seed)
        lr, gamma, max_norm = number(cfg, "lr"), number(cfg, "gamma"), number(cfg, "max_norm")
        if lr <= 0:
            raise KdmtlError(f"weighting.lr must be > 0 (got {lr:g})")
        if gamma < 0:
            raise KdmtlError(f"weighting.gamma must be >= 0 (got {gamma:g})")
        if max_norm < 0:
            raise KdmtlError(f"weighting.max_norm must be >= 0 (got {max_norm:g})")
        self.shared_clip_norm = max_norm if max_norm > 0 else None   # applied by the engine
        # trained by the Adam below, not by the model optimiser (param_groups stays empty)
        self.logits = torch.nn.Parameter(torch.zeros(self.num_tasks))
        self.optimizer = torch.optim.Adam([self.logits], lr=lr, weight_decay=gamma)
        self.register_buffer("prev_losses", torch.ones(self.num_tasks))
        self.has_prev = False  # a Python flag, not a buffer: reading it must not sync the device

    def combine(self, losses):
        shifted = self.stack(losses) + EPS
        z = torch.softmax(self.logits.detach(), dim=0).to(shifted.dtype)
        c = (z / shifted).sum().detach()
        total = (z * torch.log(shifted)).sum() / c
        return total, self.as_dict(z / (c * shifted))

    def after_step(self, losses):
        now = self.stack(losses).detach().to(self.logits.dtype) + EPS
        if self.has_prev:
            delta = torch.log(self.prev_losses) - torch.log(now)
            # a diverged loss must not poison the logits forever; zeroing avoids a host sync
            delta = torch.where(torch.isfinite(delta), delta, torch.zeros_like(delta))
            with torch.enable_grad():
                (grad,) = torch.autograd.grad(torch.softmax(self.logits, dim=0), self.logits,
                                              grad_outputs=delta)
            self.logits.grad = grad
            self.optimizer.step()
            self.logits.grad = None
        self.prev_losses.copy_(now)
        self.has_prev = True

    def get_extra_state(self):
        return {"adam": self.optimizer.state_dict(), "has_prev": self.has_prev}

    def set_extra_state(self, state):
        self.optimizer.load_state_dict(state["adam"])
        self.has_prev = bool(state["has_prev"])
