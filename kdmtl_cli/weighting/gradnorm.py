"""GradNorm: Chen et al., "GradNorm: Gradient Normalization for Adaptive Loss Balancing in Deep
Multitask Networks", ICML 2018.

Learned task weights w_k (init 1) with their own Adam (lr `weighting.lr`); the model minimises
sum_k w_k L_k. Each step, with g_k the gradient of the UNWEIGHTED loss L_k on the shared
parameters:

    n_k = ||g_k||,  G_k = w_k n_k,  G_bar = mean_k G_k
    L~_k = L_k / L_k(0)   (L_k(0): the losses at the first step, stored)
    r_k = L~_k / mean_i L~_i
    target_k = G_bar * r_k ** alpha          (a constant: no gradient flows through it)
    L_grad = sum_k |G_k - target_k|          so dL_grad/dw_k = sign(G_k - target_k) * n_k

one Adam step on w with dL_grad/dw, then w is clamped to >= 1e-4 and renormalised so that
sum_k w_k = K. The shared direction of this step is sum_k w_k g_k with the weights from BEFORE
the update, and the task-specific parameters get sum_k w_k L_k with those same weights.
alpha = `weighting.alpha` (>= 0; 0 pulls every G_k to the same norm). A step whose gradients
are not finite (mixed-precision overflow, skipped by the GradScaler) leaves w, its Adam and
L(0) untouched.
"""

from __future__ import annotations

import torch

from kdmtl_cli.errors import KdmtlError
from kdmtl_cli.weighting import WEIGHTINGS, Weighting, number

MIN_WEIGHT = 1e-4   # keeps a weight positive, so renormalising never divides by zero
_TINY = 1e-12       # keeps L~ finite when a first loss is exactly 0


@WEIGHTINGS.register("gradnorm")
class GradNorm(Weighting):
    """Adapt w_k so that each task's weighted gradient norm tracks its relative training rate."""

    name = "gradnorm"
    uses = ("alpha", "lr")
    gradient_based = True

    def __init__(self, cfg, task_names, seed=0):
        super().__init__(cfg, task_names, seed)
        self.alpha, lr = number(cfg, "alpha"), number(cfg, "lr")
        if self.alpha < 0:
            raise KdmtlError(f"weighting.alpha must be >= 0 (got {self.alpha:g})")
        if lr <= 0:
            raise KdmtlError(f"weighting.lr must be > 0 (got {lr:g})")
        # trained by the Adam below, not by the model optimiser (param_groups stays empty)
        self.w = torch.nn.Parameter(torch.ones(self.num_tasks))
        self.optimizer = torch.optim.Adam([self.w], lr=lr)
        self.register_buffer("initial_losses", torch.ones(self.num_tasks))
        self.has_initial = False

    def balance_grad(self, norms, losses):
        """dL_grad/dw for gradient norms ``norms`` [K] and losses [K] (both detached)."""
        if not self.has_initial:
            self.initial_losses.copy_(losses)
            self.has_initial = True
        relative = losses / self.initial_losses.clamp(min=_TINY)
        rate = relative / relative.mean()
        with torch.enable_grad():
            weighted = self.w * norms
            target = (weighted.mean() * rate ** self.alpha).detach()
            (grad,) = torch.autograd.grad((weighted - target).abs().sum(), self.w)
        return grad

    def combine_grads(self, grads, losses):
        weights = self.w.detach().clone()
        direction = weights.to(grads.dtype) @ grads
        # a step whose gradients overflowed (mixed precision) is skipped by the GradScaler;
        # the weights must not learn from it either
        if bool(torch.isfinite(grads).all()):
            norms = grads.norm(dim=1).detach().to(self.w.dtype)
            loss_vec = self.stack(losses).detach().to(self.w.dtype)
            self.w.grad = self.balance_grad(norms, loss_vec)
            self.optimizer.step()
            self.w.grad = None
            with torch.no_grad():
                self.w.clamp_(min=MIN_WEIGHT)
                self.w.mul_(self.num_tasks / self.w.sum())
        return direction, self.as_dict(weights)

    def get_extra_state(self):
        return {"adam": self.optimizer.state_dict(), "has_initial": self.has_initial}

    def set_extra_state(self, state):
        self.optimizer.load_state_dict(state["adam"])
        self.has_initial = bool(state["has_initial"])
