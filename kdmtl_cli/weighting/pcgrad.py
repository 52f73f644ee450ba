"""PCGrad: Yu et al., "Gradient Surgery for Multi-Task Learning", NeurIPS 2020.

With g_k the gradient of task k's loss on the shared parameters, for each task i:

    g_i' = g_i
    for j in a random permutation of ALL K tasks (i itself included):
        if g_i' . g_j < 0:  g_i' <- g_i' - (g_i' . g_j / ||g_j||^2) g_j      (g_j: the ORIGINAL gradient)

and the shared update direction is sum_i g_i' (the SUM). This is the official code's loop:
github tianheyu927/PCGrad PCGrad_tf.py `proj_grad` (every k, i included; `tf.minimum(
proj_direction, 0.) * grads_task[k]` with the original gradients; the projected gradients are
added up, no epsilon), drawn in a random order per task as in LibMTL
(LibMTL/weighting/PCGrad.py: `random.shuffle(task_index)` over all tasks, `pc_grads.sum(0)`).
The j = i term only acts when the other projections have turned g_i' against g_i (possible from
3 tasks on). Each task's own parameters get the gradient of sum_k L_k (weights 1). The random
orders come from a torch.Generator seeded with the run's seed whose state is part of the
state_dict, so a resumed run draws the same orders.
"""

from __future__ import annotations

import torch

from kdmtl_cli.weighting import WEIGHTINGS, Weighting


def project(grads: torch.Tensor, orders: list[list[int]]) -> torch.Tensor:
    """sum_i g_i' for ``grads`` [K, P], task i visiting the tasks in ``orders[i]``; in grads' dtype."""
    sq_norms = (grads * grads).sum(dim=1)
    # dividing by 1 where ||g_j|| = 0 is harmless: then g_i'.g_j = 0, no projection happens
    safe = torch.where(sq_norms > 0, sq_norms, torch.ones_like(sq_norms))
    projected = []
    for i, order in enumerate(orders):
        g = grads[i].clone()
        for j in order:
            dot = torch.dot(g, grads[j])
            # min(dot, 0) instead of `if dot < 0`: the same projection without a host sync
            g = g - (dot.clamp(max=0) / safe[j]) * grads[j]
        projected.append(g)
    return torch.stack(projected).sum(dim=0)


@WEIGHTINGS.register("pcgrad")
class PCGrad(Weighting):
    """Project each task's gradient off the others' it conflicts with; sum the results."""

    name = "pcgrad"
    gradient_based = True

    def __init__(self, cfg, task_names, seed=0):
        super().__init__(cfg, task_names, seed)
        self.generator = torch.Generator()  # CPU: the orders are tiny and must not depend on the device
        self.generator.manual_seed(seed)

    def draw_orders(self) -> list[list[int]]:
        """One random permutation of all K tasks per task (this step's visiting orders)."""
        return [torch.randperm(self.num_tasks, generator=self.generator).tolist() for _ in range(self.num_tasks)]

    def combine_grads(self, grads, losses):
        ones = torch.ones(self.num_tasks, dtype=grads.dtype, device=grads.device)
        return project(grads, self.draw_orders()), self.as_dict(ones)

    def get_extra_state(self):
        return {"generator": self.generator.get_state()}

    def set_extra_state(self, state):
        self.generator.set_state(state["generator"])
