"""Task metrics through `evaluate` against hand-computed values, the tensor-resident
loader (order, flips, normalisation, lengths) and the cached `shapes` data set."""

from __future__ import annotations

import os

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from kdmtl_cli.data import TargetSpec, build_data, shapes_generator
from kdmtl_cli.data.loader import TensorLoader
from kdmtl_cli.data.shapes import build_shapes
from kdmtl_cli.engine.checkpoint import atomic_torch_save
from kdmtl_cli.engine.hardware import Hardware
from kdmtl_cli.engine.trainer import evaluate
from kdmtl_cli.errors import KdmtlError
from kdmtl_cli.schema import DataConfig
from kdmtl_cli.tasks import TASK_KINDS, Task, _load_kinds

_load_kinds()
CPU = torch.device("cpu")
HW = Hardware(device=CPU, precision="32", channels_last=False, scaler=None)


# ================================================================ evaluate + metrics
class LookupModel(nn.Module):
    """Returns prepared outputs per sample. Each image carries its sample index in every
    pixel (uint8 value = index, loader mean 0 / std 1 => image = index / 255)."""

    def __init__(self, table):
        super().__init__()
        self.table = table
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, image):
        index = (image[:, 0, 0, 0] * 255).round().long()
        return {"outputs": {k: v[index] for k, v in self.table.items()}, "features": {}}


def _indexed_images(n, size):
    return torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, size, size).clone()


def _run_evaluate(tasks, split, table, batch_size):
    loader = TensorLoader(split, {t.target: t.kind.flip_target for t in tasks.values()}, batch_size=batch_size,
                          mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0], device=CPU)
    model = LookupModel(table)
    model.train()
    result = evaluate(model, loader, tasks, HW, "val")
    assert not model.training  # evaluate puts the model in eval mode
    return result


def _one_hot_logits(preds, num_classes, scale=4.0):
    logits = torch.zeros(len(preds), num_classes)
    for i, p in enumerate(preds):
        logits[i, p] = scale
    return logits


def _per_class_counts(preds, targets, classes, ignore=None):
    counts = {c: {"tp": 0, "fp": 0, "fn": 0} for c in classes}
    for p, t in zip(preds, targets):
        if t == ignore:
            continue
        if p == t:
            counts[t]["tp"] += 1
        else:
            counts[p]["fp"] += 1
            counts[t]["fn"] += 1
    return counts


def test_classification_accuracy_f1_recall_by_hand():
    targets = [0, 0, 0, 1, 1, 2, 2, 3, 3, 3]
    preds = [0, 1, 0, 1, 1, 0, 2, 3, 2, 2]
    n = len(targets)
    counts = _per_class_counts(preds, targets, range(4))
    precision = {c: k["tp"] / (k["tp"] + k["fp"]) for c, k in counts.items()}
    recall = {c: k["tp"] / (k["tp"] + k["fn"]) for c, k in counts.items()}
    f1 = {c: 2 * precision[c] * recall[c] / (precision[c] + recall[c]) for c in counts}
    accuracy = sum(p == t for p, t in zip(preds, targets)) / n
    # Written out: class 0: tp 2 fp 1 fn 1; class 1: tp 2 fp 1 fn 0; class 2: tp 1 fp 2 fn 1; class 3: tp 1 fp 0 fn 2
    assert accuracy == 0.6
    assert sum(recall.values()) / 4 == pytest.approx((2 / 3 + 1 + 1 / 2 + 1 / 3) / 4)
    assert sum(f1.values()) / 4 == pytest.approx((2 / 3 + 0.8 + 0.4 + 0.5) / 4)

    tasks = {"cls": Task("cls", TASK_KINDS.get("classification")(), TargetSpec("classification", 4), "label")}
    logits = _one_hot_logits(preds, 4)
    split = {"image": _indexed_images(n, 2), "label": torch.tensor(targets)}
    # batch size 3: four batches, the last partial; metrics accumulate over all of them.
    result = _run_evaluate(tasks, split, {"cls": logits}, batch_size=3)
    assert result["val/cls/accuracy"] == pytest.approx(accuracy, abs=1e-6)
    assert result["val/cls/recall"] == pytest.approx(sum(recall.values()) / 4, abs=1e-6)
    assert result["val/cls/f1"] == pytest.approx(sum(f1.values()) / 4, abs=1e-6)
    # The loss is the mean per-sample cross-entropy over the split: -log softmax(target).
    import math
    z = 3 + math.exp(4.0)
    ce = [-math.log((math.exp(4.0) if p == t else 1.0) / z) for p, t in zip(preds, targets)]
    assert result["val/task/cls"] == pytest.approx(sum(ce) / n, abs=1e-5)
    assert result["val/loss/task"] == pytest.approx(sum(ce) / n, abs=1e-5)


def test_segmentation_miou_and_pixel_accuracy_by_hand():
    # Two 3x3 maps, 3 classes, 255 = ignored.
    targets = [[[0, 0, 1], [1, 1, 2], [2, 255, 0]],
               [[1, 1, 1], [0, 2, 2], [255, 255, 0]]]
    preds = [[[0, 1, 1], [1, 0, 2], [2, 2, 0]],
             [[1, 1, 0], [0, 2, 1], [0, 1, 0]]]
    flat_t = [v for img in targets for row in img for v in row]
    flat_p = [v for img in preds for row in img for v in row]
    counts = _per_class_counts(flat_p, flat_t, range(3), ignore=255)
    iou = {c: k["tp"] / (k["tp"] + k["fp"] + k["fn"]) for c, k in counts.items()}
    valid = [(p, t) for p, t in zip(flat_p, flat_t) if t != 255]
    pixel_acc = sum(p == t for p, t in valid) / len(valid)
    # By hand: 15 valid pixels, 11 correct;
    # class 0: tp 4 fp 2 fn 1 -> 4/7; class 1: tp 4 fp 2 fn 2 -> 4/8;
    # class 2: tp 3 fp 0 fn 1 -> 3/4 (the ignored pixel predicted as 2 is not a false positive)
    assert len(valid) == 15 and pixel_acc == pytest.approx(11 / 15)
    assert iou == pytest.approx({0: 4 / 7, 1: 4 / 8, 2: 3 / 4})

    logits = torch.zeros(2, 3, 3, 3)
    for n in range(2):
        for y in range(3):
            for x in range(3):
                logits[n, preds[n][y][x], y, x] = 5.0
    tasks = {"seg": Task("seg", TASK_KINDS.get("segmentation")(), TargetSpec("segmentation", 3), "seg")}
    split = {"image": _indexed_images(2, 3), "seg": torch.tensor(targets)}
    result = _run_evaluate(tasks, split, {"seg": logits}, batch_size=2)
    assert result["val/seg/miou"] == pytest.approx(sum(iou.values()) / 3, abs=1e-6)
    assert result["val/seg/pixel_acc"] == pytest.approx(pixel_acc, abs=1e-6)


def test_depth_abs_and_relative_error_exclude_invalid_pixels():
    targets = [[[2.0, 0.0], [4.0, 1.0]], [[0.0, 0.0], [5.0, 8.0]], [[3.0, 2.0], [0.0, 10.0]]]
    preds = [[[2.5, 7.0], [3.0, 1.0]], [[9.0, 9.0], [6.0, 4.0]], [[3.0, 1.0], [-3.0, 12.0]]]
    pairs = [(p, t) for pi, ti in zip(preds, targets) for pr, tr in zip(pi, ti) for p, t in zip(pr, tr) if t > 0]
    assert len(pairs) == 8
    abs_err = sum(abs(p - t) for p, t in pairs) / len(pairs)
    rel_err = sum(abs(p - t) / t for p, t in pairs) / len(pairs)
    assert abs_err == pytest.approx((0.5 + 1 + 0 + 1 + 4 + 0 + 1 + 2) / 8)
    assert rel_err == pytest.approx((0.25 + 0.25 + 0 + 0.2 + 0.5 + 0 + 0.5 + 0.2) / 8)

    tasks = {"depth": Task("depth", TASK_KINDS.get("depth")(), TargetSpec("depth", mean=4.0, std=3.0), "depth")}
    split = {"image": _indexed_images(3, 2), "depth": torch.tensor(targets)}
    output = torch.tensor(preds).unsqueeze(1)                   # [N, 1, H, W] like a depth head
    result = _run_evaluate(tasks, split, {"depth": output}, batch_size=3)
    assert result["val/depth/abs_err"] == pytest.approx(abs_err, abs=1e-6)
    assert result["val/depth/rel_err"] == pytest.approx(rel_err, abs=1e-6)
    assert result["val/task/depth"] == pytest.approx(abs_err, abs=1e-6)  # one batch: the masked L1


def test_task_kind_metric_directions():
    assert TASK_KINDS.get("classification").higher_is_better == {"accuracy": True, "f1": True, "recall": True}
    assert TASK_KINDS.get("segmentation").higher_is_better == {"miou": True, "pixel_acc": True}
    assert TASK_KINDS.get("depth").higher_is_better == {"abs_err": False, "rel_err": False}
    assert TASK_KINDS.get("multilabel").higher_is_better == {"map": True, "f1": True, "exact_match": True}
    assert TASK_KINDS.get("regression").higher_is_better == {"mae": False, "rmse": False}
    assert TASK_KINDS.get("normals").higher_is_better == {
        "mean_angle": False, "median_angle": False, "within_11_25": True, "within_22_5": True, "within_30": True}
    spec = TargetSpec("segmentation", 5)
    assert set(TASK_KINDS.get("segmentation")().metrics(spec)) == {"miou", "pixel_acc"}
    # every metric a kind reports has a direction, and every direction is a metric it reports
    specs = {"classification": TargetSpec("classification", 3), "segmentation": spec,
             "depth": TargetSpec("depth"), "multilabel": TargetSpec("multilabel", 3),
             "normals": TargetSpec("normals"), "regression": TargetSpec("regression")}
    assert set(specs) == set(TASK_KINDS.names())
    for name, kind_spec in specs.items():
        kind = TASK_KINDS.get(name)()
        assert set(kind.metrics(kind_spec)) == set(kind.higher_is_better), name


def test_multilabel_normals_regression_through_evaluate():
    """The new kinds' metrics accumulate over batches in `evaluate` like the others."""
    present = torch.tensor([[1, 0], [0, 1], [1, 1], [0, 0]], dtype=torch.uint8)
    logits = torch.tensor([[2.0, -1.0], [-3.0, 0.5], [1.0, -0.5], [-2.0, -2.0]])
    # per image: right, right, wrong (label 1 missed), right -> exact match 3/4
    count = torch.tensor([1.0, 2.0, 3.0, 4.0])
    count_out = torch.tensor([[1.5], [2.0], [2.0], [4.0]])        # [N, 1] like the pooled head
    normal = torch.zeros(4, 3, 1, 2)
    normal[:, 2] = -1.0                                            # every target faces the camera
    normal[3, :, 0, 1] = 0.0                                       # one invalid pixel
    normal_out = normal.clone()
    normal_out[0, :, 0, 0] = torch.tensor([1.0, 0.0, 0.0])          # 90 degrees off
    normal_out[3, :, 0, 1] = torch.tensor([1.0, 0.0, 0.0])          # invalid: not counted
    tasks = {"present": Task("present", TASK_KINDS.get("multilabel")(), TargetSpec("multilabel", 2), "present"),
             "count": Task("count", TASK_KINDS.get("regression")(), TargetSpec("regression"), "count"),
             "normal": Task("normal", TASK_KINDS.get("normals")(), TargetSpec("normals"), "normal")}
    split = {"image": _indexed_images(4, 2), "present": present, "count": count, "normal": normal}
    result = _run_evaluate(tasks, split, {"present": logits, "count": count_out, "normal": normal_out},
                           batch_size=3)
    assert result["val/present/exact_match"] == pytest.approx(3 / 4)
    assert result["val/count/mae"] == pytest.approx((0.5 + 0 + 1 + 0) / 4)
    assert result["val/count/rmse"] == pytest.approx(((0.25 + 1) / 4) ** 0.5)
    # 7 valid pixels: one at 90 degrees, six at 0
    assert result["val/normal/mean_angle"] == pytest.approx(90 / 7, abs=1e-4)
    assert result["val/normal/median_angle"] == pytest.approx(0.0, abs=1e-3)
    assert result["val/normal/within_11_25"] == pytest.approx(6 / 7)


# ================================================================ TensorLoader
KINDS = {"cls": "classification", "seg": "segmentation", "depth": "depth"}


def _asymmetric_split(n=10, size=4):
    """Every row is a left-to-right ramp that differs per sample, so a horizontal flip is visible."""
    w = torch.arange(size)
    image = torch.zeros(n, 3, size, size, dtype=torch.uint8)
    for i in range(n):
        for c in range(3):
            image[i, c] = (10 * w + i + 50 * c).view(1, size).expand(size, size).to(torch.uint8)
    seg = (w.view(1, 1, size).expand(n, size, size) % 3).clone()
    seg[:, 0, :] = torch.arange(n).view(n, 1) % 3               # a row that differs per sample too
    depth = (w.float() + 1).view(1, 1, size).expand(n, size, size) * (torch.arange(n).float() + 1).view(n, 1, 1)
    return {"image": image, "cls": torch.arange(n) % 4, "seg": seg, "depth": depth.clone()}


def _loader(split, **kw):
    args = {"batch_size": 3, "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0], "device": CPU}
    args.update(kw)
    return TensorLoader(split, KINDS, **args)


def _epoch(loader, epoch):
    loader.set_epoch(epoch)
    batches = list(loader)
    index = torch.cat([b["index"] for b in batches])
    flip = torch.cat([b["flip"] for b in batches])
    return batches, index, flip


def test_shuffled_epoch_covers_every_sample_once():
    split = _asymmetric_split(10)
    loader = _loader(split, shuffle=True, hflip=True, seed=7)
    batches, index, _ = _epoch(loader, 1)
    assert [b["image"].shape[0] for b in batches] == [3, 3, 3, 1]
    assert sorted(index.tolist()) == list(range(10))
    assert index.tolist() != list(range(10))  # actually shuffled
    # every target is gathered with the same index as the image
    for b in batches:
        assert torch.equal(b["targets"]["cls"], split["cls"][b["index"]])


def test_epoch_plan_is_a_function_of_seed_and_epoch():
    split = _asymmetric_split(10)
    a = _loader(split, shuffle=True, hflip=True, seed=7)
    b = _loader(split, shuffle=True, hflip=True, seed=7)
    _, index_a, flip_a = _epoch(a, 3)
    _, index_b, flip_b = _epoch(b, 3)
    assert torch.equal(index_a, index_b) and torch.equal(flip_a, flip_b)
    # replaying the same epoch on the same loader gives it again
    _, index_again, flip_again = _epoch(a, 3)
    assert torch.equal(index_a, index_again) and torch.equal(flip_a, flip_again)
    _, index_next, _ = _epoch(a, 4)
    assert not torch.equal(index_a, index_next)
    _, index_other_seed, _ = _epoch(_loader(split, shuffle=True, hflip=True, seed=8), 3)
    assert not torch.equal(index_a, index_other_seed)


def test_unshuffled_loader_keeps_order_and_never_flips_without_hflip():
    split = _asymmetric_split(10)
    _, index, flip = _epoch(_loader(split), 2)
    assert index.tolist() == list(range(10)) and not flip.any()


def test_flip_applies_to_image_and_dense_targets_but_not_cls():
    split = _asymmetric_split(16)
    loader = _loader(split, shuffle=True, hflip=True, seed=1, batch_size=5)
    seen_flip, seen_plain = 0, 0
    for epoch in (1, 2):
        batches, _, _ = _epoch(loader, epoch)
        for b in batches:
            for j, (i, f) in enumerate(zip(b["index"].tolist(), b["flip"].tolist())):
                img = split["image"][i].float()
                seg, depth = split["seg"][i], split["depth"][i]
                if f:
                    seen_flip += 1
                    img, seg, depth = img.flip(-1), seg.flip(-1), depth.flip(-1)
                    assert not torch.equal(b["image"][j], split["image"][i].float())  # visibly changed
                else:
                    seen_plain += 1
                assert torch.equal(b["image"][j], img / 255.0)
                assert torch.equal(b["targets"]["seg"][j], seg)
                assert torch.equal(b["targets"]["depth"][j], depth)
                assert int(b["targets"]["cls"][j]) == int(split["cls"][i])
    assert seen_flip > 0 and seen_plain > 0
    # the stored data itself is never modified
    assert torch.equal(split["seg"], _asymmetric_split(16)["seg"])


def test_flip_callables_per_target_and_normals_x_negated():
    """Targets are flipped by the callables given per target (`kind.flip_target`, as
    make_loader passes them): a normals map is mirrored and its x component negated exactly."""
    n, size = 8, 3
    split = _asymmetric_split(n, size)
    g = torch.Generator().manual_seed(0)
    normal = torch.nn.functional.normalize(torch.randn(n, 3, size, size, generator=g), dim=1).half()
    split["normal"] = normal
    flips = {"cls": TASK_KINDS.get("classification")().flip_target,
             "seg": TASK_KINDS.get("segmentation")().flip_target,
             "normal": TASK_KINDS.get("normals")().flip_target}
    loader = TensorLoader(split, flips, batch_size=8, mean=[0.0] * 3, std=[1.0] * 3, device=CPU,
                          shuffle=True, hflip=True, seed=3)
    batch = next(iter(loader))
    assert set(batch) == {"image", "targets", "index", "flip"} and set(batch["targets"]) == set(flips)
    assert batch["flip"].any() and not batch["flip"].all()
    for j, (i, f) in enumerate(zip(batch["index"].tolist(), batch["flip"].tolist())):
        got = batch["targets"]["normal"][j]
        assert got.dtype == torch.float16
        for c in range(3):
            for y in range(size):
                for x in range(size):
                    if f:   # mirrored along W; x component negated, y and z kept
                        want = float(normal[i, c, y, size - 1 - x]) * (-1.0 if c == 0 else 1.0)
                    else:
                        want = float(normal[i, c, y, x])
                    assert float(got[c, y, x]) == want
        assert torch.equal(batch["targets"]["seg"][j], split["seg"][i].flip(-1) if f else split["seg"][i])
        assert int(batch["targets"]["cls"][j]) == int(split["cls"][i])
    assert torch.equal(split["normal"], normal)  # stored data untouched


def test_make_loader_wires_each_targets_flip(monkeypatch):
    from kdmtl_cli.build import make_loader
    from kdmtl_cli.data import DataBundle

    n, size = 6, 2
    split = {"image": _indexed_images(n, size), "cls": torch.arange(n) % 4,
             "normal": torch.nn.functional.normalize(torch.randn(n, 3, size, size), dim=1)}
    tasks = {"cls": Task("cls", TASK_KINDS.get("classification")(), TargetSpec("classification", 4), "cls"),
             "near": Task("near", TASK_KINDS.get("classification")(), TargetSpec("classification", 4), "cls"),
             "normal": Task("normal", TASK_KINDS.get("normals")(), TargetSpec("normals"), "normal")}
    bundle = DataBundle("t", {}, {"train": split}, mean=[0.0] * 3, std=[1.0] * 3)
    cfg = OmegaConf.create({"data": {"batch_size": 6, "eval_batch_size": 6, "hflip": True}, "seed": 1})
    loader = make_loader(bundle, "train", tasks, cfg, HW, train=True, limit=None)
    assert set(loader.targets) == {"cls", "normal"}            # two tasks on one target load it once
    batch = next(iter(loader))
    flip = batch["flip"]
    assert flip.any()
    expected = torch.where(flip.view(-1, 1, 1, 1), tasks["normal"].kind.flip_target(split["normal"][batch["index"]]),
                           split["normal"][batch["index"]])
    assert torch.equal(batch["targets"]["normal"], expected)
    assert torch.equal(batch["targets"]["cls"], split["cls"][batch["index"]])
    eval_loader = make_loader(bundle, "train", tasks, cfg, HW, train=False, limit=None)
    assert not next(iter(eval_loader))["flip"].any()           # never flips outside training


def test_normalisation_by_hand():
    split = _asymmetric_split(4, size=2)
    mean, std = [0.5, 0.25, 0.75], [0.2, 0.5, 0.1]
    batch = next(iter(_loader(split, mean=mean, std=std, batch_size=4)))
    image = batch["image"]
    assert image.dtype == torch.float32 and image.shape == (4, 3, 2, 2)
    for n in range(4):
        for c in range(3):
            for y in range(2):
                for x in range(2):
                    raw = int(split["image"][n, c, y, x])
                    expected = (raw / 255.0 - mean[c]) / std[c]
                    assert float(image[n, c, y, x]) == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("n, batch_size, drop_last, limit, expected", [
    (10, 3, False, None, 4), (9, 3, False, None, 3), (10, 3, True, None, 3), (2, 5, False, None, 1),
    (10, 3, False, 2, 2), (10, 3, False, 9, 4), (10, 3, True, 1, 1)])
def test_len_and_limit_batches(n, batch_size, drop_last, limit, expected):
    loader = _loader(_asymmetric_split(n), batch_size=batch_size, drop_last=drop_last, limit_batches=limit,
                     shuffle=True)
    assert len(loader) == expected
    batches = list(loader)
    assert len(batches) == expected
    sizes = [b["image"].shape[0] for b in batches]
    assert all(s == batch_size for s in sizes[:-1])
    if limit is None and not drop_last:
        assert sum(sizes) == n
    assert len(set(torch.cat([b["index"] for b in batches]).tolist())) == sum(sizes)


# ================================================================ shapes data set
def _data_cfg(root_dir, **overrides):
    cfg = OmegaConf.merge(OmegaConf.structured(DataConfig),
                          {"root": str(root_dir), "image_size": 16, "train_size": 6, "val_size": 3,
                           "test_size": 2, "min_objects": 1, "max_objects": 2})
    return OmegaConf.merge(cfg, overrides)


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    return tmp_path_factory.mktemp("shapes_root")


@pytest.fixture(scope="module")
def first_build(shapes_root):
    return build_shapes(_data_cfg(shapes_root))


def test_shapes_generates_cached_files(shapes_root, first_build):
    bundle = first_build
    folder = shapes_root / "shapes" / bundle.fingerprint
    assert sorted(p.name for p in folder.iterdir()) == ["test.pt", "train.pt", "val.pt"]
    assert bundle.info["path"] == str(folder)
    assert {s: bundle.size(s) for s in ("train", "val", "test")} == {"train": 6, "val": 3, "test": 2}
    assert bundle.splits["train"]["image"].shape == (6, 3, 16, 16)
    assert bundle.splits["train"]["image"].dtype == torch.uint8
    assert bundle.mean == [0.5, 0.5, 0.5] and bundle.std == [0.25, 0.25, 0.25]
    # target specs: class counts, and depth statistics of the train split
    assert bundle.targets["cls"].kind == "classification" and bundle.targets["cls"].num_classes == 4
    assert bundle.targets["seg"].kind == "segmentation" and bundle.targets["seg"].num_classes == 5
    assert bundle.targets["seg"].class_names[0] == "background"
    shapes = ["circle", "square", "triangle", "cross"]
    assert bundle.targets["near"] == TargetSpec("classification", 4, shapes)
    assert bundle.targets["present"] == TargetSpec("multilabel", 4, shapes)
    assert bundle.targets["normal"] == TargetSpec("normals")
    assert set(bundle.targets) == {"cls", "seg", "depth", "normal", "present", "count", "near"}
    for key, spec in (("depth", bundle.targets["depth"]), ("count", bundle.targets["count"])):
        values = bundle.splits["train"][key].flatten().tolist()
        mean = sum(values) / len(values)
        std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
        assert spec.kind == {"depth": "depth", "count": "regression"}[key]
        assert spec.mean == pytest.approx(mean, rel=1e-4)
        assert spec.std == pytest.approx(std if std > 0 else 1.0, rel=1e-4)
    train = bundle.splits["train"]
    assert train["normal"].shape == (6, 3, 16, 16) and train["present"].shape == (6, 4)
    # no temp files were left behind by the atomic writes
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]


def test_shapes_second_build_reads_the_cache(shapes_root, first_build, monkeypatch):
    folder = shapes_root / "shapes" / first_build.fingerprint
    mtimes = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}

    def no_generation(*args, **kwargs):
        raise AssertionError("the data set was regenerated although it is cached")

    monkeypatch.setattr(shapes_generator, "generate_shapes", no_generation)
    again = build_data(_data_cfg(shapes_root, generate=False))
    assert again.fingerprint == first_build.fingerprint
    for split in ("train", "val", "test"):
        for key in ("image", "cls", "seg", "depth", "normal", "present", "count", "near"):
            assert torch.equal(again.splits[split][key], first_build.splits[split][key])
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == mtimes
    assert again.targets == first_build.targets


def test_shapes_fingerprint_depends_on_generation_settings(shapes_root, first_build):
    from kdmtl_cli.data.shapes import _fingerprint, _split_sizes

    base = _data_cfg(shapes_root)
    fp = _fingerprint(base, _split_sizes(base))
    assert fp == first_build.fingerprint
    for change in ({"seed": 1}, {"image_size": 32}, {"train_size": 7}, {"max_objects": 3}):
        cfg = _data_cfg(shapes_root, **change)
        assert _fingerprint(cfg, _split_sizes(cfg)) != fp, change
    for change in ({"batch_size": 3}, {"generate": False}, {"hflip": False}, {"root": "/elsewhere"}):
        cfg = _data_cfg(shapes_root, **change)
        assert _fingerprint(cfg, _split_sizes(cfg)) == fp, change


def test_shapes_missing_without_generate_names_the_path(tmp_path):
    cfg = _data_cfg(tmp_path / "empty", generate=False)
    with pytest.raises(KdmtlError) as info:
        build_shapes(cfg)
    message = str(info.value)
    assert str(tmp_path / "empty" / "shapes") in message and "data.generate=true" in message
    assert not (tmp_path / "empty" / "shapes").exists()


def test_shapes_corrupt_file_is_a_kdmtl_error(tmp_path, first_build, shapes_root):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(shapes_root / "shapes", root / "shapes")
    folder = root / "shapes" / first_build.fingerprint
    data = (folder / "val.pt").read_bytes()
    (folder / "val.pt").write_bytes(data[: len(data) // 2])  # an interrupted copy
    with pytest.raises(KdmtlError) as info:
        build_shapes(_data_cfg(root))
    assert "val.pt" in str(info.value) and "corrupt" in str(info.value)


def test_shapes_file_with_wrong_content_is_a_kdmtl_error(tmp_path, first_build, shapes_root):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(shapes_root / "shapes", root / "shapes")
    folder = root / "shapes" / first_build.fingerprint
    atomic_torch_save({"image": torch.zeros(2, 3, 16, 16, dtype=torch.uint8)}, folder / "train.pt")
    with pytest.raises(KdmtlError, match="delete"):
        build_shapes(_data_cfg(root))


def test_shapes_rejects_empty_split(tmp_path):
    with pytest.raises(KdmtlError, match="data.val_size"):
        build_shapes(_data_cfg(tmp_path, val_size=0))


def test_unwritable_root_is_a_kdmtl_error(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root can write anywhere")
    root = tmp_path / "ro"
    root.mkdir()
    root.chmod(0o500)
    try:
        with pytest.raises(KdmtlError, match="writable"):
            build_shapes(_data_cfg(root))
    finally:
        root.chmod(0o700)
