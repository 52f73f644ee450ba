"""CAGrad: Liu et al., "Conflict-Averse Gradient Descent for Multi-task Learning", NeurIPS 2021.

The official code (github Cranial-XIX/CAGrad, nyuv2/utils.py `cagrad(grads, alpha, rescale=1)`
and `overwrite_grad`), with g_k the task gradients on the shared parameters, K tasks,
c = `weighting.c` >= 0 (nyuv2/run.sh `--alpha 0.4`), A = G G^T:

    ||g0|| = sqrt(mean(A) + 1e-8)                         (g0 = mean_k g_k)
    c' = c ||g0|| + 1e-8
    w = argmin over the simplex of  F(w) = w^T A 1/K + c' sqrt(w^T A w + 1e-8)
    g_w = sum_k w_k g_k,   lambda = c' / (||g_w|| + 1e-8)
    d = K (g0 + lambda g_w) / (1 + c^2)

(/(1 + c^2): `rescale=1`, the value every official call uses; K: `overwrite_grad`'s
`newgrad * 3  # to match the sum loss`, so d has the scale of the SUM of the task gradients).
c = 0 gives exactly sum_k g_k (equal weighting); the official code there still adds
1e-8 g_w / (||g_w|| + 1e-8). Each task's own parameters get the gradient of sum_k L_k.

The official code minimises F with scipy's SLSQP (`scipy.optimize.minimize` from w = 1/K,
default tolerance ftol 1e-6). Here the same F is minimised to ~1e-12 in float64 on the CPU by a
small interior-point (log-barrier + Newton) method, deterministic and without scipy, on A divided
by its mean diagonal so that the tolerances do not depend on the gradients' scale; the two
solutions agree to SLSQP's tolerance (tests/test_official_weighting.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kdmtl_cli.errors import KdmtlError
from kdmtl_cli.ranges import at_least
from kdmtl_cli.weighting import WEIGHTINGS, Weighting, number

EPS = 1e-8              # the official code's epsilons (nyuv2/utils.py cagrad)
_MIN_EPS = 1e-12        # floor of the normalised sqrt epsilon: F stays smooth at g_w = 0
BARRIERS = 10.0 ** -np.arange(1, 13)   # mu = 1e-1 ... 1e-12
NEWTON_ITERS = 50       # per barrier value; a few are usually enough
DECREMENT_TOL = 1e-14   # stop Newton once the predicted decrease is below this


def solve_weights(gram: np.ndarray, c: float) -> np.ndarray:
    """argmin over the simplex of the official F(w) = w^T A 1/K + c' sqrt(w^T A w + 1e-8),
    c' = c sqrt(mean(A) + 1e-8) + 1e-8, A = ``gram``.

    A log-barrier (interior-point) method: for decreasing mu, damped Newton steps on
    F(w) - mu sum_k log w_k restricted to sum_k w_k = 1. Newton copes with the ill-conditioning
    that task gradients of very different sizes bring (plain projected gradient descent needs
    thousands of steps there); ~100 solves of a (K+1)x(K+1) system in all."""
    k = len(gram)
    scale = float(np.trace(gram)) / k
    w = np.full(k, 1.0 / k)
    if c == 0 or not np.isfinite(scale) or scale <= 0:
        return w  # F is (nearly) linear in w (or every gradient is zero): the mean is the answer
    c_prime = c * np.sqrt(gram.mean() + EPS) + EPS
    # F / scale in terms of a = A / scale: w^T a 1/K + s sqrt(w^T a w + eps)
    a = gram / scale
    b = a.mean(axis=1)
    s = c_prime / np.sqrt(scale)
    eps = max(EPS / scale, _MIN_EPS)

    def value_grad_hess(x):
        ax = a @ x
        r = np.sqrt(max(x @ ax, 0.0) + eps)  # sqrt(||g_x||^2 + eps), normalised
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


@dataclass
class CAGradSettings:
    """`weighting.*` keys of cagrad."""
    c: float = at_least(0, default=0.4)           # radius of the ball around the mean gradient (0: the mean)


@WEIGHTINGS.register("cagrad", settings=CAGradSettings)
class CAGrad(Weighting):
    """Maximise the worst task's improvement within a ball of radius c ||g0|| around g0."""

    name = "cagrad"
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

    def direction(self, grads: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """The official update for simplex weights ``w`` [K], in grads' dtype (see the module doc)."""
        gram = grads @ grads.T
        c_prime = self.c * (gram.mean() + EPS).sqrt() + EPS
        g_w = w.to(grads.dtype) @ grads
        lam = c_prime / (g_w.norm() + EPS)
        return self.num_tasks * (grads.mean(dim=0) + lam * g_w) / (1 + self.c ** 2)

    def combine_grads(self, grads, losses):
        ones = self.as_dict(torch.ones(self.num_tasks, dtype=grads.dtype, device=grads.device))
        if self.c == 0:
            return grads.sum(dim=0), ones
        w = self.solve(grads).to(device=grads.device, dtype=grads.dtype)
        return self.direction(grads, w), ones
