"""Multi-task weighting strategies (kdmtl_cli.weighting): each formula checked against numbers
worked out by hand here, plus weighted_backward on a tiny model, config errors and resume state."""

from __future__ import annotations

import io
import itertools
import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from kdmtl_cli.errors import KdmtlError
from kdmtl_cli.schema import WeightingConfig
from kdmtl_cli.plugins import load_builtin
from kdmtl_cli.weighting import (
    WEIGHTINGS,
    build_weighting,
    weighted_backward,
)

TASKS = ["a", "b"]


def make(name, tasks=TASKS, seed=0, **fields):
    cfg = OmegaConf.structured(WeightingConfig(name=name, **fields))
    OmegaConf.set_struct(cfg, True)
    return build_weighting(cfg, tasks, seed)


def losses_of(*values, requires_grad=False):
    return {t: torch.tensor(float(v), requires_grad=requires_grad) for t, v in zip("abcdefgh", values)}


def floats(weights):
    return [float(w) for w in weights.values()]


def roundtrip(module):
    """state_dict through torch.save and the checkpoint's weights_only loader."""
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


# -- registry and config -----------------------------------------------------------------

def test_all_strategies_register_and_their_settings_make_the_config_node():
    import dataclasses

    load_builtin()
    assert WEIGHTINGS.names() == sorted(["equal", "fixed", "uncertainty", "dwa", "gradnorm",
                                         "pcgrad", "cagrad", "famo"])
    declared = {f.name: f for name in WEIGHTINGS.names() if WEIGHTINGS.settings(name)
                for f in dataclasses.fields(WEIGHTINGS.settings(name))}
    node = WeightingConfig()
    assert {f.name for f in dataclasses.fields(node)} == {"name", *declared}
    for key, f in declared.items():
        assert getattr(node, key) == f.default


@pytest.mark.parametrize("fields, message", [
    ({"name": "nope"}, "unknown weighting 'nope' in weighting; choose one of: cagrad, dwa, equal, famo"),
    ({"name": "pcgrad", "alpha": 2.0}, "weighting.alpha is not used by pcgrad (it uses: no other setting); remove it"),
    ({"name": "cagrad", "lr": 0.1}, "weighting.lr is not used by cagrad (it uses: weighting.c); remove it"),
    ({"name": "equal", "weights": {"a": 1.0, "b": 1.0}}, "weighting.weights is not used by equal"),
    ({"name": "fixed", "weights": {"a": 1.0, "b": -1.0}}, "weighting.weights must be finite and >= 0 (got {'b': -1.0})"),
    ({"name": "fixed", "weights": -2.0}, "weighting.weights must be finite and >= 0"),
    ({"name": "fixed", "weights": {"a": 1.0}}, "weighting.weights must give a weight for each task (a, b); missing: b"),
    ({"name": "dwa", "temperature": 0.0}, "weighting.temperature must be > 0 (got 0)"),
    ({"name": "cagrad", "c": -1.0}, "weighting.c must be >= 0 (got -1)"),
    ({"name": "gradnorm", "alpha": -0.5}, "weighting.alpha must be >= 0 (got -0.5)"),
    ({"name": "gradnorm", "lr": 0.1}, "weighting.lr is not used by gradnorm (it uses: weighting.alpha); remove it"),
    ({"name": "famo", "max_norm": -1.0}, "weighting.max_norm must be >= 0 (got -1)"),
    ({"name": "dwa", "max_norm": 2.0}, "weighting.max_norm is not used by dwa"),
    ({"name": "famo", "gamma": -1.0}, "weighting.gamma must be >= 0 (got -1)"),
    ({"name": "famo", "lr": float("nan")}, "weighting.lr must be a finite number (got nan)"),
])
def test_bad_settings_raise_one_line_errors(fields, message):
    with pytest.raises(KdmtlError) as err:
        make(**fields)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_plain_namespace_config_uses_defaults_for_missing_fields():
    class Cfg:
        name = "dwa"

    assert build_weighting(Cfg(), TASKS).temperature == 2.0


# -- loss-based strategies ---------------------------------------------------------------

def test_equal_and_fixed_by_hand():
    total, w = make("equal").combine(losses_of(3, 4))
    assert float(total) == 7.0 and floats(w) == [1.0, 1.0]
    total, w = make("fixed", weights={"a": 0.5, "b": 2.0}).combine(losses_of(3, 4))
    assert float(total) == pytest.approx(0.5 * 3 + 2.0 * 4) and floats(w) == [0.5, 2.0]
    total, w = make("fixed", weights=3).combine(losses_of(3, 4))
    assert float(total) == pytest.approx(3 * 3 + 3 * 4) and all(x.dim() == 0 for x in w.values())


def test_uncertainty_by_hand():
    strategy = make("uncertainty")
    assert strategy.param_groups(0.1) == [{"params": [strategy.log_vars], "lr": 0.1, "weight_decay": 0.0}]
    assert strategy.log_vars.tolist() == [-0.5, -0.5]   # MTAN's and LibMTL's initial log-variance
    assert floats(strategy.combine(losses_of(3, 4))[1]) == pytest.approx([math.exp(0.5) / 2] * 2)
    with torch.no_grad():
        strategy.log_vars.copy_(torch.tensor([0.0, math.log(2.0)]))
    total, w = strategy.combine(losses_of(3, 4))
    # 3 / (2 exp 0) + 0 / 2 + 4 / (2 exp(log 2)) + log(2) / 2
    assert total.item() == pytest.approx(3 / 2 + 0 + 4 / 4 + math.log(2) / 2)
    assert floats(w) == pytest.approx([0.5, 0.25])
    total.backward()
    # d/ds_k [L_k / (2 exp(s_k)) + s_k / 2] = -L_k / (2 exp(s_k)) + 1/2
    assert strategy.log_vars.grad.tolist() == pytest.approx([-3 / 2 + 0.5, -4 / 4 + 0.5])


def test_dwa_by_hand():
    strategy = make("dwa", temperature=2.0)
    assert floats(strategy.combine(losses_of(3, 4))[1]) == [1.0, 1.0]  # epoch 1
    strategy.end_epoch({"a": 1.0, "b": 2.0})
    assert floats(strategy.combine(losses_of(3, 4))[1]) == [1.0, 1.0]  # epoch 2: one epoch recorded
    strategy.end_epoch({"a": 0.5, "b": 1.8})
    # r = (0.5/1.0, 1.8/2.0) = (0.5, 0.9); w_k = 2 exp(r_k/2) / (exp(0.25) + exp(0.45))
    expected = [2 * math.exp(0.25) / (math.exp(0.25) + math.exp(0.45)),
                2 * math.exp(0.45) / (math.exp(0.25) + math.exp(0.45))]
    total, w = strategy.combine(losses_of(3, 4))
    assert floats(w) == pytest.approx(expected)
    assert float(total) == pytest.approx(expected[0] * 3 + expected[1] * 4)
    strategy.end_epoch({"a": 0.4, "b": 0.9})  # r = (0.4/0.5, 0.9/1.8) = (0.8, 0.5): only the last two count
    expected = [2 * math.exp(0.4) / (math.exp(0.4) + math.exp(0.25)),
                2 * math.exp(0.25) / (math.exp(0.4) + math.exp(0.25))]
    assert floats(strategy.combine(losses_of(3, 4))[1]) == pytest.approx(expected)

    resumed = make("dwa")
    resumed.load_state_dict(roundtrip(strategy))
    for s in (strategy, resumed):
        s.end_epoch({"a": 0.2, "b": 0.3})
    assert floats(resumed.combine(losses_of(3, 4))[1]) == floats(strategy.combine(losses_of(3, 4))[1])


def test_famo_weights_are_the_gradient_of_its_total():
    strategy = make("famo")
    with torch.no_grad():
        strategy.logits.copy_(torch.tensor([0.3, -0.2]))
    losses = losses_of(2.0, 0.5, requires_grad=True)
    total, w = strategy.combine(losses)
    z = [math.exp(0.3) / (math.exp(0.3) + math.exp(-0.2)), math.exp(-0.2) / (math.exp(0.3) + math.exp(-0.2))]
    d = [2.0 + 1e-8, 0.5 + 1e-8]
    c = z[0] / d[0] + z[1] / d[1]
    assert total.item() == pytest.approx((z[0] * math.log(d[0]) + z[1] * math.log(d[1])) / c)
    assert floats(w) == pytest.approx([z[0] / (c * d[0]), z[1] / (c * d[1])])
    assert sum(floats(w)) == pytest.approx(1.0)
    grads = torch.autograd.grad(total, [losses["a"], losses["b"]])
    assert [float(g) for g in grads] == pytest.approx(floats(w))
    assert strategy.logits.grad is None  # the model's backward never reaches the logits


def test_famo_after_step_by_hand():
    lr = 0.1
    strategy = make("famo", lr=lr, gamma=0.0)
    strategy.after_step(losses_of(2.0, 1.0))      # first step: only remembered
    assert strategy.logits.tolist() == [0.0, 0.0]
    strategy.after_step(losses_of(1.0, 0.9))
    # delta = log(prev) - log(now) = (log 2, log(1/0.9)); z = (1/2, 1/2)
    # softmax VJP: d_k = z_k (delta_k - sum_j z_j delta_j)
    delta = [math.log(2.0 / 1.0), math.log(1.0 / 0.9)]
    mean = 0.5 * delta[0] + 0.5 * delta[1]
    d = [0.5 * (delta[0] - mean), 0.5 * (delta[1] - mean)]
    # Adam's first step moves each logit by -lr * d / (|d| + eps) = -lr * sign(d)
    assert strategy.logits.tolist() == pytest.approx([-lr * math.copysign(1, d[0]), -lr * math.copysign(1, d[1])],
                                                     rel=1e-5)

    resumed = make("famo", lr=lr, gamma=0.0)
    resumed.load_state_dict(roundtrip(strategy))
    for s in (strategy, resumed):
        s.after_step(losses_of(0.7, 0.85))
        s.after_step(losses_of(0.6, 0.8))
    assert resumed.logits.tolist() == strategy.logits.tolist()
    assert floats(resumed.combine(losses_of(1, 2))[1]) == floats(strategy.combine(losses_of(1, 2))[1])


# -- gradient-based strategies -----------------------------------------------------------

def test_pcgrad_projects_conflicting_pairs_only():
    strategy = make("pcgrad")
    g = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
    direction, w = strategy.combine_grads(g, losses_of(1, 1))
    # g1' = g1 - (g1.g2 / |g2|^2) g2 = (1,0) - (-1/2)(-1,1) = (0.5, 0.5)
    # g2' = g2 - (g2.g1 / |g1|^2) g1 = (-1,1) - (-1/1)(1,0) = (0, 1)
    assert direction.tolist() == pytest.approx([0.5 + 0.0, 0.5 + 1.0])
    assert floats(w) == [1.0, 1.0]
    g = torch.tensor([[1.0, 0.0], [1.0, 2.0]])  # g1.g2 = 1 > 0: left alone
    assert strategy.combine_grads(g, losses_of(1, 1))[0].tolist() == [2.0, 2.0]


def test_pcgrad_three_tasks_uses_the_original_gradients_and_resumes_its_order():
    g = torch.tensor([[1.0, 0.0], [-1.0, 1.0], [0.0, -1.0]])

    def project(i, order):  # written out: projections onto the ORIGINAL g_j, in the given order (i too)
        gi = g[i].clone()
        for j in order:
            if float(gi @ g[j]) < 0:
                gi = gi - float(gi @ g[j]) / float(g[j] @ g[j]) * g[j]
        return gi
    # each task draws its own order: the direction is one of these sums
    orders = list(itertools.permutations(range(3)))
    candidates = [sum(project(i, o[i]) for i in range(3)) for o in itertools.product(orders, repeat=3)]

    strategy = make("pcgrad", tasks=["a", "b", "c"], seed=3)
    states, directions = [], []
    for _ in range(6):
        states.append(roundtrip(strategy))
        directions.append(strategy.combine_grads(g, losses_of(1, 1, 1))[0])
    assert all(any(torch.allclose(d, c) for c in candidates) for d in directions)
    assert len({tuple(d.tolist()) for d in directions}) > 1  # the order is drawn anew each step

    same_seed = make("pcgrad", tasks=["a", "b", "c"], seed=3)
    assert all(torch.equal(same_seed.combine_grads(g, losses_of(1, 1, 1))[0], d) for d in directions)
    resumed = make("pcgrad", tasks=["a", "b", "c"], seed=99)
    resumed.load_state_dict(states[2])  # the generator state resumes: steps 2.. repeat exactly
    assert all(torch.equal(resumed.combine_grads(g, losses_of(1, 1, 1))[0], d) for d in directions[2:])


def test_gradnorm_one_step_by_hand():
    strategy = make("gradnorm", alpha=1.5)
    assert strategy.param_groups(0.01) == [{"params": [strategy.logits], "lr": 0.01}]
    g = torch.tensor([[3.0, 4.0], [0.0, 1.0]])   # n = (5, 1)
    # first epoch (LibMTL: epoch 0): equal weights, the plain sum, no gradient for the logits
    direction, w = strategy.combine_grads(g, losses_of(2.0, 1.0))
    assert direction.tolist() == [3.0, 5.0] and floats(w) == [1.0, 1.0] and strategy.logits.grad is None
    strategy.end_epoch({"a": 2.0, "b": 1.0})   # L(0) = the first epoch's mean losses
    assert strategy.initial_losses.tolist() == [2.0, 1.0]

    # theta = (1, 1): w = 2 softmax(theta) = (1, 1); L = (1.8, 0.2): L~ = (0.9, 0.2), r = L~ / 0.55
    direction, w = strategy.combine_grads(g, losses_of(1.8, 0.2))
    assert direction.tolist() == [3.0, 5.0] and floats(w) == [1.0, 1.0]
    # G = (5, 1), G_bar = 3, target = 3 r^1.5 = (6.28.., 0.658..): dL/dw = sign(G - target) n = (-5, 1);
    # dw_i/dtheta_j = K z_i (delta_ij - z_j) = [[.5, -.5], [-.5, .5]]: dL/dtheta = (-3, 3)
    target = [3 * (0.9 / 0.55) ** 1.5, 3 * (0.2 / 0.55) ** 1.5]
    assert 5 < target[0] and 1 > target[1]
    assert strategy.logits.grad.tolist() == pytest.approx([-3.0, 3.0])
    # the heads get their unweighted losses (LibMTL)
    assert floats(strategy.head_weights(w)) == [1.0, 1.0]

    # weights from the logits: theta = (0, log 3) gives w = 2 (1/4, 3/4)
    with torch.no_grad():
        strategy.logits.copy_(torch.tensor([0.0, math.log(3.0)]))
    direction, w = strategy.combine_grads(g, losses_of(1.8, 0.2))
    assert floats(w) == pytest.approx([0.5, 1.5]) and direction.tolist() == pytest.approx([1.5, 2.0 + 1.5])


def test_gradnorm_state_resumes():
    strategy = make("gradnorm")
    g = torch.tensor([[3.0, 4.0], [0.0, 1.0]])
    strategy.combine_grads(g, losses_of(2.0, 1.0))
    strategy.end_epoch({"a": 2.0, "b": 0.5})
    with torch.no_grad():
        strategy.logits.copy_(torch.tensor([0.3, 1.1]))
    resumed = make("gradnorm")
    resumed.load_state_dict(roundtrip(strategy))
    assert resumed.has_initial and resumed.initial_losses.tolist() == [2.0, 0.5]
    for losses in (losses_of(1.0, 0.9), losses_of(0.5, 0.8)):
        assert torch.equal(strategy.combine_grads(g, losses)[0], resumed.combine_grads(g, losses)[0])
        assert torch.equal(strategy.logits.grad, resumed.logits.grad)


def cagrad_brute_force(g, c, n=100001):
    """w = (a, 1-a) on a grid of a in [0, 1]; F(w) = g_w.g0 + c ||g0|| ||g_w||."""
    g = g.double().numpy()
    a = np.linspace(0.0, 1.0, n)
    g0 = g.mean(axis=0)
    gw = a[:, None] * g[0] + (1 - a[:, None]) * g[1]
    f = gw @ g0 + c * np.linalg.norm(g0) * np.linalg.norm(gw, axis=1)
    best = a[f.argmin()]
    gw = best * g[0] + (1 - best) * g[1]
    # the official update: K (g0 + c' g_w / (|g_w| + 1e-8)) / (1 + c^2), c' = c sqrt(|g0|^2 + 1e-8) + 1e-8
    c_prime = c * np.sqrt(g0 @ g0 + 1e-8) + 1e-8
    d = 2 * (g0 + c_prime / (np.linalg.norm(gw) + 1e-8) * gw) / (1 + c ** 2)
    return np.array([best, 1 - best]), d


@pytest.mark.parametrize("g, c", [
    ([[1.0, 0.0], [-0.5, 1.0]], 0.4),
    ([[1.0, 0.0], [-0.5, 1.0]], 2.0),
    ([[10.0, 1.0], [0.1, 0.3]], 0.7),       # very different scales
    ([[1.0, 2.0], [2.0, 1.0]], 0.4),        # no conflict
    ([[1.0, 0.0, 0.5], [-3.0, 0.2, 0.0]], 0.9),
])
def test_cagrad_matches_a_brute_force_search(g, c):
    g = torch.tensor(g)
    strategy = make("cagrad", c=c)
    w = strategy.solve(g).numpy()
    expected_w, expected_d = cagrad_brute_force(g, c)
    assert np.abs(w - expected_w).max() < 1e-3
    direction, weights = strategy.combine_grads(g, losses_of(1, 1))
    assert np.abs(direction.double().numpy() - expected_d).max() < 1e-3 * max(1.0, np.abs(expected_d).max())
    assert floats(weights) == [1.0, 1.0]


def test_cagrad_three_tasks_is_optimal_and_c0_is_the_sum():
    g = torch.tensor([[1.0, 0.0, 0.0], [-0.6, 1.0, 0.0], [0.2, -0.8, 0.5]])
    strategy = make("cagrad", tasks=["a", "b", "c"], c=0.5)
    w = strategy.solve(g).double()
    gd = g.double()
    g0 = gd.mean(0)

    def f(x):
        gw = x @ gd
        return float(gw @ g0 + 0.5 * g0.norm() * gw.norm())
    grid = [torch.tensor([i / 100, j / 100, (100 - i - j) / 100], dtype=torch.float64)
            for i in range(101) for j in range(101 - i)]
    assert abs(float(w.sum()) - 1) < 1e-9 and float(w.min()) >= 0
    assert f(w) <= min(f(x) for x in grid) + 1e-9
    assert torch.equal(make("cagrad", c=0.0).combine_grads(g[:2], losses_of(1, 1))[0], g[:2].sum(0))


# -- weighted_backward on a tiny model ----------------------------------------------------

class Tiny(torch.nn.Module):
    """A shared Linear trunk, two Linear heads, an unused parameter; fixed numbers, no RNG."""

    def __init__(self):
        super().__init__()
        self.trunk = torch.nn.Linear(3, 4)
        self.head_a, self.head_b = torch.nn.Linear(4, 1), torch.nn.Linear(4, 1)
        self.unused = torch.nn.Parameter(torch.ones(2))
        with torch.no_grad():
            self.trunk.weight.copy_(torch.arange(12.0).reshape(4, 3) / 10 - 0.5)
            self.trunk.bias.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
            self.head_a.weight.copy_(torch.tensor([[0.5, -0.3, 0.2, 0.4]]))
            self.head_a.bias.zero_()
            self.head_b.weight.copy_(torch.tensor([[-0.4, 0.3, -0.1, -0.5]]))
            self.head_b.bias.fill_(0.1)

    def losses(self):
        x = torch.tensor([[1.0, 0.0, -1.0], [0.5, 2.0, 0.0], [-1.0, 1.0, 1.0]])
        f = torch.tanh(self.trunk(x))
        extra = f.pow(2).mean() * 0.1  # a "feature distillation" term on the trunk only
        return {"a": (self.head_a(f) - 1).pow(2).mean(), "b": (self.head_b(f) - 1).pow(2).mean()}, extra

    def split(self):
        shared = list(self.trunk.parameters())
        others = [*self.head_a.parameters(), *self.head_b.parameters(), self.unused]
        return shared, others


def grads_of(params):
    return [None if p.grad is None else p.grad.clone() for p in params]


def flat(grads):
    return torch.cat([g.reshape(-1) for g in grads])


def test_loss_based_backward_equals_plain_backward_and_measuring_changes_nothing():
    model = Tiny()
    losses, _ = model.losses()
    (losses["a"] + losses["b"]).backward()
    expected = grads_of(model.parameters())
    shared, others = model.split()
    per_task = {}
    for t in TASKS:
        model.zero_grad(set_to_none=True)
        model.losses()[0][t].backward()
        per_task[t] = flat(grads_of(shared)).norm()

    for measure in (False, True):
        model.zero_grad(set_to_none=True)
        result = weighted_backward(make("equal"), model.losses()[0], None, shared, others,
                                   measure_grad_norms=measure)
        assert all((a is None and b is None) or torch.equal(a, b)
                   for a, b in zip(grads_of(model.parameters()), expected))
        assert model.unused.grad is None
        assert float(result.total) == pytest.approx((losses["a"] + losses["b"]).item())
        if measure:
            assert {t: float(n) for t, n in result.grad_norms.items()} == pytest.approx(
                {t: float(n) for t, n in per_task.items()})
        else:
            assert result.grad_norms is None


def test_loss_based_backward_scale_and_extra():
    model = Tiny()
    shared, others = model.split()
    losses, extra = model.losses()
    (losses["a"] + losses["b"] + extra).backward()
    expected = grads_of(shared + others[:4])
    model.zero_grad(set_to_none=True)
    result = weighted_backward(make("equal"), *model.losses(), shared, others, scale=8.0,
                               measure_grad_norms=True)
    assert all(torch.allclose(p.grad, 8.0 * e) for p, e in zip(shared + others[:4], expected))
    model.zero_grad(set_to_none=True)
    unscaled = weighted_backward(make("equal"), *model.losses(), shared, others, measure_grad_norms=True)
    assert float(result.total) == pytest.approx(float(unscaled.total))
    assert [float(v) for v in result.grad_norms.values()] == pytest.approx([float(v) for v in unscaled.grad_norms.values()])


def pcgrad_by_hand(g1, g2):
    """Two tasks: each projected off the other's original gradient if they conflict."""
    dot = float(g1 @ g2)
    p1 = g1 - dot / float(g2 @ g2) * g2 if dot < 0 else g1
    p2 = g2 - dot / float(g1 @ g1) * g1 if dot < 0 else g2
    return p1 + p2


@pytest.mark.parametrize("scale", [1.0, 8.0])
def test_pcgrad_backward_on_a_tiny_model(scale):
    model = Tiny()
    shared, others = model.split()
    per_task = {}
    for t in TASKS:
        model.zero_grad(set_to_none=True)
        model.losses()[0][t].backward()
        per_task[t] = flat(grads_of(shared))
    model.zero_grad(set_to_none=True)
    losses, extra = model.losses()
    (losses["a"] + losses["b"]).backward()
    heads = grads_of(others[:4])
    model.zero_grad(set_to_none=True)
    model.losses()[1].backward()
    extra_grad = flat(grads_of(shared))
    assert float(per_task["a"] @ per_task["b"]) < 0  # the two tasks conflict on the trunk

    model.zero_grad(set_to_none=True)
    result = weighted_backward(make("pcgrad"), *model.losses(), shared, others, scale=scale)
    expected = pcgrad_by_hand(per_task["a"], per_task["b"]) + extra_grad
    assert torch.allclose(flat(grads_of(shared)), scale * expected, atol=1e-6 * scale)
    assert all(torch.allclose(p.grad, scale * h, atol=1e-6 * scale) for p, h in zip(others[:4], heads))
    assert model.unused.grad is None
    assert floats(result.weights) == [1.0, 1.0]
    assert [float(n) for n in result.grad_norms.values()] == pytest.approx(
        [float(per_task[t].norm()) for t in TASKS], rel=1e-5)
    assert float(result.total) == pytest.approx((losses["a"] + losses["b"] + extra).item())


@pytest.mark.parametrize("scale", [1.0, 4.0])
def test_gradnorm_backward_weights_the_trunk_not_the_heads(scale):
    model = Tiny()
    shared, others = model.split()
    strategy = make("gradnorm")
    strategy.end_epoch({"a": 1.0, "b": 1.0})
    with torch.no_grad():
        strategy.logits.copy_(torch.tensor([0.0, math.log(3.0)]))   # w = (0.5, 1.5)
    losses, _ = model.losses()
    (0.5 * losses["a"] + 1.5 * losses["b"]).backward()
    trunk = grads_of(shared)
    model.zero_grad(set_to_none=True)
    losses, _ = model.losses()
    (losses["a"] + losses["b"]).backward()
    heads = grads_of(others[:4])
    model.zero_grad(set_to_none=True)
    reference = make("gradnorm")
    reference.load_state_dict(strategy.state_dict())
    reference.combine_grads(torch.stack([_flat(model, shared, t) for t in TASKS]),
                            {t: v.detach() for t, v in model.losses()[0].items()})
    result = weighted_backward(strategy, model.losses()[0], None, shared, others + list(strategy.parameters()),
                               scale=scale)
    assert floats(result.weights) == pytest.approx([0.5, 1.5])
    assert all(torch.allclose(p.grad, scale * e, atol=1e-6 * scale) for p, e in zip(shared, trunk))
    assert all(torch.allclose(p.grad, scale * e, atol=1e-6 * scale) for p, e in zip(others[:4], heads))
    # the logits' gradient is scaled like every other .grad (the GradScaler unscales them all)
    assert torch.allclose(strategy.logits.grad, scale * reference.logits.grad, rtol=1e-5)
    assert model.unused.grad is None


def _flat(model, shared, task):
    model.zero_grad(set_to_none=True)
    model.losses()[0][task].backward()
    out = flat(grads_of(shared))
    model.zero_grad(set_to_none=True)
    return out


def test_uncertainty_backward_trains_its_log_variances():
    model = Tiny()
    shared, others = model.split()
    strategy = make("uncertainty")
    losses, _ = model.losses()
    result = weighted_backward(strategy, losses, None, shared, others + list(strategy.parameters()))
    # s = -0.5: total = sum_k L_k e^0.5 / 2 - 0.5 / 2, d total / d s_k = 1/2 - L_k e^0.5 / 2
    half = math.exp(0.5) / 2
    assert strategy.log_vars.grad.tolist() == pytest.approx([0.5 - half * losses["a"].item(),
                                                             0.5 - half * losses["b"].item()])
    assert float(result.total) == pytest.approx(half * (losses["a"] + losses["b"]).item() - 0.5)


def test_cagrad_backward_on_a_tiny_model():
    model = Tiny()
    shared, others = model.split()
    per_task = []
    for t in TASKS:
        model.zero_grad(set_to_none=True)
        model.losses()[0][t].backward()
        per_task.append(flat(grads_of(shared)))
    _, expected = cagrad_brute_force(torch.stack(per_task), 0.4)
    model.zero_grad(set_to_none=True)
    result = weighted_backward(make("cagrad"), model.losses()[0], None, shared, others, scale=4.0)
    assert np.abs(flat(grads_of(shared)).double().numpy() - 4.0 * expected).max() < 4e-3
    assert floats(result.weights) == [1.0, 1.0]


def test_gradnorm_does_not_learn_from_overflowed_gradients():
    strategy = make("gradnorm")
    strategy.end_epoch({"a": 2.0, "b": 1.0})
    g = torch.tensor([[float("inf"), 4.0], [0.0, 1.0]])
    strategy.combine_grads(g, losses_of(2.0, 1.0))
    assert strategy.logits.grad is None and strategy.logits.tolist() == [1.0, 1.0]
