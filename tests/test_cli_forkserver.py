"""The test harness itself: a `kdmtl` run forked from a template (tests/cli_forkserver.py) ends as
the same command started as a fresh `python -m kdmtl_cli` does (exit status, stdout, stderr), and
one past its timeout is killed, as subprocess.run does."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import FORK_SERVER, run_kdmtl


@pytest.mark.parametrize("args", [["--version"], ["frobnicate"], ["train", "seed=abc"], ["train", "student=huge"],
                                  ["eval", "run_dir=nowhere"]])
def test_a_forked_run_ends_as_a_fresh_one(args, workdir, shared_cache):
    base = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    forked = FORK_SERVER.run(args, workdir, {**base, "KDMTL_CACHE": str(shared_cache)}, 60, base=base)
    if forked is None:
        pytest.skip(f"runs are not forked here: {FORK_SERVER.reason or 'the environment differs'}")
    fresh = subprocess.run([sys.executable, "-m", "kdmtl_cli", *args], cwd=workdir, capture_output=True, text=True,
                           env={**base, "KDMTL_CACHE": str(shared_cache)}, timeout=60)
    assert (forked.returncode, forked.stdout, forked.stderr) == (fresh.returncode, fresh.stdout, fresh.stderr)
    assert forked.args == fresh.args


def test_a_run_past_its_timeout_is_killed(workdir, shared_cache):
    with pytest.raises(subprocess.TimeoutExpired):
        run_kdmtl(["train", "debug=fast", "loss=none", "optim.epochs=1000", f"hydra.run.dir={workdir / 'long'}"],
                  workdir, shared_cache, timeout=2)
