"""Sweeps through Hydra's submitit launcher, locally (`hydra/launcher=submitit_local`; the
`slurm` launcher config is the same plugin on a cluster): jobs run in their own processes, and a
job stopped by a signal resumes in place when its launcher starts it again (requeue)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import fault_env, read_jsonl, show

pytest.importorskip("hydra_plugins.hydra_submitit_launcher")


def _sweep(tmp_path, sweep, extra_env=None, extra=()):
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env["KDMTL_CACHE"] = str(tmp_path / "cache")
    env.update(extra_env or {})
    args = [sys.executable, "-m", "kdmtl_cli", "train", "-m", "hydra/launcher=submitit_local", "debug=fast",
            "loss=none", "optim.epochs=2", "data.batch_size=16", "limit_train_batches=4", "log.progress=plain",
            *extra, f"hydra.sweep.dir={sweep}"]
    return subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


def test_slurm_launcher_config_composes(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "kdmtl_cli", "train", "hydra/launcher=slurm",
                           "hydra.launcher.partition=gpu", "--cfg", "hydra", "-p", "hydra.launcher"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, show(proc)
    assert "SlurmLauncher" in proc.stdout and "partition: gpu" in proc.stdout and "signal_delay_s: 120" in proc.stdout


@pytest.mark.slow  # ~30 s; run with -m slow
def test_submitit_sweep_and_a_stopped_job_resumes_when_started_again(tmp_path):
    straight = _sweep(tmp_path, tmp_path / "straight", extra=["student.width=8,12"])
    assert straight.returncode == 0, show(straight)
    for job in ("0", "1"):
        assert json.loads((tmp_path / "straight" / job / "results.json").read_text())["overrides"]
    sweep = tmp_path / "stopped"
    # SIGUSR1 (SLURM's warning before the time limit) right after step 3 of each job
    first = _sweep(tmp_path, sweep, fault_env({"signal_at_step": 3, "signal": "USR1"}),
                   extra=["student.width=8,12"])
    for job in ("0", "1"):
        assert (sweep / job / "PREEMPTED").exists() and not (sweep / job / "results.json").exists(), show(first)
    again = _sweep(tmp_path, sweep, extra=["student.width=8,12"])          # the requeue: same job, same dir
    assert again.returncode == 0, show(again)
    for job in ("0", "1"):
        a = read_jsonl(tmp_path / "straight" / job / "metrics.jsonl")[-1]
        b = read_jsonl(sweep / job / "metrics.jsonl")[-1]
        keys = [k for k in a if k.startswith(("test/", "val/"))]
        assert keys and all(a[k] == b[k] for k in keys)
        assert not (sweep / job / "PREEMPTED").exists()
