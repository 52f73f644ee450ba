"""Each weighting against its official implementation, transcribed here line by line FROM THE
OFFICIAL CODE (not from kdmtl's) and run in float64 on random losses and gradients.

Sources (repository, file, what is transcribed):

* equal        LibMTL  LibMTL/weighting/EW.py            backward
* uncertainty  MTAN    im2im_pred/utils.py               multi_task_trainer, weight == 'uncert'
                       im2im_pred/model_segnet_mtan.py   logsigma = [-0.5, -0.5, -0.5]
               LibMTL  LibMTL/weighting/UW.py            backward, init_param
* dwa          MTAN    im2im_pred/utils.py               multi_task_trainer, weight == 'dwa'
               LibMTL  LibMTL/weighting/DWA.py           backward (any number of tasks)
* gradnorm     LibMTL  LibMTL/weighting/GradNorm.py      backward (rep_grad=False), AbsWeighting._backward_new_grads
* pcgrad       PCGrad  PCGrad_tf.py (tianheyu927)        compute_gradients.proj_grad, then the sum
               LibMTL  LibMTL/weighting/PCGrad.py        backward (its 1e-8 in the denominator)
* cagrad       CAGrad  nyuv2/utils.py (Cranial-XIX)      cagrad(grads, alpha, rescale=1), overwrite_grad (* K)
* famo         FAMO    famo.py (Cranial-XIX)             FAMO.__init__ defaults, get_weighted_loss, update

Agreement is 1e-9 in float64 everywhere except where the official code itself differs by a
stated epsilon or solver tolerance (LibMTL PCGrad's 1e-8, CAGrad's SLSQP); the largest
differences seen are recorded in MAX_DIFF and printed by the last test (-s).
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from kdmtl_cli.schema import WeightingConfig
from kdmtl_cli.weighting import build_weighting
from kdmtl_cli.weighting.pcgrad import project

ATOL = 1e-9
MAX_DIFF: dict[str, float] = {}
D = torch.float64


def make(name, k, seed=0, **fields):
    cfg = OmegaConf.structured(WeightingConfig(name=name, **fields))
    return build_weighting(cfg, [f"t{i}" for i in range(k)], seed).double()


def as_losses(vector, requires_grad=False):
    return {f"t{i}": vector[i].clone().requires_grad_(requires_grad) for i in range(len(vector))}


def record(name, *diffs):
    diff = max(float(torch.as_tensor(d).detach()) for d in diffs)
    MAX_DIFF[name] = max(MAX_DIFF.get(name, 0.0), diff)
    return diff


def maxdiff(a, b):
    return (torch.as_tensor(a, dtype=D) - torch.as_tensor(b, dtype=D)).abs().max()


# -- equal ---------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [2, 3, 5])
def test_equal_is_libmtl_ew(k):
    gen = torch.Generator().manual_seed(k)
    losses = torch.rand(k, generator=gen, dtype=D) * 3
    # LibMTL EW.backward: loss = torch.mul(losses, torch.ones_like(losses)).sum(); weights np.ones
    official = torch.mul(losses, torch.ones_like(losses)).sum()
    total, w = make("equal", k).combine(as_losses(losses))
    assert record("equal", maxdiff(total, official), maxdiff(list(w.values()), np.ones(k))) <= ATOL


def test_fixed_is_the_weighted_sum():
    # no official code: MTAN's trainer uses `sum([lambda_weight[i, index] * train_loss[i] ...])`
    losses = torch.tensor([0.7, 2.5, 1.25], dtype=D)
    weights = {"t0": 0.5, "t1": 2.0, "t2": 0.1}
    official = sum([weights[f"t{i}"] * losses[i] for i in range(3)])
    total, w = make("fixed", 3, weights=weights).combine(as_losses(losses))
    assert record("fixed", maxdiff(total, official), maxdiff(list(w.values()), list(weights.values()))) <= ATOL


# -- uncertainty -----------------------------------------------------------------------------

@pytest.mark.parametrize("k", [2, 3, 4])
def test_uncertainty_is_mtan_and_libmtl_uw(k):
    gen = torch.Generator().manual_seed(10 + k)
    strategy = make("uncertainty", k)
    # the official initial value: MTAN logsigma = [-0.5, -0.5, -0.5]; LibMTL loss_scale = [-0.5]*task_num
    assert strategy.log_vars.tolist() == [-0.5] * k
    for trial in range(3):
        losses = torch.rand(k, generator=gen, dtype=D) * 4 + 0.01
        s_value = torch.full((k,), -0.5, dtype=D) if trial == 0 else torch.randn(k, generator=gen, dtype=D)
        with torch.no_grad():
            strategy.log_vars.copy_(s_value)
        strategy.log_vars.grad = None

        # MTAN: loss = sum(1 / (2 * torch.exp(logsigma[i])) * train_loss[i] + logsigma[i] / 2 for i in range(3))
        logsigma = s_value.clone().requires_grad_(True)
        train_loss = losses.clone().requires_grad_(True)
        mtan = sum(1 / (2 * torch.exp(logsigma[i])) * train_loss[i] + logsigma[i] / 2 for i in range(k))
        mtan_ds, mtan_dl = torch.autograd.grad(mtan, [logsigma, train_loss])
        # LibMTL UW: loss = (losses/(2*self.loss_scale.exp())+self.loss_scale/2).sum(); weights 1/(2*exp(s))
        libmtl = (losses / (2 * s_value.exp()) + s_value / 2).sum()
        libmtl_w = 1 / (2 * torch.exp(s_value))

        mine_losses = as_losses(losses, requires_grad=True)
        total, w = strategy.combine(mine_losses)
        total.backward()
        mine_dl = torch.stack([mine_losses[f"t{i}"].grad for i in range(k)])
        assert record("uncertainty", maxdiff(total, mtan), maxdiff(total, libmtl),
                      maxdiff(strategy.log_vars.grad, mtan_ds), maxdiff(mine_dl, mtan_dl),
                      maxdiff(list(w.values()), libmtl_w)) <= ATOL


# -- dwa -------------------------------------------------------------------------------------

def test_dwa_is_mtan_three_tasks():
    rng = np.random.default_rng(0)
    total_epoch, T = 6, 2.0
    avg_cost = np.zeros([total_epoch, 24], dtype=np.float64)   # official: float32; float64 here
    avg_cost[:, [0, 3, 6]] = rng.uniform(0.05, 3.0, size=(total_epoch, 3))
    # MTAN im2im_pred/utils.py multi_task_trainer, opt.weight == 'dwa'
    lambda_weight = np.ones([3, total_epoch])
    for index in range(total_epoch):
        if index == 0 or index == 1:
            lambda_weight[:, index] = 1.0
        else:
            w_1 = avg_cost[index - 1, 0] / avg_cost[index - 2, 0]
            w_2 = avg_cost[index - 1, 3] / avg_cost[index - 2, 3]
            w_3 = avg_cost[index - 1, 6] / avg_cost[index - 2, 6]
            lambda_weight[0, index] = 3 * np.exp(w_1 / T) / (np.exp(w_1 / T) + np.exp(w_2 / T) + np.exp(w_3 / T))
            lambda_weight[1, index] = 3 * np.exp(w_2 / T) / (np.exp(w_1 / T) + np.exp(w_2 / T) + np.exp(w_3 / T))
            lambda_weight[2, index] = 3 * np.exp(w_3 / T) / (np.exp(w_1 / T) + np.exp(w_2 / T) + np.exp(w_3 / T))

    strategy = make("dwa", 3, temperature=T)
    losses = torch.tensor([1.5, 0.3, 2.0], dtype=D)
    for index in range(total_epoch):
        total, w = strategy.combine(as_losses(losses))
        official_total = sum([lambda_weight[i, index] * losses[i] for i in range(3)])
        assert record("dwa", maxdiff(list(w.values()), lambda_weight[:, index]),
                      maxdiff(total, official_total)) <= ATOL
        strategy.end_epoch({f"t{i}": avg_cost[index, [0, 3, 6][i]] for i in range(3)})


@pytest.mark.parametrize("k, T", [(2, 2.0), (5, 0.7)])
def test_dwa_is_libmtl_any_number_of_tasks(k, T):
    rng = np.random.default_rng(k)
    epochs = 5
    train_loss_buffer = rng.uniform(0.05, 3.0, size=(k, epochs))
    strategy = make("dwa", k, temperature=T)
    losses = torch.tensor(rng.uniform(0.1, 2, size=k), dtype=D)
    for epoch in range(epochs):
        # LibMTL DWA.backward
        if epoch > 1:
            w_i = torch.tensor(train_loss_buffer[:, epoch - 1] / train_loss_buffer[:, epoch - 2], dtype=D)
            batch_weight = k * F.softmax(w_i / T, dim=-1)
        else:
            batch_weight = torch.ones_like(losses)
        _, w = strategy.combine(as_losses(losses))
        assert record("dwa", maxdiff(list(w.values()), batch_weight)) <= ATOL
        strategy.end_epoch({f"t{i}": train_loss_buffer[i, epoch] for i in range(k)})


# -- gradnorm --------------------------------------------------------------------------------

def libmtl_gradnorm_backward(loss_scale, losses, grads, train_loss_buffer, alpha):
    """LibMTL GradNorm.backward, epoch >= 1, rep_grad False: returns (new shared grads, loss_scale.grad,
    loss_weight). `grads` [task_num, grad_dim] as _get_grads returns them."""
    task_num = len(losses)
    loss_scale_ = task_num * F.softmax(loss_scale, dim=-1)
    G_per_loss = torch.norm(loss_scale_.unsqueeze(1) * grads, p=2, dim=-1)
    G = G_per_loss.mean(0)
    L_i = torch.tensor([losses[tn].item() / train_loss_buffer[tn, 0] for tn in range(task_num)], dtype=D)
    r_i = L_i / L_i.mean()
    constant_term = (G * (r_i ** alpha)).detach()
    L_grad = (G_per_loss - constant_term).abs().sum(0)
    (grad,) = torch.autograd.grad(L_grad, loss_scale)
    loss_weight = loss_scale_.detach().clone()
    new_grads = sum([loss_weight[i] * grads[i] for i in range(task_num)])   # _backward_new_grads
    return new_grads, grad, loss_weight


@pytest.mark.parametrize("k, alpha", [(2, 1.5), (3, 1.5), (4, 0.5)])
def test_gradnorm_is_libmtl(k, alpha):
    gen = torch.Generator().manual_seed(20 + k)
    P, lr = 40, 0.01
    strategy = make("gradnorm", k, alpha=alpha)
    # LibMTL init_param: loss_scale = [1.0]*task_num, trained by the model's optimiser
    assert strategy.logits.tolist() == [1.0] * k
    groups = strategy.param_groups(lr)
    assert groups == [{"params": [strategy.logits], "lr": lr}]
    mine_opt = torch.optim.Adam(groups, lr=lr, weight_decay=1e-5)
    loss_scale = torch.ones(k, dtype=D, requires_grad=True)
    official_opt = torch.optim.Adam([loss_scale], lr=lr, weight_decay=1e-5)

    # epoch 0: LibMTL `if self.epoch >= 1` is false: EW (sum of the gradients, weights 1), no update
    for _ in range(2):
        grads = torch.randn(k, P, generator=gen, dtype=D)
        losses = torch.rand(k, generator=gen, dtype=D) + 0.1
        direction, w = strategy.combine_grads(grads, as_losses(losses))
        assert record("gradnorm", maxdiff(direction, grads.sum(0)), maxdiff(list(w.values()), np.ones(k))) <= ATOL
        assert strategy.logits.grad is None
    epoch0 = np.random.default_rng(k).uniform(0.5, 2.0, size=(k, 1))   # train_loss_buffer[:, 0]
    strategy.end_epoch({f"t{i}": epoch0[i, 0] for i in range(k)})

    for _ in range(4):
        grads = torch.randn(k, P, generator=gen, dtype=D) * torch.rand(k, 1, generator=gen, dtype=D) * 3
        losses = torch.rand(k, generator=gen, dtype=D) * 2 + 0.05
        new_grads, official_grad, loss_weight = libmtl_gradnorm_backward(loss_scale, losses, grads, epoch0, alpha)
        official_opt.zero_grad(set_to_none=False)
        loss_scale.grad = official_grad
        official_opt.step()

        mine_opt.zero_grad(set_to_none=True)
        direction, w = strategy.combine_grads(grads, as_losses(losses))
        assert record("gradnorm", maxdiff(direction, new_grads), maxdiff(strategy.logits.grad, official_grad),
                      maxdiff(list(w.values()), loss_weight)) <= ATOL
        assert [float(v) for v in strategy.head_weights(w).values()] == [1.0] * k   # heads: unweighted
        mine_opt.step()
        assert record("gradnorm", maxdiff(strategy.logits, loss_scale)) <= ATOL


# -- pcgrad ----------------------------------------------------------------------------------

def pcgrad_tf_official(grads_task, orders=None):
    """tianheyu927/PCGrad PCGrad_tf.py compute_gradients: proj_grad over k in range(num_tasks)
    (`tf.random.shuffle(loss)` there discards its result); `orders[i]` replaces range(num_tasks)
    for task i when given. Projected gradients are summed (proj_grads[idx] += proj_grad)."""
    num_tasks = len(grads_task)

    def proj_grad(grad_task, order):
        for k in order:
            inner_product = torch.sum(grad_task * grads_task[k])
            proj_direction = inner_product / torch.sum(grads_task[k] * grads_task[k])
            grad_task = grad_task - torch.minimum(proj_direction, torch.zeros((), dtype=D)) * grads_task[k]
        return grad_task

    orders = orders or [list(range(num_tasks))] * num_tasks
    proj_grads_flatten = [proj_grad(grads_task[i], orders[i]) for i in range(num_tasks)]
    return sum(proj_grads_flatten)


def pcgrad_libmtl(grads, orders):
    """LibMTL PCGrad.backward with random.shuffle(task_index) replaced by the given orders."""
    task_num = len(grads)
    pc_grads = grads.clone()
    for tn_i in range(task_num):
        task_index = orders[tn_i]
        for tn_j in task_index:
            g_ij = torch.dot(pc_grads[tn_i], grads[tn_j])
            if g_ij < 0:
                pc_grads[tn_i] -= g_ij * grads[tn_j] / (grads[tn_j].norm().pow(2) + 1e-8)
    return pc_grads.sum(0)


def test_pcgrad_fixed_order_is_the_tf_official_including_the_self_projection():
    # task 2 = (1, 0); tasks 0, 1 push it round so that after two projections it points against
    # itself: the official k = i term then acts (kdmtl used to skip it)
    a, b = math.radians(150), math.radians(210)
    grads = torch.tensor([[math.cos(a), math.sin(a)], [math.cos(b), math.sin(b)], [1.0, 0.0]], dtype=D)
    identity = [[0, 1, 2]] * 3
    official = pcgrad_tf_official(grads)
    assert record("pcgrad", maxdiff(project(grads, identity), official)) <= ATOL
    without_self = project(grads, [[1, 2], [0, 2], [0, 1]])
    assert maxdiff(without_self, official) > 1e-3   # the self term matters here

    gen = torch.Generator().manual_seed(1)
    for k in (2, 3, 5):
        grads = torch.randn(k, 30, generator=gen, dtype=D)
        orders = [list(range(k))] * k
        assert record("pcgrad", maxdiff(project(grads, orders), pcgrad_tf_official(grads))) <= ATOL


@pytest.mark.parametrize("k", [2, 3, 4, 6])
def test_pcgrad_random_orders_match_the_official_loop(k):
    gen = torch.Generator().manual_seed(30 + k)
    strategy = make("pcgrad", k, seed=7)
    replay = torch.Generator().manual_seed(7)   # the orders kdmtl draws: one randperm of ALL K per task
    for _ in range(5):
        # conflicting gradients: a shared component plus large task-specific noise
        grads = torch.randn(1, 25, generator=gen, dtype=D) * 0.3 + torch.randn(k, 25, generator=gen, dtype=D)
        orders = [torch.randperm(k, generator=replay).tolist() for _ in range(k)]
        assert all(sorted(o) == list(range(k)) for o in orders)
        direction, w = strategy.combine_grads(grads, as_losses(torch.ones(k, dtype=D)))
        assert record("pcgrad", maxdiff(direction, pcgrad_tf_official(grads, orders))) <= ATOL
        assert [float(v) for v in w.values()] == [1.0] * k
        # LibMTL adds 1e-8 to ||g_j||^2: the same up to ~1e-8 relative (recorded separately)
        libmtl = pcgrad_libmtl(grads, orders)
        assert record("pcgrad_vs_libmtl_eps", maxdiff(direction, libmtl)) <= 1e-7


# -- cagrad ----------------------------------------------------------------------------------

def cagrad_official(grads, alpha=0.5, rescale=1):
    """Cranial-XIX/CAGrad nyuv2/utils.py cagrad(grads, alpha, rescale) for any number of tasks,
    followed by overwrite_grad's `newgrad * num_tasks`. ``grads`` [dim, num_tasks] as there.
    One change: `ww = torch.Tensor(w_cpu)` (float32) is kept in float64."""
    from scipy.optimize import minimize

    num_tasks = grads.shape[1]
    GG = grads.t().mm(grads).cpu()  # [num_tasks, num_tasks]
    g0_norm = (GG.mean() + 1e-8).sqrt()  # norm of the average gradient

    x_start = np.ones(num_tasks) / num_tasks
    bnds = tuple((0, 1) for x in x_start)
    cons = ({'type': 'eq', 'fun': lambda x: 1 - sum(x)})
    A = GG.numpy()
    b = x_start.copy()
    c = (alpha * g0_norm + 1e-8).item()

    def objfn(x):
        return (x.reshape(1, num_tasks).dot(A).dot(b.reshape(num_tasks, 1))
                + c * np.sqrt(x.reshape(1, num_tasks).dot(A).dot(x.reshape(num_tasks, 1)) + 1e-8)).sum()
    res = minimize(objfn, x_start, bounds=bnds, constraints=cons)
    w_cpu = res.x
    ww = torch.tensor(w_cpu, dtype=D)
    gw = (grads * ww.view(1, -1)).sum(1)
    gw_norm = gw.norm()
    lmbda = c / (gw_norm + 1e-8)
    g = grads.mean(1) + lmbda * gw
    if rescale == 0:
        new = g
    elif rescale == 1:
        new = g / (1 + alpha ** 2)
    else:
        new = g / (1 + alpha)
    return new * num_tasks, w_cpu, objfn


CAGRAD_CASES = [(2, 0.4, 0), (3, 0.4, 1), (3, 0.6, 2), (4, 0.4, 3), (5, 1.0, 4), (2, 0.2, 5)]


@pytest.mark.parametrize("k, c, seed", CAGRAD_CASES)
def test_cagrad_update_is_the_official_one(k, c, seed):
    pytest.importorskip("scipy")
    gen = torch.Generator().manual_seed(40 + seed)
    grads = torch.randn(k, 30, generator=gen, dtype=D) * torch.rand(k, 1, generator=gen, dtype=D) * 2
    official, w_official, objfn = cagrad_official(grads.t(), alpha=c, rescale=1)
    strategy = make("cagrad", k, c=c)

    # (1) the update for given weights: the official formula exactly
    given = strategy.direction(grads, torch.tensor(w_official, dtype=D))
    assert record("cagrad_update_given_w", maxdiff(given, official)) <= ATOL

    # (2) the solver: the same objective, minimised to ~1e-12 here and to SLSQP's ftol (1e-6)
    # there: kdmtl's optimum is never worse, and the weights agree to SLSQP's accuracy
    w_mine = strategy.solve(grads).numpy()
    assert abs(w_mine.sum() - 1) < 1e-12 and w_mine.min() >= 0
    # (the barrier method leaves an active bound at ~1e-12, hence the 1e-9 relative slack)
    assert objfn(w_mine) <= objfn(w_official) + 1e-9 * abs(objfn(w_official))
    direction, w = strategy.combine_grads(grads, as_losses(torch.ones(k, dtype=D)))
    # SLSQP stops once F changes by < 1e-6 (relative): |dw| ~ sqrt(1e-6) in the flattest direction
    record("cagrad_solver_w", np.abs(w_mine - w_official).max())
    rel = float(maxdiff(direction, official) / official.abs().max())
    record("cagrad_full_rel", rel)
    assert np.abs(w_mine - w_official).max() < 2e-3 and rel < 2e-3
    assert [float(v) for v in w.values()] == [1.0] * k


def test_cagrad_rescale_and_scale_against_the_official_code():
    pytest.importorskip("scipy")
    grads = torch.tensor([[1.0, 0.0, 0.5], [-0.6, 1.0, 0.0], [0.2, -0.8, 0.5]], dtype=D)
    official, w_official, _ = cagrad_official(grads.t(), alpha=0.4, rescale=1)
    strategy = make("cagrad", 3, c=0.4)
    unscaled = strategy.direction(grads, torch.tensor(w_official, dtype=D)) / 3 * (1 + 0.4 ** 2)
    official_rescale0, _, _ = cagrad_official(grads.t(), alpha=0.4, rescale=0)
    # rescale=1 is /(1 + c^2) and the official overwrite_grad multiplies by the number of tasks
    assert record("cagrad_update_given_w", maxdiff(unscaled * 3, official_rescale0)) <= 1e-8
    # c = 0: the sum of the task gradients (equal weighting)
    assert torch.equal(make("cagrad", 3, c=0.0).combine_grads(grads, as_losses(torch.ones(3, dtype=D)))[0],
                       grads.sum(0))


# -- famo ------------------------------------------------------------------------------------

class FamoOfficial:
    """Cranial-XIX/FAMO famo.py class FAMO (get_weighted_loss, update), w in float64."""

    def __init__(self, n_tasks, gamma=0.01, w_lr=0.025, max_norm=1.0):
        self.min_losses = torch.zeros(n_tasks, dtype=D)
        self.w = torch.tensor([0.0] * n_tasks, dtype=D, requires_grad=True)
        self.w_opt = torch.optim.Adam([self.w], lr=w_lr, weight_decay=gamma)
        self.max_norm = max_norm
        self.n_tasks = n_tasks

    def get_weighted_loss(self, losses):
        self.prev_loss = losses
        z = F.softmax(self.w, -1)
        D_ = losses - self.min_losses + 1e-8
        c = (z / D_).sum().detach()
        loss = (D_.log() * z / c).sum()
        return loss

    def update(self, curr_loss):
        delta = (self.prev_loss - self.min_losses + 1e-8).log() - \
                (curr_loss - self.min_losses + 1e-8).log()
        with torch.enable_grad():
            d = torch.autograd.grad(F.softmax(self.w, -1), self.w, grad_outputs=delta.detach())[0]
        self.w_opt.zero_grad()
        self.w.grad = d
        self.w_opt.step()


def test_famo_defaults_are_famo_py():
    # famo.py FAMO.__init__(gamma=0.01, w_lr=0.025, max_norm=1.0)
    strategy = make("famo", 3)
    group = strategy.optimizer.param_groups[0]
    assert group["lr"] == 0.025 and group["weight_decay"] == 0.01
    assert strategy.shared_clip_norm == 1.0
    assert make("famo", 3, max_norm=0.0).shared_clip_norm is None


@pytest.mark.parametrize("k", [2, 3, 6])
def test_famo_is_famo_py(k):
    gen = torch.Generator().manual_seed(50 + k)
    official = FamoOfficial(k)
    strategy = make("famo", k)
    # a loss trajectory; the official update of step t compares L_t with the losses after the step,
    # which kdmtl reads from the next batch: give both the same pairs (L_t, L_{t+1})
    trajectory = [torch.rand(k, generator=gen, dtype=D) * 2 + 0.05]
    for _ in range(8):
        trajectory.append(trajectory[-1] * (0.6 + 0.6 * torch.rand(k, generator=gen, dtype=D)))
    for t, losses in enumerate(trajectory[:-1]):
        official_losses = losses.clone().requires_grad_(True)
        official_total = official.get_weighted_loss(official_losses)
        (official_dl,) = torch.autograd.grad(official_total, official_losses)

        mine_losses = as_losses(losses, requires_grad=True)
        # kdmtl's logits lag one update behind (its update for (L_{t-1}, L_t) comes at step t's end):
        # compare the objective on the official logits
        with torch.no_grad():
            strategy.logits.copy_(official.w)
        total, w = strategy.combine(mine_losses)
        total.backward()
        mine_dl = torch.stack([mine_losses[f"t{i}"].grad for i in range(k)])
        assert record("famo", maxdiff(total, official_total), maxdiff(mine_dl, official_dl),
                      maxdiff(list(w.values()), official_dl)) <= ATOL

        official.update(trajectory[t + 1])
    # the logit updates on their own, from the same starting point and the same pairs
    official = FamoOfficial(k)
    strategy = make("famo", k)
    for t in range(len(trajectory) - 1):
        official.get_weighted_loss(trajectory[t])
        official.update(trajectory[t + 1])
        if t == 0:
            strategy.after_step(as_losses(trajectory[0]))
        strategy.after_step(as_losses(trajectory[t + 1]))
        assert record("famo", maxdiff(strategy.logits, official.w)) <= ATOL


def test_famo_clips_the_trunk_gradient_like_famo_py():
    """famo.py FAMO.backward: loss.backward(), then clip_grad_norm_(shared_parameters, max_norm):
    the engine applies the same call to the trunk's parameters only (engine/trainer.py)."""
    from kdmtl_cli.engine import trainer

    source = open(trainer.__file__).read()
    assert "torch.nn.utils.clip_grad_norm_(self.shared, clip_shared)" in source
    trunk = [torch.nn.Parameter(torch.ones(3, dtype=D)), torch.nn.Parameter(torch.ones(2, dtype=D))]
    official = [p.detach().clone().requires_grad_(True) for p in trunk]
    for params in (trunk, official):
        (sum((p * torch.arange(1.0, p.numel() + 1, dtype=D)).sum() for p in params) * 3).backward()
    torch.nn.utils.clip_grad_norm_(official, 1.0)                            # famo.py
    torch.nn.utils.clip_grad_norm_(trunk, make("famo", 2).shared_clip_norm)  # the engine's call
    assert record("famo", *[maxdiff(a.grad, b.grad) for a, b in zip(trunk, official)]) <= ATOL


def test_zz_report_max_differences():
    print("\nmax |kdmtl - official| (float64):")
    for name, value in sorted(MAX_DIFF.items()):
        print(f"  {name:24s} {value:.3e}")
