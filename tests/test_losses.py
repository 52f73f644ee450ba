"""Loss functions against hand-computed numbers: logit KD, dense KD, task losses and
the weighted training objective (kdmtl_cli/distill, kdmtl_cli/tasks)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
from omegaconf import OmegaConf

from kdmtl_cli.data import TargetSpec
from kdmtl_cli.distill import build_method
from kdmtl_cli.distill.logit import LogitKD, NoDistillation, dense_regression_kd, kl_with_temperature
from kdmtl_cli.distill.objective import Objective, per_task_weights
from kdmtl_cli.errors import KdmtlError
from kdmtl_cli.schema import LossConfig
from kdmtl_cli.tasks import TASK_KINDS, Task, TaskKind, _load_kinds

_load_kinds()


# ---------------------------------------------------------------- hand-written helpers
def softmax(row, t=1.0):
    exps = [math.exp(v / t) for v in row]
    total = sum(exps)
    return [e / total for e in exps]


def kl_rows(student_rows, teacher_rows, t):
    """sum_c p_t * (log p_t - log p_s), mean over rows, times T^2."""
    values = []
    for s_row, t_row in zip(student_rows, teacher_rows):
        p_s, p_t = softmax(s_row, t), softmax(t_row, t)
        values.append(sum(pt * (math.log(pt) - math.log(ps)) for pt, ps in zip(p_t, p_s)))
    return sum(values) / len(values) * t * t


def cross_entropy_rows(rows, targets, ignore=None):
    losses = [-math.log(softmax(row)[y]) for row, y in zip(rows, targets) if y != ignore]
    return sum(losses) / len(losses)


def pixel_rows(logits):
    """[N,C,H,W] nested lists -> one class-score row per pixel, in (n, h, w) order."""
    n, c, h, w = logits.shape
    return [[float(logits[i, k, y, x]) for k in range(c)] for i in range(n) for y in range(h) for x in range(w)]


def kind(name):
    return TASK_KINDS.get(name)()


# ---------------------------------------------------------------- kl_with_temperature
STUDENT = [[1.0, 2.0, 0.5], [0.3, -1.0, 2.0]]
TEACHER = [[2.0, 0.0, 1.0], [-0.5, 0.5, 1.5]]


def test_kl_with_temperature_matches_hand_computation():
    expected = kl_rows(STUDENT, TEACHER, 2.0)
    got = kl_with_temperature(torch.tensor(STUDENT), torch.tensor(TEACHER), 2.0)
    assert got.dim() == 0
    assert float(got) == pytest.approx(expected, abs=1e-6)
    # One term written out completely for the first sample, as a sanity check of the helper.
    p_t = [math.exp(1.0) / (math.exp(1.0) + 1 + math.exp(0.5)), 1 / (math.exp(1.0) + 1 + math.exp(0.5)),
           math.exp(0.5) / (math.exp(1.0) + 1 + math.exp(0.5))]
    z_s = math.exp(0.5) + math.exp(1.0) + math.exp(0.25)
    p_s = [math.exp(0.5) / z_s, math.exp(1.0) / z_s, math.exp(0.25) / z_s]
    first = sum(a * math.log(a / b) for a, b in zip(p_t, p_s))
    second = kl_rows(STUDENT[1:], TEACHER[1:], 2.0) / 4.0
    assert float(got) == pytest.approx((first + second) / 2 * 4.0, abs=1e-6)


def test_kl_is_zero_for_identical_logits_and_positive_otherwise():
    logits = torch.tensor(STUDENT)
    assert float(kl_with_temperature(logits, logits.clone(), 3.0)) == pytest.approx(0.0, abs=1e-6)
    # Shifting all logits of a row by a constant leaves the distribution unchanged.
    assert float(kl_with_temperature(logits + 5.0, logits, 3.0)) == pytest.approx(0.0, abs=1e-5)
    assert float(kl_with_temperature(logits, torch.tensor(TEACHER), 3.0)) > 0


@pytest.mark.parametrize("t", [0.5, 2.0, 4.0])
def test_kl_temperature_scaling(t):
    s, te = torch.tensor(STUDENT), torch.tensor(TEACHER)
    # KL at temperature T of (s, t) == T^2 * KL at T=1 of (s/T, t/T)
    assert float(kl_with_temperature(s, te, t)) == pytest.approx(
        t * t * float(kl_with_temperature(s / t, te / t, 1.0)), abs=1e-6)
    # and scaling the logits by T cancels the temperature, leaving only the T^2 factor.
    assert float(kl_with_temperature(s * t, te * t, t)) == pytest.approx(
        t * t * kl_rows(STUDENT, TEACHER, 1.0), abs=1e-5)


def test_kl_per_pixel_is_mean_over_pixels_of_per_pixel_kl():
    gen = torch.Generator().manual_seed(3)
    s = torch.randn(2, 3, 2, 3, generator=gen)
    te = torch.randn(2, 3, 2, 3, generator=gen)
    s_rows, t_rows = pixel_rows(s), pixel_rows(te)
    assert len(s_rows) == 12
    expected = kl_rows(s_rows, t_rows, 2.0)  # mean over all N*H*W pixels
    assert float(kl_with_temperature(s, te, 2.0)) == pytest.approx(expected, abs=1e-6)


def test_kl_gradient_reaches_student_only():
    s = torch.tensor(STUDENT, requires_grad=True)
    te = torch.tensor(TEACHER, requires_grad=True)
    kl_with_temperature(s, te.detach(), 2.0).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    # d/ds of T^2 * mean KL = T * (p_s - p_t) / N
    for i in range(2):
        p_s, p_t = softmax(STUDENT[i], 2.0), softmax(TEACHER[i], 2.0)
        for c in range(3):
            assert float(s.grad[i, c]) == pytest.approx(2.0 * (p_s[c] - p_t[c]) / 2, abs=1e-6)


# ---------------------------------------------------------------- dense_regression_kd
def test_dense_regression_kd_l1_and_l2_by_hand():
    s = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    te = torch.tensor([[[[1.5, 0.0], [3.0, 7.0]]]])
    diffs = [1.0 - 1.5, 2.0 - 0.0, 3.0 - 3.0, 4.0 - 7.0]
    assert float(dense_regression_kd(s, te, "l1")) == pytest.approx(sum(abs(d) for d in diffs) / 4, abs=1e-6)
    assert float(dense_regression_kd(s, te, "l2")) == pytest.approx(sum(d * d for d in diffs) / 4, abs=1e-6)
    assert float(dense_regression_kd(s, s.clone(), "l1")) == 0.0


# ---------------------------------------------------------------- task losses
def test_classification_cross_entropy_by_hand():
    logits = [[1.0, 2.0, 0.5], [0.1, -1.0, 3.0], [0.0, 0.0, 0.0]]
    target = [1, 2, 0]
    expected = cross_entropy_rows(logits, target)
    assert expected == pytest.approx(
        (-math.log(math.exp(2) / (math.exp(1) + math.exp(2) + math.exp(0.5)))
         - math.log(math.exp(3) / (math.exp(0.1) + math.exp(-1) + math.exp(3)))
         + math.log(3)) / 3)
    got = kind("classification").loss(torch.tensor(logits), torch.tensor(target))
    assert float(got) == pytest.approx(expected, abs=1e-6)


def test_segmentation_cross_entropy_excludes_ignore_index():
    logits = torch.tensor([[[[1.0, 3.0], [0.0, -1.0]],
                            [[2.0, 0.0], [1.0, 2.0]],
                            [[0.5, 0.5], [4.0, 0.0]]]])           # [1, 3, 2, 2]
    target = torch.tensor([[[0, 255], [2, 1]]])                   # [1, 2, 2]
    rows = pixel_rows(logits)
    labels = [0, 255, 2, 1]
    expected = cross_entropy_rows(rows, labels, ignore=255)       # mean over the 3 valid pixels
    got = kind("segmentation").loss(logits, target)
    assert float(got) == pytest.approx(expected, abs=1e-6)
    # The ignored pixel's logits do not matter.
    changed = logits.clone()
    changed[0, :, 0, 1] = torch.tensor([-50.0, 80.0, 3.0])
    assert float(kind("segmentation").loss(changed, target)) == pytest.approx(expected, abs=1e-6)


def test_depth_masked_l1_excludes_zero_targets():
    output = torch.tensor([[[[1.0, 5.0], [2.0, 9.0]]], [[[4.0, 4.0], [0.0, 1.0]]]])  # [2, 1, 2, 2]
    target = torch.tensor([[[1.5, 0.0], [4.0, 0.0]], [[3.0, 6.0], [0.0, 0.5]]])      # [2, 2, 2]
    pairs = [(1.0, 1.5), (2.0, 4.0), (4.0, 3.0), (4.0, 6.0), (1.0, 0.5)]              # valid pixels only
    expected = sum(abs(p - t) for p, t in pairs) / len(pairs)
    got = kind("depth").loss(output, target)
    assert float(got) == pytest.approx(expected, abs=1e-6)


def test_depth_loss_with_no_valid_pixel_is_zero_not_nan():
    got = kind("depth").loss(torch.ones(1, 1, 2, 2), torch.zeros(1, 2, 2))
    assert float(got) == 0.0


# ---------------------------------------------------------------- LogitKD
def _real_tasks():
    return {
        "cls": Task("cls", kind("classification"), TargetSpec("classification", 3), "cls"),
        "seg": Task("seg", kind("segmentation"), TargetSpec("segmentation", 3), "seg"),
        "depth": Task("depth", kind("depth"), TargetSpec("depth", mean=2.0, std=1.0), "depth"),
    }


def _loss_cfg(**overrides):
    return OmegaConf.merge(OmegaConf.structured(LossConfig), overrides)


def test_logit_kd_terms_per_task_kind():
    tasks = _real_tasks()
    method = build_method(_loss_cfg(name="kd", temperature=2.0, dense_kd="l2"), tasks)
    assert isinstance(method, LogitKD) and method.uses_teacher
    gen = torch.Generator().manual_seed(0)
    s = {"cls": torch.tensor(STUDENT), "seg": torch.randn(1, 3, 2, 2, generator=gen),
         "depth": torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])}
    t = {"cls": torch.tensor(TEACHER), "seg": torch.randn(1, 3, 2, 2, generator=gen),
         "depth": torch.tensor([[[[2.0, 2.0], [1.0, 4.5]]]])}
    terms = method(s, t, batch={})
    assert set(terms) == {"kd/cls", "kd/seg", "kd/depth"}
    assert float(terms["kd/cls"]) == pytest.approx(kl_rows(STUDENT, TEACHER, 2.0), abs=1e-6)
    assert float(terms["kd/seg"]) == pytest.approx(kl_rows(pixel_rows(s["seg"]), pixel_rows(t["seg"]), 2.0),
                                                   abs=1e-6)
    assert float(terms["kd/depth"]) == pytest.approx((1 + 0 + 4 + 0.25) / 4, abs=1e-6)
    # Only tasks the teacher covers get a term.
    assert set(method(s, {"depth": t["depth"]}, batch={})) == {"kd/depth"}


@pytest.mark.parametrize("overrides, needle", [({"temperature": 0.0}, "temperature"),
                                               ({"temperature": -1.0}, "temperature"),
                                               ({"dense_kd": "huber"}, "dense_kd")])
def test_logit_kd_rejects_bad_config(overrides, needle):
    with pytest.raises(KdmtlError, match=needle):
        LogitKD(_loss_cfg(**overrides), _real_tasks())


def test_unknown_loss_name_is_a_kdmtl_error():
    with pytest.raises(KdmtlError, match="loss.name"):
        build_method(_loss_cfg(name="nope"), _real_tasks())


# ---------------------------------------------------------------- Objective with fakes
class SquaredErrorKind(TaskKind):
    """A fake task kind: mean squared error to the target."""

    name = "fake"

    def loss(self, output, target):
        return ((output - target) ** 2).mean()


class SumSquaredKD:
    """A fake KD method: sum of squared differences to the teacher, per task."""

    uses_teacher = True

    def __init__(self):
        self.seen = None

    def __call__(self, student_out, teacher_out, batch):
        self.seen = dict(teacher_out)
        return {f"kd/{k}": ((student_out[k] - v) ** 2).sum() for k, v in teacher_out.items()}


X = [1.0, 2.0, -1.0]                       # the batch "image"
Y = {"a": [0.5, 1.0, 0.0], "b": [2.0, -1.0, 1.0]}
T_OUT = {"a": [1.0, 1.0, 1.0], "b": [0.0, 0.5, -0.5]}


class Student(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.ParameterDict({"a": nn.Parameter(torch.tensor(0.7)), "b": nn.Parameter(torch.tensor(-0.3))})

    def forward(self, x):
        return {"outputs": {k: self.w[k] * x for k in ("a", "b")}, "features": {}}


class FrozenTeacher(nn.Module):
    """Returns fixed outputs (through a parameter, to check no gradient reaches it),
    plus a task the student does not have."""

    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.tensor(1.0))
        self.calls = []

    def forward(self, x):
        self.calls.append((x.clone(), torch.is_grad_enabled(), self.training))
        out = {k: self.gain * torch.tensor(v) for k, v in T_OUT.items()}
        out["extra"] = self.gain * torch.ones(3)
        return {"outputs": out, "features": {}}


def _fake_tasks():
    return {"a": Task("a", SquaredErrorKind(), TargetSpec("fake"), "ya"),
            "b": Task("b", SquaredErrorKind(), TargetSpec("fake"), "yb")}


def _batch():
    return {"image": torch.tensor(X), "targets": {"ya": torch.tensor(Y["a"]), "yb": torch.tensor(Y["b"])}}


def _hand_terms(w):
    task = {k: sum((w[k] * x - y) ** 2 for x, y in zip(X, Y[k])) / 3 for k in ("a", "b")}
    kd = {k: sum((w[k] * x - t) ** 2 for x, t in zip(X, T_OUT[k])) for k in ("a", "b")}
    return task, kd


def test_objective_total_is_weighted_sum_with_per_task_weights():
    tasks = _fake_tasks()
    teacher = FrozenTeacher()
    assert teacher.training
    method = SumSquaredKD()
    cfg = SimpleNamespace(task_weight=OmegaConf.create({"a": 2.0, "b": 0.5}), kd_weight=OmegaConf.create({"a": 3, "b": 0.25}))
    objective = Objective(tasks, cfg, method, teacher)

    # The teacher is frozen: eval mode, no parameter requires grad.
    assert not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())

    student = Student()
    total, terms = objective(student(_batch()["image"]), _batch())
    task, kd = _hand_terms({"a": 0.7, "b": -0.3})
    assert set(terms) == {"task/a", "task/b", "kd/a", "kd/b", "loss/total", "loss/task"}
    for k in ("a", "b"):
        assert float(terms[f"task/{k}"].detach()) == pytest.approx(task[k], abs=1e-6)
        assert float(terms[f"kd/{k}"].detach()) == pytest.approx(kd[k], abs=1e-6)
    expected_total = 2.0 * task["a"] + 0.5 * task["b"] + 3 * kd["a"] + 0.25 * kd["b"]
    assert float(total.detach()) == pytest.approx(expected_total, abs=1e-5)
    assert terms["loss/total"] is total
    # loss/task: the unweighted sum of task losses, detached.
    assert float(terms["loss/task"]) == pytest.approx(task["a"] + task["b"], abs=1e-6)
    assert not terms["loss/task"].requires_grad

    # The teacher ran on the batch image, without autograd, in eval mode; tasks the
    # student lacks were dropped before the method saw them.
    assert len(teacher.calls) == 1
    x_seen, grad_enabled, training = teacher.calls[0]
    assert torch.equal(x_seen, torch.tensor(X)) and not grad_enabled and not training
    assert set(method.seen) == {"a", "b"}

    # Gradients: the student's match d total / d w by hand; none reach the teacher.
    total.backward()
    assert teacher.gain.grad is None
    for k, tw, kw in (("a", 2.0, 3.0), ("b", 0.5, 0.25)):
        w = {"a": 0.7, "b": -0.3}[k]
        d_task = sum(2 * (w * x - y) * x for x, y in zip(X, Y[k])) / 3
        d_kd = sum(2 * (w * x - t) * x for x, t in zip(X, T_OUT[k]))
        assert float(student.w[k].grad) == pytest.approx(tw * d_task + kw * d_kd, abs=1e-5)


def test_objective_scalar_weights_apply_to_every_task():
    cfg = SimpleNamespace(task_weight=1.5, kd_weight=0.1)
    objective = Objective(_fake_tasks(), cfg, SumSquaredKD(), FrozenTeacher())
    total, _ = objective(Student()(_batch()["image"]), _batch())
    task, kd = _hand_terms({"a": 0.7, "b": -0.3})
    assert float(total.detach()) == pytest.approx(1.5 * (task["a"] + task["b"]) + 0.1 * (kd["a"] + kd["b"]), abs=1e-5)


def test_objective_without_teacher_use_has_task_terms_only():
    teacher = FrozenTeacher()
    cfg = SimpleNamespace(task_weight={"a": 1.0, "b": 3.0}, kd_weight=1.0)
    objective = Objective(_fake_tasks(), cfg, NoDistillation(cfg, None), teacher)
    total, terms = objective(Student()(_batch()["image"]), _batch())
    task, _ = _hand_terms({"a": 0.7, "b": -0.3})
    assert set(terms) == {"task/a", "task/b", "loss/total", "loss/task"}
    assert teacher.calls == []  # a method that does not use the teacher never runs it
    assert float(total.detach()) == pytest.approx(task["a"] + 3.0 * task["b"], abs=1e-6)
    # No teacher at all also works.
    total2, _ = Objective(_fake_tasks(), cfg, SumSquaredKD(), None)(Student()(_batch()["image"]), _batch())
    assert float(total2.detach()) == pytest.approx(float(total.detach()), abs=1e-6)


def test_objective_task_terms_read_the_task_target_key():
    objective = Objective(_fake_tasks(), SimpleNamespace(task_weight=1, kd_weight=1), NoDistillation(None, None))
    outputs = {"a": torch.tensor(Y["a"]), "b": torch.zeros(3)}
    terms = objective.task_terms(outputs, _batch()["targets"])
    assert float(terms["task/a"]) == 0.0
    assert float(terms["task/b"]) == pytest.approx((4 + 1 + 1) / 3)


# ---------------------------------------------------------------- per_task_weights
TASKS = {"cls": None, "seg": None}


def test_per_task_weights_number_and_mapping():
    assert per_task_weights(2, TASKS, "k") == {"cls": 2.0, "seg": 2.0}
    assert per_task_weights(0.5, TASKS, "k") == {"cls": 0.5, "seg": 0.5}
    assert per_task_weights(OmegaConf.create({"seg": 1, "cls": 0.25}), TASKS, "k") == {"cls": 0.25, "seg": 1.0}
    assert per_task_weights({"seg": 1, "cls": 0.25}, TASKS, "k") == {"cls": 0.25, "seg": 1.0}


@pytest.mark.parametrize("value, needles", [
    ({"cls": 1.0, "seg": 1.0, "depht": 2.0}, ["loss.kd_weight", "unknown", "depht"]),
    ({"cls": 1.0}, ["loss.kd_weight", "missing", "seg"]),
    ({"cls": 1.0, "seg": "heavy"}, ["loss.kd_weight", "numbers"]),
    ({"cls": 1.0, "seg": None}, ["loss.kd_weight", "numbers"]),
    ("heavy", ["loss.kd_weight", "number"]),
    (True, ["loss.kd_weight"]),
    ([1.0, 2.0], ["loss.kd_weight"]),
    (None, ["loss.kd_weight"]),
])
def test_per_task_weights_errors(value, needles):
    with pytest.raises(KdmtlError) as info:
        per_task_weights(value, TASKS, "loss.kd_weight")
    for needle in needles:
        assert needle in str(info.value)


def test_objective_validates_weights_at_construction():
    with pytest.raises(KdmtlError, match="loss.task_weight"):
        Objective(_fake_tasks(), SimpleNamespace(task_weight={"a": 1.0}, kd_weight=1.0), NoDistillation(None, None))
    with pytest.raises(KdmtlError, match="loss.kd_weight"):
        Objective(_fake_tasks(), SimpleNamespace(task_weight=1.0, kd_weight={"a": 1, "b": 1, "c": 1}),
                  NoDistillation(None, None))
