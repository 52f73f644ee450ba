"""`ab` and `ft` (kdmtl_cli/distill/ab.py, ft.py) against RepDistiller, in float64.

The `Official*` code below is transcribed from HobbitLong/RepDistiller at
b84f547c5db6a35318d4671d7d5c4de74c822403 (not from kdmtl's code):

- distiller_zoo/AB.py `ABLoss` (L7-29: layer weights 2^(i-n+1), / bsz, / 1000 * 3, criterion_alternative_l2);
- models/util.py `Connector` (L65-90) and `ConvReg` (L131-154), built by train_student.py L227-235 as
  `Connector(s_shapes, t_shapes)` over feat[1:-1] with `preact=True` (helper/pretrain.py L57-67);
- distiller_zoo/FT.py `FactorTransfer` (L7-31: p1=2, p2=1, factor_loss, factor);
- models/util.py `Paraphraser` (L7-41: k=0.5, use_bn=False) and `Translator` (L44-62: k=0.5, use_bn=True),
  built by train_student.py L239-253 on feat[-2]; the init stage's loss nn.MSELoss() of the paraphraser's
  reconstruction of feat_t[-2] (train_student.py L247, helper/pretrain.py L68-71); the main stage's term
  FactorTransfer(translator(feat_s[-2]), paraphraser(feat_t[-2], is_factor=True)) (helper/loops.py L177-180);
- helper/loops.py L171-173: `loss_kd = 0` for abound in the main stage;
- train_student.py L47 `--init_epochs 30`; helper/pretrain.py L22-27 (init lr 0.01 for factor);
- scripts/run_cifar_distill.sh L21 (`--distill abound -a 0 -b 1`), L23 (`--distill factor -a 0 -b 200`).

Every comparison is at 1e-9 (abs, or rel for large weighted values) on random float64 inputs; the
max abs difference of each comparison is printed (`pytest -s`) as `official-diff <what>: <value>`.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import OmegaConf

from conftest import FAST, assert_one_line_error, run_kdmtl
from distill_checks import (assert_terms_logged, build_method, loss_yaml, randn, record_diff, settings_from_yaml,
                            train_logs_finite_terms)
from kdmtl_cli.distill import build_methods, method_names
from kdmtl_cli.distill.ab import ABConfig, ActivationBoundaries, ab_loss
from kdmtl_cli.distill.ft import FactorTransfer, FTConfig, ft_loss
from kdmtl_cli.errors import KdmtlError
from kdmtl_cli.ranges import check_ranges

ATOL = 1e-9
pytestmark = pytest.mark.usefixtures("one_thread")

S_PRE = [f"trunk.stages.{i}.0.preact" for i in range(3)]
T_PRE = [f"trunk.stages.{i}.1.preact" for i in range(3)]

# ================================================================ official defaults, transcribed
# scripts/run_cifar_distill.sh L21: `--distill abound --model_s resnet8x4 -a 0 -b 1`
AB_BETA = 1.0
# distiller_zoo/AB.py L11: `def __init__(self, feat_num, margin=1.0)`
AB_MARGIN = 1.0
# scripts/run_cifar_distill.sh L23: `--distill factor --model_s resnet8x4 -a 0 -b 200`
FT_BETA = 200.0
# distiller_zoo/FT.py L9: `def __init__(self, p1=2, p2=1)`
FT_P1, FT_P2 = 2, 1
# models/util.py L9 `Paraphraser(t_shape, k=0.5, use_bn=False)`, L45 `Translator(s_shape, t_shape, k=0.5, use_bn=True)`
FT_K, PARAPHRASER_BN, TRANSLATOR_BN = 0.5, False, True
# train_student.py L47: `parser.add_argument('--init_epochs', type=int, default=30, ...)`
INIT_EPOCHS = 30
# helper/pretrain.py L22-25: `lr = 0.01` for factor (CIFAR ResNet/WRN students); L26-27 else opt.learning_rate
FT_INIT_LR = 0.01


# ================================================================ official code, transcribed
# distiller_zoo/AB.py ABLoss
class OfficialABLoss(nn.Module):
    def __init__(self, feat_num, margin=1.0):
        super().__init__()
        self.w = [2**(i-feat_num+1) for i in range(feat_num)]
        self.margin = margin

    def forward(self, g_s, g_t):
        bsz = g_s[0].shape[0]
        losses = [self.criterion_alternative_l2(s, t) for s, t in zip(g_s, g_t)]
        losses = [w * l for w, l in zip(self.w, losses)]
        losses = [l / bsz for l in losses]
        losses = [l / 1000 * 3 for l in losses]
        return losses

    def criterion_alternative_l2(self, source, target):
        loss = ((source + self.margin) ** 2 * ((source > -self.margin) & (target <= 0)).float() +
                (source - self.margin) ** 2 * ((source <= self.margin) & (target > 0)).float())
        return torch.abs(loss).sum()


# models/util.py ConvReg: the transcription in tests/test_official_distill.py (FitNet's regressor)
from test_official_distill import OfficialConvReg  # noqa: E402


# models/util.py Connector
class OfficialConnector(nn.Module):
    def __init__(self, s_shapes, t_shapes):
        super().__init__()
        self.s_shapes = s_shapes
        self.t_shapes = t_shapes
        self.connectors = nn.ModuleList(self._make_conenctors(s_shapes, t_shapes))

    @staticmethod
    def _make_conenctors(s_shapes, t_shapes):
        assert len(s_shapes) == len(t_shapes), 'unequal length of feat list'
        connectors = []
        for s, t in zip(s_shapes, t_shapes):
            if s[1] == t[1] and s[2] == t[2]:
                connectors.append(nn.Sequential())
            else:
                connectors.append(OfficialConvReg(s, t, use_relu=False))
        return connectors

    def forward(self, g_s):
        out = []
        for i in range(len(g_s)):
            out.append(self.connectors[i](g_s[i]))
        return out


# models/util.py Paraphraser
class OfficialParaphraser(nn.Module):
    def __init__(self, t_shape, k=0.5, use_bn=False):
        super().__init__()
        in_channel = t_shape[1]
        out_channel = int(t_shape[1] * k)
        self.encoder = nn.Sequential(
            nn.Conv2d(in_channel, in_channel, 3, 1, 1),
            nn.BatchNorm2d(in_channel) if use_bn else nn.Sequential(),
            nn.LeakyReLU(0.1, inplace=True),
            nn.Conv2d(in_channel, out_channel, 3, 1, 1),
            nn.BatchNorm2d(out_channel) if use_bn else nn.Sequential(),
            nn.LeakyReLU(0.1, inplace=True),
            nn.Conv2d(out_channel, out_channel, 3, 1, 1),
            nn.BatchNorm2d(out_channel) if use_bn else nn.Sequential(),
            nn.LeakyReLU(0.1, inplace=True),
        )
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(out_channel, out_channel, 3, 1, 1),
            nn.BatchNorm2d(out_channel) if use_bn else nn.Sequential(),
            nn.LeakyReLU(0.1, inplace=True),
            nn.ConvTranspose2d(out_channel, in_channel, 3, 1, 1),
            nn.BatchNorm2d(in_channel) if use_bn else nn.Sequential(),
            nn.LeakyReLU(0.1, inplace=True),
            nn.ConvTranspose2d(in_channel, in_channel, 3, 1, 1),
            nn.BatchNorm2d(in_channel) if use_bn else nn.Sequential(),
            nn.LeakyReLU(0.1, inplace=True),
        )

    def forward(self, f_s, is_factor=False):
        factor = self.encoder(f_s)
        if is_factor:
            return factor
        rec = self.decoder(factor)
        return factor, rec


# models/util.py Translator
class OfficialTranslator(nn.Module):
    def __init__(self, s_shape, t_shape, k=0.5, use_bn=True):
        super().__init__()
        in_channel = s_shape[1]
        out_channel = int(t_shape[1] * k)
        self.encoder = nn.Sequential(
            nn.Conv2d(in_channel, in_channel, 3, 1, 1),
            nn.BatchNorm2d(in_channel) if use_bn else nn.Sequential(),
            nn.LeakyReLU(0.1, inplace=True),
            nn.Conv2d(in_channel, out_channel, 3, 1, 1),
            nn.BatchNorm2d(out_channel) if use_bn else nn.Sequential(),
            nn.LeakyReLU(0.1, inplace=True),
            nn.Conv2d(out_channel, out_channel, 3, 1, 1),
            nn.BatchNorm2d(out_channel) if use_bn else nn.Sequential(),
            nn.LeakyReLU(0.1, inplace=True),
        )

    def forward(self, f_s):
        return self.encoder(f_s)


# distiller_zoo/FT.py FactorTransfer
class OfficialFactorTransfer(nn.Module):
    def __init__(self, p1=2, p2=1):
        super().__init__()
        self.p1 = p1
        self.p2 = p2

    def forward(self, f_s, f_t):
        return self.factor_loss(f_s, f_t)

    def factor_loss(self, f_s, f_t):
        s_H, t_H = f_s.shape[2], f_t.shape[2]
        if s_H > t_H:
            f_s = F.adaptive_avg_pool2d(f_s, (t_H, t_H))
        elif s_H < t_H:
            f_t = F.adaptive_avg_pool2d(f_t, (s_H, s_H))
        else:
            pass
        if self.p2 == 1:
            return (self.factor(f_s) - self.factor(f_t)).abs().mean()
        else:
            return (self.factor(f_s) - self.factor(f_t)).pow(self.p2).mean()

    def factor(self, f):
        return F.normalize(f.pow(self.p1).mean(1).view(f.size(0), -1))


# ================================================================ helpers
DIFFS: dict = {}
record = functools.partial(record_diff, atol=ATOL, diffs=DIFFS)


def _cfg(name, **overrides):
    return settings_from_yaml({"ab": ABConfig, "ft": FTConfig}[name], name, **overrides)


def _method(name, teacher_tasks=("cls",), **overrides):
    cls, settings = {"ab": (ActivationBoundaries, ABConfig), "ft": (FactorTransfer, FTConfig)}[name]
    return build_method(cls, settings, name, {}, teacher_tasks, **overrides)


def _out(features):
    return {"features": features}


# ================================================================ YAML defaults = official
def test_yaml_defaults_are_the_official_ones():
    ab, ft = _cfg("ab"), _cfg("ft")
    assert (ab.weight, ab.margin, ab.init_epochs, ab.init_lr, ab.main_stage) == (AB_BETA, AB_MARGIN, INIT_EPOCHS,
                                                                                 None, False)
    assert (ft.weight, ft.p1, ft.p2, ft.rate) == (FT_BETA, FT_P1, FT_P2, FT_K)
    assert (ft.paraphraser_bn, ft.translator_bn, ft.init_epochs, ft.init_lr) == (PARAPHRASER_BN, TRANSLATOR_BN,
                                                                                  INIT_EPOCHS, FT_INIT_LR)
    # ab: preact feat[1:-1] (the pre-ReLU sum of each stage's last block); ft: feat[-2] (the last stage's output)
    assert (list(ab.student), list(ab.teacher)) == (S_PRE, T_PRE)
    assert list(ft.student) == list(ft.teacher) == ["trunk.stages.2"]
    for name, settings in (("ab", ABConfig), ("ft", FTConfig)):
        assert OmegaConf.to_container(OmegaConf.structured(settings)) == OmegaConf.to_container(_cfg(name)), name
        assert set(loss_yaml(name)) == {f.name for f in settings.__dataclass_fields__.values()}, name


def test_the_methods_are_found_by_name():
    cfg = OmegaConf.create({"ab": loss_yaml("ab"), "ft": loss_yaml("ft")})
    assert set(method_names(cfg)) >= {"ab", "ft"}
    assert {m.name: type(m) for m in build_methods(cfg, {}, ["cls"])} == {"ab": ActivationBoundaries,
                                                                          "ft": FactorTransfer}


# ================================================================ AB
# (student, teacher) preact shapes: channels differ at equal sizes (1x1 ConvReg), equal shapes (no
# connector), the student twice the teacher's size (3x3 stride 2) and half of it (transposed conv).
AB_CASES = [
    ([(4, 8, 16, 16), (4, 16, 8, 8), (4, 32, 4, 4)], [(4, 16, 16, 16), (4, 32, 8, 8), (4, 64, 4, 4)]),
    ([(4, 8, 16, 16), (4, 16, 8, 8), (4, 32, 4, 4)], [(4, 8, 16, 16), (4, 32, 4, 4), (4, 64, 8, 8)]),
]


def _ab_method_and_official(s_shapes, t_shapes, **overrides):
    """Our method set up on these shapes, and RepDistiller's Connector with the same weights, both float64."""
    s = {n: randn(*shape, seed=1 + i, scale=1.5) for i, (n, shape) in enumerate(zip(S_PRE, s_shapes))}
    t = {n: randn(*shape, seed=11 + i, scale=1.5) for i, (n, shape) in enumerate(zip(T_PRE, t_shapes))}
    method = _method("ab", **overrides)
    method.setup(s, t)
    method.modules.double()
    connector = OfficialConnector(s_shapes, t_shapes).double()
    for i, n in enumerate(S_PRE):
        ours = method.modules[n.replace(".", "__")]
        assert isinstance(ours, nn.Identity) == isinstance(connector.connectors[i], nn.Sequential)
        assert type(getattr(ours, "conv", None)) is type(getattr(connector.connectors[i], "conv", None))
        connector.connectors[i].load_state_dict(ours.state_dict())
    return method, connector, s, t


@pytest.mark.parametrize("s_shapes, t_shapes", AB_CASES)
def test_ab_init_terms_equal_repdistiller(s_shapes, t_shapes):
    method, connector, s, t = _ab_method_and_official(s_shapes, t_shapes)
    a = {n: v.clone().requires_grad_() for n, v in s.items()}
    b = [v.clone().requires_grad_() for v in s.values()]
    terms = method.init_terms(_out(a), _out(t), {})
    official = OfficialABLoss(3, AB_MARGIN)(connector(b), list(t.values()))   # helper/pretrain.py L63-67
    for n, value in zip(S_PRE, official):
        record("ab (RepDistiller ABLoss, one layer)", terms[f"ab/{n}"], value)
    ours_total, official_total = sum(terms.values()), sum(official)
    record("ab init loss (RepDistiller sum(ABLoss(connector(feat_s[1:-1]), feat_t[1:-1])))", ours_total, official_total)
    ours_total.backward(), official_total.backward()
    for n, y in zip(S_PRE, b):
        record("ab gradient, student preact", a[n].grad, y.grad)
    for i, n in enumerate(S_PRE):
        ours = dict(method.modules[n.replace(".", "__")].named_parameters())
        for key, value in connector.connectors[i].named_parameters():
            record("ab gradient, connector", ours[key].grad, value.grad)


def test_ab_loss_at_the_margins_equals_the_official_criterion():
    """Values on and around -m, 0, m (where the indicators switch) and another margin."""
    grid = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0], dtype=torch.float64)
    source = grid.view(1, 1, 7, 1).expand(2, 3, 7, 7).contiguous()
    target = grid.view(1, 1, 1, 7).expand(2, 3, 7, 7).contiguous()
    for margin in (1.0, 0.5, 0.0):
        official = OfficialABLoss(1, margin)
        record("ab (RepDistiller criterion_alternative_l2 / bsz)", ab_loss(source, target, margin),
               official.criterion_alternative_l2(source, target) / source.shape[0])


def test_ab_adds_no_main_stage_term_unless_asked():
    s_shapes, t_shapes = AB_CASES[0]
    method, connector, s, t = _ab_method_and_official(s_shapes, t_shapes)
    assert method(_out(s), _out(t), {}, {}) == {}                       # helper/loops.py L171-173: loss_kd = 0
    method, connector, s, t = _ab_method_and_official(s_shapes, t_shapes, main_stage=True, weight=2.0)
    connector.eval()                                                   # helper/loops.py L76-77
    terms = method(_out(s), _out(t), {}, {})
    assert not method.modules.training
    official = OfficialABLoss(3)(connector(list(s.values())), list(t.values()))
    for n, value in zip(S_PRE, official):
        record("ab main-stage term (RepDistiller ABLoss, connector in eval mode)", terms[f"ab/{n}"], value)
        assert method.weight(f"ab/{n}", {}) == 2.0
    assert method.param_groups(0.1) == [] and not any(p.requires_grad for p in method.modules.parameters())


def test_ab_init_stage_trains_the_connectors_and_the_student_trunk():
    s_shapes, t_shapes = AB_CASES[0]
    method, _, s, t = _ab_method_and_official(s_shapes, t_shapes)
    student = nn.Module()
    student.trunk, student.heads = nn.Conv2d(1, 1, 1), nn.Conv2d(1, 1, 1)
    modules = method.init_modules(student)
    assert modules[0] is method.modules and modules[1] is student.trunk
    assert (method.init_epochs(), method.init_lr(0.05)) == (INIT_EPOCHS, 0.05)
    assert _method("ab", init_lr=0.2).init_lr(0.05) == 0.2
    with pytest.raises(KdmtlError, match="no `trunk` module"):
        method.init_modules(nn.Conv2d(1, 1, 1))


def test_ab_per_task_teachers_give_one_chain_each_with_its_layer_weights():
    s_shapes, t_shapes = AB_CASES[0]
    s = {n: randn(*shape, seed=1 + i) for i, (n, shape) in enumerate(zip(S_PRE, s_shapes))}
    t = {f"{task}:{n}": randn(*shape, seed=20 + i + 5 * j)
         for j, task in enumerate(("cls", "seg")) for i, (n, shape) in enumerate(zip(T_PRE, t_shapes))}
    method = _method("ab", teacher_tasks=("cls", "seg"))
    method.setup(s, t)
    method.modules.double()
    terms = method.init_terms(_out(s), _out(t), {})
    assert set(terms) == {f"ab/{n}@{task}" for n in S_PRE for task in ("cls", "seg")}
    for task in ("cls", "seg"):
        connector = OfficialConnector(s_shapes, t_shapes).double()
        for i, n in enumerate(S_PRE):
            connector.connectors[i].load_state_dict(method.modules[f"{n}@{task}".replace(".", "__")].state_dict())
        official = OfficialABLoss(3)(connector(list(s.values())), [t[f"{task}:{n}"] for n in T_PRE])
        for n, value in zip(S_PRE, official):
            record("ab (RepDistiller ABLoss, one layer)", terms[f"ab/{n}@{task}"], value)


# ================================================================ FT
FT_CASES = [((4, 16, 8, 8), (4, 32, 8, 8), {}),
            ((4, 16, 8, 8), (4, 24, 4, 4), {}),                                     # pooled: student larger
            ((4, 16, 4, 4), (4, 32, 8, 8), {"p2": 2, "paraphraser_bn": True, "translator_bn": False})]


def _ft_method_and_official(s_shape, t_shape, **overrides):
    f_s, f_t = randn(*s_shape, seed=3, scale=2.0), randn(*t_shape, seed=4, scale=2.0)
    method = _method("ft", student=["trunk.stages.1"], teacher=["trunk.stages.1"], **overrides)
    method.setup({"trunk.stages.1": f_s}, {"trunk.stages.1": f_t})
    method.modules.double()
    cfg = method.cfg
    paraphraser = OfficialParaphraser(t_shape, k=cfg.rate, use_bn=cfg.paraphraser_bn).double()
    translator = OfficialTranslator(s_shape, t_shape, k=cfg.rate, use_bn=cfg.translator_bn).double()
    pair = method.modules["trunk__stages__1"]
    paraphraser.load_state_dict(pair.paraphraser.state_dict())   # the same layout: the keys match
    translator.load_state_dict(pair.translator.state_dict())
    return method, pair, paraphraser, translator, f_s, f_t


@pytest.mark.parametrize("s_shape, t_shape, overrides", FT_CASES)
def test_ft_init_term_equals_repdistiller(s_shape, t_shape, overrides):
    method, pair, paraphraser, _, f_s, f_t = _ft_method_and_official(s_shape, t_shape, **overrides)
    terms = method.init_terms(_out({"trunk.stages.1": f_s}), _out({"trunk.stages.1": f_t}), {})
    _, rec = paraphraser(f_t)                                            # helper/pretrain.py L68-71
    official = nn.MSELoss()(rec, f_t)
    record("ft init (RepDistiller MSELoss(paraphraser(feat_t[-2])[1], feat_t[-2]))", terms["ft/trunk.stages.1"],
           official)
    terms["ft/trunk.stages.1"].backward(), official.backward()
    ours = dict(pair.paraphraser.named_parameters())
    for key, value in paraphraser.named_parameters():
        record("ft init gradient, paraphraser", ours[key].grad, value.grad)
    assert method.init_modules(None) == [pair.paraphraser]
    assert (method.init_epochs(), method.init_lr(0.05)) == (INIT_EPOCHS, FT_INIT_LR)


@pytest.mark.parametrize("s_shape, t_shape, overrides", FT_CASES)
def test_ft_main_term_equals_repdistiller(s_shape, t_shape, overrides):
    method, pair, paraphraser, translator, f_s, f_t = _ft_method_and_official(s_shape, t_shape, **overrides)
    paraphraser.eval()                                                   # helper/loops.py L78-79
    a, b = f_s.clone().requires_grad_(), f_s.clone().requires_grad_()
    terms = method(_out({"trunk.stages.1": a}), _out({"trunk.stages.1": f_t}), {}, {})
    cfg = method.cfg
    official = OfficialFactorTransfer(cfg.p1, cfg.p2)(translator(b), paraphraser(f_t, is_factor=True))
    record("ft (RepDistiller FactorTransfer)", terms["ft/trunk.stages.1"], official)
    assert method.weight("ft/trunk.stages.1", {}) == FT_BETA
    record("ft weighted (RepDistiller -b 200 * FactorTransfer)", FT_BETA * terms["ft/trunk.stages.1"],
           FT_BETA * official, rel=True)
    terms["ft/trunk.stages.1"].backward(), official.backward()
    record("ft gradient, student feature", a.grad, b.grad)
    ours = dict(pair.translator.named_parameters())
    for key, value in translator.named_parameters():
        record("ft gradient, translator", ours[key].grad, value.grad)
    assert not pair.paraphraser.training and all(p.grad is None for p in pair.paraphraser.parameters())


def test_ft_loss_pools_non_square_maps_to_the_common_size():
    s, t = randn(2, 4, 8, 6, seed=5), randn(2, 4, 4, 3, seed=6)
    official = OfficialFactorTransfer()
    expected = (official.factor(F.adaptive_avg_pool2d(s, (4, 3))) - official.factor(t)).abs().mean()
    record("ft (RepDistiller factor, pooled to (min H, min W))", ft_loss(s, t, 2, 1), expected)


def test_ft_trains_the_translators_and_freezes_the_paraphrasers_in_the_main_stage():
    method, pair, *_ = _ft_method_and_official((4, 16, 8, 8), (4, 32, 8, 8))
    groups = method.param_groups(0.1)
    assert [g["lr"] for g in groups] == [0.1]
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in pair.translator.parameters()}
    assert not any(p.requires_grad for p in pair.paraphraser.parameters())


# ================================================================ errors
def test_bad_settings_and_features_fail_at_start():
    for name, key, value, words in (("ab", "init_epochs", -1, "init_epochs must be >= 0"),
                                    ("ab", "init_lr", 0.0, "init_lr must be > 0"),
                                    ("ab", "margin", -0.5, "margin must be >= 0"),
                                    ("ft", "rate", 1.5, "rate must be"),
                                    ("ft", "p1", 0, "p1 must be >= 1")):
        with pytest.raises(KdmtlError, match=words):
            check_ranges(_cfg(name, **{key: value}), {"ab": ABConfig, "ft": FTConfig}[name], _prefix=f"loss.{name}.")
    s = {n: torch.zeros(2, 8, 8, 8) for n in S_PRE}
    with pytest.raises(KdmtlError, match="loss.ab pair .*ConvReg"):     # 3x the size: no ConvReg case
        _method("ab").setup(s, {n: torch.zeros(2, 8, 24, 24) for n in T_PRE})
    with pytest.raises(KdmtlError, match="the teacher has no feature 'trunk.stages.0.1.preact'"):
        _method("ab").setup(s, {})
    f = {"trunk.stages.2": torch.zeros(2, 3, 4, 4)}
    with pytest.raises(KdmtlError, match="loss.ft.rate=0.1: .* 0 factor channels"):
        _method("ft", rate=0.1).setup(f, f)
    with pytest.raises(KdmtlError, match="features must be"):
        _method("ft").setup({"trunk.stages.2": torch.zeros(2, 4)}, f)


# ================================================================ through the real CLI
@pytest.mark.parametrize("loss, methods, extra, expected", [
    ("ab", ["ab"], ["loss.ab.init_epochs=1"], [f"init/ab/{n}" for n in S_PRE]),
    ("ft", ["ft"], ["loss.ft.init_epochs=1"], ["init/ft/trunk.stages.2", "train/ft/trunk.stages.2"])])
def test_cli_train_with_the_method(loss, methods, extra, expected, workdir, shared_cache):
    run_dir = train_logs_finite_terms(loss, methods, workdir, shared_cache, extra=extra)
    assert_terms_logged(run_dir, loss, expected)


def test_cli_bad_init_setting_is_one_line(workdir, shared_cache):
    proc = run_kdmtl(["train", "loss=ab", "loss.ab.init_lr=0", *FAST, f"hydra.run.dir={workdir / 'bad'}"],
                     workdir, shared_cache)
    assert_one_line_error(proc, "loss.ab.init_lr", "> 0")
