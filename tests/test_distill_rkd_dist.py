"""`rkd` and `dist` against their official implementations, in float64, and through the real CLI.

The `official_*` code below is transcribed from the official repositories (not from kdmtl's), in
plain torch, at the commits read:

- RepDistiller: HobbitLong/RepDistiller b84f547c5db6a35318d4671d7d5c4de74c822403
  (distiller_zoo/RKD.py `RKDLoss`, models/resnet.py `f4` = avgpool + view, helper/loops.py
  `f_s = feat_s[-1]`, scripts/run_cifar_distill.sh `--distill rkd -a 0 -b 1`);
- mdistiller: megvii-research/mdistiller a08d46f10d6102bd6e3f258ca5ac880b020ea259
  (mdistiller/distillers/RKD.py `_pdist`, `rkd_loss`; mdistiller/engine/cfg.py `CFG.RKD`);
- DIST, classification: hunto/image_classification_sota d9662f7df68fe46b973c4580b7c9b896cedcd301
  (the submodule commit of hunto/DIST_KD; lib/models/losses/dist_kd.py `DIST`, kd_loss.py `KDLoss`,
  configs/strategies/distill/*.yaml);
- DIST, segmentation: hunto/DIST_KD 2418f18b1fedd7c2646a7b1b9a27d5c674c2170b
  (segmentation/losses/dist_kd.py `DIST`, segmentation/train_kd.py).

Every comparison is at atol 1e-9 on random float64 inputs (values and student gradients); the max
abs difference of each method is printed (`pytest -s`) as `official-diff <method>: <value>`.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import OmegaConf

from distill_checks import (epoch_terms_are_finite, loss_yaml, make_tasks, randn, record_diff, settings_from_yaml,
                            train_at_once)
from kdmtl_cli.distill import build_methods, method_names
from kdmtl_cli.distill.dist import DIST, DISTConfig
from kdmtl_cli.distill.rkd import RelationalKD, RKDConfig
from kdmtl_cli.errors import KdmtlError
from kdmtl_cli.schema import LossConfig
from kdmtl_cli.tasks import _load_kinds

REPO = Path(__file__).resolve().parents[1]
ATOL = 1e-9
DIFFS = {}
_load_kinds()
pytestmark = pytest.mark.usefixtures("one_thread")

# ---------------------------------------------------------------- official defaults, as read
# RepDistiller distiller_zoo/RKD.py L10 `def __init__(self, w_d=25, w_a=50)`; L48 `pdist(e, squared=False, eps=1e-12)`;
# scripts/run_cifar_distill.sh L17 `--distill rkd ... -a 0 -b 1` (beta = 1). mdistiller cfg.py L75-82: the same.
RKD_OFFICIAL = {"weight": 1.0, "distance_weight": 25.0, "angle_weight": 50.0, "squared": False, "eps": 1e-12}
# image_classification_sota lib/models/losses/kd_loss.py L29-30 `elif kd_method == 'dist': DIST(beta=1, gamma=1, tau=1)`
# (dist_kd.py L22 `def __init__(self, beta=1.0, gamma=1.0, tau=1.0)`); configs/strategies/distill/resnet_dist.yaml
# L29-30 `ori_loss_weight: 1.` `kd_loss_weight: 2.` (the same in dist_b2.yaml and dist_cifar.yaml).
DIST_OFFICIAL = {"weight": 2.0, "beta": 1.0, "gamma": 1.0, "tau": 1.0}


record = functools.partial(record_diff, atol=ATOL, diffs=DIFFS, flat=False)


# ================================================================ official code, transcribed
# RepDistiller distiller_zoo/RKD.py
class OfficialRKDLoss(nn.Module):
    """Relational Knowledge Disitllation"""
    def __init__(self, w_d=25, w_a=50):
        super(OfficialRKDLoss, self).__init__()
        self.w_d = w_d
        self.w_a = w_a

    def forward(self, f_s, f_t):
        student = f_s.view(f_s.shape[0], -1)
        teacher = f_t.view(f_t.shape[0], -1)

        # RKD distance loss
        with torch.no_grad():
            t_d = self.pdist(teacher, squared=False)
            mean_td = t_d[t_d > 0].mean()
            t_d = t_d / mean_td

        d = self.pdist(student, squared=False)
        mean_d = d[d > 0].mean()
        d = d / mean_d

        loss_d = F.smooth_l1_loss(d, t_d)

        # RKD Angle loss
        with torch.no_grad():
            td = (teacher.unsqueeze(0) - teacher.unsqueeze(1))
            norm_td = F.normalize(td, p=2, dim=2)
            t_angle = torch.bmm(norm_td, norm_td.transpose(1, 2)).view(-1)

        sd = (student.unsqueeze(0) - student.unsqueeze(1))
        norm_sd = F.normalize(sd, p=2, dim=2)
        s_angle = torch.bmm(norm_sd, norm_sd.transpose(1, 2)).view(-1)

        loss_a = F.smooth_l1_loss(s_angle, t_angle)

        loss = self.w_d * loss_d + self.w_a * loss_a

        return loss

    @staticmethod
    def pdist(e, squared=False, eps=1e-12):
        # RepDistiller's body is line for line mdistiller's `_pdist` (transcribed once, below)
        return mdistiller_pdist(e, squared, eps)


def official_penultimate(feature_map):
    """RepDistiller models/resnet.py: `x = self.avgpool(x)` (nn.AvgPool2d(8) on the 8x8 last map,
    i.e. the whole map), `x = x.view(x.size(0), -1)`, `f4 = x`."""
    x = nn.AvgPool2d(feature_map.shape[-1])(feature_map)
    return x.view(x.size(0), -1)


# mdistiller/distillers/RKD.py
def mdistiller_pdist(e, squared, eps):
    e_square = e.pow(2).sum(dim=1)
    prod = e @ e.t()
    res = (e_square.unsqueeze(1) + e_square.unsqueeze(0) - 2 * prod).clamp(min=eps)

    if not squared:
        res = res.sqrt()

    res = res.clone()
    res[range(len(e)), range(len(e))] = 0
    return res


def mdistiller_rkd_loss(f_s, f_t, squared=False, eps=1e-12, distance_weight=25, angle_weight=50):
    stu = f_s.view(f_s.shape[0], -1)
    tea = f_t.view(f_t.shape[0], -1)

    # RKD distance loss
    with torch.no_grad():
        t_d = mdistiller_pdist(tea, squared, eps)
        mean_td = t_d[t_d > 0].mean()
        t_d = t_d / mean_td

    d = mdistiller_pdist(stu, squared, eps)
    mean_d = d[d > 0].mean()
    d = d / mean_d

    loss_d = F.smooth_l1_loss(d, t_d)

    # RKD Angle loss
    with torch.no_grad():
        td = tea.unsqueeze(0) - tea.unsqueeze(1)
        norm_td = F.normalize(td, p=2, dim=2)
        t_angle = torch.bmm(norm_td, norm_td.transpose(1, 2)).view(-1)

    sd = stu.unsqueeze(0) - stu.unsqueeze(1)
    norm_sd = F.normalize(sd, p=2, dim=2)
    s_angle = torch.bmm(norm_sd, norm_sd.transpose(1, 2)).view(-1)

    loss_a = F.smooth_l1_loss(s_angle, t_angle)

    loss = distance_weight * loss_d + angle_weight * loss_a
    return loss


# image_classification_sota lib/models/losses/dist_kd.py (classification)
def cls_cosine_similarity(a, b, eps=1e-8):
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def cls_pearson_correlation(a, b, eps=1e-8):
    return cls_cosine_similarity(a - a.mean(1).unsqueeze(1),
                                 b - b.mean(1).unsqueeze(1), eps)


def cls_inter_class_relation(y_s, y_t):
    return 1 - cls_pearson_correlation(y_s, y_t).mean()


def cls_intra_class_relation(y_s, y_t):
    return cls_inter_class_relation(y_s.transpose(0, 1), y_t.transpose(0, 1))


class OfficialDISTClassification(nn.Module):
    def __init__(self, beta=1.0, gamma=1.0, tau=1.0):
        super(OfficialDISTClassification, self).__init__()
        self.beta = beta
        self.gamma = gamma
        self.tau = tau

    def forward(self, z_s, z_t):
        y_s = (z_s / self.tau).softmax(dim=1)
        y_t = (z_t / self.tau).softmax(dim=1)
        inter_loss = self.tau**2 * cls_inter_class_relation(y_s, y_t)
        intra_loss = self.tau**2 * cls_intra_class_relation(y_s, y_t)
        kd_loss = self.beta * inter_loss + self.gamma * intra_loss
        return kd_loss


# DIST_KD segmentation/losses/dist_kd.py
def seg_cosine_similarity(x, y, eps=1e-8):
    return (x * y).sum(1) / (x.norm(dim=1) * y.norm(dim=1) + eps)


def seg_pearson_correlation(x, y, eps=1e-8):
    return seg_cosine_similarity(x - x.mean(1).unsqueeze(1), y - y.mean(1).unsqueeze(1), eps)


def seg_inter_class_relation(y_s, y_t):
    return 1 - seg_pearson_correlation(y_s, y_t).mean()


def seg_intra_class_relation(y_s, y_t):
    return seg_inter_class_relation(y_s.transpose(0, 1), y_t.transpose(0, 1))


class OfficialDISTSegmentation(nn.Module):
    def __init__(self, beta=1., gamma=1.):
        super(OfficialDISTSegmentation, self).__init__()
        self.beta = beta
        self.gamma = gamma

    def forward(self, y_s, y_t):
        assert y_s.ndim in (2, 4)
        if y_s.ndim == 4:
            num_classes = y_s.shape[1]
            y_s = y_s.transpose(1, 3).reshape(-1, num_classes)
            y_t = y_t.transpose(1, 3).reshape(-1, num_classes)
        y_s = y_s.softmax(dim=1)
        y_t = y_t.softmax(dim=1)
        inter_loss = seg_inter_class_relation(y_s, y_t)
        intra_loss = seg_intra_class_relation(y_s, y_t)
        loss = self.beta * inter_loss + self.gamma * intra_loss
        return loss


# ================================================================ kdmtl's side
_yaml = loss_yaml
_cfg = settings_from_yaml


def _tasks(classes=5):
    return make_tasks(classes, classes)


def _rkd_term(student, teacher, **overrides):
    """kdmtl's `rkd` term for one (student, teacher) feature pair, through the method class."""
    tasks = _tasks()
    method = RelationalKD(_cfg(RKDConfig, "rkd", **overrides), tasks, list(tasks))
    s_feats, t_feats = {"trunk.stages.2": student}, {"trunk.stages.2": teacher}
    method.setup(s_feats, t_feats)
    terms = method({"outputs": {}, "features": s_feats}, {"outputs": {}, "features": t_feats}, {}, {})
    assert list(terms) == ["rkd/trunk.stages.2"]
    return terms["rkd/trunk.stages.2"]


def _dist_terms(cls_s, cls_t, seg_s, seg_t, **overrides):
    tasks = _tasks(cls_s.shape[1])
    method = DIST(_cfg(DISTConfig, "dist", **overrides), tasks, list(tasks))
    depth = torch.zeros(cls_s.shape[0], 1, 2, 2, dtype=torch.float64)
    terms = method({"outputs": {"cls": cls_s, "seg": seg_s, "depth": depth}, "features": {}},
                   {"outputs": {"cls": cls_t, "seg": seg_t, "depth": depth}, "features": {}}, {}, {})
    assert list(terms) == ["dist/cls", "dist/seg"]          # label tasks only: no dist/depth
    return terms


def _grad(loss, x):
    (g,) = torch.autograd.grad(loss, x)
    return g


# ================================================================ RKD
@pytest.mark.parametrize("shape", [(8, 16, 4, 4), (5, 7, 3, 3), (16, 32, 8, 8), (2, 3, 1, 1)])
def test_rkd_matches_repdistiller_on_the_pooled_last_stage(shape):
    """RepDistiller's RKDLoss on feat[-1] (the avg-pooled last map) = kdmtl's rkd on the map itself."""
    n, c, h, w = shape
    f_s = randn(n, c, h, w, seed=1).requires_grad_()
    f_t = randn(n, 2 * c, h + 1, w + 1, seed=2, scale=3.0)            # teacher wider, other size: relations only
    official = OfficialRKDLoss()(official_penultimate(f_s), official_penultimate(f_t))
    ours = _rkd_term(f_s, f_t)
    record("rkd", ours, official)
    record("rkd", _grad(ours, f_s), _grad(official, f_s))


@pytest.mark.parametrize("n,d", [(4, 10), (9, 3), (32, 64)])
def test_rkd_matches_repdistiller_on_vector_features(n, d):
    f_s = randn(n, d, seed=3).requires_grad_()
    f_t = randn(n, d + 5, seed=4, scale=0.1)
    official = OfficialRKDLoss()(f_s, f_t)
    ours = _rkd_term(f_s, f_t)
    record("rkd", ours, official)
    record("rkd", _grad(ours, f_s), _grad(official, f_s))


@pytest.mark.parametrize("squared", [False, True])
def test_rkd_matches_mdistiller_with_its_pdist_settings(squared):
    f_s = randn(6, 12, 2, 2, seed=5).requires_grad_()
    f_t = randn(6, 20, 2, 2, seed=6)
    official = mdistiller_rkd_loss(f_s.mean((2, 3)), f_t.mean((2, 3)), squared=squared, eps=1e-12,
                                   distance_weight=3.0, angle_weight=7.0)
    ours = _rkd_term(f_s, f_t, squared=squared, distance_weight=3.0, angle_weight=7.0)
    record("rkd", ours, official)
    record("rkd", _grad(ours, f_s), _grad(official, f_s))


def test_rkd_one_sample_is_zero_and_fp16_is_computed_in_float32():
    one = torch.ones(1, 4, 2, 2, requires_grad=True)
    term = _rkd_term(one, torch.ones(1, 8, 2, 2))
    assert float(term.detach()) == 0.0
    term.backward()
    assert torch.equal(one.grad, torch.zeros_like(one))
    half = _rkd_term(randn(4, 6, 2, 2, seed=7).half(), randn(4, 6, 2, 2, seed=8).half())
    assert half.dtype == torch.float32 and math.isfinite(float(half))


def test_rkd_batch_sizes_must_match():
    with pytest.raises(ValueError, match="batch sizes"):
        _rkd_term(randn(4, 6, 2, 2), randn(5, 6, 2, 2))


def test_rkd_bad_feature_is_a_kdmtl_error_at_setup():
    tasks = _tasks()
    method = RelationalKD(_cfg(RKDConfig, "rkd"), tasks, list(tasks))
    with pytest.raises(KdmtlError, match="loss.rkd"):
        method.setup({"trunk.stages.2": [torch.zeros(2, 3)]}, {"trunk.stages.2": torch.zeros(2, 3, 1, 1)})
    with pytest.raises(KdmtlError, match="no feature"):
        method.setup({"trunk.stages.1": torch.zeros(2, 3, 1, 1)}, {"trunk.stages.2": torch.zeros(2, 3, 1, 1)})


# ================================================================ DIST
@pytest.mark.parametrize("n,c,h,w,seed", [(8, 10, 4, 4, 0), (3, 2, 5, 7, 1), (16, 21, 6, 3, 2)])
def test_dist_matches_the_official_code_on_cls_and_seg(n, c, h, w, seed):
    """cls: the classification DIST; seg: the segmentation DIST (per pixel, no temperature, no ignore)."""
    cls_s, cls_t = randn(n, c, seed=seed, scale=2.0).requires_grad_(), randn(n, c, seed=seed + 10, scale=4.0)
    seg_s, seg_t = randn(n, c, h, w, seed=seed + 20).requires_grad_(), randn(n, c, h, w, seed=seed + 30, scale=3.0)
    terms = _dist_terms(cls_s, cls_t, seg_s, seg_t)
    official_cls = OfficialDISTClassification(beta=1, gamma=1, tau=1)(cls_s, cls_t)
    official_seg = OfficialDISTSegmentation()(seg_s, seg_t)
    record("dist", terms["dist/cls"], official_cls)
    record("dist", terms["dist/seg"], official_seg)
    record("dist", _grad(terms["dist/cls"], cls_s), _grad(official_cls, cls_s))
    record("dist", _grad(terms["dist/seg"], seg_s), _grad(official_seg, seg_s))


@pytest.mark.parametrize("beta,gamma,tau", [(1.0, 1.0, 4.0), (2.0, 0.5, 2.5), (0.0, 3.0, 1.0)])
def test_dist_settings_follow_the_official_classification_rule(beta, gamma, tau):
    """Other settings: cls as the classification DIST; seg as that rule on the segmentation code's
    per-pixel rows (the official segmentation DIST has no temperature; at tau = 1 the two agree)."""
    cls_s, cls_t = randn(6, 9, seed=40).requires_grad_(), randn(6, 9, seed=41, scale=5.0)
    seg_s, seg_t = randn(2, 9, 3, 4, seed=42), randn(2, 9, 3, 4, seed=43)
    terms = _dist_terms(cls_s, cls_t, seg_s, seg_t, beta=beta, gamma=gamma, tau=tau)
    official = OfficialDISTClassification(beta=beta, gamma=gamma, tau=tau)
    record("dist", terms["dist/cls"], official(cls_s, cls_t))
    record("dist", _grad(terms["dist/cls"], cls_s), _grad(official(cls_s, cls_t), cls_s))
    rows = lambda y: y.transpose(1, 3).reshape(-1, y.shape[1])   # noqa: E731  (segmentation DIST.forward)
    record("dist", terms["dist/seg"], official(rows(seg_s), rows(seg_t)))
    if tau == 1.0:
        record("dist", terms["dist/seg"], OfficialDISTSegmentation(beta, gamma)(seg_s, seg_t))


def test_dist_ignores_no_pixel_and_needs_no_targets():
    """The official segmentation DIST sees logits only: a batch without targets works, and the
    term is the same whatever the labels (ignore label 255 included)."""
    seg_s, seg_t = randn(2, 4, 3, 3, seed=50), randn(2, 4, 3, 3, seed=51)
    terms = _dist_terms(randn(2, 4, seed=52), randn(2, 4, seed=53), seg_s, seg_t)
    record("dist", terms["dist/seg"], OfficialDISTSegmentation()(seg_s, seg_t))


def test_dist_fp16_is_computed_in_float32_and_shapes_must_match():
    s, t = randn(4, 5, seed=60).half(), randn(4, 5, seed=61).half()
    terms = _dist_terms(s, t, randn(4, 5, 2, 2, seed=62).bfloat16(), randn(4, 5, 2, 2, seed=63).bfloat16())
    assert all(v.dtype == torch.float32 and math.isfinite(float(v)) for v in terms.values())
    with pytest.raises(ValueError, match="one shape"):
        _dist_terms(randn(4, 5), randn(4, 5), randn(4, 5, 2, 2), randn(4, 5, 3, 3))


def test_dist_needs_a_label_task():
    tasks = {"depth": _tasks()["depth"]}
    with pytest.raises(KdmtlError, match="classification or segmentation"):
        DIST(_cfg(DISTConfig, "dist"), tasks, list(tasks))


# ================================================================ YAML defaults
@pytest.mark.parametrize("name,settings,official", [("rkd", RKDConfig, RKD_OFFICIAL), ("dist", DISTConfig, DIST_OFFICIAL)])
def test_yaml_defaults_load_into_the_settings_and_are_the_official_ones(name, settings, official):
    cfg = _cfg(settings, name)
    assert {k: cfg[k] for k in official} == official
    # The settings class's defaults are the YAML's (so `loss=<name>` and the schema agree).
    assert OmegaConf.to_container(OmegaConf.structured(settings)) == OmegaConf.to_container(cfg)


def test_rkd_default_feature_is_the_last_stage_of_the_default_student_and_teacher():
    student = OmegaConf.load(REPO / "conf" / "student" / "small.yaml")
    teacher = OmegaConf.load(REPO / "conf" / "teacher" / "multitask.yaml")
    last = f"trunk.stages.{min(student.stages, teacher.stages) - 1}"
    cfg = _cfg(RKDConfig, "rkd")
    assert list(cfg.student) == list(cfg.teacher) == [last] == ["trunk.stages.2"]


def test_both_methods_are_found_by_name():
    loss = OmegaConf.merge(OmegaConf.structured(LossConfig), {"rkd": _yaml("rkd"), "dist": _yaml("dist")})
    assert method_names(loss) == ["dist", "rkd"]
    tasks = _tasks()
    assert [type(m) for m in build_methods(loss, tasks, list(tasks))] == [DIST, RelationalKD]


# ================================================================ through the real CLI
CLI_RUNS = {"rkd": ["loss=rkd"], "dist": ["loss=dist"], "combined": ["loss=[kd,rkd,dist]"]}
TERMS = {"rkd": ["rkd/trunk.stages.2"], "dist": ["dist/cls", "dist/seg"],
         "combined": ["kd/cls", "kd/seg", "kd/depth", "rkd/trunk.stages.2", "dist/cls", "dist/seg"]}


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory, shared_cache):
    """`kdmtl train debug=fast loss=rkd | loss=dist | loss=[kd,rkd,dist]` on the embedded data, at once."""
    return train_at_once(CLI_RUNS, tmp_path_factory.mktemp("rkd_dist_cli"), shared_cache)


@pytest.mark.parametrize("name", list(CLI_RUNS))
def test_cli_run_logs_the_method_terms(cli_runs, name):
    config = epoch_terms_are_finite(*cli_runs[name], TERMS[name])
    if name in ("rkd", "combined"):
        assert {k: config.loss.rkd[k] for k in RKD_OFFICIAL} == RKD_OFFICIAL
    if name in ("dist", "combined"):
        assert {k: config.loss.dist[k] for k in DIST_OFFICIAL} == DIST_OFFICIAL
