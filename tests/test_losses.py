"""Loss functions against hand-computed numbers: logit KD, dense KD, task losses and
the weighted training objective (kdmtl_cli/distill, kdmtl_cli/tasks)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from omegaconf import OmegaConf

from kdmtl_cli.data import TargetSpec
from kdmtl_cli.distill import Method, build_methods, method_names
from kdmtl_cli.distill.logit import LogitKD, dense_regression_kd, kl_with_temperature
from kdmtl_cli.distill.objective import Objective
from kdmtl_cli.distill.weights import per_task_weights
from kdmtl_cli.errors import KdmtlError
from kdmtl_cli.schema import KDConfig, LossConfig
from hand import pixel_rows, softmax
from kdmtl_cli.tasks import TASK_KINDS, Task, TaskKind, _load_kinds

_load_kinds()


# ---------------------------------------------------------------- hand-written helpers
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


def _kd_cfg(**overrides):
    return OmegaConf.merge(OmegaConf.structured(KDConfig), overrides)


def _out(outputs, features=None):
    """A full model output, as methods receive it."""
    return {"outputs": outputs, "features": features or {}}


START = {"fraction": 0.0, "epoch": 0.0}
LATE = {"fraction": 0.9, "epoch": 7.5}


def _kd_tensors():
    gen = torch.Generator().manual_seed(0)
    s = {"cls": torch.tensor(STUDENT), "seg": torch.randn(1, 3, 2, 2, generator=gen),
         "depth": torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])}
    t = {"cls": torch.tensor(TEACHER), "seg": torch.randn(1, 3, 2, 2, generator=gen),
         "depth": torch.tensor([[[[2.0, 2.0], [1.0, 4.5]]]])}
    return s, t


def test_logit_kd_terms_per_task_kind():
    tasks = _real_tasks()
    methods = build_methods(_loss_cfg(kd={"temperature": 2.0, "dense": "l2"}), tasks, list(tasks))
    assert len(methods) == 1
    method = methods[0]
    assert isinstance(method, LogitKD) and isinstance(method, Method) and method.name == "kd"
    # Logit KD needs no features and learns nothing.
    assert method.student_features == [] and method.teacher_features == []
    assert len(method.modules) == 0 and method.param_groups(0.1) == []
    s, t = _kd_tensors()
    terms = method(_out(s), _out(t), {}, START)
    assert set(terms) == {"kd/cls", "kd/seg", "kd/depth"}
    assert float(terms["kd/cls"]) == pytest.approx(kl_rows(STUDENT, TEACHER, 2.0), abs=1e-6)
    assert float(terms["kd/seg"]) == pytest.approx(kl_rows(pixel_rows(s["seg"]), pixel_rows(t["seg"]), 2.0),
                                                   abs=1e-6)
    assert float(terms["kd/depth"]) == pytest.approx((1 + 0 + 4 + 0.25) / 4, abs=1e-6)
    # The default weight (0.5) applies to every term, whatever the progress.
    for term in terms:
        assert method.weight(term, START) == 0.5 and method.weight(term, LATE) == 0.5


def test_logit_kd_only_for_tasks_the_teacher_covers():
    tasks = _real_tasks()
    s, t = _kd_tensors()
    method = LogitKD(_kd_cfg(temperature=2.0, dense="l2"), tasks, ["depth"])
    assert set(method(_out(s), _out({"depth": t["depth"]}), {}, START)) == {"kd/depth"}
    # Teacher outputs for other tasks are not used either.
    assert set(method(_out(s), _out(t), {}, START)) == {"kd/depth"}
    [built] = build_methods(_loss_cfg(kd={}), tasks, ["cls", "seg"])
    assert set(built(_out(s), _out(t), {}, START)) == {"kd/cls", "kd/seg"}
    # YAML/schema defaults: T = 4, l1 for depth.
    assert float(built(_out(s), _out(t), {}, START)["kd/cls"]) == pytest.approx(
        kl_rows(STUDENT, TEACHER, 4.0), abs=1e-6)
    l1 = LogitKD(_kd_cfg(), tasks, ["depth"])
    assert float(l1(_out(s), _out(t), {}, START)["kd/depth"]) == pytest.approx((1 + 0 + 2 + 0.5) / 4, abs=1e-6)


def test_logit_kd_per_task_weights():
    method = LogitKD(_kd_cfg(weight={"cls": 2.0, "depth": 0.25}), _real_tasks(), ["cls", "depth"])
    assert method.weight("kd/cls", START) == 2.0 and method.weight("kd/depth", LATE) == 0.25
    # The mapping must name exactly the tasks the teacher covers.
    with pytest.raises(KdmtlError, match="loss.kd.weight") as info:
        LogitKD(_kd_cfg(weight={"cls": 1.0, "seg": 1.0, "depth": 1.0}), _real_tasks(), ["cls", "depth"])
    assert "seg" in str(info.value)
    with pytest.raises(KdmtlError, match="loss.kd.weight"):
        build_methods(_loss_cfg(kd={"weight": {"cls": 1.0}}), _real_tasks(), ["cls", "seg", "depth"])


@pytest.mark.parametrize("overrides, needle", [({"temperature": 0.0}, "loss.kd.temperature"),
                                               ({"temperature": -1.0}, "loss.kd.temperature"),
                                               ({"dense": "huber"}, "loss.kd.dense")])
def test_logit_kd_rejects_bad_config(overrides, needle):
    tasks = _real_tasks()
    with pytest.raises(KdmtlError, match=needle):
        LogitKD(_kd_cfg(**overrides), tasks, list(tasks))
    with pytest.raises(KdmtlError, match=needle):
        build_methods(_loss_cfg(kd=overrides), tasks, list(tasks))


def test_method_names_follow_the_config():
    tasks = _real_tasks()
    assert method_names(_loss_cfg()) == [] and build_methods(_loss_cfg(), tasks, list(tasks)) == []
    cfg = _loss_cfg(kd={}, at={})
    assert method_names(cfg) == ["at", "kd"]
    assert [m.name for m in build_methods(cfg, tasks, list(tasks))] == ["at", "kd"]


# ---------------------------------------------------------------- Objective with fakes
class SquaredErrorKind(TaskKind):
    """A fake task kind: mean squared error to the target."""

    name = "fake"

    def loss(self, output, target):
        return ((output - target) ** 2).mean()


class SumSquaredKD(Method):
    """A fake KD method: sum of squared differences to the teacher, per task it covers,
    weighted per task like `loss.kd.weight`."""

    name = "fake"

    def __init__(self, weight=1.0, teacher_tasks=("a", "b")):
        super().__init__(None, None, list(teacher_tasks))
        weights = per_task_weights(weight, self.teacher_tasks, "loss.fake.weight")
        self._weights = {f"kd/{k}": w for k, w in weights.items()}
        self.seen = []

    def __call__(self, student_out, teacher_out, batch, progress):
        self.seen.append((set(teacher_out["outputs"]), dict(progress)))
        return {f"kd/{k}": ((student_out["outputs"][k] - teacher_out["outputs"][k]) ** 2).sum()
                for k in self.teacher_tasks}


class RampedKD(SumSquaredKD):
    """Its weights depend on where training is: w * epoch + fraction."""

    def weight(self, term, progress):
        return self._weights[term] * progress["epoch"] + progress["fraction"]


class GainKD(Method):
    """A fake method with a learned part (a gain), built in `setup` from the features it names:
    0.5 * mean((g * student_a - teacher_a)^2), g initialised to 2."""

    name = "gain"
    student_features = ["s.feat"]
    teacher_features = ["t.feat"]

    def __init__(self):
        super().__init__(None, None, ["a"])
        self._weights = {"gain/a": 0.5}
        self.setup_calls = []

    def setup(self, student_features, teacher_features):
        self.setup_calls.append((dict(student_features), dict(teacher_features)))
        self.modules["gain"] = nn.Linear(1, 1, bias=False)
        with torch.no_grad():
            self.modules["gain"].weight.fill_(2.0)

    def __call__(self, student_out, teacher_out, batch, progress):
        g = self.modules["gain"].weight[0, 0]
        return {"gain/a": ((g * student_out["outputs"]["a"] - teacher_out["outputs"]["a"]) ** 2).mean()}


X = [1.0, 2.0, -1.0]                       # the batch "image"
Y = {"a": [0.5, 1.0, 0.0], "b": [2.0, -1.0, 1.0]}
T_OUT = {"a": [1.0, 1.0, 1.0], "b": [0.0, 0.5, -0.5]}


class Student(nn.Module):
    """outputs w_k * x per task; a captured feature name returns w_a * x."""

    def __init__(self):
        super().__init__()
        self.w = nn.ParameterDict({"a": nn.Parameter(torch.tensor(0.7)), "b": nn.Parameter(torch.tensor(-0.3))})
        self.captures, self.names, self.calls = [], [], []

    def capture_features(self, names):
        self.captures.append(list(names))
        self.names += list(names)

    def forward(self, x):
        self.calls.append((self.training, torch.is_grad_enabled()))
        return {"outputs": {k: self.w[k] * x for k in ("a", "b")},
                "features": {n: self.w["a"] * x for n in self.names}}


class FrozenTeacher(nn.Module):
    """Returns fixed outputs (through a parameter, to check no gradient reaches it),
    plus a task the student does not have; captured feature names return gain * ones."""

    def __init__(self, give_features=True):
        super().__init__()
        self.gain = nn.Parameter(torch.tensor(1.0))
        self.calls, self.captures, self.names = [], [], []
        self.give_features = give_features

    def capture_features(self, names):
        self.captures.append(list(names))
        self.names += list(names)

    def forward(self, x):
        self.calls.append((x.clone(), torch.is_grad_enabled(), self.training))
        out = {k: self.gain * torch.tensor(v) for k, v in T_OUT.items()}
        out["extra"] = self.gain * torch.ones(3)
        features = {n: self.gain * torch.ones(3) for n in self.names} if self.give_features else {}
        return {"outputs": out, "features": features}


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
    method = SumSquaredKD(OmegaConf.create({"a": 3, "b": 0.25}))
    objective = Objective(tasks, OmegaConf.create({"a": 2.0, "b": 0.5}), [method], teacher)
    assert objective.teacher is teacher and objective.methods == [method]

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

    # The teacher ran once on the batch image, without autograd, in eval mode. The method got
    # the teacher's full output (a task the student lacks included) and the objective's
    # progress, and made terms only for the tasks it covers.
    assert len(teacher.calls) == 1
    x_seen, grad_enabled, training = teacher.calls[0]
    assert torch.equal(x_seen, torch.tensor(X)) and not grad_enabled and not training
    assert method.seen == [({"a", "b", "extra"}, {"fraction": 0.0, "epoch": 0.0})]

    # Gradients: the student's match d total / d w by hand; none reach the teacher.
    total.backward()
    assert teacher.gain.grad is None
    for k, tw, kw in (("a", 2.0, 3.0), ("b", 0.5, 0.25)):
        w = {"a": 0.7, "b": -0.3}[k]
        d_task = sum(2 * (w * x - y) * x for x, y in zip(X, Y[k])) / 3
        d_kd = sum(2 * (w * x - t) * x for x, t in zip(X, T_OUT[k]))
        assert float(student.w[k].grad) == pytest.approx(tw * d_task + kw * d_kd, abs=1e-5)


def test_objective_scalar_weights_apply_to_every_task():
    objective = Objective(_fake_tasks(), 1.5, [SumSquaredKD(0.1)], FrozenTeacher())
    total, _ = objective(Student()(_batch()["image"]), _batch())
    task, kd = _hand_terms({"a": 0.7, "b": -0.3})
    assert float(total.detach()) == pytest.approx(1.5 * (task["a"] + task["b"]) + 0.1 * (kd["a"] + kd["b"]), abs=1e-5)


def test_objective_weights_terms_at_the_current_progress():
    method = RampedKD({"a": 2.0, "b": 0.5})
    objective = Objective(_fake_tasks(), 1.0, [method], FrozenTeacher())
    task, kd = _hand_terms({"a": 0.7, "b": -0.3})
    # At the start (epoch 0, fraction 0) the ramped terms weigh nothing.
    total, terms = objective(Student()(_batch()["image"]), _batch())
    assert float(total.detach()) == pytest.approx(task["a"] + task["b"], abs=1e-5)
    assert float(terms["kd/a"].detach()) == pytest.approx(kd["a"], abs=1e-5)  # logged raw, unweighted
    objective.set_progress(0.25, 1.5)
    assert objective.progress == {"fraction": 0.25, "epoch": 1.5}
    total, terms = objective(Student()(_batch()["image"]), _batch())
    expected = task["a"] + task["b"] + (2.0 * 1.5 + 0.25) * kd["a"] + (0.5 * 1.5 + 0.25) * kd["b"]
    assert float(total.detach()) == pytest.approx(expected, abs=1e-5)
    assert float(terms["kd/b"].detach()) == pytest.approx(kd["b"], abs=1e-5)
    assert [p for _, p in method.seen] == [{"fraction": 0.0, "epoch": 0.0}, {"fraction": 0.25, "epoch": 1.5}]


def test_objective_combines_several_methods():
    first, second = SumSquaredKD({"a": 1.0, "b": 2.0}), GainKD()
    second.setup({}, {})                      # build the gain (g = 2) without an objective
    objective = Objective(_fake_tasks(), 1.0, [first, second], FrozenTeacher())
    total, terms = objective(Student()(_batch()["image"]), _batch())
    task, kd = _hand_terms({"a": 0.7, "b": -0.3})
    gain = sum((2.0 * 0.7 * x - t) ** 2 for x, t in zip(X, T_OUT["a"])) / 3
    assert set(terms) == {"task/a", "task/b", "kd/a", "kd/b", "gain/a", "loss/total", "loss/task"}
    assert float(terms["gain/a"].detach()) == pytest.approx(gain, abs=1e-5)
    expected = task["a"] + task["b"] + kd["a"] + 2.0 * kd["b"] + 0.5 * gain
    assert float(total.detach()) == pytest.approx(expected, abs=1e-5)


def test_objective_setup_hooks_features_and_builds_learned_parts():
    student, teacher = Student(), FrozenTeacher()
    plain, gain = SumSquaredKD(), GainKD()
    objective = Objective(_fake_tasks(), 1.0, [plain, gain], teacher)
    assert objective.param_groups(0.1) == []               # nothing learned before setup
    student.train()
    objective.setup(student, _batch(), torch.device("cpu"))

    # Only the named features are hooked, once each; the student ran once in eval mode
    # without autograd, and is back in training mode.
    assert student.captures == [["s.feat"]] and teacher.captures == [["t.feat"]]
    assert student.calls == [(False, False)] and student.training
    assert len(teacher.calls) == 1 and not teacher.calls[0][1] and not teacher.calls[0][2]
    [(s_feats, t_feats)] = gain.setup_calls
    assert set(s_feats) == {"s.feat"} and set(t_feats) == {"t.feat"}
    # on the batch's first two images: the shapes are what setup learns (start-up cost)
    assert torch.allclose(s_feats["s.feat"], 0.7 * torch.tensor(X)[:2])

    # The learned part is in objective.modules and handed to the optimiser at the base lr.
    g = gain.modules["gain"].weight
    assert set(objective.modules) == {"fake", "gain"} and objective.modules["gain"]["gain"].weight is g
    [group] = objective.param_groups(0.1)
    assert group["lr"] == 0.1 and len(group["params"]) == 1 and group["params"][0] is g
    objective.train(False)
    assert not gain.modules.training
    objective.train()
    assert gain.modules.training

    # Gradient reaches the student and the gain (0.5 * d/dg mean((g w x - t)^2)), not the teacher.
    total, _ = objective(student(_batch()["image"]), _batch())
    total.backward()
    assert teacher.gain.grad is None
    d_gain = 0.5 * sum(2 * (2.0 * 0.7 * x - t) * 0.7 * x for x, t in zip(X, T_OUT["a"])) / 3
    assert float(g.grad) == pytest.approx(d_gain, abs=1e-5)
    assert student.w["a"].grad is not None and student.w["b"].grad is not None


def test_objective_setup_rejects_a_missing_teacher_feature():
    objective = Objective(_fake_tasks(), 1.0, [GainKD()], FrozenTeacher(give_features=False))
    with pytest.raises(KdmtlError, match="loss.gain") as info:
        objective.setup(Student(), _batch(), torch.device("cpu"))
    assert "t.feat" in str(info.value)


def test_objective_without_methods_has_task_terms_only():
    teacher = FrozenTeacher()
    objective = Objective(_fake_tasks(), {"a": 1.0, "b": 3.0}, [], teacher)
    assert objective.teacher is None       # with no method the teacher is never used
    total, terms = objective(Student()(_batch()["image"]), _batch())
    task, _ = _hand_terms({"a": 0.7, "b": -0.3})
    assert set(terms) == {"task/a", "task/b", "loss/total", "loss/task"}
    assert teacher.calls == []
    assert float(total.detach()) == pytest.approx(task["a"] + 3.0 * task["b"], abs=1e-6)
    # setup hooks nothing and builds nothing.
    student = Student()
    objective.setup(student, _batch(), torch.device("cpu"))
    assert student.captures == [] and student.calls == [] and teacher.captures == []
    assert len(objective.modules) == 0 and objective.param_groups(0.1) == []
    # The vanilla objective: task weights only.
    total2, terms2 = Objective(_fake_tasks(), 1.0)(Student()(_batch()["image"]), _batch())
    assert float(total2.detach()) == pytest.approx(task["a"] + task["b"], abs=1e-6)
    assert float(terms2["loss/task"]) == pytest.approx(task["a"] + task["b"], abs=1e-6)


def test_methods_without_a_teacher_are_a_kdmtl_error():
    with pytest.raises(KdmtlError, match="teacher"):
        Objective(_fake_tasks(), 1.0, [SumSquaredKD()], None)


def test_objective_task_terms_read_the_task_target_key():
    objective = Objective(_fake_tasks(), 1)
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
    assert per_task_weights(3, ["cls"], "k") == {"cls": 3.0}      # any iterable of task names


@pytest.mark.parametrize("value, needles", [
    ({"cls": 1.0, "seg": 1.0, "depht": 2.0}, ["loss.kd.weight", "unknown", "depht"]),
    ({"cls": 1.0}, ["loss.kd.weight", "missing", "seg"]),
    ({"cls": 1.0, "seg": "heavy"}, ["loss.kd.weight", "numbers"]),
    ({"cls": 1.0, "seg": None}, ["loss.kd.weight", "numbers"]),
    ("heavy", ["loss.kd.weight", "number"]),
    (True, ["loss.kd.weight"]),
    ([1.0, 2.0], ["loss.kd.weight"]),
    (None, ["loss.kd.weight"]),
])
def test_per_task_weights_errors(value, needles):
    with pytest.raises(KdmtlError) as info:
        per_task_weights(value, TASKS, "loss.kd.weight")
    for needle in needles:
        assert needle in str(info.value)


def test_objective_validates_weights_at_construction():
    with pytest.raises(KdmtlError, match="loss.task_weight"):
        Objective(_fake_tasks(), {"a": 1.0})
    with pytest.raises(KdmtlError, match="loss.task_weight"):
        Objective(_fake_tasks(), OmegaConf.create({"a": 1, "b": 1, "c": 1}))
    # A method's weights are checked when the method is built.
    with pytest.raises(KdmtlError, match="loss.kd.weight"):
        LogitKD(_kd_cfg(weight={"a": 1, "b": 1, "c": 1}), _fake_tasks(), ["a", "b"])
