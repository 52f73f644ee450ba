"""Teachers: per-task teachers, partial teachers, input renormalisation."""

from __future__ import annotations

import torch
from omegaconf import OmegaConf

from conftest import FAST, WORKERS, read_jsonl, run_kdmtl
from kdmtl_cli.data import TargetSpec
from kdmtl_cli.models import build_model
from kdmtl_cli.schema import ModelConfig
from kdmtl_cli.tasks import build_tasks
from kdmtl_cli.teachers import Renormalize, TaskTeachers

TASKS_CFG = OmegaConf.create({"cls": {"kind": "classification"}, "seg": {"kind": "segmentation"},
                              "depth": {"kind": "depth"}})
TARGETS = {"cls": TargetSpec("classification", 4), "seg": TargetSpec("segmentation", 5), "depth": TargetSpec("depth")}


def _model(task_names, seed=0):
    torch.manual_seed(seed)
    tasks = build_tasks(OmegaConf.create({n: TASKS_CFG[n] for n in task_names}), TARGETS)
    return build_model(OmegaConf.structured(ModelConfig(width=4, decoder_width=4)), tasks).eval()


def test_renormalize_feeds_the_teacher_its_own_normalisation():
    teacher = _model(["cls", "seg"])
    student_norm = {"mean": [0.5, 0.4, 0.3], "std": [0.25, 0.2, 0.3]}
    teacher_norm = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    raw = torch.rand(2, 3, 16, 16)  # images in [0, 1]
    as_student = (raw - torch.tensor(student_norm["mean"]).view(1, 3, 1, 1)) / torch.tensor(student_norm["std"]).view(1, 3, 1, 1)
    as_teacher = (raw - torch.tensor(teacher_norm["mean"]).view(1, 3, 1, 1)) / torch.tensor(teacher_norm["std"]).view(1, 3, 1, 1)
    wrapped = Renormalize(teacher, student_norm, teacher_norm)
    with torch.no_grad():
        got, want = wrapped(as_student)["outputs"], teacher(as_teacher)["outputs"]
    for name in want:
        assert torch.allclose(got[name], want[name], atol=1e-5)


def test_task_teachers_answer_each_for_their_own_task():
    seg_teacher, depth_teacher = _model(["seg"], seed=1), _model(["cls", "depth"], seed=2)
    seg_teacher.capture_features(["trunk.stages.2"])
    both = TaskTeachers({"seg": seg_teacher, "depth": depth_teacher})
    image = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        out = both(image)
        assert set(out["outputs"]) == {"seg", "depth"}  # depth_teacher's cls head is not used
        assert torch.equal(out["outputs"]["seg"], seg_teacher(image)["outputs"]["seg"])
        assert torch.equal(out["outputs"]["depth"], depth_teacher(image)["outputs"]["depth"])
    assert set(out["features"]) == {"seg:trunk.stages.2"}


def test_per_task_teachers_are_cached_each_and_shared(workdir, tmp_path):
    cache = tmp_path / "cache"
    first = run_kdmtl(["train", *FAST, "teacher=per_task", f"hydra.run.dir={workdir / 'a'}"], workdir, cache)
    assert first.returncode == 0, first.stderr
    for task in ("cls", "seg", "depth"):
        assert f"teacher:{task}: no cached teacher" in first.stdout
        assert (workdir / "a" / "teacher" / task / "metrics.jsonl").exists()
    entries = sorted((cache / "teachers").iterdir())
    assert len(entries) == 3
    stamps = {e: (e / "teacher.safetensors").stat().st_mtime_ns for e in entries}
    epoch = read_jsonl(workdir / "a" / "metrics.jsonl")[0]
    assert {"train/kd/cls", "train/kd/seg", "train/kd/depth"} <= set(epoch)
    # again: every per-task teacher is reused, none retrained
    second = run_kdmtl(["train", *FAST, "teacher=per_task", "student=tiny", f"hydra.run.dir={workdir / 'b'}"],
                       workdir, cache)
    assert second.returncode == 0, second.stderr
    assert second.stdout.count("reusing cached teacher") == 3 and "training it" not in second.stdout
    # a multitask teacher restricted to seg is the same teacher as the per-task seg one
    third = run_kdmtl(["train", *FAST, "teacher.tasks=[seg]", f"hydra.run.dir={workdir / 'c'}"], workdir, cache)
    assert third.returncode == 0, third.stderr
    assert "reusing cached teacher" in third.stdout and "training it" not in third.stdout
    assert {e: (e / "teacher.safetensors").stat().st_mtime_ns for e in entries} == stamps
    assert len(list((cache / "teachers").iterdir())) == 3


def test_per_task_checkpoint_for_one_task_and_renormalised_input(workdir, shared_cache):
    # a seg-only kdmtl run trained at another input normalisation serves as the seg teacher
    source = workdir / "seg_only"
    made = run_kdmtl(["train", *FAST, "tasks=seg", "loss=none", "data.mean=[0.4,0.4,0.4]", "data.std=[0.3,0.3,0.3]",
                      f"hydra.run.dir={source}"], workdir, shared_cache)
    assert made.returncode == 0, made.stderr
    result = run_kdmtl(["train", *FAST, "teacher=per_task", "teacher.tasks=[seg,depth]",
                        f"teacher.checkpoints.seg={source / 'checkpoints' / 'best.pt'}",
                        f"hydra.run.dir={workdir / 'mixed'}"], workdir, shared_cache)
    assert result.returncode == 0, result.stderr
    assert f"teacher:seg: loaded {source / 'checkpoints' / 'best.pt'}" in result.stdout
    assert "renormalising the student's input" in result.stdout
    epoch = read_jsonl(workdir / "mixed" / "metrics.jsonl")[0]
    assert "train/kd/seg" in epoch and "train/kd/depth" in epoch and "train/kd/cls" not in epoch


def test_teacher_mode_errors(workdir, shared_cache):
    cases = [
        (["teacher=per_task", "teacher.checkpoint=/x.pt"], "teacher.checkpoints.<task>"),
        (["teacher.checkpoints.seg=/x.pt"], "teacher=per_task"),
        (["teacher=per_task", "teacher.tasks=[seg]", "teacher.checkpoints.depth=/x.pt"], "does not cover"),
        (["teacher.mode=bagging"], "multitask, per_task or ensemble"),
        (["teacher.mode=ensemble"], "at least two teachers"),      # teacher=ensemble lists two members
        # an unknown teacher task is named before any method looks it up
        (["teacher.tasks=[foo]", "loss=dkd"], "teacher.tasks names foo"),
    ]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(WORKERS) as pool:       # each process mostly starts up: run them together
        results = list(pool.map(lambda case: run_kdmtl(["train", *FAST, *case[0]], workdir, shared_cache), cases))
    for (extra, words), result in zip(cases, results):
        lines = result.stderr.strip().splitlines()
        assert result.returncode != 0 and len(lines) == 1 and lines[0].startswith("kdmtl: error:"), result.stderr
        assert words in lines[0], (extra, lines[0])
