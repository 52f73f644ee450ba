"""`reviewkd` (kdmtl_cli/distill/reviewkd.py) against mdistiller's ReviewKD, in float64.

The `Official*` / `official_*` code below is transcribed from megvii-research/mdistiller at
a08d46f10d6102bd6e3f258ca5ac880b020ea259 (not from kdmtl's code), identical in these parts to the
authors' dvlab-research/ReviewKD cede6ea CIFAR-100/model/reviewkd.py:

- mdistiller/distillers/ReviewKD.py `hcl_loss` (L11-28), `ABF` (L106-144), the ABF list built in
  `ReviewKD.__init__` (L44-55: mid_channel = min(512, in_channels[-1]), reversed) and the chain in
  `forward_train` (L72-98: student feats + pooled_feat, reversed; teacher feats + pooled_feat; loss
  REVIEWKD_WEIGHT * min(epoch / WARMUP_EPOCHS, 1) * hcl_loss);
- mdistiller/engine/cfg.py L150-159 (CFG.REVIEWKD defaults); engine/trainer.py L78-87 (epoch from 1).

Every comparison is at 1e-9 on random float64 inputs; the max abs difference of each comparison is
printed (`pytest -s`) as `official-diff <what>: <value>`.
"""

from __future__ import annotations

import functools

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import OmegaConf

from distill_checks import (assert_terms_logged, build_method, loss_yaml, randn, record_diff, resume_equals_straight,
                            train_logs_finite_terms)
from kdmtl_cli.distill import build_methods, method_names
from kdmtl_cli.distill.reviewkd import ReviewKD, ReviewKDConfig, hcl_loss
from kdmtl_cli.errors import KdmtlError

ATOL = 1e-9
pytestmark = pytest.mark.usefixtures("one_thread")
STAGES = ["trunk.stages.0", "trunk.stages.1", "trunk.stages.2"]

# ================================================================ official defaults, transcribed
# mdistiller/engine/cfg.py L152-153, L158
REVIEWKD_WEIGHT = 1.0
WARMUP_EPOCHS = 20
MAX_MID_CHANNEL = 512


# ================================================================ official code, transcribed
# mdistiller/distillers/ReviewKD.py hcl_loss
def official_hcl_loss(fstudent, fteacher):
    loss_all = 0.0
    for fs, ft in zip(fstudent, fteacher):
        n, c, h, w = fs.shape
        loss = F.mse_loss(fs, ft, reduction="mean")
        cnt = 1.0
        tot = 1.0
        for l in [4, 2, 1]:  # noqa: E741
            if l >= h:
                continue
            tmpfs = F.adaptive_avg_pool2d(fs, (l, l))
            tmpft = F.adaptive_avg_pool2d(ft, (l, l))
            cnt /= 2.0
            loss += F.mse_loss(tmpfs, tmpft, reduction="mean") * cnt
            tot += cnt
        loss = loss / tot
        loss_all = loss_all + loss
    return loss_all


# mdistiller/distillers/ReviewKD.py ABF
class OfficialABF(nn.Module):
    def __init__(self, in_channel, mid_channel, out_channel, fuse):
        super(OfficialABF, self).__init__()
        self.conv1 = nn.Sequential(
            nn.Conv2d(in_channel, mid_channel, kernel_size=1, bias=False),
            nn.BatchNorm2d(mid_channel),
        )
        self.conv2 = nn.Sequential(
            nn.Conv2d(
                mid_channel, out_channel, kernel_size=3, stride=1, padding=1, bias=False
            ),
            nn.BatchNorm2d(out_channel),
        )
        if fuse:
            self.att_conv = nn.Sequential(
                nn.Conv2d(mid_channel * 2, 2, kernel_size=1),
                nn.Sigmoid(),
            )
        else:
            self.att_conv = None
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, x, y=None, shape=None, out_shape=None):
        n, _, h, w = x.shape
        x = self.conv1(x)
        if self.att_conv is not None:
            y = F.interpolate(y, (shape, shape), mode="nearest")
            z = torch.cat([x, y], dim=1)
            z = self.att_conv(z)
            x = x * z[:, 0].view(n, 1, h, w) + y * z[:, 1].view(n, 1, h, w)
        if x.shape[-1] != out_shape:
            x = F.interpolate(x, (out_shape, out_shape), mode="nearest")
        y = self.conv2(x)
        return y, x


# mdistiller/distillers/ReviewKD.py ReviewKD.__init__ (the ABF part) and forward_train (the loss part)
class OfficialReviewKD(nn.Module):
    def __init__(self, in_channels, out_channels, shapes, out_shapes, weight=REVIEWKD_WEIGHT,
                 warmup_epochs=WARMUP_EPOCHS):
        super().__init__()
        self.shapes, self.out_shapes = shapes, out_shapes
        self.reviewkd_loss_weight, self.warmup_epochs = weight, warmup_epochs
        abfs = nn.ModuleList()
        mid_channel = min(512, in_channels[-1])
        for idx, in_channel in enumerate(in_channels):
            abfs.append(OfficialABF(in_channel, mid_channel, out_channels[idx], idx < len(in_channels) - 1))
        self.abfs = abfs[::-1]

    def loss_kd(self, feats_student, pooled_student, feats_teacher, pooled_teacher, epoch):
        x = feats_student + [pooled_student.unsqueeze(-1).unsqueeze(-1)]
        x = x[::-1]
        results = []
        out_features, res_features = self.abfs[0](x[0], out_shape=self.out_shapes[0])
        results.append(out_features)
        for features, abf, shape, out_shape in zip(x[1:], self.abfs[1:], self.shapes[1:], self.out_shapes[1:]):
            out_features, res_features = abf(features, res_features, shape, out_shape)
            results.insert(0, out_features)
        features_teacher = feats_teacher + [pooled_teacher.unsqueeze(-1).unsqueeze(-1)]
        return self.reviewkd_loss_weight * min(epoch / self.warmup_epochs, 1.0) * official_hcl_loss(results, features_teacher)


def official_pooled(x):   # mdistiller models/cifar/resnet.py: avgpool over the last map, flattened
    return F.adaptive_avg_pool2d(x, 1).reshape(x.size(0), -1)


# ================================================================ helpers
record = functools.partial(record_diff, atol=ATOL)


def _yaml():
    return loss_yaml("reviewkd")


def _method(teacher_tasks=("cls",), **overrides):
    return build_method(ReviewKD, ReviewKDConfig, "reviewkd", {}, teacher_tasks, **overrides)


def _maps(shapes, seed):
    return {name: randn(*shape, seed=seed + i) for i, (name, shape) in enumerate(zip(STAGES, shapes))}


def _set_up_pair(s_shapes, t_shapes, seed=0):
    """kdmtl's method set up on these features (float64 ABFs) and the official module holding its weights."""
    s, t = _maps(s_shapes, seed), _maps(t_shapes, seed + 10)
    torch.manual_seed(seed)
    method = _method()
    method.setup(s, t)
    method.modules.double()
    official = OfficialReviewKD([x[1] for x in s_shapes] + [s_shapes[-1][1]],
                                [x[1] for x in t_shapes] + [t_shapes[-1][1]],
                                [1] + [x[2] for x in s_shapes[::-1]], [1] + [x[2] for x in t_shapes[::-1]]).double()
    official.abfs.load_state_dict(method.modules["hcl"].abfs.state_dict())
    return method, official, s, t


def _official_loss(official, s, t, epoch):
    fs, ft = [s[n] for n in STAGES], [t[n] for n in STAGES]
    return official.loss_kd(fs, official_pooled(fs[-1]), ft, official_pooled(ft[-1]), epoch)


# ================================================================ YAML defaults = official
def test_yaml_defaults_are_the_official_ones():
    cfg = OmegaConf.merge(OmegaConf.structured(ReviewKDConfig), _yaml())
    assert (cfg.weight, cfg.warmup_epochs, cfg.max_mid_channel) == (REVIEWKD_WEIGHT, WARMUP_EPOCHS, MAX_MID_CHANNEL)
    assert cfg.warmup_schedule == "epoch" and cfg.pooled is True
    assert list(cfg.student) == list(cfg.teacher) == STAGES
    assert OmegaConf.to_container(OmegaConf.structured(ReviewKDConfig)) == OmegaConf.to_container(cfg)
    assert set(_yaml()) == set(ReviewKDConfig.__dataclass_fields__)


def test_the_method_is_found_by_name():
    cfg = OmegaConf.create({"reviewkd": _yaml()})
    assert "reviewkd" in method_names(cfg)
    assert [type(m) for m in build_methods(cfg, {}, ["cls"])] == [ReviewKD]


# ================================================================ the loss and its gradients
CASES = [
    # mdistiller's res32x4 -> res8x4 shapes (IN/OUT_CHANNELS [64,128,256,256], SHAPES [1,8,16,32]), smaller batch
    ([(2, 64, 32, 32), (2, 128, 16, 16), (2, 256, 8, 8)], [(2, 64, 32, 32), (2, 128, 16, 16), (2, 256, 8, 8)]),
    # kdmtl's default student (convnet width 16) and teacher (width 32), same sizes
    ([(3, 16, 16, 16), (3, 32, 8, 8), (3, 64, 4, 4)], [(3, 32, 16, 16), (3, 64, 8, 8), (3, 128, 4, 4)]),
    # teacher at twice the resolution (the official OUT_SHAPES != SHAPES path) and wide channels (mid = 512)
    ([(2, 8, 8, 8), (2, 16, 4, 4), (2, 600, 2, 2)], [(2, 12, 16, 16), (2, 24, 8, 8), (2, 40, 4, 4)]),
]


@pytest.mark.parametrize("s_shapes, t_shapes", CASES)
def test_reviewkd_equals_mdistiller_with_the_same_abfs(s_shapes, t_shapes):
    method, official, s, t = _set_up_pair(s_shapes, t_shapes)
    chain = method.modules["hcl"]
    assert chain.abfs[0].conv1[0].out_channels == min(MAX_MID_CHANNEL, s_shapes[-1][1])
    assert [abf.att_conv is None for abf in chain.abfs] == [True, False, False, False]
    terms = method({"features": s}, {"features": t}, {}, {})
    assert list(terms) == ["reviewkd/hcl"]
    for epoch in (1, 7, 20, 150):
        ours = method.weight("reviewkd/hcl", {"epoch": epoch - 1}) * terms["reviewkd/hcl"]   # epochs done = e - 1
        record("reviewkd (mdistiller ReviewKD.forward_train loss_kd)", ours, _official_loss(official, s, t, epoch))


def test_hcl_equals_mdistiller_at_every_pyramid_depth():
    for size in (1, 2, 3, 4, 5, 8):
        fs, ft = [randn(2, 3, size, size, seed=size)], [randn(2, 3, size, size, seed=size + 100)]
        record(f"hcl_loss {size}x{size} (mdistiller hcl_loss)", hcl_loss(fs, ft), official_hcl_loss(fs, ft))


@pytest.mark.parametrize("s_shapes, t_shapes", CASES[1:])
def test_gradients_wrt_student_features_and_abfs_equal_mdistiller(s_shapes, t_shapes):
    method, official, s, t = _set_up_pair(s_shapes, t_shapes, seed=5)
    a = {k: v.clone().requires_grad_() for k, v in s.items()}
    b = {k: v.clone().requires_grad_() for k, v in s.items()}
    ours = method.weight("reviewkd/hcl", {"epoch": 30}) * method({"features": a}, {"features": t}, {}, {})["reviewkd/hcl"]
    theirs = _official_loss(official, b, t, 31)
    record("reviewkd (mdistiller)", ours, theirs)
    ours.backward(), theirs.backward()
    for name in STAGES:
        record(f"reviewkd gradient, student {name}", a[name].grad, b[name].grad)
    for (k, p), q in zip(method.modules["hcl"].abfs.named_parameters(), official.abfs.parameters()):
        record(f"reviewkd gradient, ABF {k}", p.grad, q.grad)


# ================================================================ warm-up
def test_warm_up_is_mdistillers_min_epoch_over_20():
    method = _method()
    method._weights = {"reviewkd/hcl": REVIEWKD_WEIGHT}
    for done in (0, 0.5, 1, 9.99, 18, 19, 19.5, 20, 100):
        epoch = int(done) + 1          # mdistiller's trainer numbers epochs from 1
        assert method.weight("reviewkd/hcl", {"epoch": done}) == pytest.approx(min(epoch / WARMUP_EPOCHS, 1.0), abs=1e-15)
    linear = _method(warmup_schedule="linear", weight=2.0)
    linear._weights = {"reviewkd/hcl": 2.0}
    assert [linear.weight("reviewkd/hcl", {"epoch": e}) for e in (0, 5, 20, 40)] == [0.0, 0.5, 2.0, 2.0]
    off = _method(warmup_epochs=0)
    off._weights = {"reviewkd/hcl": 1.0}
    assert off.weight("reviewkd/hcl", {"epoch": 0}) == 1.0
    with pytest.raises(KdmtlError, match="warmup_schedule"):
        _method(warmup_schedule="cosine")


# ================================================================ learned parts
def test_abfs_are_learned_parts_that_a_state_dict_restores():
    s_shapes, t_shapes = CASES[1]
    s, t = _maps(s_shapes, 0), _maps(t_shapes, 10)
    torch.manual_seed(0)
    method = _method()
    method.setup(s, t)
    state = method.modules.state_dict()
    torch.manual_seed(1)
    fresh = _method()
    fresh.setup(s, t)
    assert not torch.equal(fresh.modules.state_dict()["hcl.abfs.1.conv1.0.weight"], state["hcl.abfs.1.conv1.0.weight"])
    fresh.modules.load_state_dict(state)
    assert all(torch.equal(v, state[k]) for k, v in fresh.modules.state_dict().items())
    count = sum(p.numel() for p in method.modules.parameters())
    print(f"reviewkd ABF parameters, default student (convnet w16) -> teacher (convnet w32): {count}")
    assert count == sum(p.numel() for group in method.param_groups(0.1) for p in group["params"])


def test_per_task_teachers_give_one_chain_each():
    s_shapes, t_shapes = CASES[1]
    s = _maps(s_shapes, 0)
    t = {f"{task}:{n}": v for k, task in enumerate(("cls", "seg")) for n, v in _maps(t_shapes, 10 * k + 20).items()}
    method = _method(teacher_tasks=("cls", "seg"))
    method.setup(s, t)
    method.modules.double()
    assert set(method.modules) == {"hcl_at_cls", "hcl_at_seg"}
    assert set(method({"features": s}, {"features": t}, {}, {})) == {"reviewkd/hcl@cls", "reviewkd/hcl@seg"}


# ================================================================ through the real CLI
@pytest.mark.parametrize("loss, methods", [("reviewkd", ["reviewkd"]), ("[kd,reviewkd]", ["kd", "reviewkd"])])
def test_cli_train_with_the_method(loss, methods, workdir, shared_cache):
    run_dir = train_logs_finite_terms(loss, methods, workdir, shared_cache)
    assert_terms_logged(run_dir, "reviewkd", ["reviewkd/hcl"])


def test_cli_resume_restores_the_abfs(workdir, shared_cache):
    """An interrupted `loss=reviewkd` run, resumed, ends with the ABFs of the uninterrupted run, bit for bit."""
    # the ABFs trained during the second epoch (so the restore is not trivial)
    after_one, a, _ = resume_equals_straight("reviewkd", workdir, shared_cache,
                                             trained=["reviewkd.hcl.abfs.1.conv1.0.weight"])
    assert {k.split(".", 1)[0] for k in after_one["objective"]} == {"reviewkd"}
    n_params = sum(v.numel() for k, v in after_one["objective"].items()
                   if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
    print(f"reviewkd ABF parameters in the CLI run (student=small, teacher=multitask): {n_params}")
    # the run reports them beside the student's parameters (results.json, summary.md)
    results = json.loads((workdir / "straight" / "results.json").read_text())["results"]
    assert results["student/distill_params"] == n_params > 0
    assert f"distillation modules: {n_params:,} parameters" in (workdir / "straight" / "summary.md").read_text()
    assert set(a["objective"]) == set(after_one["objective"])
