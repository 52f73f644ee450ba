"""CAGrad: Liu et al., "Conflict-Averse Gradient Descent for Multi-task Learning", NeurIPS 2021.

With g_k the task gradients on the shared parameters, g0 = mean_k g_k, c = `weighting.c` >= 0
and phi = c^2 ||g0||^2, find w on the simplex minimising

    F(w) = g_w . g0 + sqrt(phi) ||g_w||,        g_w = sum_k w_k g_k,

then the update direction is

    d = (g0 + sqrt(phi) / ||g_w|| * g_w) / (1 + c^2)

(the division is the official code's `rescale=1`). d has the scale of the MEAN gradient (not
the sum); c = 0 gives exactly g0. Each task's own parameters get the gradient of sum_k L_k.

F only needs the K x K Gram matrix A = G G^T: g_w . g0 = w^T A 1/K, ||g_w||^2 = w^T A w. It is
convex in w; it is minimised in float64 on the CPU by a small interior-point (log-barrier +
Newton) method, deterministic and independent of any random state, on A divided by its mean
diagonal so that the tolerances do not depend on the gradients' scale.
"""

from __future__ import annotations

import numpy as np
import torch

from kdmtl_cli.errors import KdmtlError
from kdmtl_cli.weighting import WEIGHTINGS, Weighting, number

_EPS = 1e-12            # inside sqrt(w^T A w) of the normalised problem: F stays smooth at g_w = 0
BARRIERS = 10.0 ** -np.arange(1, 13)   # mu = 1e-1 ... 1e-12
NEWTON_ITERS = 50       # per barrier value; a few are usually enough
DECREMENT_TOL = 1e-14   # stop Newton once the predicted decrease is below this


def solve_weights(gram: np.ndarray, c: float) -> np.ndarray:
    """argmin over the simplex of F(w) = w^T A 1/K + c ||g0|| sqrt(w^T A w), A = ``gram``.

    A log-barrier (interior-point) method: for decreasing mu, damped Newton steps on
    F(w) - mu sum_k log w_k restricted to sum_k w_k = 1. Newton copes with the ill-conditioning
    that task gradients of very different sizes bring (plain projected gradient descent needs
    thousands of steps there); ~100 solves of a (K+1)x(K+1) system in all."""
    k = len(gram)
    scale = float(np.trace(gram)) / k
    w = np.full(k, 1.0 / k)
    if c == 0 or not np.isfinite(scale) or scale <= 0:
        return w  # F is linear (or every gradient is zero): the mean is the answer
    a = gram / scale
    b = a.mean(axis=1)
    s = c * np.sqrt(max(b.mean(), 0.0))  # c ||g0||, as b.mean() = 1^T A 1 / K^2 = ||g0||^2

    def value_grad_hess(x):
        ax = a @ x
        r = np.sqrt(max(x @ ax, 0.0) + _EPS)  # ||g_x||
        return x @ b + s * r, b + s * ax / r, s * (a / r - np.outer(ax, ax) / r ** 3)

    kkt = np.zeros((k + 1, k + 1))
    kkt[:k, k] = kkt[k, :k] = 1.0  # the equality constraint sum_k step_k = 0
    for mu in BARRIERS:
        for _ in range(NEWTON_ITERS):
            f, g, h = value_grad_hess(w)
            g = g - mu / w
            kkt[:k, :k] = h + np.diag(mu / w ** 2)  # positive definite: the system is regular
            step = np.linalg.solve(kkt, np.concatenate([-g, [0.0]]))[:k]
            decrement = -g @ step
            if decrement < DECREMENT_TOL:
                break
            shrinking = step < 0  # stay strictly inside the simplex
            t = min(1.0, 0.99 * float(np.min(-w[shrinking] / step[shrinking]))) if shrinking.any() else 1.0
            barrier = f - mu * np.log(w).sum()
            while t > 1e-12:  # backtracking (Armijo) on the barrier objective
                candidate = w + t * step
                if value_grad_hess(candidate)[0] - mu * np.log(candidate).sum() <= barrier - 0.25 * t * decrement:
                    w = candidate
                    break
                t /= 2
            else:
                break  # no progress possible at this mu (rounding): go to the next one
    return w


@WEIGHTINGS.register("cagrad")
class CAGrad(Weighting):
    """Maximise the worst task's improvement within a ball of radius c ||g0|| around g0."""

    name = "cagrad"
    uses = ("c",)
    gradient_based = True

    def __init__(self, cfg, task_names, seed=0):
        super().__init__(cfg, task_names, seed)
        self.c = number(cfg, "c")
        if self.c < 0:
            raise KdmtlError(f"weighting.c must be >= 0 (got {self.c:g})")

    def solve(self, grads: torch.Tensor) -> torch.Tensor:
        """The simplex weights w [K] (float64, CPU) for ``grads`` [K, P]."""
        gram = (grads.double() @ grads.double().T).cpu().numpy()
        if not np.isfinite(gram).all():
            return torch.full((self.num_tasks,), 1.0 / self.num_tasks, dtype=torch.float64)
        return torch.from_numpy(solve_weights(gram, self.c))

    def combine_grads(self, grads, losses):
        mean = grads.mean(dim=0)
        ones = self.as_dict(torch.ones(self.num_tasks, dtype=grads.dtype, device=grads.device))
        if self.c == 0:
            return mean, ones
        w = self.solve(grads).to(device=grads.device, dtype=grads.dtype)
        g_w = w @ grads
        radius = self.c * mean.norm()  # sqrt(phi)
        direction = (mean + radius / (g_w.norm() + 1e-8) * g_w) / (1 + self.c ** 2)
        return direction, ones
