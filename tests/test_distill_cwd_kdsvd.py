"""`cwd` and `kdsvd` against their official implementations, in float64, and through the real CLI.

The `official_*` code below is transcribed from the official repositories (not from kdmtl's), in
plain torch, at the commits read:

- CWD, the authors' code: irfanICMLL/TorchDistiller c2caaca0942b615d2362fa0c9468ed1db292a2f0
  (SemSeg-distill/utils/criterion.py `ChannelNorm`, `CriterionCWD`; networks/kd_model.py
  `self.linear` and `criterion_cwd(preds_S[0], preds_T[0])`; exp_cwd.sh; README.md
  `bash exp_cwd.sh channel kl 3 4 False False False v1`);
- CWD, mmrazor: open-mmlab/mmrazor 90c7af1f (mmrazor/models/losses/cwd.py `ChannelWiseDivergence`;
  configs/distill/mmseg/cwd/cwd_logits_pspnet_r101-d8_pspnet_r18-d8_4xb2-80k_cityscapes-512x1024.py);
- KD-SVD: sseung0703/KD_methods_with_TF 9fb54144fe6a80edd94259d4ba42995b594c91a0 (nets/Shared.py
  `KD_SVD`, nets/SVP.py `SVD`, `Align_rsv`, `removenan`; nets/ResNet.py; op_util.py), TensorFlow ops
  written with their torch equivalents on the map in TF's NHWC layout.

Every comparison is at atol 1e-9 on random float64 inputs; the max abs difference of each method
is printed (`pytest -s`) as `official-diff <method>: <value>`.
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
from kdmtl_cli.distill.cwd import ChannelWiseDistillation, CWDConfig, cwd_loss
from kdmtl_cli.distill.kdsvd import KDSVDConfig, SVDDistillation, kdsvd_losses
from kdmtl_cli.errors import KdmtlError
from kdmtl_cli.schema import LossConfig
from kdmtl_cli.tasks import _load_kinds

REPO = Path(__file__).resolve().parents[1]
ATOL = 1e-9
DIFFS = {}
_load_kinds()
pytestmark = pytest.mark.usefixtures("one_thread")

STAGES = ["trunk.stages.0", "trunk.stages.1", "trunk.stages.2"]

# ---------------------------------------------------------------- official defaults, as read
# TorchDistiller SemSeg-distill/README.md: `bash exp_cwd.sh channel kl 3 4 False False False v1`;
# exp_cwd.sh L5-6 `WEIGHT=$3` `TEMPERATURE=$4`, L13 `--lambda-cwd $WEIGHT --temperature $TEMPERATURE`;
# kd_model.py: the same criterion_cwd and lambda_cwd serve `--cwd-feat` (features).
CWD_OFFICIAL = {"weight": 3.0, "tau": 4.0, "feature_weight": 3.0}
# mmrazor's own config (an alternative, documented in conf/loss/cwd.yaml): L19 tau=1, loss_weight=5.
MMRAZOR_CWD = {"tau": 1.0, "loss_weight": 5.0}
# KD_methods_with_TF nets/Shared.py L41 `K = 1`, L47 `SVD(sfm, K+3)`; op_util.py L39 distillation loss added
# with weight 1; nets/ResNet.py L23-25 + L116: every stage's last-block output.
KDSVD_OFFICIAL = {"weight": 1.0, "k": 1, "extra": 3, "student": STAGES, "teacher": STAGES}


record = functools.partial(record_diff, atol=ATOL, diffs=DIFFS, flat=False)


# ================================================================ official code, transcribed
# mmrazor/models/losses/cwd.py
class OfficialChannelWiseDivergence(nn.Module):
    def __init__(self, tau=1.0, loss_weight=1.0):
        super(OfficialChannelWiseDivergence, self).__init__()
        self.tau = tau
        self.loss_weight = loss_weight

    def forward(self, preds_S, preds_T):
        assert preds_S.shape[-2:] == preds_T.shape[-2:]
        N, C, H, W = preds_S.shape

        softmax_pred_T = F.softmax(preds_T.view(-1, W * H) / self.tau, dim=1)

        logsoftmax = torch.nn.LogSoftmax(dim=1)
        loss = torch.sum(softmax_pred_T *
                         logsoftmax(preds_T.view(-1, W * H) / self.tau) -
                         softmax_pred_T *
                         logsoftmax(preds_S.view(-1, W * H) / self.tau)) * (
                             self.tau**2)

        loss = self.loss_weight * loss / (C * N)

        return loss


# TorchDistiller SemSeg-distill/utils/criterion.py
class OfficialChannelNorm(nn.Module):
    def __init__(self):
        super(OfficialChannelNorm, self).__init__()

    def forward(self, featmap):
        n, c, h, w = featmap.shape
        featmap = featmap.reshape((n, c, -1))
        featmap = featmap.softmax(dim=-1)
        return featmap


class OfficialCriterionCWD(nn.Module):
    def __init__(self, norm_type='none', divergence='mse', temperature=1.0):
        super(OfficialCriterionCWD, self).__init__()
        if norm_type == 'channel':
            self.normalize = OfficialChannelNorm()
        elif norm_type == 'spatial':
            self.normalize = nn.Softmax(dim=1)
        elif norm_type == 'channel_mean':
            self.normalize = lambda x: x.view(x.size(0), x.size(1), -1).mean(-1)
        else:
            self.normalize = None
        self.norm_type = norm_type

        self.temperature = 1.0

        if divergence == 'mse':
            self.criterion = nn.MSELoss(reduction='sum')
        elif divergence == 'kl':
            self.criterion = nn.KLDivLoss(reduction='sum')
            self.temperature = temperature
        self.divergence = divergence

    def forward(self, preds_S, preds_T):
        n, c, h, w = preds_S.shape
        if self.normalize is not None:
            norm_s = self.normalize(preds_S / self.temperature)
            norm_t = self.normalize(preds_T.detach() / self.temperature)
        else:
            norm_s = preds_S[0]
            norm_t = preds_T[0].detach()

        if self.divergence == 'kl':
            norm_s = norm_s.log()
        loss = self.criterion(norm_s, norm_t)

        if self.norm_type == 'channel' or self.norm_type == 'channel_mean':
            loss /= n * c
        else:
            loss /= n * h * w

        return loss * (self.temperature**2)


# KD_methods_with_TF nets/SVP.py + nets/Shared.py, TF ops as torch: tf.svd(x, full_matrices=False) returns
# (s, u, v) with v NOT transposed; tf.nn.l2_normalize(x, axis, epsilon=1e-12) = x * rsqrt(max(sum x^2, eps)).
def tf_svd(x):
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    return s, u, vh.transpose(-2, -1)


def tf_l2_normalize(x, axis, epsilon=1e-12):
    return x * torch.rsqrt(torch.clamp((x * x).sum(axis, keepdim=True), min=epsilon))


def official_removenan(x):
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


def official_SVD(X, n):
    sz = list(X.shape)
    if len(sz) == 4:
        x = torch.reshape(X, [-1, sz[1] * sz[2], sz[3]])
    elif len(sz) == 3:
        x = X
    else:
        x = X.unsqueeze(1)
        n = 1
    s, u, v = tf_svd(x)
    s = official_removenan(s)
    v = official_removenan(v)
    u = official_removenan(u)
    if n > 0:
        s = tf_l2_normalize(s[:, :n], 1)
        u = tf_l2_normalize(u[:, :, :n], 1)
        v = tf_l2_normalize(v[:, :, :n], 1)
    return s, u, v


def official_Align_rsv(x, y):
    cosine = torch.matmul(x.transpose(1, 2), y)
    mask = torch.where(torch.eq(cosine.abs().amax(1, keepdim=True), cosine.abs()),
                       torch.sign(cosine), torch.zeros_like(cosine))
    x = torch.matmul(x, mask)
    return x, y


def official_KD_SVD(student_feature_maps, teacher_feature_maps, K=1):
    """Shared.py `KD_SVD(..., dist_type='SVD')` (K = 1 there; a parameter here to test other k),
    its sum split back into the per-pair losses (the official returns tf.add_n of them)."""
    GNN_losses = []
    V_Tb = V_Sb = None
    for i, sfm, tfm in zip(range(len(student_feature_maps)), student_feature_maps, teacher_feature_maps):
        Sigma_T, U_T, V_T = official_SVD(tfm, K)
        Sigma_S, U_S, V_S = official_SVD(sfm, K + 3)
        V_S, V_T = official_Align_rsv(V_S, V_T)
        Sigma_T = Sigma_T.unsqueeze(1)
        V_T = V_T * Sigma_T
        V_S = V_S * Sigma_T
        if i > 0:
            S_rbf = torch.exp(-torch.square(V_S.unsqueeze(2) - V_Sb.unsqueeze(1)) / 8)
            T_rbf = torch.exp(-torch.square(V_T.unsqueeze(2) - V_Tb.unsqueeze(1)) / 8)
            l2loss = (S_rbf - T_rbf.detach()) ** 2
            l2loss = torch.where(torch.isfinite(l2loss), l2loss, torch.zeros_like(l2loss))
            GNN_losses.append(torch.sum(l2loss))
        V_Tb = V_T
        V_Sb = V_S
    return GNN_losses


def nhwc(x):
    """A PyTorch NCHW map as the TF code's NHWC tensor."""
    return x.permute(0, 2, 3, 1)


# ================================================================ kdmtl's side
_yaml = loss_yaml
_cfg = settings_from_yaml


def _tasks(classes=5):
    return make_tasks(classes, classes)


def _cwd(seg_s, seg_t, s_feats=None, t_feats=None, **overrides):
    tasks = _tasks(seg_s.shape[1])
    method = ChannelWiseDistillation(_cfg(CWDConfig, "cwd", **overrides), tasks, list(tasks))
    n = seg_s.shape[0]
    s_feats, t_feats = s_feats or {}, t_feats or {}
    method.setup(s_feats, t_feats)
    other = {"cls": torch.zeros(n, seg_s.shape[1], dtype=seg_s.dtype), "depth": torch.zeros(n, 1, 2, 2, dtype=seg_s.dtype)}
    terms = method({"outputs": {"seg": seg_s, **other}, "features": s_feats},
                   {"outputs": {"seg": seg_t, **other}, "features": t_feats}, {}, {})
    return method, terms


def _kdsvd(s_maps, t_maps, **overrides):
    tasks = _tasks()
    names = [f"trunk.stages.{i}" for i in range(len(s_maps))]
    method = SVDDistillation(_cfg(KDSVDConfig, "kdsvd", student=names, teacher=names, **overrides), tasks, list(tasks))
    s_feats, t_feats = dict(zip(names, s_maps)), dict(zip(names, t_maps))
    method.setup(s_feats, t_feats)
    terms = method({"outputs": {}, "features": s_feats}, {"outputs": {}, "features": t_feats}, {}, {})
    assert list(terms) == [f"kdsvd/{name}" for name in names[1:]]
    return method, terms


def _grad(loss, x):
    (g,) = torch.autograd.grad(loss, x, retain_graph=True)
    return g


# ================================================================ CWD
@pytest.mark.parametrize("n,c,h,w,seed", [(4, 5, 8, 8, 0), (2, 19, 6, 9, 1), (3, 2, 1, 7, 2), (1, 7, 16, 16, 3)])
@pytest.mark.parametrize("tau", [4.0, 1.0, 2.5])
def test_cwd_matches_mmrazor_and_the_authors_code_on_seg_logits(n, c, h, w, seed, tau):
    seg_s = randn(n, c, h, w, seed=seed, scale=2.0).requires_grad_()
    seg_t = randn(n, c, h, w, seed=seed + 10, scale=3.0)
    _, terms = _cwd(seg_s, seg_t, tau=tau)
    assert list(terms) == ["cwd/seg"]                   # dense label tasks only: no cwd/cls, no cwd/depth
    ours = terms["cwd/seg"]
    mmrazor = OfficialChannelWiseDivergence(tau=tau, loss_weight=1.0)(seg_s, seg_t)
    authors = OfficialCriterionCWD("channel", "kl", tau)(seg_s, seg_t)
    for official in (mmrazor, authors):
        record("cwd", ours, official)
        record("cwd", _grad(ours, seg_s), _grad(official, seg_s))


def test_cwd_weight_is_applied_outside_the_term_as_the_official_loss_weight():
    seg_s, seg_t = randn(2, 4, 5, 5, seed=4), randn(2, 4, 5, 5, seed=5)
    method, terms = _cwd(seg_s, seg_t, tau=1.0, weight=5.0)
    official = OfficialChannelWiseDivergence(**MMRAZOR_CWD)(seg_s, seg_t)
    record("cwd", method.weight("cwd/seg", {}) * terms["cwd/seg"], official)


@pytest.mark.parametrize("c_s,c_t", [(6, 6), (4, 9)])
def test_cwd_on_feature_pairs_matches_the_authors_cwd_feat(c_s, c_t):
    """`--cwd-feat`: criterion_cwd(self.linear(preds_S[2]), preds_T[2]) where channels differ; the
    learned align is kdmtl's own module (its weights random), applied as the official code does."""
    s_map = randn(3, c_s, 4, 5, seed=6).requires_grad_()
    t_map = randn(3, c_t, 4, 5, seed=7, scale=2.0)
    seg_s, seg_t = randn(3, 5, 4, 4, seed=8), randn(3, 5, 4, 4, seed=9)
    tasks = _tasks(5)
    pair = {"student": ["trunk.stages.2"], "teacher": ["trunk.stages.2"]}
    method = ChannelWiseDistillation(_cfg(CWDConfig, "cwd", **pair), tasks, list(tasks))
    s_feats, t_feats = {"trunk.stages.2": s_map}, {"trunk.stages.2": t_map}
    method.setup(s_feats, t_feats)
    method.modules.double()
    terms = method({"outputs": {"seg": seg_s}, "features": s_feats}, {"outputs": {"seg": seg_t}, "features": t_feats}, {}, {})
    assert list(terms) == ["cwd/seg", "cwd/trunk.stages.2"]
    assert method.weight("cwd/trunk.stages.2", {}) == CWD_OFFICIAL["feature_weight"]
    if c_s == c_t:
        assert len(method.modules) == 0
        student = s_map
    else:
        (align,) = method.modules.values()
        conv, bn, relu = align
        assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.bias) == (c_s, c_t, (1, 1), None)
        assert isinstance(bn, nn.BatchNorm2d) and isinstance(relu, nn.ReLU)
        student = align(s_map)          # the official self.linear, here kdmtl's module (train mode: batch stats)
    official = OfficialCriterionCWD("channel", "kl", 4.0)(student, t_map)
    record("cwd", terms["cwd/trunk.stages.2"], official)
    record("cwd", _grad(terms["cwd/trunk.stages.2"], s_map), _grad(official, s_map))


def test_cwd_align_is_a_learned_part_with_parameters():
    s_map, t_map = torch.zeros(2, 3, 4, 4), torch.zeros(2, 8, 4, 4)
    pair = {"student": ["trunk.stages.2"], "teacher": ["trunk.stages.2"]}
    method, _ = _cwd(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 4), {"trunk.stages.2": s_map},
                     {"trunk.stages.2": t_map}, **pair)
    assert method.param_groups(0.1) and "trunk__stages__2.0.weight" in method.modules.state_dict()


def test_cwd_errors_and_fp16():
    tasks = _tasks()
    only_cls = {"cls": tasks["cls"]}
    with pytest.raises(KdmtlError, match="segmentation"):
        ChannelWiseDistillation(_cfg(CWDConfig, "cwd"), only_cls, list(only_cls))
    with pytest.raises(KdmtlError, match="spatial sizes"):
        _cwd(randn(2, 3, 4, 4), randn(2, 3, 4, 4), {"a": torch.zeros(2, 3, 4, 4)}, {"a": torch.zeros(2, 3, 2, 2)},
             student=["a"], teacher=["a"])
    with pytest.raises(KdmtlError, match="same number"):
        ChannelWiseDistillation(_cfg(CWDConfig, "cwd", student=["a"]), tasks, list(tasks))
    with pytest.raises(ValueError, match="one shape"):
        cwd_loss(randn(2, 3, 4, 4), randn(2, 3, 4, 5), 1.0)
    _, terms = _cwd(randn(2, 3, 4, 4, seed=1).half(), randn(2, 3, 4, 4, seed=2).half())
    assert terms["cwd/seg"].dtype == torch.float32 and math.isfinite(float(terms["cwd/seg"]))


# ================================================================ KD-SVD
@pytest.mark.parametrize("shapes,seed", [([(4, 8, 8, 8), (4, 16, 4, 4), (4, 32, 2, 2)], 0),
                                         ([(3, 6, 5, 5), (3, 6, 5, 5)], 1),
                                         ([(2, 4, 6, 6), (2, 10, 3, 3), (2, 12, 3, 3), (2, 5, 2, 2)], 2)])
def test_kdsvd_matches_the_official_code(shapes, seed):
    """Student and teacher maps of each stage share channels (the official alignment needs it) but
    not spatial sizes' values; the official takes NHWC maps, kdmtl NCHW ones."""
    s_maps = [randn(*shape, seed=seed * 10 + i).requires_grad_() for i, shape in enumerate(shapes)]
    t_maps = [randn(*shape, seed=seed * 10 + 5 + i, scale=2.0) for i, shape in enumerate(shapes)]
    _, terms = _kdsvd(s_maps, t_maps)
    official = official_KD_SVD([nhwc(s) for s in s_maps], [nhwc(t) for t in t_maps])
    assert len(official) == len(terms)
    for ours, theirs in zip(terms.values(), official):
        record("kdsvd", ours, theirs)
        for s in s_maps:
            g_ours = torch.autograd.grad(ours, s, retain_graph=True, allow_unused=True)[0]
            g_theirs = torch.autograd.grad(theirs, s, retain_graph=True, allow_unused=True)[0]
            if g_theirs is None:
                assert g_ours is None or float(g_ours.abs().max()) == 0.0
            else:
                record("kdsvd", g_ours, g_theirs)
    total = sum(terms.values())
    record("kdsvd", total, sum(official))           # the official's tf.add_n


def test_kdsvd_other_k_follows_the_official_rule():
    shapes = [(3, 8, 4, 4), (3, 8, 4, 4), (3, 16, 2, 2)]
    s_maps = [randn(*shape, seed=30 + i) for i, shape in enumerate(shapes)]
    t_maps = [randn(*shape, seed=40 + i) for i, shape in enumerate(shapes)]
    _, terms = _kdsvd(s_maps, t_maps, k=2)
    for ours, theirs in zip(terms.values(), official_KD_SVD([nhwc(s) for s in s_maps], [nhwc(t) for t in t_maps], K=2)):
        record("kdsvd", ours, theirs)


def test_kdsvd_gradient_is_the_true_gradient():
    """The official code replaces TF's SVD gradient by its own (SVP.py `Svd_`); kdmtl uses torch's:
    checked here against finite differences."""
    s_maps = [randn(2, 3, 3, 3, seed=50).requires_grad_(), randn(2, 4, 2, 2, seed=51).requires_grad_()]
    t_maps = [randn(2, 3, 3, 3, seed=52), randn(2, 4, 2, 2, seed=53)]
    assert torch.autograd.gradcheck(lambda a, b: kdsvd_losses([a, b], t_maps)[0], tuple(s_maps), eps=1e-6, atol=1e-5)


def test_kdsvd_errors_and_fp16():
    with pytest.raises(KdmtlError, match="channel counts differ"):
        _kdsvd([torch.randn(2, 4, 3, 3), torch.randn(2, 8, 2, 2)], [torch.randn(2, 8, 3, 3), torch.randn(2, 8, 2, 2)])
    tasks = _tasks()
    one = SVDDistillation(_cfg(KDSVDConfig, "kdsvd", student=["a"], teacher=["a"]), tasks, list(tasks))
    with pytest.raises(KdmtlError, match="at least two"):
        one.setup({"a": torch.zeros(2, 3, 2, 2)}, {"a": torch.zeros(2, 3, 2, 2)})
    _, terms = _kdsvd([randn(2, 4, 3, 3, seed=1).half(), randn(2, 6, 2, 2, seed=2).half()],
                      [randn(2, 4, 3, 3, seed=3).half(), randn(2, 6, 2, 2, seed=4).half()])
    assert all(v.dtype == torch.float32 and math.isfinite(float(v)) for v in terms.values())


def test_kdsvd_per_task_teachers_give_one_chain_each():
    tasks = _tasks()
    s_feats = {"a": randn(2, 3, 3, 3, seed=1), "b": randn(2, 4, 2, 2, seed=2)}
    t_feats = {f"{task}:{name}": v * (i + 2) for i, task in enumerate(["cls", "seg"]) for name, v in s_feats.items()}
    method = SVDDistillation(_cfg(KDSVDConfig, "kdsvd", student=["a", "b"], teacher=["a", "b"]), tasks, ["cls", "seg"])
    method.setup(s_feats, t_feats)
    terms = method({"outputs": {}, "features": s_feats}, {"outputs": {}, "features": t_feats}, {}, {})
    assert sorted(terms) == ["kdsvd/b@cls", "kdsvd/b@seg"]
    official = official_KD_SVD([nhwc(s_feats["a"]), nhwc(s_feats["b"])], [nhwc(t_feats["seg:a"]), nhwc(t_feats["seg:b"])])
    record("kdsvd", terms["kdsvd/b@seg"], official[0])


# ================================================================ YAML defaults
@pytest.mark.parametrize("name,settings,official", [("cwd", CWDConfig, CWD_OFFICIAL), ("kdsvd", KDSVDConfig, KDSVD_OFFICIAL)])
def test_yaml_defaults_load_into_the_settings_and_are_the_official_ones(name, settings, official):
    cfg = _cfg(settings, name)
    assert OmegaConf.to_container(OmegaConf.create({k: cfg[k] for k in official})) == official
    assert OmegaConf.to_container(OmegaConf.structured(settings)) == OmegaConf.to_container(cfg)
    assert set(_yaml(name)) == set(settings.__dataclass_fields__)
    if name == "cwd":
        assert list(cfg.student) == list(cfg.teacher) == []


def test_both_methods_are_found_by_name():
    loss = OmegaConf.merge(OmegaConf.structured(LossConfig), {"cwd": _yaml("cwd"), "kdsvd": _yaml("kdsvd")})
    assert method_names(loss) == ["cwd", "kdsvd"]
    tasks = _tasks()
    assert [type(m) for m in build_methods(loss, tasks, list(tasks))] == [ChannelWiseDistillation, SVDDistillation]


# ================================================================ through the real CLI
CLI_RUNS = {"cwd": ["loss=cwd"], "kd_cwd": ["loss=[kd,cwd]"],
            "cwd_feature": ["loss=cwd", "loss.cwd.student=[trunk.stages.2]", "loss.cwd.teacher=[trunk.stages.2]"],
            "kdsvd": ["loss=kdsvd", "student.width=32"]}
TERMS = {"cwd": ["cwd/seg"], "kd_cwd": ["kd/seg", "cwd/seg"], "cwd_feature": ["cwd/seg", "cwd/trunk.stages.2"],
         "kdsvd": ["kdsvd/trunk.stages.1", "kdsvd/trunk.stages.2"]}


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory, shared_cache):
    """`kdmtl train debug=fast loss=cwd | loss=[kd,cwd] | ...` on the embedded data, at once."""
    return train_at_once(CLI_RUNS, tmp_path_factory.mktemp("cwd_kdsvd_cli"), shared_cache)


@pytest.mark.parametrize("name", list(CLI_RUNS))
def test_cli_run_logs_the_method_terms(cli_runs, name):
    config = epoch_terms_are_finite(*cli_runs[name], TERMS[name])
    if name.endswith("cwd"):
        assert {k: config.loss.cwd[k] for k in CWD_OFFICIAL} == CWD_OFFICIAL
    if name == "kdsvd":
        assert {k: config.loss.kdsvd[k] for k in ("weight", "k", "extra")} == {"weight": 1.0, "k": 1, "extra": 3}


def test_cli_cwd_feature_align_is_saved_in_the_checkpoint(cli_runs):
    """Student stage 2 is narrower than the teacher's (width 16 vs 32): the learned align is saved."""
    from conftest import show

    run_dir, proc = cli_runs["cwd_feature"]
    assert proc.returncode == 0, show(proc)
    checkpoint = torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
    weight = checkpoint["objective"]["cwd.trunk__stages__2.0.weight"]
    assert weight.shape[2:] == (1, 1) and weight.shape[0] > weight.shape[1]
