"""Distillation losses of kdmtl_cli/distill/functional.py (DKD, AT, FitNet, KD4MTL, BAM) against
numbers computed by hand here, with plain Python loops and math.exp on explicit tiny tensors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hand import hand_at_loss, hand_attention, hand_kd4mtl, kl, softmax
from kdmtl_cli.distill.functional import (
    ConvReg,
    HintRegressor,
    TaskAdaptor,
    at_loss,
    attention_map,
    bam_loss,
    bam_targets,
    dkd_loss,
    hint_loss,
    kd4mtl_loss,
)


# ---------------------------------------------------------------- hand-written helpers
def dkd_parts(s_row, t_row, g, t):
    """(TCKD, NCKD) of one sample, straight from the paper's definitions (no T^2)."""
    ps, pt = softmax(s_row, t), softmax(t_row, t)
    tckd = kl([pt[g], 1 - pt[g]], [ps[g], 1 - ps[g]])
    qs = [ps[c] / (1 - ps[g]) for c in range(len(s_row)) if c != g]
    qt = [pt[c] / (1 - pt[g]) for c in range(len(t_row)) if c != g]
    return tckd, kl(qt, qs)


def tensor(values):
    return torch.tensor(values, dtype=torch.float32)


# ------------------------------------------------------------------------------- DKD
S2 = [[1.0, 2.0, 0.5], [0.2, -1.0, 3.0]]
T2 = [[2.0, 0.5, -0.5], [1.0, 0.0, 2.5]]
Y2 = [0, 2]


def test_dkd_two_samples_three_classes_by_hand():
    temp, alpha, beta = 2.0, 1.5, 8.0
    parts = [dkd_parts(s, t, g, temp) for s, t, g in zip(S2, T2, Y2)]
    tckd = sum(p[0] for p in parts) / 2
    nckd = sum(p[1] for p in parts) / 2
    assert tckd > 0 and nckd > 0
    s, t, y = tensor(S2), tensor(T2), torch.tensor(Y2)
    got = dkd_loss(s, t, y, alpha=alpha, beta=beta, temperature=temp)
    assert got.item() == pytest.approx((alpha * tckd + beta * nckd) * temp * temp, rel=1e-5)
    # Each part on its own.
    assert dkd_loss(s, t, y, 1.0, 0.0, temp).item() == pytest.approx(tckd * temp * temp, rel=1e-5)
    assert dkd_loss(s, t, y, 0.0, 1.0, temp).item() == pytest.approx(nckd * temp * temp, rel=1e-5)


def test_dkd_parts_recompose_classical_kd_by_hand():
    # The paper's Eq. (7): KL(p_t || p_s) = TCKD + (1 - p_t[g]) * NCKD, per sample.
    temp = 3.0
    for s, t, g in zip(S2, T2, Y2):
        tckd, nckd = dkd_parts(s, t, g, temp)
        p_t = softmax(t, temp)
        expected_kd = kl(p_t, softmax(s, temp))
        assert tckd + (1 - p_t[g]) * nckd == pytest.approx(expected_kd, rel=1e-9)
        got = dkd_loss(tensor([s]), tensor([t]), torch.tensor([g]), 1.0, 1.0 - p_t[g], temp)
        assert got.item() == pytest.approx(expected_kd * temp * temp, rel=1e-5)


def test_dkd_is_zero_when_student_equals_teacher():
    logits = tensor(S2)
    assert dkd_loss(logits, logits.clone(), torch.tensor(Y2), 1.0, 8.0, 4.0).item() == pytest.approx(0.0, abs=1e-7)
    dense = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    target = torch.randint(0, 4, (2, 3, 3), generator=torch.Generator().manual_seed(1))
    assert dkd_loss(dense, dense.clone(), target, 1.0, 8.0, 1.0).item() == pytest.approx(0.0, abs=1e-7)


def test_dkd_per_pixel_ignores_255():
    temp, alpha, beta = 1.5, 1.0, 2.0
    # N=1, C=3, H=1, W=3: pixel w holds the class vector [c0, c1, c2].
    s_pixels = [[1.0, 2.0, 0.5], [9.0, -4.0, 0.0], [0.2, -1.0, 3.0]]
    t_pixels = [[2.0, 0.5, -0.5], [0.0, 5.0, 1.0], [1.0, 0.0, 2.5]]
    labels = [0, 255, 2]
    expected = 0.0
    for s, t, g in zip(s_pixels, t_pixels, labels):
        if g == 255:
            continue
        tckd, nckd = dkd_parts(s, t, g, temp)
        expected += (alpha * tckd + beta * nckd) * temp * temp
    expected /= 2  # two valid pixels

    def dense(pixels):  # [W][C] -> [1, C, 1, W]
        return tensor([[[[pixels[w][c] for w in range(3)]] for c in range(3)]])

    student = dense(s_pixels).requires_grad_(True)
    target = torch.tensor([[labels]])
    got = dkd_loss(student, dense(t_pixels), target, alpha, beta, temp)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    got.backward()
    assert torch.all(student.grad[0, :, 0, 1] == 0)  # the ignored pixel gets no gradient
    assert torch.any(student.grad[0, :, 0, 0] != 0)


def test_dkd_all_pixels_ignored_is_zero_and_backpropagates():
    student = torch.randn(1, 3, 2, 2, requires_grad=True)
    target = torch.full((1, 2, 2), 255)
    loss = dkd_loss(student, torch.randn(1, 3, 2, 2), target, 1.0, 8.0, 4.0)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.all(student.grad == 0)


def test_dkd_confident_logits_stay_finite():
    student = tensor([[50.0, -50.0, 0.0], [0.0, 0.0, 0.0]]).requires_grad_(True)
    teacher = tensor([[200.0, -100.0, 0.0], [-80.0, 80.0, 0.0]])
    loss = dkd_loss(student, teacher, torch.tensor([0, 1]), 1.0, 8.0, 1.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=0.0), "temperature must be > 0"),
    (dict(temperature=-1.0), "temperature must be > 0"),
    (dict(temperature=float("nan")), "temperature must be finite"),
    (dict(alpha=-1.0), "alpha must be >= 0"),
    (dict(beta=float("inf")), "beta must be finite"),
    (dict(teacher=torch.zeros(2, 4)), "shapes must match"),
    (dict(target=torch.tensor([0, 1, 2])), "target must have shape"),
    (dict(target=torch.tensor([0.0, 1.0])), "integer class indices"),
    (dict(target=torch.tensor([0, 255])), "class indices in [0, 3)"),  # no ignore for [N, C]
    (dict(student=torch.zeros(2, 1), teacher=torch.zeros(2, 1), target=torch.tensor([0, 0])),
     "at least 2 classes"),
])
def test_dkd_rejects_invalid_arguments(kwargs, message):
    args = dict(student=tensor(S2), teacher=tensor(T2), target=torch.tensor(Y2),
                alpha=1.0, beta=8.0, temperature=4.0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace(")", r"\)")):
        dkd_loss(args["student"], args["teacher"], args["target"], args["alpha"], args["beta"],
                 args["temperature"])


# -------------------------------------------------------------------------------- AT
def test_attention_map_by_hand():
    feature = [[[1.0, -2.0]], [[3.0, 0.0]]]  # [C=2][H=1][W=2]
    x = tensor([feature])
    # p = 2: mean_c f^2 = [(1 + 9) / 2, (4 + 0) / 2] = [5, 2], norm sqrt(29).
    assert attention_map(x, 2.0)[0].tolist() == pytest.approx([5 / math.sqrt(29), 2 / math.sqrt(29)], rel=1e-6)
    # p = 1 uses f, not |f| (RepDistiller's f.pow(p)): [(1 + 3) / 2, (-2 + 0) / 2] = [2, -1], norm sqrt(5).
    assert attention_map(x, 1.0)[0].tolist() == pytest.approx([2 / math.sqrt(5), -1 / math.sqrt(5)], rel=1e-6)
    # even p: the same as the paper's |f|^p
    assert attention_map(x, 4.0)[0].tolist() == pytest.approx(hand_attention(feature, 4.0), rel=1e-6)
    assert attention_map(x).shape == (1, 2)


def test_at_loss_p2_by_hand_with_different_channel_counts():
    student = [  # N=2, C=2, H=W=2
        [[[1.0, 0.5], [-2.0, 0.0]], [[0.3, 1.0], [1.0, -1.0]]],
        [[[0.0, 2.0], [1.0, 1.0]], [[-1.0, 0.0], [0.5, 2.0]]],
    ]
    teacher = [  # N=2, C=3, H=W=2
        [[[2.0, 0.0], [1.0, 1.0]], [[0.0, 1.0], [-1.0, 0.5]], [[1.0, 1.0], [0.0, 3.0]]],
        [[[1.0, 1.0], [1.0, 1.0]], [[0.2, -0.4], [2.0, 0.0]], [[0.0, 0.0], [1.0, -2.0]]],
    ]
    expected = hand_at_loss(student, teacher, 2.0)  # mean over N * H * W = 8 squared differences
    assert expected > 0
    assert at_loss(tensor(student), tensor(teacher)).item() == pytest.approx(expected, rel=1e-5)
    assert at_loss(tensor(student), tensor(teacher), p=4.0).item() == pytest.approx(
        hand_at_loss(student, teacher, 4.0), rel=1e-5)
    assert at_loss(tensor(teacher), tensor(teacher)).item() == pytest.approx(0.0, abs=1e-12)


def test_at_loss_student_larger_is_average_pooled_first():
    values = [[1.0, -2.0, 0.0, 4.0], [3.0, 0.0, 1.0, 1.0], [-1.0, -1.0, 2.0, 0.5], [0.0, 5.0, 0.5, 2.0]]
    student = [[values, [[v * 0.5 - 1.0 for v in row] for row in values]]]  # N=1, C=2, 4x4
    teacher = [[[[1.0, 2.0], [0.0, 1.0]]]]  # N=1, C=1, 2x2
    pooled = [[[sum(ch[2 * i + di][2 * j + dj] for di in (0, 1) for dj in (0, 1)) / 4 for j in range(2)]
               for i in range(2)] for ch in student[0]]
    expected = hand_at_loss([pooled], teacher, 2.0)
    assert at_loss(tensor(student), tensor(teacher)).item() == pytest.approx(expected, rel=1e-5)
    # 3x3 -> 2x2: adaptive average pooling uses the overlapping windows rows/cols {0, 1} and {1, 2}
    # (bilinear resizing would sample at 0.25 and 1.75 instead).
    odd = [[[1.0, -2.0, 0.0], [3.0, 0.0, 4.0], [-1.0, 5.0, 2.0]]]  # C=1, 3x3
    windows = [(0, 1), (1, 2)]
    pooled_odd = [[[sum(odd[0][a][b] for a in windows[i] for b in windows[j]) / 4 for j in range(2)]
                   for i in range(2)]]
    expected_odd = hand_at_loss([pooled_odd], teacher, 2.0)
    assert at_loss(tensor([odd]), tensor(teacher)).item() == pytest.approx(expected_odd, rel=1e-5)


def test_at_loss_teacher_larger_is_average_pooled_to_the_student():
    # RepDistiller pools the larger map, here the teacher's: 2x2 -> 1x1; one position each, so both
    # normalised maps are [1] and the loss is 0 whatever the values.
    student = tensor([[[[2.0]], [[-1.0]]]])
    teacher = tensor([[[[1.0, 2.0], [0.0, 1.0]]]])
    assert at_loss(student, teacher).item() == pytest.approx(0.0, abs=1e-12)
    # 4x4 teacher, 2x2 student: the teacher is average-pooled to 2x2 (the student is left as it is).
    values = [[1.0, -2.0, 0.0, 4.0], [3.0, 0.0, 1.0, 1.0], [-1.0, -1.0, 2.0, 0.5], [0.0, 5.0, 0.5, 2.0]]
    big = [[values]]
    small = [[[[1.0, 2.0], [0.0, 1.0]]]]
    pooled = [[[sum(values[2 * i + di][2 * j + dj] for di in (0, 1) for dj in (0, 1)) / 4 for j in range(2)]
               for i in range(2)]]
    assert at_loss(tensor(small), tensor(big)).item() == pytest.approx(hand_at_loss(small, [pooled]), rel=1e-5)


@pytest.mark.parametrize("student, teacher, p, message", [
    (torch.ones(2, 1, 2, 2), torch.ones(2, 1, 2, 2), 0.0, "p must be > 0"),
    (torch.ones(2, 1, 2, 2), torch.ones(3, 1, 2, 2), 2.0, "batch sizes must match"),
    (torch.ones(2, 4), torch.ones(2, 4), 2.0, r"features must be \[N, C, H, W\]"),
])
def test_at_loss_rejects_invalid_arguments(student, teacher, p, message):
    with pytest.raises(ValueError, match=message):
        at_loss(student, teacher, p)


# ---------------------------------------------------------------------------- FitNet
def test_hint_loss_by_hand():
    s = tensor([[[[1.0, 2.0], [3.0, 4.0]]], [[[0.0, 0.0], [1.0, -1.0]]]])
    t = tensor([[[[0.0, 2.0], [5.0, 1.0]]], [[[1.0, 0.0], [1.0, 1.0]]]])
    # squared differences: 1, 0, 4, 9, 1, 0, 0, 4 -> 19 / 8
    assert hint_loss(s, t).item() == pytest.approx(19 / 8)
    with pytest.raises(ValueError, match="shapes must match"):
        hint_loss(s, t[:, :, :1])


def test_hint_regressor_is_repdistillers_convreg_and_conv1x1_is_a_setting():
    reg = HintRegressor((2, 3, 4, 4), (2, 5, 4, 4))                  # same size: ConvReg's (1, 1) kernel
    assert isinstance(reg, ConvReg) and reg.conv.kernel_size == (1, 1) and reg.conv.bias is not None
    assert isinstance(reg.bn, torch.nn.BatchNorm2d) and reg.bn.num_features == 5 and reg.use_relu
    x = torch.randn(2, 3, 4, 4)
    assert reg(x).shape == (2, 5, 4, 4) and bool((reg(x) >= 0).all())   # ends with a ReLU
    other = HintRegressor((2, 3, 4, 4), (2, 5, 2, 3), "conv1x1")       # any size ratio
    assert other.conv.kernel_size == (1, 1) and other.conv.bias is None
    assert other(x).shape == (2, 5, 2, 3)
    with pytest.raises(ValueError, match="cannot be regressed"):
        HintRegressor((2, 3, 2, 2), (2, 5, 3, 3))                     # smaller and not half: unsupported
    with pytest.raises(ValueError, match="unknown FitNet regressor"):
        HintRegressor((2, 3, 2, 2), (2, 5, 2, 2), "mlp")


# ---------------------------------------------------------------------------- KD4MTL
KS = [[[[3.0, 0.0]], [[4.0, 1.0]]], [[[1.0, -2.0]], [[1.0, 2.0]]]]  # N=2, C=2, H=1, W=2
KT = [[[[1.0, 0.0]], [[0.0, 2.0]]], [[[0.0, 1.0]], [[1.0, 1.0]]]]


def test_kd4mtl_loss_by_hand():
    expected = hand_kd4mtl(KS, KT)
    # first pixel: s = (3, 4)/5, t = (1, 0): (0.6 - 1)^2 + 0.8^2 = 0.8
    assert hand_kd4mtl([[[[3.0]], [[4.0]]]], [[[[1.0]], [[0.0]]]]) == pytest.approx(0.8)
    assert kd4mtl_loss(tensor(KS), tensor(KT)).item() == pytest.approx(expected, rel=1e-5)
    assert kd4mtl_loss(tensor(KT), tensor(KT)).item() == pytest.approx(0.0, abs=1e-7)


def test_kd4mtl_loss_ignores_positive_scaling():
    # Up to the official eps (x / sqrt(sum x^2 + 1e-6)): exact enough for norms >> 1e-3.
    base = kd4mtl_loss(tensor(KS), tensor(KT)).item()
    assert kd4mtl_loss(tensor(KS) * 7.5, tensor(KT)).item() == pytest.approx(base, rel=1e-5)
    assert kd4mtl_loss(tensor(KS), tensor(KT) * 10.0).item() == pytest.approx(base, rel=1e-5)
    with pytest.raises(ValueError, match="shapes must match"):
        kd4mtl_loss(tensor(KS), tensor(KT)[:, :1])


def test_task_adaptor_is_bias_free_1x1_conv_and_resizes():
    adaptor = TaskAdaptor(3, 2)
    assert adaptor.conv.kernel_size == (1, 1) and adaptor.conv.bias is None
    x = torch.randn(1, 3, 2, 2)
    out = adaptor(x, (2, 2))
    # a 1x1 conv without bias: out[:, o] = sum_i W[o, i] * x[:, i]
    weight = adaptor.conv.weight[:, :, 0, 0]
    for o in range(2):
        assert torch.allclose(out[0, o], sum(weight[o, i] * x[0, i] for i in range(3)), atol=1e-6)
    assert adaptor(x, (4, 3)).shape == (1, 2, 4, 3)


# ------------------------------------------------------------------------------- BAM
BT = [[1.0, 2.0, 0.5], [0.0, 0.0, 3.0]]
BY = [1, 2]
BS = [[0.5, 1.5, -1.0], [2.0, 0.0, 1.0]]


def hand_bam_targets(teacher_rows, labels, progress):
    rows = []
    for t, g in zip(teacher_rows, labels):
        pt = softmax(t)
        rows.append([progress * (1.0 if c == g else 0.0) + (1 - progress) * pt[c] for c in range(len(t))])
    return rows


def test_bam_targets_at_progress_0_half_and_1():
    teacher, target = tensor(BT), torch.tensor(BY)
    got0 = bam_targets(teacher, target, 0.0)
    for row, t in zip(got0.tolist(), BT):
        assert row == pytest.approx(softmax(t), rel=1e-6)
    assert bam_targets(teacher, target, 1.0).tolist() == [[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    got_half = bam_targets(teacher, target, 0.5).tolist()
    for row, expected in zip(got_half, hand_bam_targets(BT, BY, 0.5)):
        assert row == pytest.approx(expected, rel=1e-6)
        assert sum(row) == pytest.approx(1.0, rel=1e-6)


def test_bam_loss_by_hand():
    progress = 0.3
    expected = 0.0
    for s, y in zip(BS, hand_bam_targets(BT, BY, progress)):
        ps = softmax(s)
        expected -= sum(yc * math.log(pc) for yc, pc in zip(y, ps))
    expected /= 2
    got = bam_loss(tensor(BS), tensor(BT), torch.tensor(BY), progress)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_bam_per_pixel_ignores_255():
    progress = 0.6
    # N=1, C=3, H=1, W=3; pixel w holds the class vector.
    s_pixels, t_pixels, labels = BS + [[1.0, 1.0, 1.0]], BT + [[5.0, 0.0, 0.0]], [1, 255, 2]
    s_pixels = [s_pixels[0], s_pixels[2], s_pixels[1]]
    t_pixels = [t_pixels[0], t_pixels[2], t_pixels[1]]
    valid = [(s, t, g) for s, t, g in zip(s_pixels, t_pixels, labels) if g != 255]
    expected = 0.0
    for (s, _, _), y in zip(valid, hand_bam_targets([v[1] for v in valid], [v[2] for v in valid], progress)):
        expected -= sum(yc * math.log(pc) for yc, pc in zip(y, softmax(s)))
    expected /= len(valid)

    def dense(pixels):  # [W][C] -> [1, C, 1, W]
        return tensor([[[[pixels[w][c] for w in range(3)]] for c in range(3)]])

    target = torch.tensor([[labels]])
    soft = bam_targets(dense(t_pixels), target, progress)
    assert soft.shape == (1, 3, 1, 3)
    assert soft[0, :, 0, 1].tolist() == [0.0, 0.0, 0.0]  # the ignored pixel has no target
    assert bam_loss(dense(s_pixels), dense(t_pixels), target, progress).item() == pytest.approx(expected, rel=1e-5)


def test_bam_loss_at_progress_1_is_cross_entropy():
    gen = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 4, 3, 3, generator=gen), torch.randn(2, 4, 3, 3, generator=gen)
    target = torch.randint(0, 4, (2, 3, 3), generator=gen)
    target[0, 0, 0] = 255
    expected = F.cross_entropy(student, target, ignore_index=255)
    assert bam_loss(student, teacher, target, 1.0).item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("progress", [-0.1, 1.5, float("nan")])
def test_bam_rejects_progress_outside_unit_interval(progress):
    with pytest.raises(ValueError, match="progress must be"):
        bam_targets(tensor(BT), torch.tensor(BY), progress)
    with pytest.raises(ValueError, match="progress must be"):
        bam_loss(tensor(BS), tensor(BT), torch.tensor(BY), progress)


def test_bam_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="shapes must match"):
        bam_loss(tensor(BS), tensor(BT)[:, :2], torch.tensor(BY), 0.5)


# ----------------------------------------------------------------------- gradients
def _dense_target():
    target = torch.tensor([[[0, 1], [2, 255]]])
    return target


LOSSES = {
    "dkd": (lambda s, t: dkd_loss(s, t, torch.tensor([0, 2]), 1.0, 8.0, 4.0), (2, 3)),
    "dkd_dense": (lambda s, t: dkd_loss(s, t, _dense_target(), 1.0, 8.0, 4.0), (1, 3, 2, 2)),
    "at": (lambda s, t: at_loss(s, t), (2, 3, 4, 4)),
    "hint": (lambda s, t: hint_loss(s, t), (2, 3, 2, 2)),
    "kd4mtl": (lambda s, t: kd4mtl_loss(s, t), (2, 3, 2, 2)),
    "bam": (lambda s, t: bam_loss(s, t, torch.tensor([0, 2]), 0.4), (2, 3)),
    "bam_dense": (lambda s, t: bam_loss(s, t, _dense_target(), 0.4), (1, 3, 2, 2)),
}


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_gradient_reaches_student_without_teacher_grad(name):
    fn, shape = LOSSES[name]
    gen = torch.Generator().manual_seed(3)
    student = torch.randn(shape, generator=gen, requires_grad=True)
    teacher_net = torch.randn(shape, generator=gen, requires_grad=True)
    with torch.no_grad():  # teacher values as the trainer produces them
        teacher = teacher_net * 1.5
    assert not teacher.requires_grad
    fn(student, teacher).backward()
    assert student.grad is not None and torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0
    # A teacher tensor that requires grad, passed detached, receives none.
    student.grad = None
    fn(student, teacher_net.detach()).backward()
    assert teacher_net.grad is None
    assert student.grad is not None and torch.isfinite(student.grad).all()


def test_gradient_reaches_regressor_and_adaptor_parameters():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 4, 4, generator=gen, requires_grad=True)
    with torch.no_grad():
        teacher = torch.randn(2, 5, 2, 2, generator=gen)
    reg, adaptor = HintRegressor(tuple(x.shape), tuple(teacher.shape)), TaskAdaptor(3, 5)   # 4x4 -> 2x2: 3x3/2
    assert reg.conv.stride == (2, 2)
    loss = hint_loss(reg(x), teacher) + kd4mtl_loss(adaptor(x, teacher.shape[-2:]), teacher)
    loss.backward()
    for param in [*reg.parameters(), *adaptor.parameters()]:
        assert param.grad is not None and torch.isfinite(param.grad).all()
    assert adaptor.conv.weight.grad.abs().sum() > 0 and reg.conv.weight.grad.abs().sum() > 0
    assert x.grad is not None and torch.isfinite(x.grad).all()
