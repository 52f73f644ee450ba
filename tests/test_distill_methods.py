"""The distillation methods (kdmtl_cli/distill: kd, dkd, at, fitnet, kd4mtl, bam) as the trainer
uses them: built from their conf/loss/*.yaml defaults, checked against numbers computed by hand
on tiny tensors, and wired into the Objective with real small models (feature hooks, learned
parts, gradients, a frozen teacher)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from hand import hand_at_loss, hand_kd4mtl, kl, pixel_rows, softmax
from kdmtl_cli.data import TargetSpec
from kdmtl_cli.distill import Method, build_methods, method_names
from kdmtl_cli.distill.at import AttentionTransfer
from kdmtl_cli.distill.bam import TeacherAnnealing
from kdmtl_cli.distill.dkd import DecoupledKD
from kdmtl_cli.distill.fitnet import FitNet
from kdmtl_cli.distill.functional import ConvReg, TaskAdaptor, at_loss, hint_loss, kd4mtl_loss
from kdmtl_cli.distill.kd4mtl import KD4MTL
from kdmtl_cli.distill.logit import LogitKD
from kdmtl_cli.distill.objective import Objective
from kdmtl_cli.engine.optim import build_optimizer
from kdmtl_cli.errors import KdmtlError
from kdmtl_cli.models import build_model
from kdmtl_cli.schema import (ATConfig, BAMConfig, DKDConfig, FitNetConfig, KD4MTLConfig, KDConfig, LossConfig,
                              ModelConfig, OptimConfig)
from kdmtl_cli.tasks import TASK_KINDS, Task, _load_kinds
from kdmtl_cli.teachers import TaskTeachers

REPO = Path(__file__).resolve().parents[1]
_load_kinds()

SCHEMAS = {"kd": KDConfig, "dkd": DKDConfig, "at": ATConfig, "fitnet": FitNetConfig,
           "kd4mtl": KD4MTLConfig, "bam": BAMConfig}
START = {"fraction": 0.0, "epoch": 0.0}


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- hand-written helpers
def hand_dkd_row(s_row, t_row, g, alpha, beta, t):
    """(alpha * KL(b_t || b_s) + beta * KL(p̂_t || p̂_s)) * T^2 for one row."""
    p_s, p_t = softmax(s_row, t), softmax(t_row, t)
    tckd = kl([p_t[g], 1 - p_t[g]], [p_s[g], 1 - p_s[g]])
    others = [c for c in range(len(s_row)) if c != g]
    nckd = kl([p_t[c] / (1 - p_t[g]) for c in others], [p_s[c] / (1 - p_s[g]) for c in others])
    return (alpha * tckd + beta * nckd) * t * t


def hand_bam_row(s_row, t_row, g, progress):
    """-sum_c (p * onehot + (1 - p) * softmax(t))_c * log softmax(s)_c for one row."""
    p_s, p_t = softmax(s_row), softmax(t_row)
    return -sum((progress * (c == g) + (1 - progress) * p_t[c]) * math.log(p_s[c]) for c in range(len(s_row)))


def hand_matmul_1x1(weight, sample):
    """A bias-free 1x1 convolution: weight [C_out][C_in], sample [C_in][H][W] -> [C_out][H][W]."""
    h, w = len(sample[0]), len(sample[0][0])
    return [[[sum(weight[o][i] * sample[i][y][x] for i in range(len(sample))) for x in range(w)] for y in range(h)]
            for o in range(len(weight))]


def kind(name):
    return TASK_KINDS.get(name)()


def _real_tasks():
    return {
        "cls": Task("cls", kind("classification"), TargetSpec("classification", 3), "cls"),
        "seg": Task("seg", kind("segmentation"), TargetSpec("segmentation", 3), "seg"),
        "depth": Task("depth", kind("depth"), TargetSpec("depth", mean=2.0, std=1.0), "depth"),
    }


def _yaml(name):
    return OmegaConf.load(REPO / "conf" / "loss" / f"{name}.yaml")


def _cfg(name, **overrides):
    """A method's node from its YAML defaults, validated by its schema."""
    return OmegaConf.merge(OmegaConf.structured(SCHEMAS[name]), _yaml(name), overrides)


def _loss_cfg(*names, **overrides):
    """A whole `loss` node with these methods on (their YAML defaults), as `loss=[a,b]` composes it."""
    nodes = {name: _yaml(name) for name in names}
    return OmegaConf.merge(OmegaConf.structured(LossConfig), nodes, overrides)


def _out(outputs=None, features=None):
    return {"outputs": outputs or {}, "features": features or {}}


def t(values):
    return torch.tensor(values, dtype=torch.float32)


# Tiny logits shared by DKD and BAM: 2 samples x 3 classes, and one 3-class 2x2 image.
S_CLS = [[1.0, 2.0, 0.5], [0.3, -1.0, 2.0]]
T_CLS = [[2.0, 0.0, 1.0], [-0.5, 0.5, 1.5]]
Y_CLS = [1, 2]
S_SEG = [[[[1.0, 3.0], [0.0, -1.0]], [[2.0, 0.0], [1.0, 2.0]], [[0.5, 0.5], [4.0, 0.0]]]]   # [1, 3, 2, 2]
T_SEG = [[[[0.0, 1.0], [2.0, 0.5]], [[1.5, -1.0], [0.0, 1.0]], [[-0.5, 2.0], [1.0, 3.0]]]]
Y_SEG = [[[0, 255], [2, 1]]]                                                               # one ignored pixel
Y_SEG_ROWS = [0, 255, 2, 1]


def _label_outputs():
    student = {"cls": t(S_CLS), "seg": t(S_SEG), "depth": torch.ones(1, 1, 2, 2)}
    teacher = {"cls": t(T_CLS), "seg": t(T_SEG), "depth": torch.zeros(1, 1, 2, 2)}
    batch = {"targets": {"cls": torch.tensor(Y_CLS), "seg": torch.tensor(Y_SEG), "depth": torch.ones(1, 2, 2)}}
    return _out(student), _out(teacher), batch


# ---------------------------------------------------------------- YAML defaults
def test_yaml_defaults_are_the_ones_these_tests_compute_with():
    assert dict(_cfg("kd")) == {"weight": 0.5, "temperature": 4.0, "dense": "l1", "standardize": False}
    assert dict(_cfg("dkd")) == {"weight": 1.0, "alpha": 1.0, "beta": 8.0, "temperature": 4.0, "warmup_epochs": 20.0,
                                 "warmup_schedule": "epoch", "standardize": False}
    at = _cfg("at")
    assert (at.weight, at.p) == (1000.0, 2.0)
    assert list(at.student) == list(at.teacher) == ["trunk.stages.0", "trunk.stages.1", "trunk.stages.2"]
    fitnet = _cfg("fitnet")
    assert (fitnet.weight, fitnet.regressor) == (100.0, "convreg")
    assert list(fitnet.student) == list(fitnet.teacher) == ["trunk.stages.1"]
    kd4mtl = _cfg("kd4mtl")
    assert (kd4mtl.weight, kd4mtl.adaptor_lr, kd4mtl.adaptor_weight_decay) == (1.0, 0.1, 5e-4)
    assert list(kd4mtl.student) == list(kd4mtl.teacher) == ["trunk/-1", "trunk/0"]
    # The schema's defaults are the YAML's.
    for name in SCHEMAS:
        assert OmegaConf.to_container(OmegaConf.structured(SCHEMAS[name])) == OmegaConf.to_container(_cfg(name)), name
    assert dict(_cfg("bam")) == {"weight": 1.0, "reduction": "mean"}


def test_build_methods_from_the_yaml_of_every_method():
    tasks = _real_tasks()
    cfg = _loss_cfg("kd", "dkd", "at", "fitnet", "kd4mtl", "bam")
    assert method_names(cfg) == ["at", "bam", "dkd", "fitnet", "kd", "kd4mtl"]
    methods = build_methods(cfg, tasks, list(tasks))
    assert [type(m) for m in methods] == [AttentionTransfer, TeacherAnnealing, DecoupledKD, FitNet, LogitKD, KD4MTL]
    assert all(isinstance(m, Method) for m in methods)
    assert [m.name for m in methods] == method_names(cfg)
    # Each method's node is its own config (not the whole loss node).
    assert methods[0].cfg.weight == 1000.0 and methods[4].cfg.temperature == 4.0
    assert method_names(_loss_cfg()) == []


# ---------------------------------------------------------------- DKD
def test_dkd_terms_only_for_label_tasks_by_hand():
    tasks = _real_tasks()
    method = DecoupledKD(_cfg("dkd"), tasks, list(tasks))
    assert method.name == "dkd" and len(method.modules) == 0 and method.param_groups(0.1) == []
    assert method.student_features == [] and method.teacher_features == []
    s, te, batch = _label_outputs()
    terms = method(s, te, batch, START)
    assert set(terms) == {"dkd/cls", "dkd/seg"}                       # no term for depth
    cls = sum(hand_dkd_row(a, b, g, 1.0, 8.0, 4.0) for a, b, g in zip(S_CLS, T_CLS, Y_CLS)) / 2
    assert float(terms["dkd/cls"]) == pytest.approx(cls, rel=1e-5, abs=1e-6)
    seg_rows = [(a, b, g) for a, b, g in zip(pixel_rows(t(S_SEG)), pixel_rows(t(T_SEG)), Y_SEG_ROWS) if g != 255]
    assert len(seg_rows) == 3
    seg = sum(hand_dkd_row(a, b, g, 1.0, 8.0, 4.0) for a, b, g in seg_rows) / 3
    assert float(terms["dkd/seg"]) == pytest.approx(seg, rel=1e-5, abs=1e-6)
    # alpha and beta come from the config.
    tckd_only = DecoupledKD(_cfg("dkd", beta=0.0, temperature=2.0), tasks, ["cls"])
    assert set(tckd_only(s, te, batch, START)) == {"dkd/cls"}
    expected = sum(hand_dkd_row(a, b, g, 1.0, 0.0, 2.0) for a, b, g in zip(S_CLS, T_CLS, Y_CLS)) / 2
    assert float(tckd_only(s, te, batch, START)["dkd/cls"]) == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_dkd_target_key_comes_from_the_task():
    tasks = _real_tasks()
    tasks["cls"] = Task("cls", kind("classification"), TargetSpec("classification", 3), "label")
    s, te, batch = _label_outputs()
    batch["targets"] = {"label": torch.tensor(Y_CLS)}
    terms = DecoupledKD(_cfg("dkd"), tasks, ["cls"])(s, te, batch, START)
    cls = sum(hand_dkd_row(a, b, g, 1.0, 8.0, 4.0) for a, b, g in zip(S_CLS, T_CLS, Y_CLS)) / 2
    assert float(terms["dkd/cls"]) == pytest.approx(cls, rel=1e-5, abs=1e-6)


def test_dkd_weight_warms_up_per_epoch_as_mdistiller():
    """mdistiller: min(epoch / warmup, 1) with epoch = 1 in the first epoch, constant within it."""
    tasks = _real_tasks()
    method = DecoupledKD(_cfg("dkd"), tasks, list(tasks))             # warmup 20, schedule epoch, weight 1
    for done, expected in ((0.0, 1 / 20), (0.6, 1 / 20), (1.0, 2 / 20), (18.99, 19 / 20), (19.0, 1.0), (50.0, 1.0)):
        for term in ("dkd/cls", "dkd/seg"):
            # the fraction of training does not matter, only epochs done
            assert method.weight(term, {"fraction": 0.9, "epoch": done}) == pytest.approx(expected)
    ramped = DecoupledKD(_cfg("dkd", warmup_epochs=2.0, weight={"cls": 2.0, "seg": 0.5}), tasks, list(tasks))
    assert ramped.weight("dkd/cls", {"fraction": 0.0, "epoch": 0.5}) == pytest.approx(1.0)
    assert ramped.weight("dkd/seg", {"fraction": 0.0, "epoch": 0.5}) == pytest.approx(0.25)
    assert ramped.weight("dkd/cls", {"fraction": 0.0, "epoch": 1.0}) == pytest.approx(2.0)
    no_warmup = DecoupledKD(_cfg("dkd", warmup_epochs=0.0), tasks, list(tasks))
    assert no_warmup.weight("dkd/cls", START) == 1.0
    # warmup_schedule=linear (kdmtl's own): fractional epochs done / warmup, from 0.
    linear = DecoupledKD(_cfg("dkd", warmup_epochs=1.0, warmup_schedule="linear"), tasks, list(tasks))
    for done, expected in ((0.0, 0.0), (0.25, 0.25), (1.0, 1.0), (3.0, 1.0)):
        assert linear.weight("dkd/cls", {"fraction": 0.9, "epoch": done}) == pytest.approx(expected)


def test_dkd_weight_follows_the_objective_progress():
    """Through the Objective: with warmup 2 DKD adds half in the first epoch, all from the second."""
    tasks = _real_tasks()
    s, te, batch = _label_outputs()
    batch["image"] = torch.zeros(1)

    class Fixed(torch.nn.Module):
        def forward(self, image):
            return te

    method = DecoupledKD(_cfg("dkd", warmup_epochs=2.0), {k: tasks[k] for k in ("cls", "seg")}, ["cls", "seg"])
    objective = Objective({k: tasks[k] for k in ("cls", "seg")}, 0.0, [method], Fixed())
    raw = method(s, te, batch, START)
    dkd_sum = float(raw["dkd/cls"]) + float(raw["dkd/seg"])
    total, terms = objective(s, batch)
    assert float(total) == pytest.approx(0.5 * dkd_sum, rel=1e-6)
    assert float(terms["dkd/cls"]) == pytest.approx(float(raw["dkd/cls"]))    # logged raw
    objective.set_progress(0.1, 0.5)
    assert float(objective(s, batch)[0]) == pytest.approx(0.5 * dkd_sum, rel=1e-6)
    objective.set_progress(0.2, 1.5)
    assert float(objective(s, batch)[0]) == pytest.approx(dkd_sum, rel=1e-6)


def test_dkd_config_errors():
    tasks = _real_tasks()
    with pytest.raises(KdmtlError, match="dkd"):                      # a teacher of depth only
        DecoupledKD(_cfg("dkd"), tasks, ["depth"])
    with pytest.raises(KdmtlError, match="loss.dkd.temperature"):
        DecoupledKD(_cfg("dkd", temperature=0.0), tasks, list(tasks))
    with pytest.raises(KdmtlError, match="loss.dkd.warmup_epochs"):
        DecoupledKD(_cfg("dkd", warmup_epochs=-1.0), tasks, list(tasks))
    with pytest.raises(KdmtlError, match="loss.dkd.warmup_schedule"):
        DecoupledKD(_cfg("dkd", warmup_schedule="cosine"), tasks, list(tasks))
    # Per-task weights name the label tasks the teacher covers.
    with pytest.raises(KdmtlError, match="loss.dkd.weight"):
        DecoupledKD(_cfg("dkd", weight={"cls": 1.0}), tasks, list(tasks))


# ---------------------------------------------------------------- BAM
def test_bam_uses_the_fraction_of_training_by_hand():
    tasks = _real_tasks()
    method = TeacherAnnealing(_cfg("bam"), tasks, list(tasks))
    assert method.name == "bam" and len(method.modules) == 0
    s, te, batch = _label_outputs()
    seg_rows = [(a, b, g) for a, b, g in zip(pixel_rows(t(S_SEG)), pixel_rows(t(T_SEG)), Y_SEG_ROWS) if g != 255]
    for fraction, p in ((0.0, 0.0), (0.5, 0.5), (1.0, 1.0), (1.7, 1.0), (-0.2, 0.0)):   # clamped to [0, 1]
        for epoch in (0.0, 3.0):                                      # epochs do not matter
            terms = method(s, te, batch, {"fraction": fraction, "epoch": epoch})
            assert set(terms) == {"bam/cls", "bam/seg"}
            cls = sum(hand_bam_row(a, b, g, p) for a, b, g in zip(S_CLS, T_CLS, Y_CLS)) / 2
            seg = sum(hand_bam_row(a, b, g, p) for a, b, g in seg_rows) / 3
            assert float(terms["bam/cls"]) == pytest.approx(cls, rel=1e-5, abs=1e-6), (fraction, epoch)
            assert float(terms["bam/seg"]) == pytest.approx(seg, rel=1e-5, abs=1e-6), (fraction, epoch)
            assert method.weight("bam/cls", {"fraction": fraction, "epoch": epoch}) == 1.0
    # At fraction 1 BAM is the plain cross-entropy with the labels.
    ce = -(math.log(softmax(S_CLS[0])[1]) + math.log(softmax(S_CLS[1])[2])) / 2
    assert float(method(s, te, batch, {"fraction": 1.0, "epoch": 0.0})["bam/cls"]) == pytest.approx(ce, rel=1e-5)


def test_bam_tasks_weights_and_errors():
    tasks = _real_tasks()
    method = TeacherAnnealing(_cfg("bam", weight={"seg": 0.3}), tasks, ["seg", "depth"])
    s, te, batch = _label_outputs()
    assert set(method(s, te, batch, START)) == {"bam/seg"}
    assert method.weight("bam/seg", START) == pytest.approx(0.3)
    with pytest.raises(KdmtlError, match="bam"):
        TeacherAnnealing(_cfg("bam"), tasks, ["depth"])
    with pytest.raises(KdmtlError, match="loss.bam.weight"):
        TeacherAnnealing(_cfg("bam", weight={"cls": 1.0, "depth": 1.0}), tasks, ["cls", "depth"])


def test_bam_reduction_sum_is_the_official_sum_over_the_batch():
    tasks = _real_tasks()
    s, te, batch = _label_outputs()
    mean = TeacherAnnealing(_cfg("bam"), tasks, list(tasks))(s, te, batch, {"fraction": 0.3, "epoch": 0.0})
    total = TeacherAnnealing(_cfg("bam", reduction="sum"), tasks, list(tasks))(s, te, batch,
                                                                              {"fraction": 0.3, "epoch": 0.0})
    assert float(total["bam/cls"]) == pytest.approx(2 * float(mean["bam/cls"]), rel=1e-6)   # 2 samples
    assert float(total["bam/seg"]) == pytest.approx(3 * float(mean["bam/seg"]), rel=1e-6)   # 3 valid pixels
    with pytest.raises(KdmtlError, match="loss.bam.reduction"):
        TeacherAnnealing(_cfg("bam", reduction="max"), tasks, list(tasks))


# ---------------------------------------------------------------- AT
F_S1 = [[[[1.0, 2.0], [0.0, 1.0]], [[3.0, -1.0], [1.0, 0.0]]]]                             # [1, 2, 2, 2]
F_T1 = [[[[0.5, 1.0], [2.0, 1.0]], [[1.0, 0.0], [-1.0, 2.0]], [[0.0, 1.0], [1.0, 1.0]]]]   # [1, 3, 2, 2]
F_S2 = [[[[2.0, 0.0]]], [[[1.0, 1.0]]]]                                                  # [2, 1, 1, 2]
F_T2 = [[[[1.0, 3.0]], [[0.5, -2.0]]], [[[0.0, 2.0]], [[1.0, 1.0]]]]                       # [2, 2, 1, 2]


def test_at_terms_per_pair_by_hand():
    pair = ["trunk.stages.1", "trunk.stages.2"]
    method = AttentionTransfer(_cfg("at", student=pair, teacher=pair), _real_tasks(), ["cls"])
    assert method.name == "at"
    assert method.student_features == ["trunk.stages.1", "trunk.stages.2"]
    assert method.teacher_features == ["trunk.stages.1", "trunk.stages.2"]
    assert len(method.modules) == 0 and method.param_groups(0.1) == []
    student = _out(features={"trunk.stages.1": t(F_S1), "trunk.stages.2": t(F_S2)})
    teacher = _out(features={"trunk.stages.1": t(F_T1), "trunk.stages.2": t(F_T2)})
    method.setup(student["features"], teacher["features"])
    terms = method(student, teacher, {}, START)
    assert set(terms) == {"at/trunk.stages.1", "at/trunk.stages.2"}
    assert float(terms["at/trunk.stages.1"]) == pytest.approx(hand_at_loss(F_S1, F_T1), abs=1e-7)
    assert float(terms["at/trunk.stages.2"]) == pytest.approx(hand_at_loss(F_S2, F_T2), abs=1e-7)
    assert hand_at_loss(F_S1, F_T1) > 0 and hand_at_loss(F_S2, F_T2) > 0
    for term in terms:                                                  # beta = 1000 for each pair
        assert method.weight(term, START) == 1000.0 and method.weight(term, {"fraction": 1, "epoch": 9}) == 1000.0


def test_at_pairs_by_position_and_names_terms_by_student_path():
    cfg = _cfg("at", student=["trunk.stem"], teacher=["trunk.stages.0"], weight=50.0)
    method = AttentionTransfer(cfg, _real_tasks(), ["cls"])
    assert method.student_features == ["trunk.stem"] and method.teacher_features == ["trunk.stages.0"]
    student = _out(features={"trunk.stem": t(F_S1)})
    teacher = _out(features={"trunk.stages.0": t(F_T1), "trunk.stem": t(F_S1)})   # the same path is not used
    method.setup(student["features"], teacher["features"])
    terms = method(student, teacher, {}, START)
    assert set(terms) == {"at/trunk.stem"} and method.weight("at/trunk.stem", START) == 50.0
    assert float(terms["at/trunk.stem"]) == pytest.approx(hand_at_loss(F_S1, F_T1), abs=1e-7)


@pytest.mark.parametrize("name", ["at", "fitnet"])
@pytest.mark.parametrize("student, teacher", [(["trunk.stages.1", "trunk.stages.2"], ["trunk.stages.2"]),
                                              (["trunk.stages.2"], []),
                                              ([], [])])
def test_feature_pairs_of_different_lengths_are_a_kdmtl_error(name, student, teacher):
    cls = {"at": AttentionTransfer, "fitnet": FitNet}[name]
    with pytest.raises(KdmtlError, match=f"loss.{name}.student and loss.{name}.teacher") as info:
        cls(_cfg(name, student=student, teacher=teacher), _real_tasks(), ["cls"])
    assert f"got {len(student)} and {len(teacher)}" in str(info.value)
    with pytest.raises(KdmtlError, match=f"loss.{name}"):
        build_methods(_loss_cfg(name, **{name: {"student": student, "teacher": teacher}}), _real_tasks(), ["cls"])


# ---------------------------------------------------------------- FitNet
def test_fitnet_builds_a_convreg_per_pair_in_setup():
    cfg = _cfg("fitnet", student=["trunk.stages.1", "trunk.stages.2"], teacher=["trunk.stages.2", "trunk.stages.2"])
    method = FitNet(cfg, _real_tasks(), ["cls"])
    assert method.name == "fitnet"
    assert method.student_features == ["trunk.stages.1", "trunk.stages.2"]
    assert method.teacher_features == ["trunk.stages.2", "trunk.stages.2"]
    assert len(method.modules) == 0 and method.param_groups(0.1) == []   # nothing before setup
    method.setup({"trunk.stages.1": torch.zeros(2, 2, 4, 4), "trunk.stages.2": torch.zeros(2, 4, 2, 2)},
                 {"trunk.stages.2": torch.zeros(2, 6, 2, 2)})
    assert len(method.modules) == 2
    regressors = list(method.modules.values())
    assert all(isinstance(r, ConvReg) for r in regressors)
    # 4x4 -> 2x2: RepDistiller's 3x3 stride-2 conv; 2x2 -> 2x2: a 1x1 conv; both with bias.
    assert [tuple(r.conv.weight.shape) for r in regressors] == [(6, 2, 3, 3), (6, 4, 1, 1)]
    assert regressors[0].conv.stride == (2, 2) and all(r.conv.bias is not None for r in regressors)
    [group] = method.param_groups(0.05)
    assert group["lr"] == 0.05
    assert {id(p) for p in group["params"]} == {id(p) for p in method.modules.parameters()}
    assert len(group["params"]) == 8                                    # conv weight, bias, bn weight, bias, twice
    assert {method.weight(f"fitnet/{s}", START) for s in cfg.student} == {100.0}


def test_fitnet_term_by_hand():
    method = FitNet(_cfg("fitnet", student=["trunk.stages.2"], teacher=["trunk.stages.2"]), _real_tasks(), ["cls"])
    student_f = [[[[1.0, 2.0]], [[0.0, -1.0]]], [[[3.0, 1.0]], [[2.0, 0.5]]]]         # [2, 2, 1, 2]
    teacher_f = [[[[1.0, 0.0]], [[2.0, 1.0]], [[0.0, 0.0]]],
                 [[[4.0, 1.0]], [[-1.0, 0.5]], [[1.0, 2.0]]]]                          # [2, 3, 1, 2]
    method.setup({"trunk.stages.2": t(student_f)}, {"trunk.stages.2": t(teacher_f)})
    [regressor] = method.modules.values()
    weight = [[1.0, 0.5], [0.0, -1.0], [2.0, 1.0]]
    bias = [0.5, -0.25, 0.0]
    with torch.no_grad():
        regressor.conv.weight.copy_(t(weight).view(3, 2, 1, 1))
        regressor.conv.bias.copy_(t(bias))
    regressor.eval()             # BatchNorm at its initial running statistics: x / sqrt(1 + eps)
    terms = method(_out(features={"trunk.stages.2": t(student_f)}), _out(features={"trunk.stages.2": t(teacher_f)}),
                   {}, START)
    assert set(terms) == {"fitnet/trunk.stages.2"}
    scale = 1 / math.sqrt(1 + 1e-5)
    diffs = [(max(scale * (r + bias[o]), 0.0) - tv) ** 2        # conv + bias, BN, ReLU
             for s_sample, t_sample in zip(student_f, teacher_f)
             for o, (r_c, t_c) in enumerate(zip(hand_matmul_1x1(weight, s_sample), t_sample))
             for r_row, t_row in zip(r_c, t_c) for r, tv in zip(r_row, t_row)]
    assert len(diffs) == 12
    assert float(terms["fitnet/trunk.stages.2"].detach()) == pytest.approx(sum(diffs) / 12, rel=1e-5)


def test_fitnet_size_cases_and_the_conv1x1_setting():
    gen = torch.Generator().manual_seed(1)
    s, te = torch.randn(2, 4, 2, 2, generator=gen), torch.randn(2, 6, 4, 4, generator=gen)
    method = FitNet(_cfg("fitnet", student=["trunk.stages.2"], teacher=["trunk.stages.2"]), _real_tasks(), ["cls"])
    method.setup({"trunk.stages.2": s}, {"trunk.stages.2": te})         # 2x2 -> 4x4: ConvTranspose2d 4x4/2
    [regressor] = method.modules.values()
    assert isinstance(regressor.conv, torch.nn.ConvTranspose2d)
    terms = method(_out(features={"trunk.stages.2": s}), _out(features={"trunk.stages.2": te}), {}, START)
    assert float(terms["fitnet/trunk.stages.2"].detach()) == pytest.approx(float(hint_loss(regressor(s), te)), rel=1e-6)
    # 2x2 -> 3x3 is no ConvReg case: a one-line error naming the setting that bridges it.
    odd = torch.randn(2, 6, 3, 3, generator=gen)
    with pytest.raises(KdmtlError, match="loss.fitnet.regressor=conv1x1"):
        method.setup({"trunk.stages.2": s}, {"trunk.stages.2": odd})
    resized = FitNet(_cfg("fitnet", student=["trunk.stages.2"], teacher=["trunk.stages.2"], regressor="conv1x1"),
                     _real_tasks(), ["cls"])
    resized.setup({"trunk.stages.2": s}, {"trunk.stages.2": odd})
    [r] = resized.modules.values()
    assert r(s).shape == odd.shape
    with pytest.raises(KdmtlError, match="loss.fitnet.regressor"):
        FitNet(_cfg("fitnet", regressor="mlp"), _real_tasks(), ["cls"])
    # Features that are not [N, C, H, W] maps fail at setup.
    flat = FitNet(_cfg("fitnet", student=["heads.cls"], teacher=["heads.cls"]), _real_tasks(), ["cls"])
    with pytest.raises(KdmtlError, match="loss.fitnet"):
        flat.setup({"heads.cls": torch.zeros(2, 3)}, {"heads.cls": torch.zeros(2, 3)})


# ---------------------------------------------------------------- KD4MTL
KS = [[[[1.0, -2.0]], [[0.5, 1.0]]]]                                     # student shared feature [1, 2, 1, 2]
KT = [[[[1.0, 0.0]], [[0.0, 2.0]], [[1.0, 1.0]]]]                        # teacher feature [1, 3, 1, 2]
KW = [[1.0, 0.0], [0.5, -1.0], [2.0, 1.0]]                               # adaptor weight [3, 2]
ONE = {"student": "trunk.stages.2", "teacher": "trunk.stages.2"}         # one feature, as a string


def test_kd4mtl_one_bias_free_adaptor_per_teacher_task_and_feature_with_its_own_lr():
    tasks = _real_tasks()
    method = KD4MTL(_cfg("kd4mtl", **ONE), tasks, ["cls", "seg", "depth"])
    assert method.name == "kd4mtl"
    assert method.student_features == ["trunk.stages.2"] and method.teacher_features == ["trunk.stages.2"]
    method.setup({"trunk.stages.2": t(KS)}, {"trunk.stages.2": t(KT)})
    assert list(method.modules) == ["cls__0", "seg__0", "depth__0"]
    for adaptor in method.modules.values():
        assert isinstance(adaptor, TaskAdaptor) and adaptor.conv.bias is None
        assert tuple(adaptor.conv.weight.shape) == (3, 2, 1, 1)
        assert [n for n, _ in adaptor.named_parameters()] == ["conv.weight"]
    [group] = method.param_groups(0.5)                                  # the base lr is not used
    assert (group["lr"], group["weight_decay"]) == (0.1, 5e-4)
    assert [id(p) for p in group["params"]] == [id(method.modules[f"{k}__0"].conv.weight)
                                                for k in ("cls", "seg", "depth")]
    assert {method.weight(f"kd4mtl/{k}", START) for k in ("cls", "seg", "depth")} == {1.0}
    # Only the tasks the teacher covers get an adaptor and a term.
    partial = KD4MTL(_cfg("kd4mtl", weight={"seg": 0.25}, **ONE), tasks, ["seg"])
    partial.setup({"trunk.stages.2": t(KS)}, {"trunk.stages.2": t(KT)})
    assert list(partial.modules) == ["seg__0"] and partial.weight("kd4mtl/seg", START) == 0.25
    terms = partial(_out(features={"trunk.stages.2": t(KS)}), _out(features={"trunk.stages.2": t(KT)}), {}, START)
    assert set(terms) == {"kd4mtl/seg"}


def test_kd4mtl_term_by_hand():
    method = KD4MTL(_cfg("kd4mtl", **ONE), _real_tasks(), ["cls", "depth"])
    method.setup({"trunk.stages.2": t(KS)}, {"trunk.stages.2": t(KT)})
    with torch.no_grad():
        method.modules["cls__0"].conv.weight.copy_(t(KW).view(3, 2, 1, 1))
        method.modules["depth__0"].conv.weight.copy_(-2.0 * t(KW).view(3, 2, 1, 1))   # a negative rescaling
    terms = method(_out(features={"trunk.stages.2": t(KS)}), _out(features={"trunk.stages.2": t(KT)}), {}, START)
    assert set(terms) == {"kd4mtl/cls", "kd4mtl/depth"}
    adapted = [hand_matmul_1x1(KW, KS[0])]
    flipped = [hand_matmul_1x1([[-2.0 * w for w in row] for row in KW], KS[0])]
    assert float(terms["kd4mtl/cls"].detach()) == pytest.approx(hand_kd4mtl(adapted, KT), rel=1e-5)
    assert float(terms["kd4mtl/depth"].detach()) == pytest.approx(hand_kd4mtl(flipped, KT), rel=1e-5)
    assert hand_kd4mtl(flipped, KT) != pytest.approx(hand_kd4mtl(adapted, KT))


def test_kd4mtl_sums_its_features_per_task():
    gen = torch.Generator().manual_seed(5)
    s0, s1 = torch.randn(2, 4, 1, 1, generator=gen), torch.randn(2, 3, 4, 4, generator=gen)
    t0, t1 = torch.randn(2, 6, 1, 1, generator=gen), torch.randn(2, 5, 4, 4, generator=gen)
    method = KD4MTL(_cfg("kd4mtl", student=["a", "b"], teacher=["c", "d"]), _real_tasks(), ["cls"])
    method.setup({"a": s0, "b": s1}, {"c": t0, "d": t1})
    assert list(method.modules) == ["cls__0", "cls__1"]
    terms = method(_out(features={"a": s0, "b": s1}), _out(features={"c": t0, "d": t1}), {}, START)
    expected = (kd4mtl_loss(method.modules["cls__0"](s0, (1, 1)), t0)
                + kd4mtl_loss(method.modules["cls__1"](s1, (4, 4)), t1))
    assert float(terms["kd4mtl/cls"].detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
    with pytest.raises(KdmtlError, match="loss.kd4mtl.teacher"):
        KD4MTL(_cfg("kd4mtl", student=["a"], teacher=["seg:c"]), _real_tasks(), ["cls"])


def test_kd4mtl_uses_per_task_teacher_features_when_present():
    method = KD4MTL(_cfg("kd4mtl", **ONE), _real_tasks(), ["cls", "seg", "depth"])
    gen = torch.Generator().manual_seed(2)
    shared = torch.randn(2, 4, 2, 2, generator=gen)
    feats = {"cls:trunk.stages.2": torch.randn(2, 3, 2, 2, generator=gen),
             "seg:trunk.stages.2": torch.randn(2, 5, 4, 4, generator=gen),
             "trunk.stages.2": torch.randn(2, 6, 2, 2, generator=gen)}       # depth has no own teacher feature
    method.setup({"trunk.stages.2": shared}, feats)
    assert {k: tuple(m.conv.weight.shape) for k, m in method.modules.items()} == {
        "cls__0": (3, 4, 1, 1), "seg__0": (5, 4, 1, 1), "depth__0": (6, 4, 1, 1)}
    terms = method(_out(features={"trunk.stages.2": shared}), _out(features=feats), {}, START)
    for task, key in (("cls", "cls:trunk.stages.2"), ("seg", "seg:trunk.stages.2"), ("depth", "trunk.stages.2")):
        target = feats[key]
        expected = kd4mtl_loss(method.modules[f"{task}__0"](shared, target.shape[-2:]), target)
        assert float(terms[f"kd4mtl/{task}"].detach()) == pytest.approx(float(expected.detach()), rel=1e-6), task


def test_kd4mtl_needs_feature_maps():
    method = KD4MTL(_cfg("kd4mtl", student="heads.cls", teacher="trunk.stages.2"), _real_tasks(), ["cls"])
    with pytest.raises(KdmtlError, match="loss.kd4mtl"):
        method.setup({"heads.cls": torch.zeros(2, 3)}, {"trunk.stages.2": torch.zeros(2, 4, 2, 2)})


# ---------------------------------------------------------------- with real models
def _batch(seed=0, n=2, size=16):
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.randn(n, 3, size, size, generator=g),
            "targets": {"cls": torch.tensor([0, 2]), "seg": torch.randint(0, 3, (n, size, size), generator=g),
                        "depth": torch.rand(n, size, size, generator=g) * 2 + 1}}


def _models(tasks):
    torch.manual_seed(0)
    student = build_model(ModelConfig(width=4, decoder_width=4), tasks)
    teacher = build_model(ModelConfig(width=8, decoder_width=8), tasks)
    return student, teacher


ALL = ("kd", "dkd", "at", "fitnet", "kd4mtl", "bam")


def test_every_method_end_to_end_with_real_models():
    tasks = _real_tasks()
    student, teacher = _models(tasks)
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    methods = build_methods(_loss_cfg(*ALL), tasks, list(tasks))
    objective = Objective(tasks, 1.0, methods, teacher)
    assert not teacher.training and all(not p.requires_grad for p in teacher.parameters())
    batch = _batch()
    student.train()
    objective.setup(student, batch, torch.device("cpu"))
    assert student.training and not teacher.training

    by_name = {m.name: m for m in methods}
    # Learned parts, built from the real feature shapes: stages 0, 1, 2 have 4, 8, 16 (student) and
    # 8, 16, 32 (teacher) channels; FitNet's hint is stage 1 (same size: ConvReg's 1x1 conv), KD4MTL's
    # features the trunk's last (trunk/-1 = stage 2) and first (trunk/0 = stage 0) outputs.
    [regressor] = by_name["fitnet"].modules.values()
    assert tuple(regressor.conv.weight.shape) == (16, 8, 1, 1) and regressor.conv.bias is not None
    assert {k: tuple(a.conv.weight.shape) for k, a in by_name["kd4mtl"].modules.items()} == {
        **{f"{k}__0": (32, 16, 1, 1) for k in tasks}, **{f"{k}__1": (8, 4, 1, 1) for k in tasks}}
    assert set(objective.modules) == set(ALL)
    assert objective.modules["kd4mtl"] is by_name["kd4mtl"].modules
    groups = objective.param_groups(0.003)
    assert [g["lr"] for g in groups] == [0.003, 0.1]                   # fitnet (base lr), kd4mtl (adaptor_lr)
    optimizer = build_optimizer([{"params": list(student.parameters())}, *groups],
                                OmegaConf.merge(OmegaConf.structured(OptimConfig), {"lr": 0.003}))
    assert [g["lr"] for g in optimizer.param_groups] == [0.003, 0.003, 0.1]

    objective.set_progress(0.5, 0.5)
    out = student(batch["image"])
    assert set(out["features"]) == {"trunk.stages.0", "trunk.stages.1", "trunk.stages.2", "trunk/-1", "trunk/0"}
    assert torch.equal(out["features"]["trunk/-1"], out["features"]["trunk.stages.2"])
    total, terms = objective(out, batch)
    assert set(terms) == {"task/cls", "task/seg", "task/depth", "kd/cls", "kd/seg", "kd/depth", "dkd/cls", "dkd/seg",
                          "at/trunk.stages.0", "at/trunk.stages.1", "at/trunk.stages.2", "fitnet/trunk.stages.1",
                          "kd4mtl/cls", "kd4mtl/seg", "kd4mtl/depth", "bam/cls", "bam/seg",
                          "loss/total", "loss/task"}
    assert all(torch.isfinite(v).all() for v in terms.values())
    # total = task terms + each method's weight (at this progress) times its terms.
    expected = sum(float(terms[f"task/{k}"].detach()) for k in tasks)
    for method in methods:
        for term in [n for n in terms if n.startswith(method.name + "/")]:
            expected += method.weight(term, objective.progress) * float(terms[term].detach())
    assert float(total.detach()) == pytest.approx(expected, rel=1e-5)
    assert by_name["dkd"].weight("dkd/cls", objective.progress) == pytest.approx(1 / 20)   # first epoch of 20
    # Wiring of the feature terms: the hooked features of both models.
    with torch.no_grad():
        t_feats = teacher(batch["image"])["features"]
    assert set(t_feats) == {"trunk.stages.0", "trunk.stages.1", "trunk.stages.2", "trunk/-1", "trunk/0"}
    for path in ("trunk.stages.0", "trunk.stages.1", "trunk.stages.2"):
        assert float(terms[f"at/{path}"].detach()) == pytest.approx(
            float(at_loss(out["features"][path].detach(), t_feats[path])), rel=1e-5)

    optimizer.zero_grad()
    total.backward()
    # Gradients reach every student parameter and every learned part, never the teacher.
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in objective.modules.parameters())
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    adaptor_before = by_name["kd4mtl"].modules["cls__0"].conv.weight.detach().clone()
    optimizer.step()
    assert not torch.equal(by_name["kd4mtl"].modules["cls__0"].conv.weight, adaptor_before)
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k]), k


def test_unknown_student_module_path_is_a_kdmtl_error_listing_names():
    tasks = _real_tasks()
    student, teacher = _models(tasks)
    cfg = _loss_cfg("at", at={"student": ["trunk.stage.9"], "teacher": ["trunk.stages.2"]})
    objective = Objective(tasks, 1.0, build_methods(cfg, tasks, list(tasks)), teacher)
    with pytest.raises(KdmtlError) as info:
        objective.setup(student, _batch(), torch.device("cpu"))
    message = str(info.value)
    assert "trunk.stage.9" in message
    assert "trunk.stages.1" in message and "trunk.stages.2" in message and "heads.seg" in message


def test_unknown_teacher_module_path_is_a_kdmtl_error_listing_names():
    tasks = _real_tasks()
    student, teacher = _models(tasks)
    cfg = _loss_cfg("fitnet", fitnet={"student": ["trunk.stages.2"], "teacher": ["trunk.stage.7"]})
    objective = Objective(tasks, 1.0, build_methods(cfg, tasks, list(tasks)), teacher)
    with pytest.raises(KdmtlError) as info:
        objective.setup(student, _batch(), torch.device("cpu"))
    assert "trunk.stage.7" in str(info.value) and "trunk.stages.2" in str(info.value)


def _per_task_teachers(tasks):
    """Single-task teachers of different widths, so that each adaptor's shape names its teacher."""
    torch.manual_seed(1)
    return TaskTeachers({name: build_model(ModelConfig(width=w, decoder_width=4), {name: tasks[name]})
                         for name, w in (("cls", 8), ("seg", 4), ("depth", 6))})


def test_kd4mtl_with_per_task_teachers_end_to_end():
    tasks = _real_tasks()
    student, _ = _models(tasks)
    teachers = _per_task_teachers(tasks)
    objective = Objective(tasks, 1.0, build_methods(_loss_cfg("kd4mtl"), tasks, list(tasks)), teachers)
    batch = _batch()
    objective.setup(student, batch, torch.device("cpu"))
    [method] = objective.methods
    # Each task's adaptors map the student's 16 (trunk/-1) and 4 (trunk/0) channels to its own teacher's.
    assert {k: tuple(a.conv.weight.shape) for k, a in method.modules.items()} == {
        "cls__0": (32, 16, 1, 1), "seg__0": (16, 16, 1, 1), "depth__0": (24, 16, 1, 1),
        "cls__1": (8, 4, 1, 1), "seg__1": (4, 4, 1, 1), "depth__1": (6, 4, 1, 1)}
    out = student(batch["image"])
    total, terms = objective(out, batch)
    with torch.no_grad():
        t_feats = teachers(batch["image"])["features"]
    assert set(t_feats) == {f"{k}:trunk/{i}" for k in tasks for i in (-1, 0)}
    for task in tasks:
        expected = sum(kd4mtl_loss(method.modules[f"{task}__{j}"](out["features"][name], t_feats[f"{task}:{name}"].shape[-2:]),
                                   t_feats[f"{task}:{name}"]) for j, name in enumerate(("trunk/-1", "trunk/0")))
        assert float(terms[f"kd4mtl/{task}"].detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    total.backward()
    assert all(p.grad is not None for p in method.modules.parameters())
    assert all(p.grad is None for p in teachers.parameters())


def test_at_with_a_named_per_task_teacher_feature():
    tasks = _real_tasks()
    student, _ = _models(tasks)
    teachers = _per_task_teachers(tasks)
    cfg = _loss_cfg("at", at={"student": ["trunk.stages.2"], "teacher": ["seg:trunk.stages.2"]})
    objective = Objective(tasks, 1.0, build_methods(cfg, tasks, list(tasks)), teachers)
    batch = _batch()
    objective.setup(student, batch, torch.device("cpu"))
    out = student(batch["image"])
    _, terms = objective(out, batch)
    with torch.no_grad():
        target = teachers(batch["image"])["features"]["seg:trunk.stages.2"]
    assert float(terms["at/trunk.stages.2@seg"].detach()) == pytest.approx(
        float(at_loss(out["features"]["trunk.stages.2"].detach(), target)), rel=1e-5)


@pytest.mark.parametrize("name", ["at", "fitnet"])
def test_unprefixed_teacher_path_with_per_task_teachers_is_one_term_per_task(name):
    """With per-task teachers an unprefixed teacher path means that module in every task's
    teacher: the method's own defaults work, one term `<name>/<student path>@<task>` per task."""
    tasks = _real_tasks()
    student, _ = _models(tasks)
    teachers = _per_task_teachers(tasks)
    objective = Objective(tasks, 1.0, build_methods(_loss_cfg(name), tasks, list(tasks)), teachers)
    batch = _batch()
    objective.setup(student, batch, torch.device("cpu"))
    out = student(batch["image"])
    total, terms = objective(out, batch)
    [method] = objective.methods
    expected = {f"{name}/{s}@{task}" for s in method.student_features for task in tasks}
    assert {k for k in terms if k.startswith(name + "/")} == expected
    with torch.no_grad():
        t_feats = teachers(batch["image"])["features"]
    if name == "at":
        for s in method.student_features:
            for task in tasks:
                assert float(terms[f"at/{s}@{task}"].detach()) == pytest.approx(
                    float(at_loss(out["features"][s].detach(), t_feats[f"{task}:{s}"])), rel=1e-5)
    else:
        assert len(method.modules) == len(tasks)
    total.backward()
    assert all(p.grad is None for p in teachers.parameters())


def test_a_teacher_path_missing_in_the_per_task_teachers_fails_at_setup():
    tasks = _real_tasks()
    student, _ = _models(tasks)
    cfg = _loss_cfg("at", at={"student": ["trunk.stages.2"], "teacher": ["trunk.stages.7"]})
    objective = Objective(tasks, 1.0, build_methods(cfg, tasks, list(tasks)), _per_task_teachers(tasks))
    with pytest.raises(KdmtlError, match=r"trunk\.stages\.7"):
        objective.setup(student, _batch(), torch.device("cpu"))


def test_at_on_a_module_without_feature_maps_fails_at_setup():
    """BUG (late check): FitNet and KD4MTL reject non-[N, C, H, W] features at setup with a
    KdmtlError ("pick convolutional modules"); AT does not check its pairs, so `loss.at.student=
    [heads.cls]` passes setup and fails at the first training step with a ValueError from at_loss."""
    tasks = _real_tasks()
    student, teacher = _models(tasks)
    cfg = _loss_cfg("at", at={"student": ["heads.cls"], "teacher": ["heads.cls"]})
    objective = Objective(tasks, 1.0, build_methods(cfg, tasks, list(tasks)), teacher)
    with pytest.raises(KdmtlError, match="loss.at"):
        objective.setup(student, _batch(), torch.device("cpu"))


# ---------------------------------------------------------------- through the real CLI
def test_cli_feature_methods_with_per_task_teachers_use_their_defaults(workdir, shared_cache):
    """`kdmtl train teacher=per_task loss=fitnet|at|kd4mtl debug=fast` with the methods' own
    defaults (one process for the three: loss=[fitnet,at,kd4mtl])."""
    from conftest import FAST, read_jsonl, run_kdmtl, show

    run_dir = workdir / "run"
    proc = run_kdmtl(["train", *FAST, "teacher=per_task", "loss=[fitnet,at,kd4mtl]", f"hydra.run.dir={run_dir}"],
                     workdir, shared_cache)
    assert proc.returncode == 0, show(proc)
    [epoch] = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r.get("type") == "epoch"]
    for task in ("cls", "seg", "depth"):
        assert f"train/fitnet/trunk.stages.1@{task}" in epoch
        assert all(f"train/at/trunk.stages.{i}@{task}" in epoch for i in range(3))
        assert f"train/kd4mtl/{task}" in epoch


def test_cli_bad_teacher_feature_with_per_task_teachers_fails_before_any_teacher_is_trained(workdir, tmp_path):
    from conftest import FAST, assert_one_line_error, run_kdmtl

    cache = tmp_path / "cache"
    proc = run_kdmtl(["train", *FAST, "teacher=per_task", "loss=at", "loss.at.student=[trunk.stages.2]",
                      "loss.at.teacher=[trunk.stages.9]", f"hydra.run.dir={workdir / 'bad'}"], workdir, cache)
    assert_one_line_error(proc, "trunk.stages.9", "teacher feature")
    assert not (cache / "teachers").exists() or not any((cache / "teachers").iterdir())
    # A task prefix with one multi-task teacher: refused the same way, naming the fix.
    proc = run_kdmtl(["train", *FAST, "loss=fitnet", "loss.fitnet.teacher=[seg:trunk.stages.1]",
                      f"hydra.run.dir={workdir / 'prefix'}"], workdir, cache)
    assert_one_line_error(proc, "seg:trunk.stages.1", "teacher=per_task")
    assert not (cache / "teachers").exists() or not any((cache / "teachers").iterdir())
