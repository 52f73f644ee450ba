"""`vid` (kdmtl_cli/distill/vid.py) against RepDistiller, in float64.

The `Official*` code below is transcribed from HobbitLong/RepDistiller at
b84f547c5db6a35318d4671d7d5c4de74c822403 (not from kdmtl's code):

- distiller_zoo/VID.py `VIDLoss` (L9-54: __init__ with conv1x1, regressor, log_scale; forward);
- train_student.py L219-226: `VIDLoss(s, t, t)` per feature of feat[1:-1], trained with the student;
- helper/loops.py L166-170: loss_kd = sum of the VIDLoss terms over feat[1:-1];
- helper/loops.py L184: loss = gamma * loss_cls + alpha * loss_div + beta * loss_kd;
- scripts/run_cifar_distill.sh L15: `--distill vid -a 0 -b 1`.

Every comparison is at 1e-9 (abs, or rel for large weighted values) on random float64 inputs; the
max abs difference of each comparison is printed (`pytest -s`) as `official-diff <what>: <value>`.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import OmegaConf

from distill_checks import (assert_same_terms, assert_terms_logged, build_method, loss_yaml, randn, record_diff,
                            resume_equals_straight, settings_from_yaml, train_logs_finite_terms)
from kdmtl_cli.distill import build_methods, method_names
from kdmtl_cli.distill.vid import VariationalInformationDistillation, VIDConfig, vid_loss
from kdmtl_cli.errors import KdmtlError

ATOL = 1e-9
pytestmark = pytest.mark.usefixtures("one_thread")

STAGES = ["trunk.stages.0", "trunk.stages.1", "trunk.stages.2"]

# ================================================================ official defaults, transcribed
# scripts/run_cifar_distill.sh L15: `--distill vid --model_s resnet8x4 -a 0 -b 1`
VID_BETA = 1.0
# distiller_zoo/VID.py L16-17: `init_pred_var=5.0, eps=1e-5`
VID_INIT_PRED_VAR = 5.0
VID_EPS = 1e-5


# ================================================================ official code, transcribed
# distiller_zoo/VID.py VIDLoss
class OfficialVIDLoss(nn.Module):
    def __init__(self, num_input_channels, num_mid_channel, num_target_channels, init_pred_var=5.0, eps=1e-5):
        super().__init__()

        def conv1x1(in_channels, out_channels, stride=1):
            return nn.Conv2d(in_channels, out_channels, kernel_size=1, padding=0, bias=False, stride=stride)

        self.regressor = nn.Sequential(
            conv1x1(num_input_channels, num_mid_channel),
            nn.ReLU(),
            conv1x1(num_mid_channel, num_mid_channel),
            nn.ReLU(),
            conv1x1(num_mid_channel, num_target_channels),
        )
        self.log_scale = torch.nn.Parameter(
            np.log(np.exp(init_pred_var - eps) - 1.0) * torch.ones(num_target_channels)
        )
        self.eps = eps

    def forward(self, input, target):
        s_H, t_H = input.shape[2], target.shape[2]
        if s_H > t_H:
            input = F.adaptive_avg_pool2d(input, (t_H, t_H))
        elif s_H < t_H:
            target = F.adaptive_avg_pool2d(target, (s_H, s_H))
        else:
            pass
        pred_mean = self.regressor(input)
        pred_var = torch.log(1.0 + torch.exp(self.log_scale)) + self.eps
        pred_var = pred_var.view(1, -1, 1, 1)
        neg_log_prob = 0.5 * ((pred_mean - target) ** 2 / pred_var + torch.log(pred_var))
        loss = torch.mean(neg_log_prob)
        return loss


# ================================================================ helpers
record = functools.partial(record_diff, atol=ATOL)


def _yaml():
    return loss_yaml("vid")


def _cfg(**overrides):
    return settings_from_yaml(VIDConfig, "vid", **overrides)


def _method(teacher_tasks=("cls",), **overrides):
    return build_method(VariationalInformationDistillation, VIDConfig, "vid", {}, teacher_tasks, **overrides)


def _terms_and_total(method, s_feats, t_feats):
    terms = method({"features": s_feats}, {"features": t_feats}, {}, {})
    return terms, sum(method.weight(name, {}) * value for name, value in terms.items())


def _method_and_officials(s_feats: dict, t_feats: dict, **overrides):
    """kdmtl's method set up on these features (float64 learned parts), and one RepDistiller
    VIDLoss(s, t, t) per pair holding the same (randomised) parameters."""
    method = _method(**overrides)
    method.setup(s_feats, t_feats)
    method.modules.double()
    g = torch.Generator().manual_seed(99)
    with torch.no_grad():   # move log_scale off its constant start so per-channel variances differ
        for part in method.modules.values():
            part.log_scale.add_(torch.randn(part.log_scale.shape, generator=g, dtype=torch.float64))
    officials = []
    for term in method.terms:
        s, t = s_feats[term.student].shape[1], t_feats[term.teacher].shape[1]
        official = OfficialVIDLoss(s, t, t, float(method.cfg.init_pred_var), float(method.cfg.eps)).double()
        official.load_state_dict(method.modules[term.key].state_dict())
        officials.append(official)
    return method, officials


# ================================================================ YAML defaults = official
def test_yaml_defaults_are_the_official_ones():
    cfg = _cfg()
    assert (cfg.weight, cfg.init_pred_var, cfg.eps) == (VID_BETA, VID_INIT_PRED_VAR, VID_EPS)
    # feat[1:-1]: every stage output after the stem.
    assert list(cfg.student) == list(cfg.teacher) == STAGES
    assert OmegaConf.to_container(OmegaConf.structured(VIDConfig)) == OmegaConf.to_container(cfg)
    assert set(_yaml()) == {f.name for f in VIDConfig.__dataclass_fields__.values()}


def test_the_method_is_found_by_name():
    cfg = OmegaConf.create({"vid": _yaml()})
    assert "vid" in method_names(cfg)
    assert [type(m) for m in build_methods(cfg, {}, ["cls"])] == [VariationalInformationDistillation]


def test_learned_parts_start_as_repdistillers():
    """Same layer shapes, names and log_scale start (float32) as VIDLoss(s, t, t)."""
    s_feats = {n: torch.zeros(2, c, h, h) for n, c, h in zip(STAGES, (8, 16, 32), (16, 8, 4))}
    t_feats = {n: torch.zeros(2, c, h, h) for n, c, h in zip(STAGES, (16, 32, 64), (16, 8, 4))}
    method = _method()
    method.setup(s_feats, t_feats)
    for name, s, t in zip(STAGES, (8, 16, 32), (16, 32, 64)):
        ours = method.modules[name.replace(".", "__")].state_dict()
        official = OfficialVIDLoss(s, t, t).state_dict()
        assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in official.items()}
        assert ours["log_scale"].dtype == official["log_scale"].dtype == torch.float32
        assert torch.equal(ours["log_scale"], official["log_scale"])
    # sigma^2 starts at init_pred_var.
    start = F.softplus(method.modules["trunk__stages__0"].log_scale.double()) + VID_EPS
    assert torch.allclose(start, torch.full_like(start, VID_INIT_PRED_VAR), atol=1e-6)


# ================================================================ value and gradients
@pytest.mark.parametrize("s_shapes, t_shapes", [
    ([(4, 8, 16, 16), (4, 16, 8, 8), (4, 32, 4, 4)], [(4, 8, 16, 16), (4, 16, 8, 8), (4, 32, 4, 4)]),  # same
    ([(4, 8, 16, 16), (4, 16, 8, 8), (4, 32, 4, 4)], [(4, 16, 16, 16), (4, 32, 8, 8), (4, 64, 4, 4)]),  # wider T
    ([(3, 6, 8, 8), (3, 5, 4, 4), (3, 7, 2, 2)], [(3, 4, 16, 16), (3, 9, 2, 2), (3, 3, 2, 2)]),  # pooling
])
def test_vid_equals_repdistiller(s_shapes, t_shapes):
    s_feats = {n: randn(*shape, seed=10 + i, scale=2.0) for i, (n, shape) in enumerate(zip(STAGES, s_shapes))}
    t_feats = {n: randn(*shape, seed=20 + i) for i, (n, shape) in enumerate(zip(STAGES, t_shapes))}
    method, officials = _method_and_officials(s_feats, t_feats)
    terms, total = _terms_and_total(method, s_feats, t_feats)
    assert list(terms) == [f"vid/{n}" for n in STAGES]
    official_values = [c(s_feats[n], t_feats[n]) for n, c in zip(STAGES, officials)]
    for n, value in zip(STAGES, official_values):
        record("vid (RepDistiller VIDLoss)", terms[f"vid/{n}"], value)
        record("vid (RepDistiller VIDLoss)", vid_loss(s_feats[n], t_feats[n], method.modules[n.replace(".", "__")],
                                                      VID_EPS), value)
        assert method.weight(f"vid/{n}", {}) == VID_BETA
    record("vid method (RepDistiller -b 1 * sum VIDLoss(feat[1:-1]))", total, VID_BETA * sum(official_values),
           rel=True)


@pytest.mark.parametrize("s_shape, t_shape", [((4, 6, 8, 8), (4, 10, 8, 8)), ((5, 3, 8, 8), (5, 7, 4, 4)),
                                              ((2, 9, 2, 2), (2, 4, 6, 6))])
def test_vid_gradients_reach_the_student_and_the_learned_parts_as_repdistiller(s_shape, t_shape):
    f_s, f_t = randn(*s_shape, seed=3), randn(*t_shape, seed=4, scale=3.0)
    method, (official,) = _method_and_officials({"trunk.stages.1": f_s}, {"trunk.stages.1": f_t},
                                                student=["trunk.stages.1"], teacher=["trunk.stages.1"])
    part = method.modules["trunk__stages__1"]
    a, b = f_s.clone().requires_grad_(), f_s.clone().requires_grad_()
    ours = vid_loss(a, f_t, part, VID_EPS)
    reference = official(b, f_t)
    record("vid (RepDistiller VIDLoss)", ours, reference)
    ours.backward(), reference.backward()
    record("vid gradient, student feature", a.grad, b.grad)
    ours_params, official_params = dict(part.named_parameters()), dict(official.named_parameters())
    assert set(ours_params) == set(official_params) == {"regressor.0.weight", "regressor.2.weight",
                                                        "regressor.4.weight", "log_scale"}
    for name, p in ours_params.items():
        record(f"vid gradient, {name}", p.grad, official_params[name].grad)


def test_per_task_teachers_give_one_learned_part_per_task():
    s_feats = {"trunk.stages.2": randn(2, 8, 4, 4, seed=5)}
    t_feats = {"cls:trunk.stages.2": randn(2, 16, 4, 4, seed=6), "seg:trunk.stages.2": randn(2, 4, 2, 2, seed=7)}
    method, officials = _method_and_officials(s_feats, t_feats, teacher_tasks=("cls", "seg"),
                                              student=["trunk.stages.2"], teacher=["trunk.stages.2"])
    terms, _ = _terms_and_total(method, s_feats, t_feats)
    assert list(terms) == ["vid/trunk.stages.2@cls", "vid/trunk.stages.2@seg"]
    for (name, value), term, official in zip(terms.items(), method.terms, officials):
        record("vid (RepDistiller VIDLoss)", value, official(s_feats["trunk.stages.2"], t_feats[term.teacher]))


def test_bad_settings_and_features_fail_at_start():
    s = {n: torch.zeros(2, 4, 4, 4) for n in STAGES}
    with pytest.raises(KdmtlError, match="init_pred_var .* must exceed"):
        _method(init_pred_var=1e-6).setup(s, s)
    with pytest.raises(KdmtlError, match="features must be"):
        _method().setup({**s, "trunk.stages.2": torch.zeros(2, 4)}, s)


# ================================================================ learned parts and state
def test_learned_parts_are_trained_and_a_state_dict_restores_them():
    sizes = (8, 4, 2)
    s_feats = {n: randn(4, c, h, h, seed=30 + i).float() for i, (n, c, h) in enumerate(zip(STAGES, (8, 16, 32), sizes))}
    t_feats = {n: randn(4, c, h, h, seed=40 + i).float()
               for i, (n, c, h) in enumerate(zip(STAGES, (16, 32, 64), sizes))}
    torch.manual_seed(0)
    method = _method()
    method.setup(s_feats, t_feats)
    params = method.param_groups(0.1)
    assert len(params) == 1 and len(params[0]["params"]) == 3 * 4      # per pair: three convs + log_scale
    # One SGD step moves the log-scales (mdistiller never trains them; RepDistiller does).
    optimizer = torch.optim.SGD(params, lr=0.1)
    before = {k: v.clone() for k, v in method.modules.state_dict().items()}
    terms, total = _terms_and_total(method, s_feats, t_feats)
    total.backward()
    optimizer.step()
    state = method.modules.state_dict()
    assert set(state) == {f"{n.replace('.', '__')}.{p}" for n in STAGES
                          for p in ("regressor.0.weight", "regressor.2.weight", "regressor.4.weight", "log_scale")}
    for key in state:
        assert not torch.equal(state[key], before[key]), key
    torch.manual_seed(1)
    fresh = _method()
    fresh.setup(s_feats, t_feats)
    assert not torch.equal(fresh.modules.state_dict()["trunk__stages__0.regressor.0.weight"],
                           state["trunk__stages__0.regressor.0.weight"])
    fresh.modules.load_state_dict(state)
    for key, value in fresh.modules.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert_same_terms(method, fresh, s_feats, t_feats)


# ================================================================ precision
@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_are_computed_in_float32_even_under_autocast(low):
    f_s, f_t = randn(8, 16, 8, 8, seed=80).to(low), randn(8, 32, 4, 4, seed=81).to(low)
    method, (official,) = _method_and_officials({"trunk.stages.1": f_s.double()}, {"trunk.stages.1": f_t.double()},
                                                student=["trunk.stages.1"], teacher=["trunk.stages.1"])
    part = method.modules["trunk__stages__1"].float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = vid_loss(f_s, f_t, part, VID_EPS)
    assert ours.dtype == torch.float32
    reference = official(f_s.double(), f_t.double())
    assert float(ours.detach()) == pytest.approx(float(reference.detach()), rel=1e-4, abs=1e-9)


# ================================================================ through the real CLI
@pytest.mark.parametrize("loss, methods", [("vid", ["vid"]), ("[kd,vid]", ["kd", "vid"])])
def test_cli_train_with_the_method(loss, methods, workdir, shared_cache):
    run_dir = train_logs_finite_terms(loss, methods, workdir, shared_cache)
    assert_terms_logged(run_dir, "vid", [f"vid/{n}" for n in STAGES])


@pytest.mark.slow   # ~19 s: the method's state_dict round trip above stays in the default run
def test_cli_resume_restores_the_vid_learned_parts(workdir, shared_cache):
    """An interrupted `loss=vid` run, resumed, ends with the learned parts of the uninterrupted run, bit for bit."""
    # the log-scales trained during the second epoch too (so the restore is not trivial)
    after_one, reference, resumed = resume_equals_straight("vid", workdir, shared_cache,
                                                           trained=["vid.trunk__stages__0.log_scale"])
    assert {k.split(".", 1)[0] for k in after_one["objective"]} == {"vid"}
    assert any(k.endswith(".log_scale") for k in after_one["objective"]), sorted(after_one["objective"])
    assert resumed["epoch"] == reference["epoch"] == 2
    # The log-scales were trained (they left their start) and the resumed run restored them.
    start = torch.full_like(reference["objective"]["vid.trunk__stages__0.log_scale"],
                            math.log(math.exp(VID_INIT_PRED_VAR - VID_EPS) - 1.0))
    assert not torch.equal(reference["objective"]["vid.trunk__stages__0.log_scale"], start)
