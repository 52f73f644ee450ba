"""Every task kind (kdmtl_cli/tasks): loss, metrics, distillation rule, flip and display, each
against numbers computed by hand on tiny tensors; the kind flags the rest of the program reads
(scaled heads, label-only KD methods); `build_tasks` with repeated kinds and auxiliary tasks;
one multi-task model with all six kinds trained a step on `shapes` targets."""

from __future__ import annotations

import math

import pytest
import torch
from hand import kl, pixel_rows, softmax
from omegaconf import OmegaConf

from kdmtl_cli.data import TargetSpec
from kdmtl_cli.data.shapes_generator import SHAPE_NAMES, generate_shapes
from kdmtl_cli.distill.dkd import DecoupledKD
from kdmtl_cli.distill.logit import LogitKD
from kdmtl_cli.errors import KdmtlError
from kdmtl_cli.models import build_model
from kdmtl_cli.models.heads import ScaledHead
from kdmtl_cli.schema import DKDConfig, KDConfig, ModelConfig
from kdmtl_cli.tasks import (
    TASK_KINDS,
    Task,
    TaskKind,
    _load_kinds,
    build_tasks,
    task_signature,
)
from kdmtl_cli.tasks.depth import DEPTH_RAMP
from kdmtl_cli.tasks.segmentation import PALETTE

_load_kinds()
NAMES = list(SHAPE_NAMES)

pytestmark = pytest.mark.usefixtures("one_thread")


def kind(name) -> TaskKind:
    return TASK_KINDS.get(name)()


def t(values):
    return torch.tensor(values, dtype=torch.float32)


def sigmoid(z):
    return 1 / (1 + math.exp(-z))


def compute(metrics, pred, target):
    """Update every metric once with (pred, target) and return {name: float}."""
    out = {}
    for name, metric in metrics.items():
        metric.update(pred, target)
        out[name] = float(metric.compute())
    return out


def facing(deg):
    """A unit normal `deg` degrees from the camera-facing (0, 0, -1), tilted towards +x."""
    a = math.radians(deg)
    return [math.sin(a), 0.0, -math.cos(a)]


def normal_map(vectors):
    """A list of 3-vectors -> one [1, 3, 1, W] map (one row of W pixels)."""
    return t(vectors).t().reshape(1, 3, 1, len(vectors))


# ================================================================ flags and defaults
def test_kind_flags():
    flags = {name: (kind(name).dense, kind(name).scaled_output, kind(name).softmax_labels)
             for name in TASK_KINDS.names()}
    assert flags == {"classification": (False, False, True), "segmentation": (True, False, True),
                     "multilabel": (False, False, False), "depth": (True, True, False),
                     "normals": (True, False, False), "regression": (False, True, False)}
    outs = {"classification": 4, "segmentation": 5, "multilabel": 4, "depth": 1, "normals": 3, "regression": 1}
    for name, n in outs.items():
        assert kind(name).out_channels(TargetSpec(name, n)) == n


def test_base_flip_and_describe_defaults():
    class Image(TaskKind):
        name, dense = "image_level", False

    class Dense(TaskKind):
        name, dense = "dense_map", True

    x = torch.arange(6.0).view(1, 2, 3)
    assert Image().flip_target(x) is x
    assert torch.equal(Dense().flip_target(x), t([[[2, 1, 0], [5, 4, 3]]]))
    assert Image().show(x, None) is None
    assert Image().describe(t([[1.5, 2.0], [0.25, -3.0]]), None) == ["1.5, 2", "0.25, -3"]
    assert Dense().describe(torch.zeros(2, 1, 4, 5), None) == ["dense_map map 1x4x5"] * 2
    # The base rule for regression-like outputs: L1 / L2 to the teacher.
    s, te = t([1.0, 2.0]), t([0.0, 4.0])
    assert float(Image().distill(s, te, 4.0, "l1")) == pytest.approx((1 + 2) / 2)
    assert float(Image().distill(s, te, 4.0, "l2")) == pytest.approx((1 + 4) / 2)


# ================================================================ classification / segmentation
S_CLS = [[1.0, 2.0, 0.5], [0.3, -1.0, 2.0]]
T_CLS = [[2.0, 0.0, 1.0], [-0.5, 0.5, 1.5]]


def test_classification_distill_is_kl_at_temperature():
    temp = 2.0
    expected = sum(kl(softmax(tr, temp), softmax(sr, temp)) for sr, tr in zip(S_CLS, T_CLS)) / 2 * temp * temp
    got = kind("classification").distill(t(S_CLS), t(T_CLS), temp, "l1")
    assert float(got) == pytest.approx(expected, abs=1e-6)
    assert torch.equal(kind("classification").flip_target(torch.tensor([1, 2])), torch.tensor([1, 2]))


def test_segmentation_distill_is_kl_per_pixel():
    s = t([[[[1.0, 3.0], [0.0, -1.0]], [[2.0, 0.0], [1.0, 2.0]], [[0.5, 0.5], [4.0, 0.0]]]])
    te = t([[[[0.0, 1.0], [2.0, 0.5]], [[1.5, -1.0], [0.0, 1.0]], [[-0.5, 2.0], [1.0, 3.0]]]])
    temp = 3.0
    rows = list(zip(pixel_rows(s), pixel_rows(te)))
    expected = sum(kl(softmax(tr, temp), softmax(sr, temp)) for sr, tr in rows) / len(rows) * temp * temp
    assert float(kind("segmentation").distill(s, te, temp, "l2")) == pytest.approx(expected, abs=1e-6)


def test_classification_describe_logits_and_labels():
    spec = TargetSpec("classification", 4, NAMES)
    logits = t([[0.0, 0.0, math.log(2.0), 0.0], [3.0, 0.0, 0.0, 0.0]])
    # softmax of row 0: 2 / (1 + 1 + 2 + 1) = 0.4 on triangle
    p1 = math.exp(3) / (math.exp(3) + 3)
    assert kind("classification").describe(logits, spec) == ["triangle (p=0.40)", f"circle (p={p1:.2f})"]
    assert kind("classification").describe(torch.tensor([3, 1]), spec) == ["cross", "square"]
    assert kind("classification").describe(torch.tensor([1]), TargetSpec("classification", 4)) == ["class 1"]
    assert kind("classification").show(logits, spec) is None


def test_segmentation_show_colours_labels_with_the_palette():
    labels = torch.tensor([[[0, 1], [255, 2]], [[17, 3], [4, 0]]])
    image = kind("segmentation").show(labels, TargetSpec("segmentation", 18))
    assert image.shape == (2, 3, 2, 2) and image.dtype == torch.float32
    assert image.min() >= 0 and image.max() <= 1

    def rgb(n, y, x):
        return [round(float(v) * 255) for v in image[n, :, y, x]]

    assert rgb(0, 0, 0) == list(PALETTE[0]) and rgb(0, 0, 1) == list(PALETTE[1])
    assert rgb(0, 1, 1) == list(PALETTE[2]) and rgb(1, 1, 0) == list(PALETTE[4])
    assert rgb(0, 1, 0) == [0, 0, 0]                              # ignored pixel: black
    assert rgb(1, 0, 0) == list(PALETTE[17 % len(PALETTE)])       # the palette repeats
    assert len(set(PALETTE)) == len(PALETTE)                      # ...but its colours are distinct
    # Logits are shown by their argmax class.
    logits = torch.zeros(1, 3, 1, 2)
    logits[0, 2, 0, 0], logits[0, 1, 0, 1] = 5.0, 5.0
    assert torch.equal(kind("segmentation").show(logits, TargetSpec("segmentation", 3)),
                       kind("segmentation").show(torch.tensor([[[2, 1]]]), TargetSpec("segmentation", 3)))


# ================================================================ multilabel
def test_multilabel_loss_is_mean_bce():
    logits = [[2.0, -1.0], [0.5, 0.0]]
    target = [[1, 0], [0, 1]]
    terms = [-math.log(sigmoid(z)) if y else -math.log(1 - sigmoid(z))
             for row, ys in zip(logits, target) for z, y in zip(row, ys)]
    got = kind("multilabel").loss(t(logits), torch.tensor(target, dtype=torch.uint8))
    assert float(got) == pytest.approx(sum(terms) / 4, abs=1e-6)


def test_multilabel_metrics_by_hand():
    # Four images, two labels; the probabilities fed as logits (the kind applies the sigmoid).
    probs = t([[0.9, 0.1], [0.6, 0.8], [0.3, 0.7], [0.2, 0.4]])
    target = torch.tensor([[1, 0], [0, 1], [1, 1], [0, 0]], dtype=torch.uint8)
    # AP, label 0: ranked 0.9 (+), 0.6 (-), 0.3 (+), 0.2 (-): precision at the positives 1/1 and 2/3
    ap0 = (1 / 1 + 2 / 3) / 2
    # label 1: 0.8 (+), 0.7 (+), 0.4 (-), 0.1 (-): 1/1 and 2/2
    ap1 = (1 / 1 + 2 / 2) / 2
    # F1 at 0.5: label 0 predicts [1, 1, 0, 0] vs [1, 0, 1, 0]: tp 1, fp 1, fn 1 -> 0.5;
    # label 1 predicts [0, 1, 1, 0] vs [0, 1, 1, 0] -> 1
    f1 = (0.5 + 1.0) / 2
    # whole rows right: image 0 ([1,0]) and image 3 ([0,0])
    exact = 2 / 4
    k = kind("multilabel")
    pred, tgt = k.prepare_for_metrics(torch.logit(probs), target)
    got = compute(k.metrics(TargetSpec("multilabel", 2)), pred, tgt)
    assert got == pytest.approx({"map": (ap0 + ap1) / 2, "f1": f1, "exact_match": exact}, abs=1e-5)


def test_multilabel_metrics_read_logits_inside_0_1_as_logits():
    """Logits all within [0, 1] are still logits (torchmetrics alone would read them as probabilities)."""
    k = kind("multilabel")
    logits = t([[0.2, 0.9], [0.1, 0.4]])          # all positive: every label predicted
    target = torch.ones(2, 2, dtype=torch.uint8)
    pred, tgt = k.prepare_for_metrics(logits, target)
    assert compute({"exact_match": k.metrics(TargetSpec("multilabel", 2))["exact_match"]}, pred, tgt) == \
        {"exact_match": 1.0}


def test_multilabel_distill_is_binary_kl_per_label():
    s, te, temp = [[1.0, -2.0, 0.5]], [[3.0, 0.0, -1.0]], 2.0
    values = []
    for zs, zt in zip(s[0], te[0]):
        ps, pt = sigmoid(zs / temp), sigmoid(zt / temp)
        values.append(kl([pt, 1 - pt], [ps, 1 - ps]))
    expected = sum(values) / 3 * temp * temp
    got = kind("multilabel").distill(t(s), t(te), temp, "l1")
    assert float(got) == pytest.approx(expected, abs=1e-6)
    assert float(kind("multilabel").distill(t(te), t(te), temp, "l1")) == pytest.approx(0.0, abs=1e-7)
    # saturated logits stay finite
    assert math.isfinite(float(kind("multilabel").distill(t([[80.0, -80.0]]), t([[-80.0, 80.0]]), 1.0, "l1")))


def test_multilabel_describe_flip_show():
    k, spec = kind("multilabel"), TargetSpec("multilabel", 4, NAMES)
    logits = t([[2.0, -1.0, 0.3, -0.1], [-1.0, -1.0, -1.0, -1.0]])
    assert k.describe(logits, spec) == ["circle, triangle", "(none)"]
    assert k.describe(torch.tensor([[0, 1, 0, 1]], dtype=torch.uint8), spec) == ["square, cross"]
    present = torch.tensor([[1, 0, 1, 0]], dtype=torch.uint8)
    assert k.flip_target(present) is present and k.show(logits, spec) is None


# ================================================================ regression
def test_regression_loss_metrics_distill_describe():
    k, spec = kind("regression"), TargetSpec("regression", mean=2.0, std=1.0)
    out = t([[1.5], [2.0], [4.0]])                 # [N, 1], as the pooled head returns it
    target = t([1.0, 3.0, 3.0])
    # |0.5| + |-1| + |1|
    assert float(k.loss(out, target)) == pytest.approx((0.5 + 1 + 1) / 3)
    assert float(k.loss(out.squeeze(1), target)) == pytest.approx((0.5 + 1 + 1) / 3)   # [N] too
    got = compute(k.metrics(spec), *k.prepare_for_metrics(out, target))
    assert got == pytest.approx({"mae": 2.5 / 3, "rmse": math.sqrt((0.25 + 1 + 1) / 3)}, abs=1e-6)
    teacher = t([[1.0], [4.0], [4.0]])
    assert float(k.distill(out, teacher, 4.0, "l1")) == pytest.approx((0.5 + 2 + 0) / 3)
    assert float(k.distill(out, teacher, 4.0, "l2")) == pytest.approx((0.25 + 4 + 0) / 3)
    assert k.describe(out, spec) == ["1.500", "2.000", "4.000"]
    assert k.flip_target(target) is target and k.show(out, spec) is None


# ================================================================ depth
def test_depth_show_ramp_and_flip():
    k = kind("depth")
    pred = t([[[[2.0, 4.0], [6.0, 0.0]]]])         # [1, 1, 2, 2]; 0 = no depth
    image = k.show(pred, TargetSpec("depth"))
    assert image.shape == (1, 3, 2, 2) and image.min() >= 0 and image.max() <= 1
    assert image[0, :, 0, 0].tolist() == pytest.approx(list(DEPTH_RAMP[0]))     # nearest
    assert image[0, :, 1, 0].tolist() == pytest.approx(list(DEPTH_RAMP[-1]))    # farthest
    assert image[0, :, 0, 1].tolist() == pytest.approx(list(DEPTH_RAMP[2]))     # half way: middle stop
    assert image[0, :, 1, 1].tolist() == [0.0, 0.0, 0.0]                        # invalid: black
    assert torch.equal(k.show(pred.squeeze(1), TargetSpec("depth")), image)     # a target [N,H,W] alike
    assert torch.equal(k.flip_target(t([[[1, 2], [3, 4]]])), t([[[2, 1], [4, 3]]]))
    assert float(k.distill(pred, torch.zeros_like(pred), 1.0, "l1")) == pytest.approx(12 / 4)


# ================================================================ normals
def test_normals_loss_over_valid_pixels():
    target = normal_map([[1, 0, 0], [1, 0, 0], [1, 0, 0], [0, 0, 0]])
    pred = normal_map([[2, 0, 0], [0, 3, 0], [1, 1, 0], [5, 5, 5]])   # last pixel invalid
    # cos: 1, 0, 1/sqrt(2)
    expected = ((1 - 1) + (1 - 0) + (1 - 1 / math.sqrt(2))) / 3
    assert float(kind("normals").loss(pred, target)) == pytest.approx(expected, abs=1e-6)


def test_normals_metrics_by_hand():
    k = kind("normals")
    target = normal_map([facing(0)] * 5 + [[0, 0, 0]])
    pred = normal_map([facing(a) for a in (0, 20, 25, 45, 90)] + [facing(10)])   # last pixel invalid
    pred[0, :, 0, 1] *= 3.0                                                        # length does not matter
    got = compute(k.metrics(TargetSpec("normals")), *k.prepare_for_metrics(pred, target))
    angles = [0, 20, 25, 45, 90]
    assert got == pytest.approx({"mean_angle": sum(angles) / 5, "median_angle": 25.0,
                                 "within_11_25": 1 / 5, "within_22_5": 2 / 5, "within_30": 3 / 5}, abs=1e-3)


def test_normals_median_over_batches_and_opposite_vectors():
    """The median sees every angle of every update (even count: mean of the middle two);
    opposite vectors give 180 degrees, not NaN (the cosine is clamped)."""
    k = kind("normals")
    metrics = k.metrics(TargetSpec("normals"))
    for angles in ((0, 90), (45, 180)):
        target = normal_map([facing(0)] * 2)
        pred = normal_map([facing(a) for a in angles])
        for metric in metrics.values():
            metric.update(*k.prepare_for_metrics(pred, target))
    got = {name: float(m.compute()) for name, m in metrics.items()}
    assert got["median_angle"] == pytest.approx((45 + 90) / 2, abs=1e-3)
    assert got["mean_angle"] == pytest.approx((0 + 90 + 45 + 180) / 4, abs=1e-3)
    assert got["within_30"] == pytest.approx(1 / 4)


def test_normals_distill_flip_show():
    k = kind("normals")
    s = normal_map([[1, 0, 0], [0, 2, 0], [1, 1, 0]])
    te = normal_map([[1, 0, 0], [1, 0, 0], [0, 1, 0]])
    expected = ((1 - 1) + (1 - 0) + (1 - 1 / math.sqrt(2))) / 3
    assert float(k.distill(s, te, 4.0, "l1")) == pytest.approx(expected, abs=1e-6)

    m = t([[[[0.6, 0.0]], [[0.0, 0.8]], [[-0.8, -0.6]]]])          # [1, 3, 1, 2]: two unit vectors
    flipped = k.flip_target(m)
    assert flipped[0, :, 0, 0].tolist() == pytest.approx([-0.0, 0.8, -0.6])     # was the right pixel
    assert flipped[0, :, 0, 1].tolist() == pytest.approx([-0.6, 0.0, -0.8])     # x negated
    assert torch.equal(k.flip_target(m[0]), flipped[0])                         # one sample [3,H,W] alike
    assert torch.equal(k.flip_target(flipped), m)                               # a flip undoes itself

    shown = k.show(torch.cat([m * 4, torch.zeros(1, 3, 1, 2)], dim=-1), TargetSpec("normals"))
    assert shown.shape == (1, 3, 1, 4) and shown.min() >= 0 and shown.max() <= 1
    assert shown[0, :, 0, 0].tolist() == pytest.approx([(0.6 + 1) / 2, 0.5, (-0.8 + 1) / 2])
    assert shown[0, :, 0, 2].tolist() == [0.0, 0.0, 0.0]                        # invalid: black


# ================================================================ users of the kind flags
def _all_kinds_tasks():
    return {"cls": Task("cls", kind("classification"), TargetSpec("classification", 3), "cls"),
            "seg": Task("seg", kind("segmentation"), TargetSpec("segmentation", 3), "seg"),
            "present": Task("present", kind("multilabel"), TargetSpec("multilabel", 3), "present"),
            "count": Task("count", kind("regression"), TargetSpec("regression", mean=2.0, std=0.5), "count"),
            "normal": Task("normal", kind("normals"), TargetSpec("normals"), "normal")}


def test_label_methods_take_softmax_label_tasks_only():
    tasks = _all_kinds_tasks()
    cfg = OmegaConf.structured(DKDConfig)
    assert DecoupledKD(cfg, tasks, list(tasks)).label_tasks == ["cls", "seg"]
    with pytest.raises(KdmtlError, match="classification or segmentation"):
        DecoupledKD(cfg, tasks, ["present", "count", "normal"])


def test_kd_dispatches_to_each_kind():
    tasks = _all_kinds_tasks()
    cfg = OmegaConf.merge(OmegaConf.structured(KDConfig), {"temperature": 2.0, "dense": "l2"})
    g = torch.Generator().manual_seed(0)
    shapes = {"cls": (2, 3), "seg": (2, 3, 2, 2), "present": (2, 3), "count": (2, 1), "normal": (2, 3, 2, 2)}
    student = {n: torch.randn(*s, generator=g) for n, s in shapes.items()}
    teacher = {n: torch.randn(*s, generator=g) for n, s in shapes.items()}
    terms = LogitKD(cfg, tasks, list(tasks))({"outputs": student}, {"outputs": teacher}, {}, {})
    assert set(terms) == {f"kd/{n}" for n in tasks}
    for name, task in tasks.items():
        assert torch.equal(terms[f"kd/{name}"], task.kind.distill(student[name], teacher[name], 2.0, "l2"))
    diff = [a - b for a, b in zip(student["count"].flatten().tolist(), teacher["count"].flatten().tolist())]
    assert float(terms["kd/count"]) == pytest.approx(sum(d * d for d in diff) / 2, abs=1e-6)


# ================================================================ build_tasks
TARGETS = {"cls": TargetSpec("classification", 4, NAMES), "near": TargetSpec("classification", 4, NAMES),
           "seg": TargetSpec("segmentation", 5), "depth": TargetSpec("depth", mean=8.0, std=1.0),
           "normal": TargetSpec("normals"), "present": TargetSpec("multilabel", 4, NAMES),
           "count": TargetSpec("regression", mean=2.5, std=1.0)}


def test_build_tasks_same_kind_twice_shared_target_and_auxiliary():
    cfg = OmegaConf.create({"cls": {"kind": "classification"},
                            "near": {"kind": "classification", "auxiliary": True},
                            "cls_again": {"kind": "classification", "target": "cls"},
                            "present": {"kind": "multilabel"}, "count": {"kind": "regression"},
                            "normal": {"kind": "normals", "target": "normal"}})
    tasks = build_tasks(cfg, TARGETS)
    assert {n: (t.target, t.kind.name, t.auxiliary) for n, t in tasks.items()} == {
        "cls": ("cls", "classification", False), "near": ("near", "classification", True),
        "cls_again": ("cls", "classification", False), "present": ("present", "multilabel", False),
        "count": ("count", "regression", False), "normal": ("normal", "normals", False)}
    assert tasks["cls"].kind is not tasks["near"].kind
    assert task_signature(tasks) == {
        "cls": {"kind": "classification", "num_classes": 4, "out_channels": 4},
        "near": {"kind": "classification", "num_classes": 4, "out_channels": 4},
        "cls_again": {"kind": "classification", "num_classes": 4, "out_channels": 4},
        "present": {"kind": "multilabel", "num_classes": 4, "out_channels": 4},
        "count": {"kind": "regression", "num_classes": None, "out_channels": 1},
        "normal": {"kind": "normals", "num_classes": None, "out_channels": 3}}
    with pytest.raises(KdmtlError, match="tasks.count.kind=regression"):
        build_tasks(OmegaConf.create({"count": {"kind": "classification"}}), TARGETS)


# ================================================================ one model, all kinds, on shapes
def test_all_kinds_train_a_step_on_shapes_targets():
    data = generate_shapes(4, image_size=16, seed=0)
    cfg = OmegaConf.create({"cls": {"kind": "classification"}, "near": {"kind": "classification"},
                            "present": {"kind": "multilabel"}, "count": {"kind": "regression"},
                            "seg": {"kind": "segmentation"}, "depth": {"kind": "depth"},
                            "normal": {"kind": "normals"}})
    tasks = build_tasks(cfg, TARGETS)
    torch.manual_seed(0)
    model = build_model(OmegaConf.structured(ModelConfig(width=4, decoder_width=4)), tasks)
    scaled = {n for n, head in model.heads.items() if isinstance(head, ScaledHead)}
    assert scaled == {"count", "depth"}
    assert float(model.heads["count"].shift) == 2.5
    image = data["image"].float() / 255.0
    out = model(image)["outputs"]
    assert {n: tuple(v.shape) for n, v in out.items()} == {
        "cls": (4, 4), "near": (4, 4), "present": (4, 4), "count": (4, 1), "seg": (4, 5, 16, 16),
        "depth": (4, 1, 16, 16), "normal": (4, 3, 16, 16)}
    losses = {n: task.kind.loss(out[n], data[task.target]) for n, task in tasks.items()}
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values()), losses
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in model.heads.parameters())
    for name, task in tasks.items():
        shown = task.kind.show(out[name].detach(), task.spec)
        if task.kind.dense:
            assert shown.shape == (4, 3, 16, 16) and shown.min() >= 0 and shown.max() <= 1
            target_shown = task.kind.show(data[task.target], task.spec)
            assert target_shown.shape == (4, 3, 16, 16)
        else:
            assert shown is None and len(task.kind.describe(out[name], task.spec)) == 4
            assert len(task.kind.describe(data[task.target], task.spec)) == 4
