"""Checkpoint files (atomic writes, safe loading, safetensors), LR schedules, RNG state,
model construction (sizes, shapes, feature capture, torchvision trunks), teacher cache
keys, and in-process bit-reproducibility of the trainer."""

from __future__ import annotations

import math
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision
from omegaconf import OmegaConf

from kdmtl_cli.data import TargetSpec
from kdmtl_cli.data.loader import TensorLoader
from kdmtl_cli.distill import build_methods
from kdmtl_cli.distill.objective import Objective
from kdmtl_cli.engine import checkpoint as ckpt
from kdmtl_cli.engine.checkpoint import (atomic_torch_save, atomic_write_text, load_checkpoint, load_tensor_file,
                                         read_safetensors_metadata, save_checkpoint, save_weights)
from kdmtl_cli.engine.hardware import Hardware
from kdmtl_cli.engine.logging import MetricsLog
from kdmtl_cli.engine.optim import build_optimizer, build_scheduler
from kdmtl_cli.engine.seeding import rng_state, seed_everything, set_rng_state
from kdmtl_cli.engine.teacher_cache import teacher_key
from kdmtl_cli.engine.trainer import Trainer
from kdmtl_cli.errors import KdmtlError
from kdmtl_cli.models import build_model, count_parameters
from kdmtl_cli.models.torchvision_resnet import ResNetTrunk
from kdmtl_cli.schema import DataConfig, LossConfig, ModelConfig, OptimConfig, TeacherConfig
from kdmtl_cli.tasks import TASK_KINDS, Task, _load_kinds

REPO = Path(__file__).resolve().parents[1]
_load_kinds()


pytestmark = pytest.mark.usefixtures("one_thread")


def _listing(folder: Path):
    return sorted(p.name for p in folder.iterdir())


# ================================================================ atomic writes
def test_atomic_torch_save_replaces_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "sub" / "state.pt"
    atomic_torch_save({"a": torch.arange(3)}, path)          # creates the parent folder
    atomic_torch_save({"a": torch.arange(5)}, path)          # replaces
    assert _listing(path.parent) == ["state.pt"]
    assert torch.equal(load_tensor_file(path)["a"], torch.arange(5))
    atomic_write_text("hello\n", tmp_path / "note.txt")
    assert (tmp_path / "note.txt").read_text() == "hello\n"
    assert _listing(tmp_path) == ["note.txt", "sub"]


def test_failed_write_keeps_the_old_file_and_removes_the_temp(tmp_path, monkeypatch):
    path = tmp_path / "state.pt"
    atomic_torch_save({"a": torch.ones(4)}, path)
    before = path.read_bytes()
    temp_seen = []

    def failing_save(obj, handle, *args, **kwargs):
        handle.write(b"PK\x03\x04 half a zip file")
        handle.flush()
        temp_seen.append(_listing(tmp_path))                 # the temp file exists during the write
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(RuntimeError, match="disk full"):
        atomic_torch_save({"a": torch.zeros(4)}, path)
    assert len(temp_seen[0]) == 2 and any(n.startswith(".state.pt.") and n.endswith(".tmp") for n in temp_seen[0])
    assert path.read_bytes() == before
    assert _listing(tmp_path) == ["state.pt"]
    monkeypatch.undo()
    assert torch.equal(load_tensor_file(path)["a"], torch.ones(4))


def test_interrupt_during_write_also_cleans_up(tmp_path, monkeypatch):
    path = tmp_path / "state.pt"

    def interrupted(obj, handle, *args, **kwargs):
        handle.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        atomic_torch_save({"a": torch.zeros(1)}, path)
    assert _listing(tmp_path) == []


# ================================================================ safe loading
class Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_load_refuses_pickled_code_and_never_runs_it(tmp_path):
    marker = tmp_path / "MARKER"
    path = tmp_path / "evil.pt"
    torch.save({"weights": torch.ones(2), "payload": Exploit(marker)}, path)
    with pytest.raises(KdmtlError) as info:
        load_tensor_file(path)
    assert "pickled" in str(info.value) and str(path) in str(info.value)
    assert not marker.exists()
    with pytest.raises(KdmtlError, match="pickled"):
        load_checkpoint(path)
    assert not marker.exists()


def test_load_missing_file(tmp_path):
    with pytest.raises(KdmtlError, match="not found") as info:
        load_tensor_file(tmp_path / "nope.pt", what="teacher checkpoint")
    assert str(tmp_path / "nope.pt") in str(info.value) and "teacher checkpoint" in str(info.value)
    with pytest.raises(KdmtlError, match="not found"):
        load_tensor_file(tmp_path)                              # a directory is not a file either


def _truncated_torch_file():
    import io

    buffer = io.BytesIO()
    torch.save({"a": torch.arange(100)}, buffer)
    data = buffer.getvalue()
    return data[: len(data) // 2]


@pytest.mark.parametrize("content", [
    pytest.param(b"", id="empty"),
    pytest.param(b"\x00" * 64, id="zeros"),
    pytest.param(_truncated_torch_file(), id="truncated-zip"),
    pytest.param(b"<!DOCTYPE html><html><body>404</body></html>", id="html"),
    pytest.param(b"this is not a torch file", id="text-t"),
    pytest.param(b"hello", id="text-h"),
    pytest.param(b"see README for the weights\n", id="text-s"),
])
def test_load_corrupt_file_is_a_kdmtl_error(tmp_path, content):
    path = tmp_path / "broken.pt"
    path.write_bytes(content)
    with pytest.raises(KdmtlError) as info:
        load_tensor_file(path)
    assert str(path) in str(info.value) and "corrupt" in str(info.value)


def test_load_rejects_non_dict_and_corrupt_safetensors(tmp_path):
    torch.save(torch.ones(3), tmp_path / "tensor.pt")
    with pytest.raises(KdmtlError, match="dictionary"):
        load_tensor_file(tmp_path / "tensor.pt")
    (tmp_path / "bad.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    with pytest.raises(KdmtlError, match="safetensors"):
        load_tensor_file(tmp_path / "bad.safetensors")
    with pytest.raises(KdmtlError, match="safetensors"):
        read_safetensors_metadata(tmp_path / "tensor.pt")


def test_save_weights_safetensors_round_trip_with_metadata(tmp_path):
    state = {"layer.weight": torch.randn(3, 2), "layer.bias": torch.arange(3.0), "count": torch.tensor(7)}
    state["view"] = torch.randn(4, 4).t()                        # non-contiguous is fine
    meta = {"kdmtl": "weights", "model": '{"arch": "convnet", "width": 8}'}
    path = tmp_path / "w" / "student.safetensors"
    save_weights(state, path, meta)
    assert _listing(path.parent) == ["student.safetensors"]
    loaded = load_tensor_file(path)
    assert set(loaded) == set(state)
    for k in state:
        assert torch.equal(loaded[k], state[k]) and loaded[k].dtype == state[k].dtype
    assert read_safetensors_metadata(path) == meta


def test_checkpoint_round_trip_and_marker(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint({"model": {"w": torch.ones(2)}, "epoch": 3, "best_value": None,
                     "best_metrics": {"val/loss/task": 0.5}, "monitor": "val/loss/task"}, path)
    state = load_checkpoint(path)
    assert state["format"] == ckpt.CHECKPOINT_FORMAT and state["version"] == ckpt.CHECKPOINT_VERSION
    assert state["epoch"] == 3 and state["best_value"] is None and torch.equal(state["model"]["w"], torch.ones(2))
    assert state["best_metrics"] == {"val/loss/task": 0.5}

    bare = tmp_path / "bare.pt"
    torch.save({"model": {"w": torch.ones(2)}, "epoch": 3}, bare)
    with pytest.raises(KdmtlError, match="not a kdmtl checkpoint"):
        load_checkpoint(bare)
    torch.save({"format": "something-else", "model": {}}, bare)
    with pytest.raises(KdmtlError, match="kdmtl-checkpoint"):
        load_checkpoint(bare)


# ================================================================ LR schedules
def _lrs(steps_per_epoch, **overrides):
    cfg = OmegaConf.merge(OmegaConf.structured(OptimConfig), overrides)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, cfg, steps_per_epoch)
    lrs = []
    for _ in range(cfg.epochs * steps_per_epoch + 1):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def test_cosine_schedule_by_formula():
    lrs = _lrs(5, epochs=2, scheduler="cosine")
    total = 10
    assert lrs[0] == pytest.approx(1.0)
    for k in range(total):
        assert lrs[k] == pytest.approx(0.5 * (1 + math.cos(math.pi * k / total)), abs=1e-9)
    assert lrs[total - 1] == pytest.approx(0.5 * (1 + math.cos(0.9 * math.pi)), abs=1e-9)  # ~0.0245
    assert lrs[total - 1] < 0.03
    assert lrs[total] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_linear_warmup_then_cosine():
    lrs = _lrs(5, epochs=2, scheduler="cosine", warmup_epochs=0.6)  # 3 warm-up steps
    assert lrs[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])
    for k in range(3, 10):
        assert lrs[k] == pytest.approx(0.5 * (1 + math.cos(math.pi * (k - 3) / 7)), abs=1e-9)
    constant = _lrs(4, epochs=1, scheduler="constant", warmup_epochs=0.5)
    assert constant == pytest.approx([0.5, 1.0, 1.0, 1.0, 1.0])


def test_step_decay():
    lrs = _lrs(3, epochs=6, scheduler="step", step_epochs=2, gamma=0.5)
    expected = [0.5 ** ((k // 3) // 2) for k in range(19)]
    assert lrs == pytest.approx(expected)
    assert lrs[5] == 1.0 and lrs[6] == 0.5 and lrs[12] == 0.25


def test_multistep_decay_at_milestone_epochs():
    # RepDistiller: lr x 0.1 from epoch 151 on (1-based), i.e. epoch index 150; here milestones 2 and 4.
    lrs = _lrs(3, epochs=5, scheduler="multistep", milestones=[4, 2], gamma=0.1)
    expected = [1.0] * 6 + [0.1] * 6 + [0.01] * 4
    assert lrs[:16] == pytest.approx(expected)


def test_an_unscheduled_param_group_keeps_its_lr():
    """KD4MTL's adaptors ("scheduled": False) keep their lr while the student's group follows cosine."""
    student, adaptor = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [student]}, {"params": [adaptor], "lr": 0.1, "scheduled": False}], lr=1.0)
    cfg = OmegaConf.merge(OmegaConf.structured(OptimConfig), {"epochs": 2, "scheduler": "cosine"})
    sched = build_scheduler(opt, cfg, 4)
    for _ in range(8):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12) and opt.param_groups[1]["lr"] == 0.1


@pytest.mark.parametrize("overrides, needle", [({"scheduler": "linear"}, "optim.scheduler"),
                                               ({"epochs": 0}, "optim.epochs"),
                                               ({"scheduler": "multistep"}, "optim.milestones")])
def test_scheduler_errors(overrides, needle):
    cfg = OmegaConf.merge(OmegaConf.structured(OptimConfig), overrides)
    with pytest.raises(KdmtlError, match=needle):
        build_scheduler(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0), cfg, 4)


def test_build_optimizer_kinds_and_errors():
    params = [nn.Parameter(torch.zeros(2))]
    cfg = OmegaConf.structured(OptimConfig)
    kinds = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}
    for name, cls in kinds.items():
        opt = build_optimizer(params, OmegaConf.merge(cfg, {"name": name, "lr": 0.01, "weight_decay": 0.1}))
        assert type(opt) is cls
        assert opt.param_groups[0]["lr"] == 0.01 and opt.param_groups[0]["weight_decay"] == 0.1
    sgd = build_optimizer(params, OmegaConf.merge(cfg, {"name": "sgd", "momentum": 0.8, "nesterov": True}))
    assert sgd.param_groups[0]["momentum"] == 0.8 and sgd.param_groups[0]["nesterov"] is True
    with pytest.raises(KdmtlError, match="optim.name"):
        build_optimizer(params, OmegaConf.merge(cfg, {"name": "lion"}))
    with pytest.raises(KdmtlError, match="optim.lr"):
        build_optimizer(params, OmegaConf.merge(cfg, {"lr": 0.0}))


# ================================================================ RNG state
def _draws():
    return ([random.random() for _ in range(3)], np.random.rand(3).tolist(), torch.rand(3).tolist(),
            [random.gauss(0, 1)], np.random.randn(2).tolist(), torch.randn(2).tolist())


def test_rng_state_survives_weights_only_round_trip(tmp_path):
    seed_everything(1234)
    _draws()
    np.random.randn(1)                   # leave a cached gaussian in numpy's state
    state = rng_state()
    torch.save(state, tmp_path / "rng.pt")
    expected = _draws()
    seed_everything(99)                  # scramble every generator
    assert _draws() != expected
    loaded = torch.load(tmp_path / "rng.pt", weights_only=True)
    set_rng_state(loaded)
    assert _draws() == expected
    # and through a kdmtl checkpoint file
    save_checkpoint({"rng": state}, tmp_path / "ck.pt")
    seed_everything(5)
    set_rng_state(load_checkpoint(tmp_path / "ck.pt")["rng"])
    assert _draws() == expected


def test_seed_everything_is_deterministic():
    seed_everything(7)
    a = _draws()
    seed_everything(7)
    assert _draws() == a


# ================================================================ models
def _tasks(num_cls=4, num_seg=5):
    return {
        "cls": Task("cls", TASK_KINDS.get("classification")(), TargetSpec("classification", num_cls), "cls"),
        "seg": Task("seg", TASK_KINDS.get("segmentation")(), TargetSpec("segmentation", num_seg), "seg"),
        "depth": Task("depth", TASK_KINDS.get("depth")(), TargetSpec("depth", mean=5.0, std=2.0), "depth"),
    }


def _yaml_cfg(schema, path):
    raw = OmegaConf.load(REPO / path)
    raw = OmegaConf.masked_copy(raw, [k for k in raw if k != "defaults"])
    return OmegaConf.merge(OmegaConf.structured(schema), raw)


@pytest.fixture(scope="module")
def default_models():
    teacher_cfg = _yaml_cfg(TeacherConfig, "conf/teacher/multitask.yaml")
    student_cfg = _yaml_cfg(ModelConfig, "conf/student/small.yaml")
    assert (teacher_cfg.width, teacher_cfg.depth, teacher_cfg.stem_stride, teacher_cfg.decoder_width) == (32, 2, 2, 32)
    assert (student_cfg.width, student_cfg.depth, student_cfg.stem_stride, student_cfg.decoder_width) == (16, 1, 2, 16)
    torch.manual_seed(0)
    return build_model(teacher_cfg, _tasks()), build_model(student_cfg, _tasks())


def test_default_teacher_is_at_least_4x_the_student(default_models):
    teacher, student = default_models
    n_teacher, n_student = count_parameters(teacher), count_parameters(student)
    assert n_teacher == sum(p.numel() for p in teacher.parameters())
    assert n_teacher >= 4 * n_student, (n_teacher, n_student)


@pytest.mark.parametrize("size", [32, 48])
def test_output_shapes(default_models, size):
    for model in default_models:
        model.eval()
        with torch.no_grad():
            out = model(torch.randn(2, 3, size, size))
        assert set(out) == {"outputs", "features"} and out["features"] == {}
        assert out["outputs"]["cls"].shape == (2, 4)
        assert out["outputs"]["seg"].shape == (2, 5, size, size)
        assert out["outputs"]["depth"].shape == (2, 1, size, size)


def test_depth_head_predicts_in_target_units(default_models):
    _, student = default_models
    scaled = student.heads["depth"]
    assert float(scaled.shift) == 5.0 and float(scaled.scale) == 2.0
    assert "heads.depth.shift" in student.state_dict() and "heads.depth.scale" in student.state_dict()
    student.eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        features = student.trunk(x)
        raw = scaled.head(features, x.shape[-2:])
        assert torch.allclose(student(x)["outputs"]["depth"], raw * 2.0 + 5.0)


def test_capture_features(default_models):
    _, student = default_models
    model = build_model(_yaml_cfg(ModelConfig, "conf/student/small.yaml"), _tasks())
    model.load_state_dict(student.state_dict())
    model.eval()
    model.capture_features(["trunk.stages.2", "trunk.stem"])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
        trunk_features = model.trunk(x)
    assert set(out["features"]) == {"trunk.stages.2", "trunk.stem"}
    assert torch.equal(out["features"]["trunk.stages.2"], trunk_features[2])
    assert out["features"]["trunk.stages.2"].shape == (2, 64, 4, 4)    # width 16 * 2^2, 32 / (2 * 4)
    assert out["features"]["trunk.stem"].shape == (2, 16, 16, 16)
    with pytest.raises(KdmtlError) as info:
        model.capture_features(["trunk.stage.9"])
    message = str(info.value)
    assert "trunk.stage.9" in message and "trunk.stages.2" in message and "heads.seg" in message


def test_unknown_arch_is_a_kdmtl_error():
    cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), {"arch": "nosuchnet"})
    with pytest.raises(KdmtlError, match="nosuchnet"):
        build_model(cfg, _tasks())


def test_resnet18_trunk_builds_without_weights():
    cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), {"arch": "resnet18", "decoder_width": 8})
    model = build_model(cfg, _tasks(3, 2)).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 32, 32))
    assert out["outputs"]["cls"].shape == (1, 3) and out["outputs"]["seg"].shape == (1, 2, 32, 32)
    assert out["outputs"]["depth"].shape == (1, 1, 32, 32)
    assert model.trunk.channels == [64, 128, 256, 512]


@pytest.fixture(scope="module")
def resnet18_state(tmp_path_factory):
    torch.manual_seed(3)
    state = torchvision.models.resnet18(weights=None).state_dict()
    path = tmp_path_factory.mktemp("weights") / "resnet18.pt"
    torch.save(state, path)
    return state, path


@pytest.mark.parametrize("small_input", [False, True])
def test_resnet18_trunk_loads_local_weights(resnet18_state, small_input):
    state, path = resnet18_state
    torch.manual_seed(11)  # a different init, so equality means the file was loaded
    trunk = ResNetTrunk("resnet18", str(path), small_input=small_input)
    assert torch.equal(trunk.layer1[0].conv1.weight, state["layer1.0.conv1.weight"])
    assert torch.equal(trunk.layer4[1].conv2.weight, state["layer4.1.conv2.weight"])
    assert torch.equal(trunk.stem[1].running_var, state["bn1.running_var"])
    if small_input:   # the ImageNet 7x7 stem is replaced by a 3x3 one for small images
        assert trunk.stem[0].weight.shape == (64, 3, 3, 3)
    else:
        assert torch.equal(trunk.stem[0].weight, state["conv1.weight"])


def test_resnet18_weights_with_missing_keys_is_a_kdmtl_error(resnet18_state, tmp_path):
    state, _ = resnet18_state
    partial = {k: v for k, v in state.items() if not k.startswith("layer4.")}
    torch.save(partial, tmp_path / "partial.pt")
    with pytest.raises(KdmtlError, match="does not match torchvision resnet18"):
        ResNetTrunk("resnet18", str(tmp_path / "partial.pt"), small_input=True)


def test_resnet18_weights_with_wrong_shapes_is_a_kdmtl_error(resnet18_state, tmp_path):
    # e.g. a ResNet-50 file: its blocks share key names with ResNet-18 but not shapes
    state, _ = resnet18_state
    wrong = dict(state)
    wrong["layer1.0.conv1.weight"] = torch.zeros(64, 64, 1, 1)
    torch.save(wrong, tmp_path / "wrong.pt")
    with pytest.raises(KdmtlError, match="resnet18"):
        ResNetTrunk("resnet18", str(tmp_path / "wrong.pt"), small_input=True)


def test_resnet18_missing_weights_file_is_a_kdmtl_error(tmp_path):
    with pytest.raises(KdmtlError, match="not found"):
        ResNetTrunk("resnet18", str(tmp_path / "none.pth"), small_input=True)


# ================================================================ teacher cache key
def test_teacher_key_covers_what_changes_the_weights():
    teacher = OmegaConf.merge(OmegaConf.structured(TeacherConfig), {"width": 32})
    data = OmegaConf.merge(OmegaConf.structured(DataConfig), {"root": "/data"})
    sig = {"cls": {"kind": "classification", "num_classes": 4, "out_channels": 4}}
    base = teacher_key(teacher, sig, data, "fp", 0, "32", None)
    assert base == teacher_key(teacher, sig, data, "fp", 0, "32", None) and len(base) == 20
    # irrelevant to the trained weights
    assert teacher_key(OmegaConf.merge(teacher, {"checkpoint": "/x.pt"}), sig, data, "fp", 0, "32", None) == base
    for change in ({"root": "/other"}, {"generate": False}, {"eval_batch_size": 7}):
        assert teacher_key(teacher, sig, OmegaConf.merge(data, change), "fp", 0, "32", None) == base
    # relevant
    assert teacher_key(OmegaConf.merge(teacher, {"width": 16}), sig, data, "fp", 0, "32", None) != base
    assert teacher_key(OmegaConf.merge(teacher, {"optim": {"lr": 0.1}}), sig, data, "fp", 0, "32", None) != base
    assert teacher_key(teacher, sig, OmegaConf.merge(data, {"batch_size": 7}), "fp", 0, "32", None) != base
    assert teacher_key(teacher, {"cls": {**sig["cls"], "num_classes": 5}}, data, "fp", 0, "32", None) != base
    assert teacher_key(teacher, sig, data, "fp2", 0, "32", None) != base
    assert teacher_key(teacher, sig, data, "fp", 1, "32", None) != base
    assert teacher_key(teacher, sig, data, "fp", 0, "bf16", None) != base
    assert teacher_key(teacher, sig, data, "fp", 0, "32", 3) != base


# ================================================================ trainer reproducibility
def _tiny_split(n, seed):
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.randint(0, 256, (n, 3, 8, 8), generator=g, dtype=torch.uint8),
            "cls": torch.randint(0, 3, (n,), generator=g),
            "seg": torch.randint(0, 3, (n, 8, 8), generator=g),
            "depth": torch.rand(n, 8, 8, generator=g) * 4 + 1}


# Distillation with learned parts (FitNet regressor, KD4MTL adaptors) and progress-dependent
# weights (DKD warm-up, BAM annealing), on the last stage of a 2-stage net.
DISTILL = {"fitnet": {"student": ["trunk.stages.1"], "teacher": ["trunk.stages.1"]},
           "kd4mtl": {"student": "trunk.stages.1", "teacher": "trunk.stages.1"},
           "dkd": {"warmup_epochs": 1.5}, "bam": {}, "kd": {}}


def _train(tmp: Path, epochs=2, stop_after=None, resume_from=None, distill=False):
    tasks = _tasks(3, 3)
    seed_everything(0)
    cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), {"width": 4, "stages": 2, "decoder_width": 4})
    model = build_model(cfg, tasks)
    teacher = build_model(OmegaConf.merge(cfg, {"width": 6}), tasks) if distill else None
    kinds = {"cls": "classification", "seg": "segmentation", "depth": "depth"}
    common = dict(mean=[0.5] * 3, std=[0.25] * 3, device=torch.device("cpu"), seed=0)
    train = TensorLoader(_tiny_split(12, 1), kinds, batch_size=4, shuffle=True, hflip=True, **common)
    val = TensorLoader(_tiny_split(6, 2), kinds, batch_size=6, **common)
    optim_cfg = OmegaConf.merge(OmegaConf.structured(OptimConfig), {"epochs": epochs, "lr": 0.01})
    if distill:
        loss_cfg = OmegaConf.merge(OmegaConf.structured(LossConfig), DISTILL)
        objective = Objective(tasks, 1.0, build_methods(loss_cfg, tasks, list(tasks)), teacher)
        objective.setup(model, next(iter(val)), torch.device("cpu"))
    else:
        objective = Objective(tasks, 1.0)        # vanilla: task losses only, no teacher
    optimizer = build_optimizer([{"params": list(model.parameters())}, *objective.param_groups(optim_cfg.lr)],
                                optim_cfg)
    scheduler = build_scheduler(optimizer, optim_cfg, len(train))
    hw = Hardware(device=torch.device("cpu"), precision="32", channels_last=False, scaler=None)
    trainer = Trainer(model=model, objective=objective, tasks=tasks, optimizer=optimizer, scheduler=scheduler,
                      hardware=hw, train_loader=train, val_loader=val, epochs=epochs,
                      checkpoint_dir=tmp / "checkpoints", log=MetricsLog(tmp, tensorboard=False),
                      progress_mode="none", label="student", monitor="val/loss/task", stop_after_epoch=stop_after)
    if resume_from is not None:
        trainer.restore(load_checkpoint(resume_from))
    state = trainer.fit()
    weights = dict(model.state_dict())
    weights.update({f"objective.{k}": v for k, v in objective.modules.state_dict().items()})
    return weights, state, optimizer


def _assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_trainer_is_bit_reproducible_in_process(tmp_path):
    first, state1, _ = _train(tmp_path / "a")
    second, state2, _ = _train(tmp_path / "b")
    _assert_same_state(first, second)
    assert state1.epoch == state2.epoch == 2 and state1.global_step == 6
    assert state1.best_value == state2.best_value
    assert (tmp_path / "a" / "checkpoints" / "last.pt").exists()
    assert (tmp_path / "a" / "checkpoints" / "best.pt").exists()
    # training changed the weights
    seed_everything(0)
    init = build_model(OmegaConf.merge(OmegaConf.structured(ModelConfig),
                                       {"width": 4, "stages": 2, "decoder_width": 4}), _tasks(3, 3)).state_dict()
    assert not torch.equal(init["trunk.stem.0.weight"], first["trunk.stem.0.weight"])


def test_trainer_resume_matches_uninterrupted_run(tmp_path):
    full, _, _ = _train(tmp_path / "full")
    _, stopped, _ = _train(tmp_path / "part", stop_after=1)
    assert stopped.epoch == 1
    resumed, state, _ = _train(tmp_path / "resumed", resume_from=tmp_path / "part" / "checkpoints" / "last.pt")
    assert state.epoch == 2 and state.global_step == 6
    _assert_same_state(full, resumed)


def test_trainer_resume_with_learned_distillation_parts(tmp_path):
    """Regressor and adaptor weights are checkpointed with the student and restored on resume;
    progress-dependent weights (DKD warm-up, BAM) continue where they were."""
    full, state, optimizer = _train(tmp_path / "full", distill=True)
    assert state.global_step == 6
    # at the end of cosine: the FitNet regressor follows the student's schedule to 0; KD4MTL's adaptors
    # keep their own lr (0.1, unscheduled as in the official code)
    assert [g["lr"] for g in optimizer.param_groups][1:] == [0.0, 0.1]
    learned = [k for k in full if k.startswith("objective.")]
    assert any(k.startswith("objective.fitnet.") for k in learned)
    assert {k.split(".")[2] for k in learned if k.startswith("objective.kd4mtl.")} == {"cls__0", "seg__0", "depth__0"}
    assert "objective" in load_checkpoint(tmp_path / "full" / "checkpoints" / "last.pt")
    _, stopped, _ = _train(tmp_path / "part", stop_after=1, distill=True)
    assert stopped.epoch == 1
    resumed, state, _ = _train(tmp_path / "resumed", resume_from=tmp_path / "part" / "checkpoints" / "last.pt",
                               distill=True)
    assert state.epoch == 2 and state.global_step == 6
    _assert_same_state(full, resumed)
    # The learned parts did train during the second epoch.
    after_one = load_checkpoint(tmp_path / "part" / "checkpoints" / "last.pt")["objective"]
    assert not torch.equal(after_one["kd4mtl.cls__0.conv.weight"], full["objective.kd4mtl.cls__0.conv.weight"])
    assert not torch.equal(after_one["fitnet.trunk__stages__1.conv.weight"],
                           full["objective.fitnet.trunk__stages__1.conv.weight"])
