"""Preemption: SIGTERM (or SIGUSR1) makes a run checkpoint after the current step and exit with
75 (EX_TEMPFAIL, for a launcher to requeue); the same command started again resumes it from the
middle of the epoch and finishes bit-identical to an uninterrupted run."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import FAST, read_jsonl, run_kdmtl, show


def test_sigterm_mid_epoch_then_the_same_command_resumes_exactly(workdir, shared_cache):
    common = ["train", *FAST, "optim.epochs=2", "data.batch_size=16", "limit_train_batches=4", "log.every_n_steps=1"]
    straight, stopped = workdir / "straight", workdir / "stopped"
    # fresh=True (conftest.run_kdmtl): runs compared bit for bit, each in an interpreter of its own
    done = run_kdmtl([*common, f"hydra.run.dir={straight}"], workdir, shared_cache, fresh=True)
    assert done.returncode == 0, show(done)

    command = [*common, f"hydra.run.dir={stopped}"]
    # a real SIGTERM, delivered by the run to itself right after global step 3 (epoch 1 has 4 steps)
    first = run_kdmtl(command, workdir, shared_cache, faults={"signal_at_step": 3})
    assert first.returncode == 75, show(first)
    lines = first.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kdmtl: stopped:") and "SIGTERM" in lines[0], first.stderr
    checkpoint = torch.load(stopped / "checkpoints" / "last.pt", weights_only=True)
    assert checkpoint["epoch"] == 0 and checkpoint["global_step"] == 3
    assert checkpoint["position"]["epoch"] == 1 and checkpoint["position"]["batches_done"] == 3
    assert json.loads((stopped / "PREEMPTED").read_text())["signal"] == "SIGTERM"
    assert not (stopped / "results.json").exists()

    second = run_kdmtl(command, workdir, shared_cache, fresh=True)          # the requeued, identical command
    assert second.returncode == 0, show(second)
    assert "resuming" in second.stdout and "after epoch 0 + 3 steps" in second.stdout
    assert not (stopped / "PREEMPTED").exists()

    a, b = read_jsonl(straight / "metrics.jsonl"), read_jsonl(stopped / "metrics.jsonl")
    assert [r["type"] for r in b if r["type"] != "step"] == ["epoch", "epoch", "final"]
    assert [r["step"] for r in b if r["type"] == "step"] == [r["step"] for r in a if r["type"] == "step"]
    epochs_a = [r for r in a if r["type"] == "epoch"]
    epochs_b = [r for r in b if r["type"] == "epoch"]
    for ra, rb in zip(epochs_a, epochs_b):           # the interrupted epoch's training means included
        for key in ra:
            if key.startswith(("train/loss", "train/task", "val/")):
                assert ra[key] == rb[key], key
    keys = [k for k in a[-1] if k.startswith(("test/", "val/"))]
    assert keys and all(a[-1][k] == b[-1][k] for k in keys)    # bit-identical, not approximately equal
    wa = torch.load(straight / "checkpoints" / "last.pt", weights_only=True)["model"]
    wb = torch.load(stopped / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def _final(run_dir):
    return next(r for r in read_jsonl(run_dir / "metrics.jsonl") if r["type"] == "final")


def test_sigusr1_also_checkpoints_and_stops(workdir, shared_cache):
    run_dir = workdir / "usr1"
    proc = run_kdmtl(["train", *FAST, "loss=none", "optim.epochs=2", "data.batch_size=16", "limit_train_batches=4",
                      f"hydra.run.dir={run_dir}"], workdir, shared_cache,
                     faults={"signal_at_step": 2, "signal": "USR1"})
    assert proc.returncode == 75 and "SIGUSR1" in proc.stderr, show(proc)
    assert torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["position"]["batches_done"] == 2


@pytest.mark.slow  # ~30 s; run with -m slow
def test_kill_9_mid_epoch_and_inside_a_checkpoint_write_then_resume_exactly(workdir, shared_cache):
    """kill -9 loses at most the current epoch: the previous checkpoint stays loadable (a write
    killed halfway leaves only a temporary file) and `resume=` finishes bit-identical."""
    common = ["train", *FAST, "loss=none", "optim.epochs=3", "data.batch_size=16", "limit_train_batches=4"]
    straight = workdir / "straight9"
    assert run_kdmtl([*common, f"hydra.run.dir={straight}"], workdir, shared_cache).returncode == 0
    # writes: epoch 1 last (1) + best (2); epoch 2 last (3)...; step 6 is mid epoch 2
    cases = {"mid_epoch": {"signal_at_step": 6, "signal": "KILL"}, "in_write": {"kill_in_checkpoint_write": 3}}
    for name, env in cases.items():
        run_dir = workdir / name
        killed = run_kdmtl([*common, f"hydra.run.dir={run_dir}"], workdir, shared_cache, faults=env)
        assert killed.returncode == -9, show(killed)
        checkpoint = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)   # still loadable
        assert checkpoint["epoch"] == 1 and "position" not in checkpoint, name
        if name == "in_write":
            assert list((run_dir / "checkpoints").glob(".last.pt.*.tmp"))     # the half-written file
        resumed = run_kdmtl(["train", f"resume={run_dir}", "log.progress=plain"], workdir, shared_cache)
        assert resumed.returncode == 0, show(resumed)
        a, b = _final(straight), _final(run_dir)
        keys = [k for k in a if k.startswith(("test/", "val/"))]
        assert keys and all(a[k] == b[k] for k in keys), name
