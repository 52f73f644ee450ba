"""GradNorm: Chen et al., "GradNorm: Gradient Normalization for Adaptive Loss Balancing in Deep
Multitask Networks", ICML 2018 — as implemented by LibMTL (LibMTL/weighting/GradNorm.py), the
authors having released no code.

Task logits theta (init 1) and weights w = K softmax(theta), so sum_k w_k = K always (LibMTL's
form of the paper's renormalisation). theta is trained by the MODEL optimiser (its learning
rate, weight decay and schedule), as in LibMTL, whose optimiser covers `model.parameters()`
including the weighting's `loss_scale`.

* First epoch (LibMTL `self.epoch >= 1` fails): equal weights, the trunk gets sum_k g_k and theta
  gets no gradient. Its epoch-mean training losses become L(0) (LibMTL `train_loss_buffer[:, 0]`).
* Afterwards, each step, with g_k the gradient of the UNWEIGHTED loss L_k on all the shared
  (trunk) parameters:

      G_k = ||w_k g_k||,  G_bar = mean_k G_k,  r_k = L~_k / mean_i L~_i,  L~_k = L_k / L_k(0)
      L_grad = sum_k |G_k - (G_bar r_k^alpha).detach()|

  theta.grad = dL_grad/dtheta (through the softmax), stepped with the network; the trunk gets
  sum_k w_k g_k with the weights from BEFORE that step; each task's own parameters get the
  gradient of its UNWEIGHTED loss L_k (LibMTL's per-task backward passes leave the heads that
  gradient; only the shared parameters' gradient is replaced).

alpha = `weighting.alpha` (LibMTL config.py `--alpha` default 1.5). A step whose gradients are
not finite (mixed-precision overflow, skipped by the GradScaler) gives theta no gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kdmtl_cli.errors import KdmtlError
from kdmtl_cli.ranges import at_least
from kdmtl_cli.weighting import WEIGHTINGS, Weighting, number


@dataclass
class GradNormSettings:
    """`weighting.*` keys of gradnorm."""
    alpha: float = at_least(0, default=1.5)       # restoring-force strength (0: equal gradient norms); lr: optim.lr


@WEIGHTINGS.register("gradnorm", settings=GradNormSettings)
class GradNorm(Weighting):
    """Adapt w_k so that each task's weighted gradient norm tracks its relative training rate."""

    name = "gradnorm"
    gradient_based = True

    def __init__(self, cfg, task_names, seed=0):
        super().__init__(cfg, task_names, seed)
        self.alpha = number(cfg, "alpha")
        if self.alpha < 0:
            raise KdmtlError(f"weighting.alpha must be >= 0 (got {self.alpha:g})")
        # LibMTL GradNorm.py init_param: loss_scale = [1.0] * task_num; trained by the model optimiser
        self.logits = torch.nn.Parameter(torch.ones(self.num_tasks))
        self.register_buffer("initial_losses", torch.ones(self.num_tasks))
        self.has_initial = False   # False during the first epoch: equal weights

    def param_groups(self, base_lr):
        # the model optimiser's lr and weight decay, as in LibMTL (one optimiser over everything)
        return [{"params": [self.logits], "lr": base_lr}]

    def weights(self, dtype) -> torch.Tensor:
        """w = K softmax(theta) in ``dtype`` (differentiable in theta)."""
        return self.num_tasks * torch.softmax(self.logits.to(dtype), dim=-1)

    def balance_loss(self, norms, losses):
        """LibMTL's L_grad for trunk gradient norms ``norms`` [K] and losses [K] (detached)."""
        w = self.weights(norms.dtype)
        per_task = w.abs() * norms                        # ||w_k g_k||
        relative = losses / self.initial_losses.to(losses.dtype)
        rate = relative / relative.mean()
        target = (per_task.mean() * rate ** self.alpha).detach()
        return (per_task - target).abs().sum()

    def combine_grads(self, grads, losses):
        if not self.has_initial:   # the first epoch: equal weighting
            ones = torch.ones(self.num_tasks, dtype=grads.dtype, device=grads.device)
            return grads.sum(dim=0), self.as_dict(ones)
        weights = self.weights(grads.dtype).detach()
        direction = weights @ grads
        # a step whose gradients overflowed (mixed precision) is skipped by the GradScaler;
        # the weights must not learn from it either
        if bool(torch.isfinite(grads).all()):
            loss_vec = self.stack(losses).detach().to(grads.dtype)
            with torch.enable_grad():
                (grad,) = torch.autograd.grad(self.balance_loss(grads.norm(dim=1), loss_vec), self.logits)
            self.logits.grad = grad   # LibMTL: L_grad.backward() into a zeroed loss_scale.grad
        return direction, self.as_dict(weights)

    def head_weights(self, weights):
        return {t: torch.ones_like(w) for t, w in weights.items()}

    def end_epoch(self, mean_losses):
        if not self.has_initial:
            self.initial_losses.copy_(torch.tensor([float(mean_losses[t]) for t in self.task_names], dtype=torch.float64))
            self.has_initial = True

    def get_extra_state(self):
        return {"has_initial": self.has_initial}

    def set_extra_state(self, state):
        self.has_initial = bool(state["has_initial"])
