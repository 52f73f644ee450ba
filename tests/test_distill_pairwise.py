"""`pairwise` (kdmtl_cli/distill/pairwise.py) against the official Structured Knowledge Distillation code, in float64.

The `official_*` code below is transcribed from irfanICMLL/structure_knowledge_distillation at
ce208e1e5ba9177ecfc42519a2c64148d396fb71 (master, the TPAMI version; not from kdmtl's code):

- utils/utils.py L170-183 `L2`, `similarity`, `sim_dis_compute` (the `feat = feat.float()` of L174 is
  left out: it would cast the float64 inputs to float32; kdmtl keeps float64);
- utils/criterion.py L228-245 `CriterionPairWiseforWholeFeatAfterPool` (kernel from the teacher's size,
  `nn.MaxPool2d(..., ceil_mode=True)`);
- networks/kd_model.py L82 `feat_ind=-5`, L144-146 `G_loss + args.lambda_pa * temp1`;
- networks/pspnet_combine.py L189: forward returns `[x, x_dsn, x_feat_after_psp, x4, x3, x2, x1]`;
- run_train_val.sh L22-23 `--lambda-pa 0.5 --pool-scale 0.5`; utils/train_options.py L58-59.

Every comparison is at 1e-9 (abs, or rel for weighted values) on random float64 inputs; the max abs
difference of each comparison is printed (`pytest -s`) as `official-diff <what>: <value>`.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import OmegaConf

from conftest import FAST, assert_one_line_error, run_kdmtl
from distill_checks import assert_terms_logged, build_method, loss_yaml, randn, record_diff, settings_from_yaml, train_logs_finite_terms
from kdmtl_cli.distill import build_methods, method_names
from kdmtl_cli.distill.pairwise import PairwiseConfig, PairwiseDistillation, pairwise_loss
from kdmtl_cli.errors import KdmtlError
from kdmtl_cli.ranges import check_ranges

ATOL = 1e-9
DIFFS = {}
pytestmark = pytest.mark.usefixtures("one_thread")

# ================================================================ official defaults, transcribed
# run_train_val.sh L22: `--lambda-pa 0.5` (utils/train_options.py L58: `--lambda-pa', default=1.0`)
LAMBDA_PA = 0.5
# run_train_val.sh L23: `--pool-scale 0.5`; utils/train_options.py L59: `--pool-scale', default=0.5`
POOL_SCALE = 0.5
# networks/kd_model.py L82: `CriterionPairWiseforWholeFeatAfterPool(scale=args.pool_scale, feat_ind=-5)`
FEAT_IND = -5


# ================================================================ official code, transcribed
# utils/utils.py L170-171
def official_L2(f_):
    return (((f_**2).sum(dim=1))**0.5).reshape(f_.shape[0], 1, f_.shape[2], f_.shape[3]) + 1e-8


# utils/utils.py L173-178 (without L174 `feat = feat.float()`)
def official_similarity(feat):
    tmp = official_L2(feat).detach()
    feat = feat / tmp
    feat = feat.reshape(feat.shape[0], feat.shape[1], -1)
    return torch.einsum('icm,icn->imn', [feat, feat])


# utils/utils.py L180-183
def official_sim_dis_compute(f_S, f_T):
    sim_err = ((official_similarity(f_T) - official_similarity(f_S))**2) / ((f_T.shape[-1] * f_T.shape[-2])**2) / f_T.shape[0]
    sim_dis = sim_err.sum()
    return sim_dis


# utils/criterion.py L228-245
class OfficialPairWiseforWholeFeatAfterPool(nn.Module):
    def __init__(self, scale, feat_ind):
        super().__init__()
        self.criterion = official_sim_dis_compute
        self.feat_ind = feat_ind
        self.scale = scale

    def forward(self, preds_S, preds_T):
        feat_S = preds_S[self.feat_ind]
        feat_T = preds_T[self.feat_ind]
        feat_T.detach()

        total_w, total_h = feat_T.shape[2], feat_T.shape[3]
        patch_w, patch_h = int(total_w * self.scale), int(total_h * self.scale)
        maxpool = nn.MaxPool2d(kernel_size=(patch_w, patch_h), stride=(patch_w, patch_h), padding=0, ceil_mode=True)
        loss = self.criterion(maxpool(feat_S), maxpool(feat_T))
        return loss


def official_preds(feat):
    """A stand-in for pspnet_combine.py L189's output list: `x_feat_after_psp` at index 2 = -5."""
    return [None, None, feat, None, None, None, None]


def official_pairwise(f_s, f_t, scale=POOL_SCALE):
    return OfficialPairWiseforWholeFeatAfterPool(scale, FEAT_IND)(official_preds(f_s), official_preds(f_t))


# ================================================================ helpers
record = functools.partial(record_diff, atol=ATOL, diffs=DIFFS)


def _cfg(**overrides):
    return settings_from_yaml(PairwiseConfig, "pairwise", **overrides)


def _method(teacher_tasks=("seg",), **overrides):
    return build_method(PairwiseDistillation, PairwiseConfig, "pairwise", {}, teacher_tasks, **overrides)


def _weighted_total(method, s_feats, t_feats):
    method.setup(s_feats, t_feats)
    terms = method({"features": s_feats}, {"features": t_feats}, {}, {})
    return terms, sum(method.weight(name, {}) * value for name, value in terms.items())


# ================================================================ YAML defaults = official
def test_yaml_defaults_are_the_official_ones():
    cfg = _cfg()
    assert cfg.weight == LAMBDA_PA
    assert cfg.pool_scale == POOL_SCALE
    # The last feature map before the classifier (feat_ind = -5 -> x_feat_after_psp): the last trunk stage.
    assert official_preds("psp")[FEAT_IND] == "psp"
    assert list(cfg.student) == list(cfg.teacher) == ["trunk.stages.2"]
    # The settings class's own defaults are the YAML's (a method built without its YAML is the same).
    assert OmegaConf.to_container(OmegaConf.structured(PairwiseConfig)) == OmegaConf.to_container(cfg)
    assert set(loss_yaml("pairwise")) == {f.name for f in PairwiseConfig.__dataclass_fields__.values()}


def test_the_method_is_found_by_name_with_no_learned_part():
    cfg = OmegaConf.create({"pairwise": loss_yaml("pairwise")})
    assert "pairwise" in set(method_names(cfg))
    (method,) = build_methods(cfg, {}, ["seg"])
    assert type(method) is PairwiseDistillation
    assert len(method.modules) == 0 and method.param_groups(0.1) == []
    assert list(method.modules.state_dict()) == []


# ================================================================ the loss
@pytest.mark.parametrize("s_shape, t_shape, scale", [
    ((4, 8, 8, 8), (4, 16, 8, 8), 0.5),      # the default: kernel 4, a 2x2 grid
    ((3, 5, 7, 5), (3, 6, 7, 5), 0.5),       # non-square; kernel (3, 2): ceil_mode gives 3x3, floor 2x2
    ((2, 4, 9, 6), (2, 3, 9, 6), 0.3),       # int(2.7) = 2, int(1.8) = 1: a 5x6 grid (floor mode 4x6)
    ((2, 6, 16, 12), (2, 9, 16, 12), 0.25),  # kernel 4x3: 4x4 grid
    ((3, 4, 6, 10), (3, 4, 6, 10), 1.0),     # the whole map in one window: one position
    ((2, 3, 11, 13), (2, 5, 11, 13), 0.2),   # int(2.2) = 2, int(2.6) = 2: ceil 6x7 (floor 5x6)
])
def test_pairwise_equals_the_official(s_shape, t_shape, scale):
    f_s, f_t = randn(*s_shape, seed=1, scale=2.0), randn(*t_shape, seed=2)
    official = official_pairwise(f_s, f_t, scale)
    assert official.shape == ()
    record("pairwise (SKD CriterionPairWiseforWholeFeatAfterPool)", pairwise_loss(f_s, f_t, scale), official)
    if scale != 1.0:
        assert float(official) > 0
    # The method: term pairwise/<student feature>, weight lambda_pa, as kd_model.py `lambda_pa * temp1`.
    method = _method(pool_scale=scale)
    terms, total = _weighted_total(method, {"trunk.stages.2": f_s}, {"trunk.stages.2": f_t})
    assert set(terms) == {"pairwise/trunk.stages.2"}
    assert method.weight("pairwise/trunk.stages.2", {}) == LAMBDA_PA
    record("pairwise method (SKD lambda_pa 0.5 * pair-wise)", total, LAMBDA_PA * official, rel=True)


def test_ceil_mode_matters_for_the_cases_above():
    """The non-square cases above pool to a larger grid with ceil_mode (so the comparison checks it)."""
    for size, kernel in [((7, 5), (3, 2)), ((9, 6), (2, 1)), ((11, 13), (2, 2))]:
        x = randn(1, 1, *size, seed=3)
        ceil = F.max_pool2d(x, kernel, kernel, ceil_mode=True).shape[-2:]
        floor = F.max_pool2d(x, kernel, kernel, ceil_mode=False).shape[-2:]
        assert ceil != floor, size
    f_s, f_t = randn(3, 5, 7, 5, seed=4), randn(3, 6, 7, 5, seed=5)
    floor_mode = official_sim_dis_compute(F.max_pool2d(f_s, (3, 2), (3, 2)), F.max_pool2d(f_t, (3, 2), (3, 2)))
    assert abs(float(pairwise_loss(f_s, f_t, 0.5) - floor_mode)) > 1e-6


def test_gradient_equals_the_official_with_the_norm_held_constant():
    """The official divides by a DETACHED norm: the gradient is not that of a true cosine."""
    f_s, f_t = randn(3, 6, 8, 6, seed=6), randn(3, 4, 8, 6, seed=7)
    a, b = f_s.clone().requires_grad_(), f_s.clone().requires_grad_()
    ours, official = pairwise_loss(a, f_t), official_pairwise(b, f_t)
    record("pairwise (SKD CriterionPairWiseforWholeFeatAfterPool)", ours, official)
    ours.backward(), official.backward()
    record("pairwise gradient (SKD CriterionPairWiseforWholeFeatAfterPool)", a.grad, b.grad)
    # Not the gradient through the norm: a true-cosine version differs.
    c = f_s.clone().requires_grad_()
    pooled = F.max_pool2d(c, 4, 4, ceil_mode=True)
    cos = F.normalize(pooled.flatten(2), dim=1, eps=0.0)
    t = F.normalize(F.max_pool2d(f_t, 4, 4, ceil_mode=True).flatten(2), dim=1)
    (torch.bmm(t.transpose(1, 2), t) - torch.bmm(cos.transpose(1, 2), cos)).pow(2).mean().backward()
    assert float((c.grad - a.grad).abs().max()) > 1e-6
    # The teacher gets no gradient (detached): with only the teacher requiring one, the loss needs none.
    t_leaf = f_t.clone().requires_grad_()
    assert not pairwise_loss(f_s, t_leaf).requires_grad


@pytest.mark.parametrize("s_shape, t_shape", [
    ((2, 8, 16, 16), (2, 16, 8, 8)),     # student larger: the student is average-pooled first
    ((2, 8, 4, 6), (2, 16, 8, 12)),      # teacher larger: the TEACHER is average-pooled first
    ((2, 8, 10, 6), (2, 16, 5, 9)),      # mixed: both to (5, 6)
])
def test_different_sizes_pool_the_larger_map_first(s_shape, t_shape):
    f_s, f_t = randn(*s_shape, seed=8), randn(*t_shape, seed=9)
    size = (min(s_shape[2], t_shape[2]), min(s_shape[3], t_shape[3]))
    official = official_pairwise(F.adaptive_avg_pool2d(f_s, size), F.adaptive_avg_pool2d(f_t, size))
    record("pairwise sizes bridged (SKD after adaptive_avg_pool2d)", pairwise_loss(f_s, f_t), official)


def test_kernel_is_at_least_one_where_the_official_fails():
    """int(1 * 0.5) = 0: the official MaxPool2d refuses a zero kernel; kdmtl pools that side by 1."""
    f_s, f_t = randn(2, 4, 1, 6, seed=10), randn(2, 5, 1, 6, seed=11)
    with pytest.raises(RuntimeError):
        official_pairwise(f_s, f_t)
    pool = nn.MaxPool2d((1, 3), (1, 3), ceil_mode=True)
    record("pairwise kernel >= 1 (SKD sim_dis_compute)", pairwise_loss(f_s, f_t), official_sim_dis_compute(pool(f_s), pool(f_t)))


def test_per_task_teachers_name_one_term_per_task():
    f_s = randn(2, 8, 8, 8, seed=12)
    t_feats = {"seg:trunk.stages.2": randn(2, 16, 8, 8, seed=13), "depth:trunk.stages.2": randn(2, 16, 8, 8, seed=14)}
    terms, _ = _weighted_total(_method(teacher_tasks=("seg", "depth")), {"trunk.stages.2": f_s}, t_feats)
    assert set(terms) == {"pairwise/trunk.stages.2@seg", "pairwise/trunk.stages.2@depth"}
    for task in ("seg", "depth"):
        record("pairwise (SKD CriterionPairWiseforWholeFeatAfterPool)", terms[f"pairwise/trunk.stages.2@{task}"],
               official_pairwise(f_s, t_feats[f"{task}:trunk.stages.2"]))


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_are_computed_in_float32_even_under_autocast(low):
    f_s, f_t = randn(4, 16, 8, 8, seed=15).to(low), randn(4, 32, 8, 8, seed=16).to(low)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = pairwise_loss(f_s, f_t)
    assert ours.dtype == torch.float32
    assert float(ours) == pytest.approx(float(official_pairwise(f_s.double(), f_t.double())), rel=1e-4, abs=1e-9)


# ================================================================ errors
def test_refuses_features_that_are_not_maps():
    method = _method(student=["heads.cls"], teacher=["heads.cls"])
    with pytest.raises(KdmtlError, match="loss.pairwise") as err:
        method.setup({"heads.cls": torch.zeros(2, 3)}, {"heads.cls": torch.zeros(2, 3)})
    assert "\n" not in str(err.value)
    with pytest.raises(KdmtlError, match="no feature 'trunk.stages.9'"):
        _method(student=["trunk.stages.9"], teacher=["trunk.stages.2"]).setup(
            {"trunk.stages.2": torch.zeros(2, 3, 4, 4)}, {"trunk.stages.2": torch.zeros(2, 3, 4, 4)})


@pytest.mark.parametrize("scale", [0.0, -0.5, 1.5])
def test_refuses_a_bad_pool_scale_in_one_line(scale):
    with pytest.raises(KdmtlError) as err:
        cfg = _cfg(pool_scale=scale)
        check_ranges(cfg, PairwiseConfig, _prefix="loss.pairwise.")
        PairwiseDistillation(cfg, {}, ["seg"])
    message = str(err.value)
    assert "loss.pairwise.pool_scale" in message and "\n" not in message, message
    with pytest.raises(ValueError, match="pool_scale"):
        pairwise_loss(randn(1, 2, 4, 4), randn(1, 2, 4, 4), scale)


def test_cli_refuses_a_pool_scale_above_one(workdir, shared_cache):
    proc = run_kdmtl(["train", "loss=pairwise", "loss.pairwise.pool_scale=2", *FAST,
                      f"hydra.run.dir={workdir / 'run'}"], workdir, shared_cache)
    assert_one_line_error(proc, "loss.pairwise.pool_scale")


# ================================================================ through the real CLI
@pytest.mark.parametrize("loss, methods", [("pairwise", ["pairwise"]), ("[kd,pairwise]", ["kd", "pairwise"])])
def test_cli_train_with_the_method(loss, methods, workdir, shared_cache):
    run_dir = train_logs_finite_terms(loss, methods, workdir, shared_cache)
    assert_terms_logged(run_dir, "pairwise", ["pairwise/trunk.stages.2"])
