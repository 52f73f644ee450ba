"""`ofd` (kdmtl_cli/distill/ofd.py) against the official code, in float64.

The `official_*` code below is transcribed (not from kdmtl's code) from

- clovaai/overhaul-distillation 76344a8, CIFAR-100/distiller.py: `distillation_loss` (L9-13),
  `build_feature_connector` (L15-27), `get_margin_from_BN` (L29-41), `Distiller.forward`'s loop
  (L66-70: each feature's loss / 2 ** (feat_num - i - 1));
- its CIFAR-100/train_with_distillation.py L91: `loss = loss_CE + loss_distill.sum() / batch_size / 1000`;
- megvii-research/mdistiller a08d46f, mdistiller/distillers/OFD.py: `feat_loss` (L11-19) and the
  teacher pooled to the connector output's size in `ofd_loss` (L154-160); engine/cfg.py L99-105 (OFD).

Transcription change: get_margin_from_BN returns `torch.tensor(margin, dtype=torch.float64)` instead
of `torch.FloatTensor(margin)` so that the float64 comparison is not limited by float32 rounding.

Every comparison is at 1e-9 (abs, or rel for large values) on random float64 inputs; the max abs
difference of each is printed (`pytest -s`) as `official-diff <what>: <value>`.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import OmegaConf
from scipy.stats import norm

from distill_checks import (assert_same_terms, assert_terms_logged, build_method, loss_yaml, randn, record_diff,
                            resume_equals_straight, settings_from_yaml, train_logs_finite_terms)
from kdmtl_cli.distill import build_methods, method_names
from kdmtl_cli.distill.ofd import OFDConfig, OverhaulFeatureDistillation, margins_from_bn, ofd_loss
from kdmtl_cli.errors import KdmtlError
from kdmtl_cli.models.cifar_resnet import CifarResNetTrunk
from kdmtl_cli.models.convnet import ConvNetTrunk
from kdmtl_cli.teachers import TaskTeachers

ATOL = 1e-9
pytestmark = pytest.mark.usefixtures("one_thread")

STUDENT = [f"trunk.stages.{i}.0.preact" for i in range(3)]
TEACHER = [f"trunk.stages.{i}.1.preact" for i in range(3)]
TEACHER_BN = [f"trunk.stages.{i}.1.conv2.1" for i in range(3)]

# ================================================================ official defaults, transcribed
# clovaai train_with_distillation.py L91: `loss_distill.sum() / batch_size / 1000`
CLOVAAI_DIVISOR = 1000
# mdistiller engine/cfg.py L102-105: CE_WEIGHT 1.0, FEAT_WEIGHT 0.001, CONNECTOR.KERNEL_SIZE 1
# (configs/cifar100/ofd.yaml has no OFD section: these hold for the CIFAR-100 benchmark)
MDISTILLER_CE_WEIGHT = 1.0
MDISTILLER_FEAT_WEIGHT = 0.001
MDISTILLER_KERNEL_SIZE = 1
# clovaai distiller.py L69-70 (mdistiller OFD.py L160): `/ 2 ** (feat_num - i - 1)`
STAGE_DIVISOR_BASE = 2


# ================================================================ official code, transcribed
# clovaai CIFAR-100/distiller.py L9-13
def official_distillation_loss(source, target, margin):
    target = torch.max(target, margin)
    loss = torch.nn.functional.mse_loss(source, target, reduction="none")
    loss = loss * ((source > target) | (target > 0)).float()
    return loss.sum()


# clovaai CIFAR-100/distiller.py L15-27
def official_build_feature_connector(t_channel, s_channel):
    C = [nn.Conv2d(s_channel, t_channel, kernel_size=1, stride=1, padding=0, bias=False),
         nn.BatchNorm2d(t_channel)]

    for m in C:
        if isinstance(m, nn.Conv2d):
            n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            m.weight.data.normal_(0, math.sqrt(2. / n))
        elif isinstance(m, nn.BatchNorm2d):
            m.weight.data.fill_(1)
            m.bias.data.zero_()

    return nn.Sequential(*C)


# clovaai CIFAR-100/distiller.py L29-41 (float64 instead of FloatTensor, see the module docstring)
def official_get_margin_from_BN(bn):
    margin = []
    std = bn.weight.data
    mean = bn.bias.data
    for (s, m) in zip(std, mean):
        s = abs(s.item())
        m = m.item()
        if norm.cdf(-m / s) > 0.001:
            margin.append(- s * math.exp(- (m / s) ** 2 / 2) / math.sqrt(2 * math.pi) / norm.cdf(-m / s) + m)
        else:
            margin.append(-3 * s)

    return torch.tensor(margin, dtype=torch.float64).to(std.device)


# clovaai Distiller.__init__ L55: the margin buffer's shape
def official_margin_buffer(bn):
    return official_get_margin_from_BN(bn).unsqueeze(1).unsqueeze(2).unsqueeze(0).detach()


# clovaai Distiller.forward L64-70 (features and margins given) and train_with_distillation.py L91
def official_distiller_loss(connectors, s_feats, t_feats, margins):
    feat_num = len(t_feats)
    loss_distill = 0
    for i in range(feat_num):
        s_feat = connectors[i](s_feats[i])
        loss_distill += official_distillation_loss(s_feat, t_feats[i].detach(), margins[i]) / 2 ** (feat_num - i - 1)
    batch_size = s_feats[0].shape[0]
    return loss_distill.sum() / batch_size / 1000


# mdistiller mdistiller/distillers/OFD.py L11-19
def official_feat_loss(source, target, margin):
    margin = margin.to(source)
    loss = (
        (source - margin) ** 2 * ((source > margin) & (target <= margin)).float()
        + (source - target) ** 2
        * ((source > target) & (target > margin) & (target <= 0)).float()
        + (source - target) ** 2 * (target > 0).float()
    )
    return torch.abs(loss).mean(dim=0).sum()


# ================================================================ helpers
record = functools.partial(record_diff, atol=ATOL)


class Wrapped(nn.Module):
    """A teacher whose modules sit under `trunk.` as in kdmtl's models."""

    def __init__(self, trunk: nn.Module):
        super().__init__()
        self.trunk = trunk


def _convnet_teacher(width=4, seed=0):
    """The default teacher's layout (convnet, depth 2, 3 stages), its BNs set to random affine
    parameters with mixed-sign means (so both margin branches run)."""
    torch.manual_seed(seed)
    teacher = Wrapped(ConvNetTrunk(width, 2, 3))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in teacher.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.randn(m.num_features, generator=g) * 0.7)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 2.0)
                m.bias[0] = 5.0 * abs(float(m.weight[0])) + 0.1     # Phi(-m / s) < 0.001: the -3 s branch
    return teacher.double()


def _cfg(**overrides):
    return settings_from_yaml(OFDConfig, "ofd", **overrides)


def _method(bound=None, teacher_tasks=("cls",), **overrides):
    """The method from its YAML (plus `overrides`), bound to the teacher module `bound` if given."""
    method = build_method(OverhaulFeatureDistillation, OFDConfig, "ofd", {}, teacher_tasks, **overrides)
    if bound is not None:
        method.bind_teacher(bound)
    return method


def _features(batch, s_channels, t_channels, s_sizes, t_sizes, seed=0):
    s = {n: randn(batch, c, h, h, seed=seed + i, scale=2.0)
         for i, (n, c, h) in enumerate(zip(STUDENT, s_channels, s_sizes))}
    t = {n: randn(batch, c, h, h, seed=seed + 10 + i, scale=1.5)
         for i, (n, c, h) in enumerate(zip(TEACHER, t_channels, t_sizes))}
    return s, t


def _randomise(method, seed=5):
    """Move every connector off its start (conv weights, BN affine) so that the comparison is not trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in method.modules.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)


def _officials(method, kernel_size=1):
    """clovaai connectors (kernel 1) or mdistiller's (kernel k) holding the method's parameters."""
    connectors = []
    for term in method.terms:
        ours = method.modules[term.key]
        conv = ours[0]
        if kernel_size == 1:
            official = official_build_feature_connector(conv.out_channels, conv.in_channels)
        else:   # mdistiller OFD.py L41-60 ConnectorConvBN._build_feature_connector
            official = nn.Sequential(nn.Conv2d(conv.in_channels, conv.out_channels, kernel_size=kernel_size, stride=1,
                                               padding=(kernel_size - 1) // 2, bias=False),
                                     nn.BatchNorm2d(conv.out_channels))
        official = official.double()
        official.load_state_dict(ours.state_dict())
        connectors.append(official)
    return connectors


def _terms_and_total(method, s_feats, t_feats):
    terms = method({"features": s_feats}, {"features": t_feats}, {}, {})
    return terms, sum(method.weight(name, {}) * value for name, value in terms.items())


# ================================================================ YAML defaults = official
def test_yaml_defaults_are_the_official_ones():
    cfg = _cfg()
    assert cfg.weight == 1 / CLOVAAI_DIVISOR == MDISTILLER_FEAT_WEIGHT
    assert cfg.stage_decay == 1 / STAGE_DIVISOR_BASE
    assert cfg.connector_kernel == MDISTILLER_KERNEL_SIZE
    # pre-ReLU maps of each stage's last block (student small: depth 1; teacher multitask: depth 2)
    assert list(cfg.student) == STUDENT and list(cfg.teacher) == TEACHER and list(cfg.teacher_bn) == TEACHER_BN
    assert OmegaConf.to_container(OmegaConf.structured(OFDConfig)) == OmegaConf.to_container(cfg)
    assert set(loss_yaml("ofd")) == {f.name for f in OFDConfig.__dataclass_fields__.values()}
    # the CE weight mdistiller uses beside it is kdmtl's default task weight
    from kdmtl_cli.schema import LossConfig
    assert OmegaConf.structured(LossConfig).task_weight == MDISTILLER_CE_WEIGHT


def test_the_default_paths_exist_in_the_default_models():
    """student=small (convnet width 16, depth 1) and teacher=multitask (width 32, depth 2): the named
    modules exist, the BNs are those before each stage's last ReLU, channels agree."""
    student, teacher = Wrapped(ConvNetTrunk(16, 1, 3)), Wrapped(ConvNetTrunk(32, 2, 3))
    s_mods, t_mods = dict(student.named_modules()), dict(teacher.named_modules())
    for s, t, bn, channels in zip(STUDENT, TEACHER, TEACHER_BN, (32, 64, 128)):
        assert s in s_mods and t in t_mods
        assert isinstance(t_mods[bn], nn.BatchNorm2d) and t_mods[bn].num_features == channels
        block = t_mods[t.rpartition(".")[0]]
        assert block.conv2[1] is t_mods[bn]


def test_the_method_is_found_by_name():
    cfg = OmegaConf.create({"ofd": loss_yaml("ofd")})
    assert "ofd" in method_names(cfg)
    assert [type(m) for m in build_methods(cfg, {}, ["cls"])] == [OverhaulFeatureDistillation]


# ================================================================ margins and connectors
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_margins_equal_get_margin_from_bn(seed):
    g = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(64).double()
    with torch.no_grad():
        bn.weight.copy_(torch.randn(64, generator=g, dtype=torch.float64))          # signs mixed: |s| used
        bn.bias.copy_(torch.randn(64, generator=g, dtype=torch.float64) * 3.0)      # means of both signs
    s, m = bn.weight.detach().abs(), bn.bias.detach()
    p = torch.tensor([norm.cdf(-mi / si) for si, mi in zip(s.tolist(), m.tolist())])
    assert (p > 0.001).any() and (p <= 0.001).any(), "both margin branches must run"
    assert (m > 0).any() and (m < 0).any()
    ours = margins_from_bn(bn.weight, bn.bias)
    assert ours.dtype == torch.float64
    record("margin (clovaai get_margin_from_BN)", ours, official_get_margin_from_BN(bn))
    assert (ours < 0).all()   # every margin negative: why mdistiller's feat_loss equals clovaai's loss


def test_a_zero_bn_weight_gives_the_limit_margin():
    weight = torch.tensor([0.0, 0.0, 0.0, 1e-12, 1e-12], dtype=torch.float64)
    bias = torch.tensor([-0.5, 0.0, 0.7, -0.5, 0.7], dtype=torch.float64)
    margins = margins_from_bn(weight, bias)
    assert torch.isfinite(margins).all()
    assert margins.tolist()[:3] == [-0.5, 0.0, 0.0]
    assert margins[3] == pytest.approx(-0.5, abs=1e-9) and margins[4] == pytest.approx(0.0, abs=1e-9)


def test_connectors_start_as_build_feature_connector():
    """Same layers, state-dict keys and (same seed) the same drawn weights as clovaai's connector."""
    teacher = _convnet_teacher().float()
    s_feats, t_feats = _features(2, (3, 5, 7), (4, 8, 16), (8, 4, 2), (8, 4, 2))
    s_feats = {k: v.float() for k, v in s_feats.items()}
    t_feats = {k: v.float() for k, v in t_feats.items()}
    torch.manual_seed(3)
    method = _method(teacher)
    method.setup(s_feats, t_feats)
    torch.manual_seed(3)
    officials = [official_build_feature_connector(t, s) for t, s in zip((4, 8, 16), (3, 5, 7))]
    for term, official in zip(method.terms, officials):
        ours = method.modules[term.key].state_dict()
        assert list(ours) == list(official.state_dict())          # margins are not saved
        for key, value in official.state_dict().items():
            assert torch.equal(ours[key], value), (term.name, key)


# ================================================================ value and gradients
def _prepared(teacher, s_feats, t_feats):
    """kdmtl's ofd set up on these features (float64, random connector weights), the official connectors
    with the same weights, and the official margins read from the teacher's BNs."""
    method = _method(teacher)
    method.setup(s_feats, t_feats)
    method.modules.double()
    _randomise(method)
    modules = dict(teacher.named_modules())
    return method, _officials(method), [official_margin_buffer(modules[bn]) for bn in TEACHER_BN]


@pytest.mark.parametrize("s_channels, t_channels, sizes", [
    ((4, 8, 16), (4, 8, 16), (8, 4, 2)),       # same widths
    ((3, 5, 7), (4, 8, 16), (8, 4, 2)),        # narrower student
    ((6, 9, 20), (4, 8, 16), (6, 3, 3)),       # wider student
])
def test_ofd_equals_clovaai(s_channels, t_channels, sizes):
    teacher = _convnet_teacher()
    s_feats, t_feats = _features(5, s_channels, t_channels, sizes, sizes, seed=20)
    method, connectors, margins = _prepared(teacher, s_feats, t_feats)
    for term, margin in zip(method.terms, margins):
        record("margin buffer (clovaai Distiller margin<i>)", method.modules[term.key].margin, margin)
    terms, total = _terms_and_total(method, s_feats, t_feats)     # connector BNs in train mode, as the official
    assert list(terms) == [f"ofd/{n}" for n in STUDENT]
    reference = official_distiller_loss(connectors, [s_feats[n] for n in STUDENT], [t_feats[n] for n in TEACHER],
                                        margins)
    record("ofd method (clovaai loss_distill.sum() / batch_size / 1000)", total, reference, rel=True)
    # the running statistics of the connectors' BNs moved as the official ones (one forward each)
    for term, connector in zip(method.terms, connectors):
        record("connector BN running_var", method.modules[term.key][1].running_var, connector[1].running_var)
    for i, (term, connector, margin) in enumerate(zip(method.terms, connectors, margins)):
        source, target = connector(s_feats[term.student]), t_feats[term.teacher]
        per_sample = official_distillation_loss(source, target, margin) / 5
        record("ofd term (clovaai distillation_loss / N)", terms[term.name], per_sample, rel=True)
        record("ofd term (mdistiller feat_loss)", terms[term.name], official_feat_loss(source, target, margin),
               rel=True)
        assert method.weight(term.name, {}) == pytest.approx(1e-3 / 2 ** (2 - i), rel=1e-15)


@pytest.mark.parametrize("kernel, s_size, t_size", [(1, 4, 8), (3, 8, 4), (3, 6, 6), (2, 5, 4)])
def test_ofd_pools_the_teacher_and_takes_a_kernel_as_mdistiller(kernel, s_size, t_size):
    teacher = _convnet_teacher(seed=1)
    s_feats, t_feats = _features(3, (5, 6, 7), (4, 8, 16), (s_size,) * 3, (t_size,) * 3, seed=40)
    method = _method(teacher, connector_kernel=kernel)
    method.setup(s_feats, t_feats)
    method.modules.double()
    _randomise(method)
    connectors = _officials(method, kernel_size=kernel)
    modules = dict(teacher.named_modules())
    terms, _ = _terms_and_total(method, s_feats, t_feats)
    for term, connector, bn in zip(method.terms, connectors, TEACHER_BN):
        source = connector(s_feats[term.student])
        target = F.adaptive_avg_pool2d(t_feats[term.teacher], source.shape[-2:]).detach()   # OFD.py L156-158
        record("ofd term (mdistiller feat_loss, pooled teacher)", terms[term.name],
               official_feat_loss(source, target, official_margin_buffer(modules[bn])), rel=True)


def test_ofd_gradients_reach_the_student_and_the_connector_as_clovaai():
    teacher = _convnet_teacher(seed=2)
    s_feats, t_feats = _features(4, (3, 5, 7), (4, 8, 16), (6, 3, 2), (6, 3, 2), seed=60)
    method, connectors, margins = _prepared(teacher, s_feats, t_feats)
    ours_in = {n: v.clone().requires_grad_() for n, v in s_feats.items()}
    theirs_in = {n: v.clone().requires_grad_() for n, v in s_feats.items()}
    _, total = _terms_and_total(method, ours_in, t_feats)
    reference = official_distiller_loss(connectors, [theirs_in[n] for n in STUDENT], [t_feats[n] for n in TEACHER],
                                        margins)
    total.backward(), reference.backward()
    for n in STUDENT:
        record("ofd gradient, student feature", ours_in[n].grad, theirs_in[n].grad)
    for term, connector in zip(method.terms, connectors):
        ours, theirs = dict(method.modules[term.key].named_parameters()), dict(connector.named_parameters())
        assert set(ours) == set(theirs) == {"0.weight", "1.weight", "1.bias"}
        for name, p in ours.items():
            record(f"ofd gradient, connector {name}", p.grad, theirs[name].grad)


def test_ofd_loss_function_alone_equals_clovaai():
    """ofd_loss with an identity-like connector in eval mode: the partial L2 itself, per sample."""
    teacher = _convnet_teacher(seed=3)
    s_feats, t_feats = _features(6, (4, 8, 16), (4, 8, 16), (5, 5, 5), (5, 5, 5), seed=80)
    method = _method(teacher)
    method.setup(s_feats, t_feats)
    method.modules.double().eval()
    _randomise(method)
    for term in method.terms:
        connector = method.modules[term.key]
        source = connector(s_feats[term.student])
        record("ofd_loss (clovaai distillation_loss / N)", ofd_loss(s_feats[term.student], t_feats[term.teacher],
                                                                    connector),
               official_distillation_loss(source, t_feats[term.teacher], connector.margin) / 6, rel=True)


# ================================================================ margins read from the named BN
def test_margins_are_read_from_the_named_bn_of_a_cifar_resnet():
    """A resnet8 teacher (one block per stage): teacher_bn trunk.stages.<i>.0.bn2 = clovaai's
    get_bn_before_relu (layer<i>[-1].bn2); the margins follow that BN and no other."""
    torch.manual_seed(0)
    teacher = Wrapped(CifarResNetTrunk(8, [16, 16, 32, 64])).double()
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for m in teacher.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.randn(m.num_features, generator=g, dtype=torch.float64))
                m.bias.copy_(torch.randn(m.num_features, generator=g, dtype=torch.float64) * 2)
    names = [f"trunk.stages.{i}.0.preact" for i in range(3)]
    bns = [f"trunk.stages.{i}.0.bn2" for i in range(3)]
    # the teacher's own pre-ReLU maps, captured by hooks on the preact modules
    modules = dict(teacher.named_modules())
    captured = {}
    hooks = [modules[n].register_forward_hook(lambda _m, _i, out, n=n: captured.__setitem__(n, out)) for n in names]
    teacher.trunk(randn(2, 3, 8, 8, seed=12))
    for h in hooks:
        h.remove()
    s_feats = {n: randn(*captured[n].shape, seed=13 + i) for i, n in enumerate(STUDENT)}
    method = _method(teacher, teacher=names, teacher_bn=bns)
    method.setup(s_feats, captured)
    for term, bn in zip(method.terms, bns):
        record("margin from the named CIFAR-ResNet bn2", method.modules[term.key].margin,
               official_margin_buffer(modules[bn]))
        other = official_margin_buffer(modules[bn.replace("bn2", "bn1")])
        assert not torch.allclose(method.modules[term.key].margin, other)
    # changing the BN changes the margins at the next set-up (they are read, not cached)
    with torch.no_grad():
        modules[bns[0]].bias.add_(1.0)
    method = _method(teacher, teacher=names, teacher_bn=bns)
    method.setup(s_feats, captured)
    record("margin from the named CIFAR-ResNet bn2", method.modules[method.terms[0].key].margin,
           official_margin_buffer(modules[bns[0]]))


def test_per_task_teachers_read_each_tasks_bn():
    teachers = TaskTeachers({"cls": _convnet_teacher(seed=4), "seg": _convnet_teacher(seed=5)})
    s_feats = {STUDENT[2]: randn(2, 8, 2, 2, seed=90)}
    t_feats = {f"{task}:{TEACHER[2]}": randn(2, 16, 2, 2, seed=91 + k) for k, task in enumerate(("cls", "seg"))}
    method = _method(teachers, teacher_tasks=("cls", "seg"), student=[STUDENT[2]], teacher=[TEACHER[2]],
                     teacher_bn=[TEACHER_BN[2]])
    method.setup(s_feats, t_feats)
    assert [t.name for t in method.terms] == [f"ofd/{STUDENT[2]}@cls", f"ofd/{STUDENT[2]}@seg"]
    for term, task in zip(method.terms, ("cls", "seg")):
        bn = dict(teachers.teachers[task].named_modules())[TEACHER_BN[2]]
        record("margin from the task's teacher", method.modules[term.key].margin, official_margin_buffer(bn))
        assert method.weight(term.name, {}) == 1e-3       # one pair: the last stage, divided by 2 ** 0
    # a prefixed BN reads that teacher for the pair
    method = _method(teachers, teacher_tasks=("cls", "seg"), student=[STUDENT[2]], teacher=[f"seg:{TEACHER[2]}"],
                     teacher_bn=[f"seg:{TEACHER_BN[2]}"])
    method.setup(s_feats, t_feats)
    bn = dict(teachers.teachers["seg"].named_modules())[TEACHER_BN[2]]
    record("margin from the task's teacher", method.modules[method.terms[0].key].margin, official_margin_buffer(bn))


# ================================================================ one-line errors
def _one_line(excinfo):
    assert "\n" not in str(excinfo.value), str(excinfo.value)


@pytest.mark.parametrize("overrides, match", [
    ({"teacher_bn": ["trunk.stages.0.1.conv2.9", TEACHER_BN[1], TEACHER_BN[2]]},
     "has no module 'trunk.stages.0.1.conv2.9'"),
    ({"teacher_bn": ["trunk.stages.0.1.conv2.0", TEACHER_BN[1], TEACHER_BN[2]]}, "is a Conv2d, not a BatchNorm2d"),
    ({"teacher_bn": [TEACHER_BN[1], TEACHER_BN[1], TEACHER_BN[2]]}, r"has 8 channels, the teacher feature .* 4"),
    ({"teacher_bn": ["cls:" + TEACHER_BN[0], TEACHER_BN[1], TEACHER_BN[2]]}, "task prefix, but the teacher is one"),
    ({"teacher_bn": [TEACHER_BN[0] + "/0", TEACHER_BN[1], TEACHER_BN[2]]}, "without /<i>"),
])
def test_bad_teacher_bn_fails_in_one_line(overrides, match):
    s_feats, t_feats = _features(2, (3, 5, 7), (4, 8, 16), (4, 2, 1), (4, 2, 1))
    with pytest.raises(KdmtlError, match=match) as excinfo:
        _method(_convnet_teacher(), **overrides).setup(s_feats, t_feats)
    _one_line(excinfo)


def test_other_bad_settings_fail_in_one_line():
    s_feats, t_feats = _features(2, (3, 5, 7), (4, 8, 16), (4, 2, 1), (4, 2, 1))
    with pytest.raises(KdmtlError, match="one teacher batch-norm per pair") as excinfo:
        _method(_convnet_teacher(), teacher_bn=TEACHER_BN[:2])
    _one_line(excinfo)
    with pytest.raises(KdmtlError, match="bind_teacher must come before setup") as excinfo:
        _method().setup(s_feats, t_feats)
    _one_line(excinfo)
    with pytest.raises(KdmtlError, match="features must be") as excinfo:
        _method(_convnet_teacher()).setup({**s_feats, STUDENT[0]: torch.zeros(2, 3)}, t_feats)
    _one_line(excinfo)
    affine_free = _convnet_teacher()
    affine_free.trunk.stages[0][1].conv2[1] = nn.BatchNorm2d(4, affine=False).double()
    with pytest.raises(KdmtlError, match="affine=False") as excinfo:
        _method(affine_free).setup(s_feats, t_feats)
    _one_line(excinfo)
    teachers = TaskTeachers({"cls": _convnet_teacher(seed=4), "seg": _convnet_teacher(seed=5)})
    with pytest.raises(KdmtlError, match=r"task prefix differs from the teacher feature.s \(cls\)") as excinfo:
        method = _method(teachers, teacher_tasks=("cls", "seg"), student=[STUDENT[2]], teacher=[TEACHER[2]],
                         teacher_bn=["det:" + TEACHER_BN[2]])
        method.setup({STUDENT[2]: randn(2, 8, 2, 2)}, {f"cls:{TEACHER[2]}": randn(2, 16, 2, 2)})
    _one_line(excinfo)


# ================================================================ learned parts and state
def test_connectors_are_trained_and_a_state_dict_restores_them():
    teacher = _convnet_teacher().float()
    s_feats, t_feats = _features(4, (3, 5, 7), (4, 8, 16), (4, 2, 2), (4, 2, 2), seed=100)
    s_feats = {k: v.float() for k, v in s_feats.items()}
    t_feats = {k: v.float() for k, v in t_feats.items()}
    torch.manual_seed(0)
    method = _method(teacher)
    method.setup(s_feats, t_feats)
    params = method.param_groups(0.1)
    assert len(params) == 1 and len(params[0]["params"]) == 3 * 3     # per pair: conv weight, BN weight and bias
    optimizer = torch.optim.SGD(params, lr=0.1)
    before = {k: v.clone() for k, v in method.modules.state_dict().items()}
    _, total = _terms_and_total(method, s_feats, t_feats)
    total.backward()
    optimizer.step()
    state = method.modules.state_dict()
    assert not any(k.endswith("margin") for k in state)
    for key in state:
        if not key.endswith("num_batches_tracked"):
            assert not torch.equal(state[key], before[key]), key
    torch.manual_seed(1)
    fresh = _method(teacher)
    fresh.setup(s_feats, t_feats)
    fresh.modules.load_state_dict(state)
    method.modules.eval(), fresh.modules.eval()
    assert_same_terms(method, fresh, s_feats, t_feats)


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_are_computed_in_float32_even_under_autocast(low):
    teacher = _convnet_teacher().float()
    s_feats, t_feats = _features(4, (3, 5, 7), (4, 8, 16), (4, 2, 2), (4, 2, 2), seed=120)
    method = _method(teacher)
    method.setup({k: v.float() for k, v in s_feats.items()}, {k: v.float() for k, v in t_feats.items()})
    method.modules.eval()
    term = method.terms[0]
    f_s, f_t = s_feats[term.student].to(low), t_feats[term.teacher].to(low)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = ofd_loss(f_s, f_t, method.modules[term.key])
    assert ours.dtype == torch.float32
    connector = method.modules[term.key].double()
    reference = official_distillation_loss(connector(f_s.double()), f_t.double(), connector.margin) / 4
    assert float(ours.detach()) == pytest.approx(float(reference.detach()), rel=1e-4)


# ================================================================ through the real CLI
def test_cli_train_with_the_method(workdir, shared_cache):
    run_dir = train_logs_finite_terms("ofd", ["ofd"], workdir, shared_cache)
    assert_terms_logged(run_dir, "ofd", [f"ofd/{n}" for n in STUDENT])


@pytest.mark.slow
def test_cli_resume_restores_the_connectors(workdir, shared_cache):
    """An interrupted `loss=ofd` run, resumed, ends with the connectors of the uninterrupted run, bit for bit."""
    key = "ofd.trunk__stages__0__0__preact"
    after_one, reference, resumed = resume_equals_straight("ofd", workdir, shared_cache,
                                                           trained=[f"{key}.0.weight", f"{key}.1.running_mean"])
    assert {k.split(".", 1)[0] for k in after_one["objective"]} == {"ofd"}
    assert not any(k.endswith("margin") for k in after_one["objective"])
    assert resumed["epoch"] == reference["epoch"] == 2
