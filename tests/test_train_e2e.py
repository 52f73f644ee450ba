"""End-to-end `kdmtl train` / `kdmtl eval` through the real CLI in subprocesses."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import yaml

import pytest

from conftest import FAST, TB, WORKERS, read_jsonl, run_kdmtl


def _ok(result):
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result


def _tensorboard_tags(run_dir: Path) -> set:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return set(acc.Tags()["scalars"])


def test_train_writes_checkpoints_metrics_tensorboard_summary(workdir, shared_cache):
    run_dir = workdir / "run"
    result = _ok(run_kdmtl(["train", *FAST, "log.efficiency=true", TB, f"hydra.run.dir={run_dir}"], workdir, shared_cache))
    for name in ("config.yaml", "results.json", "summary.md", "metrics.jsonl", ".hydra/config.yaml",
                 "checkpoints/last.pt", "checkpoints/best.pt"):
        assert (run_dir / name).exists(), name
    records = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["type"] for r in records] == ["epoch", "final"]
    epoch, final = records
    assert epoch["epoch"] == 1 and epoch["step"] == 2  # debug=fast: one epoch of two batches
    for term in ("train/task/cls", "train/task/seg", "train/task/depth", "train/kd/cls", "train/kd/seg",
                 "train/kd/depth", "train/loss/total", "val/cls/accuracy", "val/seg/miou", "val/depth/abs_err"):
        assert term in epoch, term
    # the optimised total is the weighted sum of its named terms (by default task_weight 1, kd weight 0.5,
    # and the FitNet hint on trunk.stages.1 with weight 100, a term tied to no task)
    saved_loss = yaml.safe_load((run_dir / "config.yaml").read_text())["loss"]
    assert (saved_loss["task_weight"], saved_loss["kd"]["weight"], saved_loss["fitnet"]["weight"]) == (1.0, 0.5, 100.0)
    parts = sum(epoch[f"train/task/{t}"] + 0.5 * epoch[f"train/kd/{t}"] for t in ("cls", "seg", "depth"))
    parts += 100.0 * epoch["train/fitnet/trunk.stages.1"]
    assert abs(epoch["train/loss/total"] - parts) < 1e-4 * max(1.0, abs(parts))
    for key in ("test/cls/accuracy", "test/cls/f1", "test/cls/recall", "test/seg/miou", "test/seg/pixel_acc",
                "test/depth/abs_err", "test/depth/rel_err", "teacher/test/cls/accuracy",
                "student/params", "teacher/params", "student/flops", "student/latency_ms"):
        assert key in final, key
    assert final["teacher/params"] >= 4 * final["student/params"]
    tags = _tensorboard_tags(run_dir)
    assert {"train/kd/seg", "train/task/depth", "val/seg/miou", "lr", "test/cls/accuracy"} <= tags
    summary = (run_dir / "summary.md").read_text()
    assert "| cls/accuracy ↑ |" in summary and "teacher" in summary
    assert "parameters" in result.stdout and "cls/accuracy" in result.stdout
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert state["format"] == "kdmtl-checkpoint" and state["epoch"] == 1
    assert set(state) >= {"model", "optimizer", "scheduler", "rng", "model_meta"}
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["optim"]["epochs"] == 1 and saved["data"]["train_size"] == 128


def test_teacher_is_trained_once_and_reused(workdir, tmp_path):
    cache = tmp_path / "fresh_cache"
    # fresh=True (conftest.run_kdmtl): the last run is compared bit for bit with this one
    first = _ok(run_kdmtl(["train", *FAST, f"hydra.run.dir={workdir / 'a'}"], workdir, cache, fresh=True))
    assert "training it" in first.stdout and "cached at" in first.stdout
    entries = list((cache / "teachers").iterdir())
    assert len(entries) == 1
    weights = entries[0] / "teacher.safetensors"
    before = (weights.stat().st_mtime_ns, weights.read_bytes())
    # a different student and KD temperature share the teacher; nothing is retrained
    second = _ok(run_kdmtl(["train", *FAST, "student=tiny", "loss.kd.temperature=2", f"hydra.run.dir={workdir / 'b'}"],
                           workdir, cache))
    assert "reusing cached teacher" in second.stdout and "training it" not in second.stdout
    assert (weights.stat().st_mtime_ns, weights.read_bytes()) == before
    assert not (workdir / "b" / "teacher").exists()
    assert len(list((cache / "teachers").iterdir())) == 1
    info = json.loads((entries[0] / "teacher.json").read_text())
    assert info["trained_in_run"] == str(workdir / "a")
    # a different teacher (width) is a different cache entry
    third = _ok(run_kdmtl(["train", *FAST, "teacher.width=24", f"hydra.run.dir={workdir / 'c'}"], workdir, cache))
    assert "training it" in third.stdout
    assert len(list((cache / "teachers").iterdir())) == 2
    # the frozen teacher's test metrics are evaluated once per (weights, test data, settings) and
    # read back afterwards: a value planted in the stored file comes back in the next run's results
    tests = sorted((cache / "teacher_tests").iterdir())
    assert len(tests) == 2                          # the two teachers (widths 32 and 24)
    first_results = json.loads((workdir / "a" / "results.json").read_text())["results"]
    planted = next(t for t in tests if json.loads(t.read_text())["metrics"] == {
        k[len("teacher/"):]: v for k, v in first_results.items() if k.startswith("teacher/test/")})
    stored = json.loads(planted.read_text())
    stored["metrics"]["test/cls/accuracy"] = 0.123456
    planted.write_text(json.dumps(stored))
    # the same run again, now with the cached teacher: the student ends bit-identical
    _ok(run_kdmtl(["train", *FAST, f"hydra.run.dir={workdir / 'a2'}"], workdir, cache, fresh=True))
    again = json.loads((workdir / "a2" / "results.json").read_text())["results"]
    assert again["teacher/test/cls/accuracy"] == 0.123456
    assert {k: v for k, v in again.items() if k.startswith("teacher/test/") and k != "teacher/test/cls/accuracy"} == {
        k: v for k, v in first_results.items() if k.startswith("teacher/test/") and k != "teacher/test/cls/accuracy"}
    wa = torch.load(workdir / "a" / "checkpoints" / "last.pt", weights_only=True)["model"]
    wa2 = torch.load(workdir / "a2" / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(wa[k], wa2[k]) for k in wa)


def test_resume_gives_identical_results(workdir, shared_cache):
    common = [*FAST, "optim.epochs=2"]
    straight, interrupted = workdir / "straight", workdir / "interrupted"
    # fresh=True (conftest.run_kdmtl): runs compared bit for bit, each in an interpreter of its own
    _ok(run_kdmtl(["train", *common, f"hydra.run.dir={straight}"], workdir, shared_cache, fresh=True))
    stopped = _ok(run_kdmtl(["train", *common, "stop_after_epoch=1", f"hydra.run.dir={interrupted}"], workdir, shared_cache,
                            fresh=True))
    assert "stopping after epoch 1" in stopped.stdout
    assert not (interrupted / "results.json").exists()
    assert torch.load(interrupted / "checkpoints" / "last.pt", weights_only=True)["epoch"] == 1
    resumed = _ok(run_kdmtl(["train", f"resume={interrupted}", "log.progress=plain"], workdir, shared_cache, fresh=True))
    assert "resuming" in resumed.stdout
    a, b = read_jsonl(straight / "metrics.jsonl"), read_jsonl(interrupted / "metrics.jsonl")
    assert [r["type"] for r in b] == ["epoch", "epoch", "final"]
    metric_keys = [k for k in a[-1] if k.startswith(("test/", "val/"))]
    assert metric_keys
    for key in metric_keys:
        assert a[-1][key] == b[-1][key], key  # bit-identical, not approximately equal
    wa = torch.load(straight / "checkpoints" / "last.pt", weights_only=True)["model"]
    wb = torch.load(interrupted / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # the resumed run keeps its original Hydra record and adds its own
    assert (interrupted / ".hydra" / "config.yaml").exists()
    assert any(p.name.startswith("resume-") for p in (interrupted / ".hydra").iterdir())


def test_same_seed_is_bit_reproducible_and_other_seed_differs(workdir, shared_cache):
    runs = {}
    # d: glibc's allocator left at its defaults (hardware.keep_freed_memory=false) changes no bit
    seeds = {"a": 0, "b": 0, "c": 1, "d": 0}
    extra = {"d": ["hardware.keep_freed_memory=false"]}
    with ThreadPoolExecutor(WORKERS) as pool:      # fresh=True: compared bit for bit
        procs = dict(zip(seeds, pool.map(lambda name: run_kdmtl(
            ["train", *FAST, f"seed={seeds[name]}", "loss=none", *extra.get(name, []), f"hydra.run.dir={workdir / name}"],
            workdir, shared_cache, fresh=True), seeds)))
    for name in seeds:
        _ok(procs[name])
        runs[name] = torch.load(workdir / name / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(runs["a"][k], runs["b"][k]) for k in runs["a"])
    assert all(torch.equal(runs["a"][k], runs["d"][k]) for k in runs["a"])
    assert not all(torch.equal(runs["a"][k], runs["c"][k]) for k in runs["a"])


def test_vanilla_student_has_no_teacher_and_no_kd_terms(workdir, shared_cache):
    run_dir = workdir / "vanilla"
    result = _ok(run_kdmtl(["train", *FAST, "loss=none", f"hydra.run.dir={run_dir}"], workdir, shared_cache))
    assert "teacher:" not in result.stdout
    epoch = read_jsonl(run_dir / "metrics.jsonl")[0]
    assert not any(k.startswith("train/kd/") for k in epoch)
    assert abs(epoch["train/loss/total"] - sum(epoch[f"train/task/{t}"] for t in ("cls", "seg", "depth"))) < 1e-4


def test_eval_reproduces_the_final_test_metrics(workdir, shared_cache):
    run_dir = workdir / "run"
    _ok(run_kdmtl(["train", *FAST, f"hydra.run.dir={run_dir}"], workdir, shared_cache))
    result = _ok(run_kdmtl(["eval", f"run_dir={run_dir}", "log.progress=plain"], workdir, shared_cache))
    assert "test/seg/miou" in result.stdout
    outputs = list((run_dir / "eval").glob("*/eval.json"))
    assert len(outputs) == 1
    evaluated = json.loads(outputs[0].read_text())["metrics"]
    final = read_jsonl(run_dir / "metrics.jsonl")[-1]
    for key, value in evaluated.items():
        assert abs(value - final[key]) < 1e-6, key
    bad = run_kdmtl(["eval", f"run_dir={workdir / 'nope'}"], workdir, shared_cache)
    assert bad.returncode != 0 and bad.stderr.strip().count("\n") == 0 and "kdmtl train run directory" in bad.stderr


def test_bf16_precision_and_teacher_subset(workdir, shared_cache):
    run_dir = workdir / "bf16"
    _ok(run_kdmtl(["train", *FAST, "hardware.precision=bf16", "teacher.tasks=[seg]", f"hydra.run.dir={run_dir}"],
                  workdir, shared_cache))
    epoch = read_jsonl(run_dir / "metrics.jsonl")[0]
    # only the task the teacher covers is distilled; the others get their task loss only
    assert "train/kd/seg" in epoch and "train/kd/cls" not in epoch and "train/kd/depth" not in epoch


@pytest.mark.slow  # ~13 s; tests/test_run_ownership.py covers resume=true (with a run dir, and skipping live runs); run with -m slow
def test_resume_true_continues_the_newest_interrupted_run(workdir, shared_cache):
    _ok(run_kdmtl(["train", *FAST, TB, "optim.epochs=2", "stop_after_epoch=1"], workdir, shared_cache))
    (run_dir,) = [p.parent.parent for p in (workdir / "outputs").glob("*/*/checkpoints/last.pt")]
    assert not (run_dir / "results.json").exists()
    resumed = _ok(run_kdmtl(["train", "resume=true", "log.progress=plain"], workdir, shared_cache))
    assert f"resuming from {run_dir.resolve() / 'checkpoints' / 'last.pt'} after epoch 1" in resumed.stdout
    assert [r["type"] for r in read_jsonl(run_dir / "metrics.jsonl")] == ["epoch", "epoch", "final"]
    # no second run directory was made for the resumed run
    assert len(list((workdir / "outputs").glob("*/*/config.yaml"))) == 1
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    assert "hparam/test/seg/miou" in acc.Tags()["scalars"]  # the HParams row of the finished run


def test_every_distillation_method_runs_one_short_epoch(workdir, shared_cache):
    """Each method (and a combination) through the real CLI: its named terms are logged."""
    expected = {
        "dkd": {"train/dkd/cls", "train/dkd/seg"},
        "fitnet": {"train/fitnet/trunk.stages.1"},
        "at": {"train/at/trunk.stages.0", "train/at/trunk.stages.1", "train/at/trunk.stages.2"},
        "kd4mtl": {"train/kd4mtl/cls", "train/kd4mtl/seg", "train/kd4mtl/depth"},
        "bam": {"train/bam/cls", "train/bam/seg"},
        "[kd,at]": {"train/kd/cls", "train/kd/depth", "train/at/trunk.stages.2"},
    }
    run_dirs = {loss: workdir / loss.strip("[]").replace(",", "+") for loss in expected}
    with ThreadPoolExecutor(WORKERS) as pool:      # independent runs: started together
        procs = list(pool.map(lambda loss: run_kdmtl(["train", *FAST, f"loss={loss}", f"hydra.run.dir={run_dirs[loss]}"],
                                                     workdir, shared_cache), expected))
    for (loss, terms), proc in zip(expected.items(), procs):
        _ok(proc)
        epoch = read_jsonl(run_dirs[loss] / "metrics.jsonl")[0]
        assert terms <= set(epoch), (loss, sorted(epoch))
        methods = {k.split("/")[1] for k in epoch if k.startswith("train/") and k.count("/") >= 2} - {"task", "loss", "group", "weight", "grad_norm"}
        assert methods == {t.split("/")[1] for t in terms}, (loss, methods)
    # KD4MTL's adaptors are learned parts: they travel in the checkpoint
    state = torch.load(workdir / "kd4mtl" / "checkpoints" / "last.pt", weights_only=True)
    assert set(state["objective"]) == {f"kd4mtl.{t}__{i}.conv.weight" for t in ("cls", "seg", "depth") for i in (0, 1)}
