"""`pkt`, `sp` and `nst` (kdmtl_cli/distill/pkt.py, sp.py, nst.py) against RepDistiller, in float64.

The `official_*` code below is transcribed from HobbitLong/RepDistiller at
b84f547c5db6a35318d4671d7d5c4de74c822403 (not from kdmtl's code):

- distiller_zoo/PKT.py `PKT.cosine_similarity_loss` (L17-42);
- distiller_zoo/SP.py `Similarity.similarity_loss` (L16-30);
- distiller_zoo/NST.py `NSTLoss.nst_loss` + `poly_kernel` (L16-42);
- models/resnet.py L191-193: feat[-1] = `self.avgpool(x)` (nn.AvgPool2d(8) over the 8x8 last stage,
  i.e. a global average pool), then `x.view(x.size(0), -1)`;
- helper/loops.py L139-156: nst on feat[1:-1] (summed), similarity on [feat[-2]] (summed), pkt on
  feat[-1]; L184: loss = gamma * loss_cls + alpha * loss_div + beta * loss_kd;
- scripts/run_cifar_distill.sh: the beta (`-b`) of each method.

Every comparison is at 1e-9 (abs, or rel for large weighted values) on random float64 inputs; the
max abs difference of each method is printed (`pytest -s`) as `official-diff <method>: <value>`.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import OmegaConf

from distill_checks import assert_terms_logged, build_method, loss_yaml, randn, record_diff, settings_from_yaml, train_logs_finite_terms
from kdmtl_cli.distill import build_methods, method_names
from kdmtl_cli.distill.nst import NeuronSelectivityTransfer, NSTConfig, nst_loss
from kdmtl_cli.distill.pkt import PKTConfig, ProbabilisticKnowledgeTransfer, pkt_loss
from kdmtl_cli.distill.sp import SimilarityPreserving, SPConfig, sp_loss
from kdmtl_cli.errors import KdmtlError

ATOL = 1e-9
DIFFS = {}
pytestmark = pytest.mark.usefixtures("one_thread")

STAGES = ["trunk.stages.0", "trunk.stages.1", "trunk.stages.2"]

# ================================================================ official defaults, transcribed
# scripts/run_cifar_distill.sh L19: `--distill pkt --model_s resnet8x4 -a 0 -b 30000`
PKT_BETA = 30000.0
# distiller_zoo/PKT.py L17: `def cosine_similarity_loss(output_net, target_net, eps=0.0000001)`
PKT_EPS = 0.0000001
# scripts/run_cifar_distill.sh L11: `--distill similarity --model_s resnet8x4 -a 0 -b 3000`
SP_BETA = 3000.0
# scripts/run_cifar_distill.sh L27: `--distill nst --model_s resnet8x4 -a 0 -b 50`
NST_BETA = 50.0


# ================================================================ official code, transcribed
# models/resnet.py ResNet.forward L191-193 (AvgPool2d over the whole last-stage map)
def official_feat_last(x):
    x = nn.AvgPool2d(tuple(x.shape[2:]))(x)
    return x.view(x.size(0), -1)


# distiller_zoo/PKT.py PKT.cosine_similarity_loss
def official_pkt_loss(output_net, target_net, eps=0.0000001):
    output_net_norm = torch.sqrt(torch.sum(output_net ** 2, dim=1, keepdim=True))
    output_net = output_net / (output_net_norm + eps)
    output_net[output_net != output_net] = 0

    target_net_norm = torch.sqrt(torch.sum(target_net ** 2, dim=1, keepdim=True))
    target_net = target_net / (target_net_norm + eps)
    target_net[target_net != target_net] = 0

    model_similarity = torch.mm(output_net, output_net.transpose(0, 1))
    target_similarity = torch.mm(target_net, target_net.transpose(0, 1))

    model_similarity = (model_similarity + 1.0) / 2.0
    target_similarity = (target_similarity + 1.0) / 2.0

    model_similarity = model_similarity / torch.sum(model_similarity, dim=1, keepdim=True)
    target_similarity = target_similarity / torch.sum(target_similarity, dim=1, keepdim=True)

    loss = torch.mean(target_similarity * torch.log((target_similarity + eps) / (model_similarity + eps)))
    return loss


# distiller_zoo/SP.py Similarity.similarity_loss
def official_sp_loss(f_s, f_t):
    bsz = f_s.shape[0]
    f_s = f_s.view(bsz, -1)
    f_t = f_t.view(bsz, -1)

    G_s = torch.mm(f_s, torch.t(f_s))
    G_s = torch.nn.functional.normalize(G_s)
    G_t = torch.mm(f_t, torch.t(f_t))
    G_t = torch.nn.functional.normalize(G_t)

    G_diff = G_t - G_s
    loss = (G_diff * G_diff).view(-1, 1).sum(0) / (bsz * bsz)
    return loss


# distiller_zoo/NST.py NSTLoss.poly_kernel
def official_poly_kernel(a, b):
    a = a.unsqueeze(1)
    b = b.unsqueeze(2)
    res = (a * b).sum(-1).pow(2)
    return res


# distiller_zoo/NST.py NSTLoss.nst_loss (full_loss = True)
def official_nst_loss(f_s, f_t):
    s_H, t_H = f_s.shape[2], f_t.shape[2]
    if s_H > t_H:
        f_s = F.adaptive_avg_pool2d(f_s, (t_H, t_H))
    elif s_H < t_H:
        f_t = F.adaptive_avg_pool2d(f_t, (s_H, s_H))
    else:
        pass

    f_s = f_s.view(f_s.shape[0], f_s.shape[1], -1)
    f_s = F.normalize(f_s, dim=2)
    f_t = f_t.view(f_t.shape[0], f_t.shape[1], -1)
    f_t = F.normalize(f_t, dim=2)

    return (official_poly_kernel(f_t, f_t).mean().detach() + official_poly_kernel(f_s, f_s).mean()
            - 2 * official_poly_kernel(f_s, f_t).mean())


# helper/loops.py: the list-valued criteria are summed (`loss_kd = sum(loss_group)`), then times beta
def official_group(criterion, g_s, g_t):
    return sum(criterion(f_s, f_t) for f_s, f_t in zip(g_s, g_t))


# ================================================================ helpers
record = functools.partial(record_diff, atol=ATOL, diffs=DIFFS)
_yaml = loss_yaml


SETTINGS = {"pkt": PKTConfig, "sp": SPConfig, "nst": NSTConfig}
METHODS = {"pkt": ProbabilisticKnowledgeTransfer, "sp": SimilarityPreserving, "nst": NeuronSelectivityTransfer}


def _cfg(name, **overrides):
    """A method's node from its YAML, validated by its settings class."""
    return settings_from_yaml(SETTINGS[name], name, **overrides)


def _method(name, teacher_tasks=("cls",), **overrides):
    return build_method(METHODS[name], SETTINGS[name], name, {}, teacher_tasks, **overrides)


def _weighted_total(method, s_feats, t_feats):
    method.setup(s_feats, t_feats)
    terms = method({"features": s_feats}, {"features": t_feats}, {}, {})
    return terms, sum(method.weight(name, {}) * value for name, value in terms.items())


# ================================================================ YAML defaults = official
def test_yaml_defaults_are_the_official_ones():
    pkt, sp, nst = _cfg("pkt"), _cfg("sp"), _cfg("nst")
    assert (pkt.weight, pkt.eps) == (PKT_BETA, PKT_EPS)
    assert sp.weight == SP_BETA
    assert nst.weight == NST_BETA
    # pkt: feat[-1] (pooled last stage); sp: [feat[-2]] (last stage map); nst: feat[1:-1] (every stage).
    assert list(pkt.student) == list(pkt.teacher) == ["trunk.stages.2"]
    assert list(sp.student) == list(sp.teacher) == ["trunk.stages.2"]
    assert list(nst.student) == list(nst.teacher) == STAGES
    # The settings classes' own defaults are the YAML's (a method built without its YAML is the same).
    for name, settings in SETTINGS.items():
        assert OmegaConf.to_container(OmegaConf.structured(settings)) == OmegaConf.to_container(_cfg(name)), name
        assert set(_yaml(name)) == {f.name for f in settings.__dataclass_fields__.values()}, name


def test_the_methods_are_found_by_name_with_no_learned_part():
    cfg = OmegaConf.create({"pkt": _yaml("pkt"), "sp": _yaml("sp"), "nst": _yaml("nst")})
    assert set(method_names(cfg)) >= {"pkt", "sp", "nst"}
    methods = {m.name: m for m in build_methods(cfg, {}, ["cls"])}
    assert {name: type(m) for name, m in methods.items()} == METHODS
    for method in methods.values():
        # No learned part and no other state: nothing to optimise, save or restore on resume.
        assert len(method.modules) == 0 and method.param_groups(0.1) == []
        assert list(method.modules.state_dict()) == []


# ================================================================ PKT
@pytest.mark.parametrize("s_shape, t_shape", [
    ((16, 16, 8, 8), (16, 32, 8, 8)),    # maps: pooled like RepDistiller's feat[-1]
    ((8, 16, 4, 4), (8, 64, 2, 2)),      # different sizes and channels: only N x N compared
    ((5, 7, 3, 5), (5, 3, 6, 2)),        # non-square
    ((12, 10), (12, 40)),                # already vectors
])
def test_pkt_equals_repdistiller(s_shape, t_shape):
    f_s, f_t = randn(*s_shape, seed=1, scale=2.0), randn(*t_shape, seed=2)
    pool = official_feat_last if len(s_shape) == 4 else (lambda x: x)
    official = official_pkt_loss(pool(f_s.clone()), pool(f_t.clone()))
    record("pkt (RepDistiller PKT.cosine_similarity_loss)", pkt_loss(f_s, f_t, PKT_EPS), official)
    # The method: term pkt/<student feature>, weight beta, as loops.py `beta * criterion_kd(feat_s[-1], feat_t[-1])`.
    terms, total = _weighted_total(_method("pkt"), {"trunk.stages.2": f_s}, {"trunk.stages.2": f_t})
    assert set(terms) == {"pkt/trunk.stages.2"}
    record("pkt method (RepDistiller -b 30000 * PKT)", total, PKT_BETA * official, rel=True)


def test_pkt_zero_vectors_and_gradient_equal_repdistiller():
    """The gradient w.r.t. the student feature; a zero sample (eps keeps the value finite)."""
    f_s, f_t = randn(6, 8, 4, 4, seed=3), randn(6, 12, 4, 4, seed=4)
    a, b = f_s.clone().requires_grad_(), f_s.clone().requires_grad_()
    ours, official = pkt_loss(a, f_t), official_pkt_loss(official_feat_last(b), official_feat_last(f_t))
    record("pkt (RepDistiller PKT.cosine_similarity_loss)", ours, official)
    ours.backward(), official.backward()
    record("pkt gradient (RepDistiller PKT.cosine_similarity_loss)", a.grad, b.grad)
    # All-zero samples, student and teacher: the same value. The official gradient is nan at the
    # zero student sample (d sqrt(s)/ds at s = 0 times 0) and so everywhere after the mm;
    # kdmtl's is finite (the norm's gradient there is 0, the rest exact: I / eps through x / (||x|| + eps)).
    f_s[2] = 0.0
    f_t[4] = 0.0
    a, b = f_s.clone().requires_grad_(), f_s.clone().requires_grad_()
    ours, official = pkt_loss(a, f_t), official_pkt_loss(official_feat_last(b), official_feat_last(f_t))
    record("pkt (RepDistiller PKT.cosine_similarity_loss)", ours, official)
    ours.backward(), official.backward()
    assert torch.isnan(b.grad).any() and torch.isfinite(a.grad).all()
    # kdmtl's gradient at the zero sample is the true derivative: a central difference along a
    # random direction of that sample (steps far below eps = 1e-7, where x / (||x|| + eps) ~ x / eps).
    direction = torch.zeros_like(f_s)
    direction[2] = randn(8, 4, 4, seed=60)
    step = 1e-13
    slope = (pkt_loss(f_s + step * direction, f_t) - pkt_loss(f_s - step * direction, f_t)) / (2 * step)
    assert float((a.grad * direction).sum()) == pytest.approx(float(slope), rel=1e-4)


def test_pkt_per_task_teachers_name_one_term_per_task():
    f_s = randn(4, 8, 2, 2, seed=5)
    t_feats = {"cls:trunk.stages.2": randn(4, 16, 2, 2, seed=6), "seg:trunk.stages.2": randn(4, 16, 2, 2, seed=7)}
    method = _method("pkt", teacher_tasks=("cls", "seg"))
    terms, _ = _weighted_total(method, {"trunk.stages.2": f_s}, t_feats)
    assert set(terms) == {"pkt/trunk.stages.2@cls", "pkt/trunk.stages.2@seg"}
    for task in ("cls", "seg"):
        official = official_pkt_loss(official_feat_last(f_s), official_feat_last(t_feats[f"{task}:trunk.stages.2"]))
        record("pkt (RepDistiller PKT.cosine_similarity_loss)", terms[f"pkt/trunk.stages.2@{task}"], official)
        assert method.weight(f"pkt/trunk.stages.2@{task}", {}) == PKT_BETA


# ================================================================ SP
@pytest.mark.parametrize("s_shape, t_shape", [
    ((16, 16, 8, 8), (16, 32, 8, 8)),
    ((8, 16, 8, 8), (8, 64, 4, 4)),      # different sizes: the Gram matrices are N x N either way
    ((5, 3, 7, 2), (5, 9, 3, 3)),
    ((6, 10), (6, 4, 2, 2)),             # a vector against a map
])
def test_sp_equals_repdistiller(s_shape, t_shape):
    f_s, f_t = randn(*s_shape, seed=8, scale=3.0), randn(*t_shape, seed=9)
    official = official_sp_loss(f_s, f_t)
    assert official.shape == (1,)                         # the official loss is a 1-element tensor
    ours = sp_loss(f_s, f_t)
    assert ours.shape == ()
    record("sp (RepDistiller Similarity.similarity_loss)", ours, official)
    # The method: term sp/<student feature>, weight beta, as loops.py `beta * sum(criterion_kd([feat_s[-2]], ...))`.
    terms, total = _weighted_total(_method("sp"), {"trunk.stages.2": f_s}, {"trunk.stages.2": f_t})
    assert set(terms) == {"sp/trunk.stages.2"}
    official_total = SP_BETA * official_group(official_sp_loss, [f_s], [f_t])
    record("sp method (RepDistiller -b 3000 * Similarity)", total, official_total, rel=True)


def test_sp_gradient_equals_repdistiller():
    f_s, f_t = randn(8, 4, 4, 4, seed=10), randn(8, 6, 2, 2, seed=11)
    f_s[1] = 0.0                                          # a zero row of G: normalize's eps keeps it finite
    a, b = f_s.clone().requires_grad_(), f_s.clone().requires_grad_()
    ours, official = sp_loss(a, f_t), official_sp_loss(b, f_t).sum()
    record("sp (RepDistiller Similarity.similarity_loss)", ours, official)
    ours.backward(), official.backward()
    record("sp gradient (RepDistiller Similarity.similarity_loss)", a.grad, b.grad)


# ================================================================ NST
@pytest.mark.parametrize("s_shape, t_shape", [
    ((4, 16, 8, 8), (4, 32, 8, 8)),      # same size
    ((4, 16, 16, 16), (4, 32, 8, 8)),    # student larger: the student is pooled
    ((4, 16, 4, 4), (4, 32, 8, 8)),      # teacher larger: the TEACHER is pooled
    ((3, 16, 7, 7), (3, 8, 3, 3)),       # odd sizes: adaptive windows overlap
])
def test_nst_equals_repdistiller(s_shape, t_shape):
    f_s, f_t = randn(*s_shape, seed=12, scale=2.0), randn(*t_shape, seed=13)
    record("nst (RepDistiller NSTLoss.nst_loss)", nst_loss(f_s, f_t), official_nst_loss(f_s, f_t))


def test_nst_method_over_every_stage_equals_repdistiller_feat_1_to_minus_1():
    """loops.py `--distill nst`: beta * sum(NSTLoss(feat_s[1:-1], feat_t[1:-1])), three stages."""
    shapes_s = [(4, 8, 16, 16), (4, 16, 8, 8), (4, 32, 4, 4)]
    shapes_t = [(4, 16, 16, 16), (4, 32, 8, 8), (4, 64, 4, 4)]
    g_s = [randn(*shape, seed=20 + i) for i, shape in enumerate(shapes_s)]
    g_t = [randn(*shape, seed=30 + i) for i, shape in enumerate(shapes_t)]
    method = _method("nst")
    terms, total = _weighted_total(method, dict(zip(STAGES, g_s)), dict(zip(STAGES, g_t)))
    assert set(terms) == {f"nst/{s}" for s in STAGES}
    for name, f_s, f_t in zip(STAGES, g_s, g_t):
        record("nst (RepDistiller NSTLoss.nst_loss)", terms[f"nst/{name}"], official_nst_loss(f_s, f_t))
        assert method.weight(f"nst/{name}", {}) == NST_BETA
    record("nst method (RepDistiller -b 50 * sum NSTLoss)", total,
           NST_BETA * official_group(official_nst_loss, g_s, g_t), rel=True)


def test_nst_gradient_and_zero_channels_equal_repdistiller():
    f_s, f_t = randn(3, 6, 5, 5, seed=40), randn(3, 4, 5, 5, seed=41)
    f_s[0, 2] = 0.0                                       # an all-zero channel: normalize's eps
    a, b = f_s.clone().requires_grad_(), f_s.clone().requires_grad_()
    ours, official = nst_loss(a, f_t), official_nst_loss(b, f_t)
    record("nst (RepDistiller NSTLoss.nst_loss)", ours, official)
    ours.backward(), official.backward()
    record("nst gradient (RepDistiller NSTLoss.nst_loss)", a.grad, b.grad)


def test_nst_non_square_maps_pool_to_the_smaller_height_and_width():
    """RepDistiller pools to a square (t_H, t_H); kdmtl to (min H, min W): the official loss of the
    maps pooled that way, and the same as RepDistiller whenever the maps are square."""
    f_s, f_t = randn(2, 4, 8, 6, seed=42), randn(2, 5, 4, 3, seed=43)
    record("nst (RepDistiller NSTLoss.nst_loss)", nst_loss(f_s, f_t),
           official_nst_loss(F.adaptive_avg_pool2d(f_s, (4, 3)), f_t))


def test_nst_refuses_features_that_are_not_maps():
    method = _method("nst", student=["heads.cls"], teacher=["heads.cls"])
    with pytest.raises(KdmtlError, match="loss.nst"):
        method.setup({"heads.cls": torch.zeros(2, 3)}, {"heads.cls": torch.zeros(2, 3)})


# ================================================================ precision
@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["pkt", "sp", "nst"])
def test_half_precision_inputs_are_computed_in_float32_even_under_autocast(name, low):
    """Under autocast the features are float16/bfloat16: the loss (matmuls included) runs in
    float32, so it matches the float64 official value of the same rounded inputs closely."""
    loss = {"pkt": pkt_loss, "sp": sp_loss, "nst": nst_loss}[name]
    official = {"pkt": lambda s, t: official_pkt_loss(official_feat_last(s), official_feat_last(t)),
                "sp": official_sp_loss, "nst": official_nst_loss}[name]
    f_s, f_t = randn(16, 32, 8, 8, seed=50).to(low), randn(16, 64, 4, 4, seed=51).to(low)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = loss(f_s, f_t)
    assert ours.dtype == torch.float32
    reference = float(official(f_s.double(), f_t.double()).sum())
    assert float(ours) == pytest.approx(reference, rel=1e-4, abs=1e-9)


# ================================================================ through the real CLI
@pytest.mark.parametrize("loss, methods", [("pkt", ["pkt"]), ("sp", ["sp"]), ("nst", ["nst"]),
                                           ("[kd,pkt]", ["kd", "pkt"])])
def test_cli_train_with_the_method(loss, methods, workdir, shared_cache):
    run_dir = train_logs_finite_terms(loss, methods, workdir, shared_cache)
    expected = {"pkt": ["pkt/trunk.stages.2"], "sp": ["sp/trunk.stages.2"], "nst": [f"nst/{s}" for s in STAGES]}
    for method in methods:
        assert_terms_logged(run_dir, method, expected.get(method, []))
