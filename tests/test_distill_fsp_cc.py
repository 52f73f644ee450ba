"""`fsp` and `cc` (kdmtl_cli/distill/fsp.py, cc.py) against RepDistiller, in float64.

The `official_*` code below is transcribed from HobbitLong/RepDistiller at
b84f547c5db6a35318d4671d7d5c4de74c822403 (not from kdmtl's code):

- distiller_zoo/FSP.py `FSP` (L8-48: __init__'s channel check, forward, compute_loss, compute_fsp);
- train_student.py L254-261 + helper/pretrain.py L72-74: FSP on feat[:-1] (f0 = stem .. f3), summed, in the
  init stage only (helper/loops.py L174-176: `loss_kd = 0` in the main stage; its init loop is transcribed
  in tests/test_init_stage.py);
- distiller_zoo/CC.py `Correlation.forward` (L14-17);
- models/util.py `LinearEmbed` (L185-194), built by train_student.py L211-218 as
  `LinearEmbed(feat[-1].shape[1], opt.feat_dim)` for student and teacher; helper/loops.py L162-165
  applies them to feat[-1] (models/resnet.py L191-193: AvgPool2d over the last stage, flattened);
- helper/loops.py L184: loss = gamma * loss_cls + alpha * loss_div + beta * loss_kd;
- scripts/run_cifar_distill.sh: beta (`-b`) of each method; train_student.py L81: `--feat_dim 128`.

Every comparison is at 1e-9 (abs, or rel for large weighted values) on random float64 inputs; the
max abs difference of each comparison is printed (`pytest -s`) as `official-diff <what>: <value>`.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import OmegaConf

from distill_checks import (assert_terms_logged, build_method, loss_yaml, randn, record_diff, resume_equals_straight,
                            settings_from_yaml, train_logs_finite_terms)
from kdmtl_cli.distill import build_methods, method_names
from kdmtl_cli.distill.cc import CCConfig, CorrelationCongruence, cc_loss
from kdmtl_cli.distill.fsp import FlowOfSolutionProcedure, FSPConfig, fsp_loss
from kdmtl_cli.errors import KdmtlError

ATOL = 1e-9
pytestmark = pytest.mark.usefixtures("one_thread")

STEM_AND_STAGES = ["trunk.stem", "trunk.stages.0", "trunk.stages.1", "trunk.stages.2"]

# ================================================================ official defaults, transcribed
# scripts/run_cifar_distill.sh L25: `--distill fsp --model_s resnet8x4 -a 0 -b 50`
FSP_BETA = 50.0
# train_student.py L47: `parser.add_argument('--init_epochs', type=int, default=30, ...)`; helper/pretrain.py
# L26-27: the init stage's lr = opt.learning_rate (init_lr null: optim.lr)
FSP_INIT_EPOCHS = 30
# scripts/run_cifar_distill.sh L13: `--distill correlation --model_s resnet8x4 -a 0 -b 0.02`
CC_BETA = 0.02
# train_student.py L81: `parser.add_argument('--feat_dim', default=128, type=int, ...)`
CC_FEAT_DIM = 128


# ================================================================ official code, transcribed
# distiller_zoo/FSP.py FSP
class OfficialFSP(nn.Module):
    def __init__(self, s_shapes, t_shapes):
        super().__init__()
        assert len(s_shapes) == len(t_shapes), 'unequal length of feat list'
        s_c = [s[1] for s in s_shapes]
        t_c = [t[1] for t in t_shapes]
        if np.any(np.asarray(s_c) != np.asarray(t_c)):
            raise ValueError('num of channels not equal (error in FSP)')

    def forward(self, g_s, g_t):
        s_fsp = self.compute_fsp(g_s)
        t_fsp = self.compute_fsp(g_t)
        loss_group = [self.compute_loss(s, t) for s, t in zip(s_fsp, t_fsp)]
        return loss_group

    @staticmethod
    def compute_loss(s, t):
        return (s - t).pow(2).mean()

    @staticmethod
    def compute_fsp(g):
        fsp_list = []
        for i in range(len(g) - 1):
            bot, top = g[i], g[i + 1]
            b_H, t_H = bot.shape[2], top.shape[2]
            if b_H > t_H:
                bot = F.adaptive_avg_pool2d(bot, (t_H, t_H))
            elif b_H < t_H:
                top = F.adaptive_avg_pool2d(top, (b_H, b_H))
            else:
                pass
            bot = bot.unsqueeze(1)
            top = top.unsqueeze(2)
            bot = bot.view(bot.shape[0], bot.shape[1], bot.shape[2], -1)
            top = top.view(top.shape[0], top.shape[1], top.shape[2], -1)

            fsp = (bot * top).mean(-1)
            fsp_list.append(fsp)
        return fsp_list


# distiller_zoo/CC.py Correlation
class OfficialCorrelation(nn.Module):
    def forward(self, f_s, f_t):
        delta = torch.abs(f_s - f_t)
        loss = torch.mean((delta[:-1] * delta[1:]).sum(1))
        return loss


# models/util.py LinearEmbed
class OfficialLinearEmbed(nn.Module):
    def __init__(self, dim_in=1024, dim_out=128):
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x):
        x = x.view(x.shape[0], -1)
        x = self.linear(x)
        return x


# models/resnet.py ResNet.forward L191-193 (AvgPool2d over the whole last-stage map)
def official_feat_last(x):
    x = nn.AvgPool2d(tuple(x.shape[2:]))(x)
    return x.view(x.size(0), -1)


# ================================================================ helpers
record = functools.partial(record_diff, atol=ATOL)
_yaml = loss_yaml


SETTINGS = {"fsp": FSPConfig, "cc": CCConfig}
METHODS = {"fsp": FlowOfSolutionProcedure, "cc": CorrelationCongruence}


def _cfg(name, **overrides):
    return settings_from_yaml(SETTINGS[name], name, **overrides)


def _method(name, teacher_tasks=("cls",), **overrides):
    return build_method(METHODS[name], SETTINGS[name], name, {}, teacher_tasks, **overrides)


def _terms_and_total(method, s_feats, t_feats):
    terms = method({"features": s_feats}, {"features": t_feats}, {}, {})
    return terms, sum(method.weight(name, {}) * value for name, value in terms.items())


# ================================================================ YAML defaults = official
def test_yaml_defaults_are_the_official_ones():
    fsp, cc = _cfg("fsp"), _cfg("cc")
    assert fsp.weight == FSP_BETA
    assert (fsp.init_epochs, fsp.init_lr, fsp.main_stage) == (FSP_INIT_EPOCHS, None, False)
    assert (cc.weight, cc.feat_dim) == (CC_BETA, CC_FEAT_DIM)
    # fsp: feat[:-1] (stem and every stage); cc: feat[-1] (the pooled last stage).
    assert list(fsp.student) == list(fsp.teacher) == STEM_AND_STAGES
    assert list(cc.student) == list(cc.teacher) == ["trunk.stages.2"]
    for name, settings in SETTINGS.items():
        assert OmegaConf.to_container(OmegaConf.structured(settings)) == OmegaConf.to_container(_cfg(name)), name
        assert set(_yaml(name)) == {f.name for f in settings.__dataclass_fields__.values()}, name


def test_the_methods_are_found_by_name():
    cfg = OmegaConf.create({"fsp": _yaml("fsp"), "cc": _yaml("cc")})
    assert set(method_names(cfg)) >= {"fsp", "cc"}
    assert {m.name: type(m) for m in build_methods(cfg, {}, ["cls"])} == METHODS


# ================================================================ FSP
FSP_STUDENT = [(4, 8, 16, 16), (4, 8, 16, 16), (4, 16, 8, 8), (4, 32, 4, 4)]   # stem, stage 0..2


@pytest.mark.parametrize("t_shapes", [
    FSP_STUDENT,                                                  # the same sizes
    [(4, 8, 32, 32), (4, 8, 32, 32), (4, 16, 16, 16), (4, 32, 8, 8)],   # teacher at twice the resolution
    [(4, 8, 16, 16), (4, 8, 8, 8), (4, 16, 8, 8), (4, 32, 2, 2)],       # bottom larger / top larger
])
def test_fsp_equals_repdistiller(t_shapes):
    g_s = [randn(*shape, seed=10 + i, scale=2.0) for i, shape in enumerate(FSP_STUDENT)]
    g_t = [randn(*shape, seed=20 + i) for i, shape in enumerate(t_shapes)]
    official = OfficialFSP([f.shape for f in g_s], [f.shape for f in g_t])(g_s, g_t)
    for i in range(3):
        record("fsp (RepDistiller FSP.compute_loss)", fsp_loss(g_s[i], g_s[i + 1], g_t[i], g_t[i + 1]), official[i])
    # The method over feat[:-1]: three consecutive-pair terms. The init stage minimises their plain sum
    # (helper/pretrain.py L72-74); the main stage adds none (helper/loops.py L174-176: loss_kd = 0).
    s_feats, t_feats = dict(zip(STEM_AND_STAGES, g_s)), dict(zip(STEM_AND_STAGES, g_t))
    names = [f"fsp/{a}+{b}" for a, b in zip(STEM_AND_STAGES[:-1], STEM_AND_STAGES[1:])]
    method = _method("fsp")
    method.setup(s_feats, t_feats)
    init_terms = method.init_terms({"features": s_feats}, {"features": t_feats}, {})
    assert list(init_terms) == names
    for name, value in zip(names, official):
        record("fsp init term (RepDistiller FSP.compute_loss)", init_terms[name], value)
    record("fsp init loss (RepDistiller sum(FSP(feat_s[:-1], feat_t[:-1])))", sum(init_terms.values()), sum(official))
    assert _terms_and_total(method, s_feats, t_feats)[0] == {}
    # main_stage: true (kdmtl's option): the same terms, each weight beta, in the main training too.
    method = _method("fsp", main_stage=True)
    method.setup(s_feats, t_feats)
    terms, total = _terms_and_total(method, s_feats, t_feats)
    assert list(terms) == names
    for name, value in zip(names, official):
        record("fsp (RepDistiller FSP.compute_loss)", terms[name], value)
        assert method.weight(name, {}) == FSP_BETA
    record("fsp method (RepDistiller -b 50 * sum FSP(feat[:-1]))", total, FSP_BETA * sum(official), rel=True)


def test_fsp_gradient_equals_repdistiller():
    g_s = [randn(*shape, seed=30 + i) for i, shape in enumerate(FSP_STUDENT)]
    g_t = [randn(*shape, seed=40 + i) for i, shape in enumerate(FSP_STUDENT)]
    a = [f.clone().requires_grad_() for f in g_s]
    b = [f.clone().requires_grad_() for f in g_s]
    ours = sum(fsp_loss(a[i], a[i + 1], g_t[i], g_t[i + 1]) for i in range(3))
    official = sum(OfficialFSP([f.shape for f in b], [f.shape for f in g_t])(b, g_t))
    record("fsp (RepDistiller FSP.compute_loss)", ours, official)
    ours.backward(), official.backward()
    for x, y in zip(a, b):
        record("fsp gradient (RepDistiller FSP)", x.grad, y.grad)


def test_fsp_non_square_maps_pool_to_the_smaller_height_and_width():
    """RepDistiller pools to a square (t_H, t_H); kdmtl to (min H, min W): the official loss of the
    maps pooled that way (and the same as RepDistiller for square maps, above)."""
    s_bot, s_top = randn(2, 3, 8, 6, seed=50), randn(2, 5, 4, 3, seed=51)
    t_bot, t_top = randn(2, 3, 8, 6, seed=52), randn(2, 5, 4, 3, seed=53)
    official = OfficialFSP.compute_loss(OfficialFSP.compute_fsp([F.adaptive_avg_pool2d(s_bot, (4, 3)), s_top])[0],
                                        OfficialFSP.compute_fsp([F.adaptive_avg_pool2d(t_bot, (4, 3)), t_top])[0])
    record("fsp (RepDistiller FSP.compute_loss)", fsp_loss(s_bot, s_top, t_bot, t_top), official)


def test_fsp_refuses_unequal_channels_and_single_features():
    """RepDistiller's FSP.__init__ raises on unequal channel counts; kdmtl fails at start, saying why."""
    s = {name: torch.zeros(2, c, 4, 4) for name, c in zip(STEM_AND_STAGES, (16, 16, 32, 64))}
    t = {name: torch.zeros(2, c, 4, 4) for name, c in zip(STEM_AND_STAGES, (32, 32, 64, 128))}
    with pytest.raises(ValueError, match="num of channels not equal"):
        OfficialFSP([f.shape for f in s.values()], [f.shape for f in t.values()])
    with pytest.raises(KdmtlError, match="loss.fsp .*equal channel counts"):
        _method("fsp").setup(s, t)
    with pytest.raises(KdmtlError, match="at least two features"):
        _method("fsp", student=["trunk.stem"], teacher=["trunk.stem"]).setup(s, s)


def test_fsp_per_task_teachers_give_one_chain_per_task():
    g_s = {n: randn(*shape, seed=60 + i) for i, (n, shape) in enumerate(zip(STEM_AND_STAGES, FSP_STUDENT))}
    t_feats = {f"{task}:{n}": randn(*shape, seed=70 + 10 * k + i)
               for k, task in enumerate(("cls", "seg"))
               for i, (n, shape) in enumerate(zip(STEM_AND_STAGES, FSP_STUDENT))}
    method = _method("fsp", teacher_tasks=("cls", "seg"))
    method.setup(g_s, t_feats)
    terms = method.init_terms({"features": g_s}, {"features": t_feats}, {})
    assert len(terms) == 6
    for task in ("cls", "seg"):
        g_t = [t_feats[f"{task}:{n}"] for n in STEM_AND_STAGES]
        official = OfficialFSP(FSP_STUDENT, FSP_STUDENT)(list(g_s.values()), g_t)
        for (a, b), value in zip(zip(STEM_AND_STAGES[:-1], STEM_AND_STAGES[1:]), official):
            record("fsp (RepDistiller FSP.compute_loss)", terms[f"fsp/{a}+{b}@{task}"], value)


# ================================================================ CC
def _cc_method_and_official(s_feature, t_feature, **overrides):
    """kdmtl's method set up on these features (float64 embeddings), and RepDistiller's two
    LinearEmbeds holding the same weights."""
    method = _method("cc", **overrides)
    method.setup({"trunk.stages.2": s_feature}, {"trunk.stages.2": t_feature})
    method.modules.double()
    embeddings = method.modules["trunk__stages__2"]
    feat_dim = int(method.cfg.feat_dim)
    embed_s = OfficialLinearEmbed(embeddings.student.in_features, feat_dim).double()
    embed_t = OfficialLinearEmbed(embeddings.teacher.in_features, feat_dim).double()
    embed_s.linear.load_state_dict(embeddings.student.state_dict())
    embed_t.linear.load_state_dict(embeddings.teacher.state_dict())
    return method, embed_s, embed_t


def _official_cc(s_feature, t_feature, embed_s, embed_t):
    pool = official_feat_last if s_feature.dim() == 4 else (lambda x: x)
    pool_t = official_feat_last if t_feature.dim() == 4 else (lambda x: x)
    return OfficialCorrelation()(embed_s(pool(s_feature)), embed_t(pool_t(t_feature)))


@pytest.mark.parametrize("s_shape, t_shape", [
    ((16, 16, 8, 8), (16, 32, 8, 8)),    # maps: pooled like RepDistiller's feat[-1]
    ((8, 16, 4, 4), (8, 64, 2, 2)),      # different sizes and channels
    ((5, 7, 3, 5), (5, 3, 6, 2)),        # non-square
    ((12, 10), (12, 40)),                # already vectors
])
def test_cc_equals_repdistiller_with_the_same_embeddings(s_shape, t_shape):
    f_s, f_t = randn(*s_shape, seed=1, scale=2.0), randn(*t_shape, seed=2)
    method, embed_s, embed_t = _cc_method_and_official(f_s, f_t)
    official = _official_cc(f_s, f_t, embed_s, embed_t)
    embeddings = method.modules["trunk__stages__2"]
    assert (embeddings.student.out_features, embeddings.teacher.out_features) == (CC_FEAT_DIM, CC_FEAT_DIM)
    record("cc (RepDistiller Correlation(LinearEmbed))", cc_loss(f_s, f_t, embeddings), official)
    terms, total = _terms_and_total(method, {"trunk.stages.2": f_s}, {"trunk.stages.2": f_t})
    assert set(terms) == {"cc/trunk.stages.2"}
    assert method.weight("cc/trunk.stages.2", {}) == CC_BETA
    record("cc method (RepDistiller -b 0.02 * Correlation)", total, CC_BETA * official, rel=True)


def test_cc_gradients_reach_the_student_and_both_embeddings_as_repdistiller():
    f_s, f_t = randn(8, 6, 4, 4, seed=3), randn(8, 10, 2, 2, seed=4)
    method, embed_s, embed_t = _cc_method_and_official(f_s, f_t, feat_dim=5)
    a, b = f_s.clone().requires_grad_(), f_s.clone().requires_grad_()
    ours = cc_loss(a, f_t, method.modules["trunk__stages__2"])
    official = _official_cc(b, f_t, embed_s, embed_t)
    record("cc (RepDistiller Correlation(LinearEmbed))", ours, official)
    ours.backward(), official.backward()
    record("cc gradient, student feature", a.grad, b.grad)
    embeddings = method.modules["trunk__stages__2"]
    for ours_p, official_p in ((embeddings.student.weight, embed_s.linear.weight),
                               (embeddings.student.bias, embed_s.linear.bias),
                               (embeddings.teacher.weight, embed_t.linear.weight),
                               (embeddings.teacher.bias, embed_t.linear.bias)):
        record("cc gradient, embedding parameters", ours_p.grad, official_p.grad)


def test_cc_embeddings_are_learned_parts_that_a_state_dict_restores():
    f_s, f_t = torch.randn(4, 16, 4, 4), torch.randn(4, 32, 2, 2)
    torch.manual_seed(0)
    method = _method("cc")
    method.setup({"trunk.stages.2": f_s}, {"trunk.stages.2": f_t})
    params = method.param_groups(0.1)
    assert len(params) == 1 and len(params[0]["params"]) == 4      # two Linear layers, weight + bias
    state = method.modules.state_dict()
    assert set(state) == {f"trunk__stages__2.{side}.{p}" for side in ("student", "teacher") for p in ("weight", "bias")}
    assert state["trunk__stages__2.student.weight"].shape == (CC_FEAT_DIM, 16)
    assert state["trunk__stages__2.teacher.weight"].shape == (CC_FEAT_DIM, 32)
    torch.manual_seed(1)
    fresh = _method("cc")
    fresh.setup({"trunk.stages.2": f_s}, {"trunk.stages.2": f_t})
    assert not torch.equal(fresh.modules.state_dict()["trunk__stages__2.student.weight"],
                           state["trunk__stages__2.student.weight"])
    fresh.modules.load_state_dict(state)
    for key, value in fresh.modules.state_dict().items():
        assert torch.equal(value, state[key]), key
    batch = ({"features": {"trunk.stages.2": f_s}}, {"features": {"trunk.stages.2": f_t}}, {}, {})
    assert torch.equal(fresh(*batch)["cc/trunk.stages.2"], method(*batch)["cc/trunk.stages.2"])


# ================================================================ precision
@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["fsp", "cc"])
def test_half_precision_inputs_are_computed_in_float32_even_under_autocast(name, low):
    f_s, f_t = randn(16, 32, 8, 8, seed=80).to(low), randn(16, 32, 4, 4, seed=81).to(low)
    if name == "fsp":
        g_s, g_t = [f_s, f_s[:, :, ::2, ::2]], [f_t, f_t]
        loss = lambda: fsp_loss(g_s[0], g_s[1], g_t[0], g_t[1])   # noqa: E731
        reference = OfficialFSP.compute_loss(*[OfficialFSP.compute_fsp([x.double() for x in g])[0] for g in (g_s, g_t)])
    else:
        method, embed_s, embed_t = _cc_method_and_official(f_s.float(), f_t.float())
        method.modules.float()
        loss = lambda: cc_loss(f_s, f_t, method.modules["trunk__stages__2"])   # noqa: E731
        reference = _official_cc(f_s.double(), f_t.double(), embed_s, embed_t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = loss()
    assert ours.dtype == torch.float32
    assert float(ours.detach()) == pytest.approx(float(reference.detach()), rel=1e-4, abs=1e-9)


# ================================================================ through the real CLI
# FSP needs the teacher's channel counts: the default teacher (convnet width 32) with a width-32 student;
# its terms are those of its init stage (`init/fsp/...`, two epochs here; tests/test_init_stage.py).
@pytest.mark.parametrize("loss, methods, extra", [("fsp", ["fsp"], ["student.width=32", "loss.fsp.init_epochs=2"]),
                                                  ("cc", ["cc"], []),
                                                  ("[kd,cc]", ["kd", "cc"], [])])
def test_cli_train_with_the_method(loss, methods, extra, workdir, shared_cache):
    run_dir = train_logs_finite_terms(loss, methods, workdir, shared_cache, extra=extra)
    expected = {"fsp": [f"fsp/{a}+{b}" for a, b in zip(STEM_AND_STAGES[:-1], STEM_AND_STAGES[1:])],
                "cc": ["cc/trunk.stages.2"]}
    for method in methods:
        assert_terms_logged(run_dir, method, expected.get(method, []))


@pytest.mark.slow   # ~19 s: the method's state_dict round trip above stays in the default run
def test_cli_resume_restores_the_cc_embeddings(workdir, shared_cache):
    """An interrupted `loss=cc` run, resumed, ends with the embeddings of the uninterrupted run, bit for bit."""
    # the embeddings trained during the second epoch (so the restore is not trivial)
    after_one, a, _ = resume_equals_straight("cc", workdir, shared_cache, trained=["cc.trunk__stages__2.student.weight"])
    assert {k.split(".", 1)[0] for k in after_one["objective"]} == {"cc"}
    assert set(a["objective"]) == set(after_one["objective"])
