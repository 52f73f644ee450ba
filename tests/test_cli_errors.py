"""User errors through the real `kdmtl` CLI: one line on stderr, a non-zero exit, no traceback,
and nothing already on disk damaged.

Runs that must import torch (a few seconds each on 2 cores) are launched concurrently by the
module fixtures below (`runs`), and each test then checks one of their results; runs that
fail while composing the config (well under a second) are made inside the tests themselves.
"""

from __future__ import annotations

import io
import os
import random
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
import torch

from conftest import FAST, WORKERS, assert_one_line_error, read_jsonl, run_kdmtl, show


# ---- helpers -------------------------------------------------------------------------------------

def assert_ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, show(proc)
    return proc


def run_parallel(jobs: Dict[str, Tuple[List[str], Path]], cache: Path,
                 workers: int = WORKERS) -> Dict[str, subprocess.CompletedProcess]:
    """Run several `kdmtl` invocations at once: {name: (args, cwd)} -> {name: CompletedProcess}."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {name: pool.submit(run_kdmtl, args, cwd, cache) for name, (args, cwd) in jobs.items()}
        return {name: future.result() for name, future in futures.items()}


def snapshot(*paths: Path) -> Dict[str, Tuple[bytes, int]]:
    """Bytes and mtime of each file (recursively for directories)."""
    out = {}
    for path in paths:
        files = sorted(p for p in Path(path).rglob("*") if p.is_file()) if Path(path).is_dir() else [Path(path)]
        for f in files:
            out[str(f)] = (f.read_bytes(), f.stat().st_mtime_ns)
    return out


def assert_unchanged(before: Dict[str, Tuple[bytes, int]], after: Dict[str, Tuple[bytes, int]]) -> None:
    assert sorted(after) == sorted(before), "files appeared or disappeared"
    changed = [p for p in before if before[p] != after[p]]
    assert not changed, f"files changed: {changed}"


class Evil:
    """Unpickling this runs a shell command: a checkpoint must never be loaded with pickle."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


# ---- module fixtures: the runs several tests share --------------------------------------------------

@pytest.fixture(scope="module")
def area(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli_errors")


@pytest.fixture(scope="module")
def base_runs(area, shared_cache):
    """Two real runs, started together: an interrupted 2-epoch run (stopped after epoch 1; trains and
    caches the FAST teacher) and a student-only run on the `seg` task (its checkpoint covers seg only)."""
    interrupted, seg_only = area / "interrupted", area / "seg_only"
    procs = run_parallel({
        "interrupted": (["train", *FAST, "optim.epochs=2", "stop_after_epoch=1", f"hydra.run.dir={interrupted}"],
                        area),
        "seg_only": (["train", *FAST, "tasks=seg", "loss=none", f"hydra.run.dir={seg_only}"], area),
    }, shared_cache)
    for proc in procs.values():
        assert_ok(proc)
    assert (interrupted / "checkpoints" / "last.pt").is_file()
    assert not (interrupted / "results.json").exists()
    # A pristine copy of a full (cls, seg, depth) kdmtl checkpoint, for the class-mismatch tests.
    full_ckpt = area / "full_student.pt"
    shutil.copyfile(interrupted / "checkpoints" / "best.pt", full_ckpt)
    return {"interrupted": interrupted, "seg_only": seg_only, "seg_ckpt": seg_only / "checkpoints" / "best.pt",
            "full_ckpt": full_ckpt}


def _resume_story(run_dir: Path, cwd: Path, cache: Path) -> dict:
    """Resume the interrupted run twice with incompatible changes (both must be refused), then once
    with an allowed change (finishes it). Records the run's files before and after the refusals."""
    watched = [run_dir / "checkpoints", run_dir / "metrics.jsonl", run_dir / "config.yaml"]
    watched += sorted((run_dir / ".hydra").glob("*.yaml"))
    before = snapshot(*watched)
    bad_student = run_kdmtl(["train", f"resume={run_dir}", "student=tiny"], cwd, cache)
    bad_temperature = run_kdmtl(["train", f"resume={run_dir}", "loss.kd.temperature=8"], cwd, cache)
    after = snapshot(*watched)
    good = run_kdmtl(["train", f"resume={run_dir}", "hardware.device=cpu", "log.progress=plain",
                      "log.efficiency=false"], cwd, cache)
    return {"run_dir": run_dir, "before": before, "after": after, "bad_student": bad_student,
            "bad_temperature": bad_temperature, "good": good}


@pytest.fixture(scope="module")
def runs(base_runs, shared_cache, area):
    """The resume story and every failing run that gets as far as importing torch, all launched
    concurrently once the base runs exist (the FAST teacher is cached by then)."""
    finished = base_runs["seg_only"]  # a finished run: results.json and checkpoints
    assert (finished / "results.json").is_file()
    files = area / "files"
    files.mkdir()

    garbage = files / "garbage.pt"
    garbage.write_bytes(random.Random(0).randbytes(4096))

    evil_dir = files / "evil"
    evil_dir.mkdir()
    marker = evil_dir / "MARKER"
    evil = evil_dir / "evil.pt"
    torch.save({"format": "kdmtl-checkpoint", "model": {}, "x": Evil(f"touch {marker}")}, evil)

    # The brief's recipe: only the recorded class count changes (the weights keep 4 outputs).
    state = torch.load(base_runs["full_ckpt"], map_location="cpu", weights_only=True)
    assert state["model_meta"]["tasks"]["cls"]["num_classes"] == 4
    state["model_meta"]["tasks"]["cls"]["num_classes"] = 10
    meta_only = files / "teacher_meta_only.pt"
    torch.save(state, meta_only)

    # A self-consistent 10-class teacher: metadata and the cls head's weights both say 10.
    state = torch.load(base_runs["full_ckpt"], map_location="cpu", weights_only=True)
    state["model_meta"]["tasks"]["cls"].update(num_classes=10, out_channels=10)
    weight = state["model"]["heads.cls.fc.weight"]
    state["model"]["heads.cls.fc.weight"] = torch.zeros(10, weight.shape[1])
    state["model"]["heads.cls.fc.bias"] = torch.zeros(10)
    ten_classes = files / "teacher_ten.pt"
    torch.save(state, ten_classes)

    empty_root = files / "empty_data_root"
    empty_root.mkdir()

    existing_watch = [finished / "checkpoints", finished / "results.json", finished / "metrics.jsonl",
                      finished / "config.yaml"]
    existing_before = snapshot(*existing_watch)
    hydra_before = snapshot(*sorted((finished / ".hydra").glob("*.yaml")))

    nan_dir = area / "nan_run"
    jobs = {
        "missing_ckpt": ["teacher.checkpoint=/nonexistent.pt"],
        "garbage_ckpt": [f"teacher.checkpoint={garbage}"],
        "evil_ckpt": [f"teacher.checkpoint={evil}"],
        "task_mismatch": [f"teacher.checkpoint={base_runs['seg_ckpt']}"],
        "class_mismatch_meta": [f"teacher.checkpoint={meta_only}"],
        "class_mismatch": [f"teacher.checkpoint={ten_classes}"],
        "no_data": ["data.generate=false", f"data.root={empty_root}"],
        "existing_dir": [f"hydra.run.dir={finished}"],
        "cuda": ["hardware.device=cuda"],
        "fp8": ["hardware.precision=fp8"],
        "kd_weight_map": ["loss.kd.weight={cls:1}"],
        "bad_monitor": ["checkpoint.monitor=val/nope"],
        "nan": ["optim.epochs=2", "optim.scheduler=step", "optim.step_epochs=1", "optim.gamma=1e38",
                f"hydra.run.dir={nan_dir}"],
    }
    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        story = pool.submit(_resume_story, base_runs["interrupted"], area, shared_cache)
        futures = {}
        for name, args in jobs.items():
            cwd = evil_dir if name == "evil_ckpt" else area / f"cwd_{name}"
            cwd.mkdir(exist_ok=True)
            futures[name] = pool.submit(run_kdmtl, ["train", *FAST, *args], cwd, shared_cache)
        procs = {name: future.result() for name, future in futures.items()}
        resume = story.result()
    return {"procs": procs, "resume": resume, "marker": marker, "evil": evil, "garbage": garbage, "meta_only": meta_only, "ten_classes": ten_classes,
            "empty_root": empty_root, "finished": finished, "existing_watch": existing_watch,
            "existing_before": existing_before, "hydra_before": hydra_before, "nan_dir": nan_dir}


# ---- composition errors (no torch import: fast, run inline) ---------------------------------------

def test_unknown_group_option_lists_choices(workdir, shared_cache):
    line = assert_one_line_error(run_kdmtl(["train", "student=huge"], workdir, shared_cache), "student/huge")
    for option in ("small", "tiny", "resnet18"):
        assert option in line


def test_typo_key_suggests_the_right_one(workdir, shared_cache):
    line = assert_one_line_error(run_kdmtl(["train", "loss.kd.wieght=1"], workdir, shared_cache),
                                 "loss.kd.wieght", "weight")
    assert "did you mean 'weight'" in line


def test_typo_key_with_plus_suggests_the_right_one(workdir, shared_cache):
    line = assert_one_line_error(run_kdmtl(["train", "+loss.kd.temprature=1"], workdir, shared_cache),
                                 "loss.kd.temprature", "temperature")
    assert "did you mean 'temperature'" in line


def test_teacher_cache_with_scale_crop_is_refused_before_the_data_is_read(workdir, shared_cache):
    """`teacher.cache=views|exact` store no random scale-crop views: refused while the settings are
    checked, before the data is looked for (the root here is empty, so reading it would fail
    with another message) and before the run writes its config, metrics or checkpoints."""
    empty = workdir / "empty_root"
    empty.mkdir()
    for mode in ("exact", "views"):
        proc = run_kdmtl(["train", "data=nyuv2", f"data.root={empty}", "data.scale_crop=[1.0,1.2]",
                          f"teacher.cache={mode}", f"hydra.run.dir={workdir / mode}"], workdir, shared_cache)
        assert_one_line_error(proc, f"teacher.cache={mode}", "data.scale_crop")
        assert not any(empty.iterdir())
        assert not {"config.yaml", "checkpoints", "metrics.jsonl"} & {p.name for p in (workdir / mode).iterdir()}


def test_unknown_top_level_key(workdir, shared_cache):
    line = assert_one_line_error(run_kdmtl(["train", "+foo.bar=1"], workdir, shared_cache), "unknown")
    assert "'foo'" in line
    assert "seed" in line and "optim" in line  # lists the valid top-level keys


def test_unknown_key_inside_a_task(workdir, shared_cache):
    line = assert_one_line_error(run_kdmtl(["train", "tasks.cls.foo=1"], workdir, shared_cache),
                                 "tasks.cls.foo")
    assert "kind" in line and "target" in line


@pytest.mark.parametrize("override,key", [("seed=abc", "seed"), ("optim.epochs=two", "optim.epochs")])
def test_wrong_type(workdir, shared_cache, override, key):
    value = override.split("=")[1]
    line = assert_one_line_error(run_kdmtl(["train", override], workdir, shared_cache), f"'{key}'", value)
    assert "integer" in line.lower() or "int" in line.lower()


def test_hydra_full_error_shows_the_traceback(workdir, shared_cache):
    proc = run_kdmtl(["train", "seed=abc"], workdir, shared_cache, env_extra={"HYDRA_FULL_ERROR": "1"})
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr, show(proc)
    assert "seed" in proc.stderr


def test_unwritable_output_dir(workdir, shared_cache):
    a_file = workdir / "a_file"
    a_file.write_text("not a directory\n")
    target = a_file / "run"
    assert_one_line_error(run_kdmtl(["train", *FAST, f"hydra.run.dir={target}"], workdir, shared_cache),
                          str(target))
    assert a_file.read_text() == "not a directory\n"


def test_resume_nonexistent_dir(workdir, shared_cache):
    assert_one_line_error(run_kdmtl(["train", "resume=/nonexistent"], workdir, shared_cache),
                          "/nonexistent", "resume")


def test_resume_true_without_outputs(workdir, shared_cache):
    assert not (workdir / "outputs").exists()
    assert_one_line_error(run_kdmtl(["train", "resume=true"], workdir, shared_cache), "resume", "outputs")


def test_unknown_subcommand(workdir, shared_cache):
    assert_one_line_error(run_kdmtl(["frobnicate"], workdir, shared_cache), "frobnicate", "train", "eval", rc=2)


# ---- resume with a changed config --------------------------------------------------------------------

def test_resume_refuses_changed_student(runs):
    line = assert_one_line_error(runs["resume"]["bad_student"], "resume", "student.width")
    assert "incompatib" in line


def test_resume_refuses_changed_temperature(runs):
    line = assert_one_line_error(runs["resume"]["bad_temperature"], "resume", "loss.kd.temperature")
    assert "8" in line


def test_refused_resume_leaves_the_run_untouched(runs):
    assert_unchanged(runs["resume"]["before"], runs["resume"]["after"])


def test_resume_with_allowed_change_finishes(runs):
    assert_ok(runs["resume"]["good"])
    run_dir = runs["resume"]["run_dir"]
    assert (run_dir / "results.json").is_file()
    epochs = [r["epoch"] for r in read_jsonl(run_dir / "metrics.jsonl") if r.get("type") == "epoch"]
    assert epochs == [1, 2]


# ---- errors from runs that import torch (launched together by `runs`) -----------------------

def test_missing_teacher_checkpoint(runs):
    assert_one_line_error(runs["procs"]["missing_ckpt"], "/nonexistent.pt", "not found")


def test_corrupt_teacher_checkpoint(runs):
    line = assert_one_line_error(runs["procs"]["garbage_ckpt"], str(runs["garbage"]))
    assert "corrupt" in line.lower() or "not a torch" in line.lower(), line


def _zip_checkpoint() -> bytes:
    buffer = io.BytesIO()
    torch.save({"format": "kdmtl-checkpoint", "model": {"w": torch.ones(64, 64)}}, buffer)
    return buffer.getvalue()


CORRUPTIONS = {
    "empty": lambda: b"",
    "random_bytes": lambda: random.Random(1).randbytes(4096),
    "truncated_zip": lambda: _zip_checkpoint()[:2000],
    "zeroed_zip": lambda: b"\0" * len(_zip_checkpoint()),
    "html_page": lambda: b"<!DOCTYPE html><html><body>404 Not Found</body></html>\n",
    "plain_text": lambda: b"hello world\n",
    "csv_text": lambda: b"epoch,loss\n1,0.5\n",
}


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_load_tensor_file_reports_any_corruption(tmp_path, kind):
    """In-process (cheap): every kind of unreadable file becomes one KdmtlError naming the file,
    never a bare KeyError/IndexError from the unpickler."""
    from kdmtl_cli.engine.checkpoint import load_tensor_file
    from kdmtl_cli.errors import KdmtlError

    path = tmp_path / f"{kind}.pt"
    path.write_bytes(CORRUPTIONS[kind]())
    with pytest.raises(KdmtlError) as info:
        load_tensor_file(path, what="teacher checkpoint")
    assert str(path) in str(info.value)


def test_checkpoint_with_pickled_code_is_refused_unexecuted(runs):
    line = assert_one_line_error(runs["procs"]["evil_ckpt"], str(runs["evil"]))
    assert "refus" in line.lower() and "pickled" in line.lower()
    marker = runs["marker"]
    assert not marker.exists(), "the pickled payload ran while loading the checkpoint"
    # The payload is live: plain unpickling runs it (so the assertion above is not vacuous).
    torch.load(runs["evil"], weights_only=False)
    assert marker.exists()


def test_teacher_does_not_cover_student_task(runs):
    line = assert_one_line_error(runs["procs"]["task_mismatch"], "cover")
    assert "'cls'" in line or "'depth'" in line
    assert "teacher.tasks" in line


def test_teacher_class_count_mismatch(runs):
    line = assert_one_line_error(runs["procs"]["class_mismatch"], "cls", "classes")
    text = line.replace(str(runs["ten_classes"]), "")
    assert re.search(r"\b10\b", text) and re.search(r"\b4\b", text), line


def test_teacher_class_count_mismatch_in_metadata_only(runs):
    """The brief's recipe: model_meta says 10 classes, the stored cls head still has 4 outputs.
    The error must still say what does not match (the cls task / its 10 outputs), not only that
    'something' in the state dict does."""
    line = assert_one_line_error(runs["procs"]["class_mismatch_meta"], str(runs["meta_only"]))
    text = line.replace(str(runs["meta_only"]), "")
    assert "cls" in text and re.search(r"\b10\b", text), line


def test_missing_data_directory(runs):
    line = assert_one_line_error(runs["procs"]["no_data"], str(runs["empty_root"]),
                                 "data.generate=true")
    assert "no shapes data" in line.lower()


def test_existing_run_dir_is_refused(runs):
    assert_one_line_error(runs["procs"]["existing_dir"], str(runs["finished"]), "finished", "never overwritten")
    assert_unchanged(runs["existing_before"], snapshot(*runs["existing_watch"]))


def test_existing_run_dir_refusal_keeps_its_hydra_record(runs):
    """A refused run must not rewrite the finished run's .hydra/ (its record of how it was made)."""
    finished = runs["finished"]
    assert_unchanged(runs["hydra_before"], snapshot(*sorted((finished / ".hydra").glob("*.yaml"))))


def test_cuda_on_cpu_only_machine(runs):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is available here")
    assert_one_line_error(runs["procs"]["cuda"], "hardware.device=cuda", "cpu")


def test_unknown_precision(runs):
    line = assert_one_line_error(runs["procs"]["fp8"], "hardware.precision", "fp8")
    for choice in ("32", "bf16", "16-mixed"):
        assert choice in line


def test_kd_weight_mapping_missing_tasks(runs):
    line = assert_one_line_error(runs["procs"]["kd_weight_map"], "loss.kd.weight", "missing")
    assert "seg" in line and "depth" in line


def test_unknown_monitor_lists_valid_metrics(runs):
    line = assert_one_line_error(runs["procs"]["bad_monitor"], "checkpoint.monitor", "val/nope")
    for metric in ("val/loss/task", "val/cls/accuracy", "val/seg/miou"):
        assert metric in line


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(runs):
    line = assert_one_line_error(runs["procs"]["nan"], "epoch 2", "global step 4")
    assert re.search(r"\b(nan|inf)\b", line.lower()), line
    last = runs["nan_dir"] / "checkpoints" / "last.pt"
    assert last.is_file()
    assert str(last) in line
    state = torch.load(last, map_location="cpu", weights_only=True)
    assert state["epoch"] == 1
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())


def test_unknown_feature_module_fails_before_any_teacher_is_trained(workdir, tmp_path):
    cache = tmp_path / "fresh"
    proc = run_kdmtl(["train", "debug=fast", "loss=at", "loss.at.student=[trunk.stages.0,trunk.nope,trunk.stages.2]"], workdir, cache)
    line = assert_one_line_error(proc, "loss.at", "trunk.nope", "available", "trunk.stages.2")
    assert not (cache / "teachers").exists(), line  # no teacher was trained for a run that cannot start
    pair = run_kdmtl(["train", "debug=fast", "loss=fitnet", "loss.fitnet.student=[heads.cls]"], workdir, cache)
    assert_one_line_error(pair, "loss.fitnet", "heads.cls", "[N, C, H, W]")
    off = run_kdmtl(["train", "loss=none", "loss.at.weight=5", "--cfg", "job"], workdir, cache)
    assert_one_line_error(off, "loss.at.weight", "loss=at")
