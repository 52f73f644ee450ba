"""Sweeps that share a teacher train it once: jobs needing the same teacher key take a file
lock; the first trains, the others wait and load it. A job killed while training leaves no lock
(flock dies with its holder) and no half-written teacher behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import FAST, run_kdmtl, show
from kdmtl_cli.engine.locks import file_lock


def _env(cache):
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env["KDMTL_CACHE"] = str(cache)
    return env


def test_file_lock_waits_for_the_holder_and_says_so(tmp_path):
    lock = tmp_path / ".x.lock"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys, time\n"
        f"h = open({str(lock)!r}, 'a'); fcntl.flock(h, fcntl.LOCK_EX); print('held', flush=True); time.sleep(1.5)")],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    waited, start = [], time.monotonic()
    with file_lock(lock, on_wait=lambda: waited.append(True)):
        elapsed = time.monotonic() - start
    holder.wait()
    assert waited == [True] and elapsed > 0.5     # it blocked until the holder let go
    with file_lock(lock, on_wait=lambda: waited.append(False)):
        pass
    assert waited == [True]                        # free lock: no wait


def test_two_job_joblib_sweep_trains_the_teacher_once(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    cache, sweep = tmp_path / "cache", tmp_path / "sweep"
    proc = run_kdmtl(["train", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", *FAST, "student.width=8,12",
                      "log.progress=plain", f"hydra.sweep.dir={sweep}"], tmp_path, cache, timeout=600)
    assert proc.returncode == 0, show(proc)
    out = proc.stdout + proc.stderr
    assert out.count("training it") == 1, out
    assert out.count("reusing cached teacher") == 1, out
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert len(jobs) == 2 and all((j / "results.json").is_file() for j in jobs)
    assert sum((j / "teacher").is_dir() for j in jobs) == 1      # only one job trained a teacher
    assert len(list((cache / "teachers").glob("*/teacher.safetensors"))) == 1
    # each job records its own overrides and best / last / final metrics for the aggregation
    import json
    saved = [json.loads((j / "results.json").read_text()) for j in jobs]
    assert sorted(o for s in saved for o in s["overrides"] if o.startswith("student.width")) == \
        ["student.width=12", "student.width=8"]
    for s in saved:
        assert s["best"]["epoch"] == 1 and s["last"]["epoch"] == 1 and "val/loss/task" in s["last"]
        assert s["best"]["val/loss/task"] == s["results"]["val/loss/task"] and "test/cls/accuracy" in s["results"]


@pytest.mark.slow  # ~13 s; the default suite stops a teacher mid-training in tests/test_run_ownership.py; run with -m slow
def test_a_job_killed_while_training_leaves_no_lock_and_no_half_teacher(tmp_path):
    cache = tmp_path / "cache"
    args = [sys.executable, "-m", "kdmtl_cli", "train", *FAST, "teacher.optim.epochs=8", "log.progress=plain"]
    victim = subprocess.Popen([*args, f"hydra.run.dir={tmp_path / 'a'}"], cwd=tmp_path, env=_env(cache),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in victim.stdout:
        if "training it" in line:
            break
    time.sleep(1.0)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert list((cache / "locks").glob("teacher-*.lock"))              # the lock file stays, unlocked
    assert not list((cache / "teachers").glob("*/teacher.safetensors"))
    staged = list((cache / "teachers").glob("*/training/checkpoints/last.pt"))   # an epoch may have ended
    # the next job (same teacher key) is not blocked: it continues the teacher from its last
    # checkpoint in the cache's staging area, or trains it from the start when it had none
    proc = subprocess.run([*args, f"hydra.run.dir={tmp_path / 'b'}"], cwd=tmp_path, env=_env(cache),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, show(proc)
    assert "another job is training" not in proc.stdout, show(proc)
    assert ("teacher: resuming from" in proc.stdout) == bool(staged), show(proc)
    assert ("training it" in proc.stdout) == (not staged), show(proc)
    assert not list((cache / "teachers").glob("*/training"))
    assert len(list((cache / "teachers").glob("*/teacher.safetensors"))) == 1
