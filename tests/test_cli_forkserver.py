"""The test harness itself: a `kdmtl` run forked from a template (tests/cli_forkserver.py) ends as
the same command started as a fresh `python -m kdmtl_cli` does (exit status, stdout, stderr), and
one past its timeout is killed, as subprocess.run does."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from cli_forkserver import ForkServer
from conftest import run_kdmtl


@pytest.fixture(scope="module")
def fork_server():
    """A fork server of this test file's own, started for the environment the tests run in (the
    session's shared one serves the environment it started with; that of a pytest process can
    drift, as imports set variables)."""
    server = ForkServer()
    if server.disabled:
        pytest.skip(f"runs are not forked here: {server.reason}")
    yield server
    server.close()


@pytest.mark.parametrize("args", [["--version"], ["frobnicate"], ["train", "seed=abc"], ["train", "student=huge"],
                                  ["eval", "run_dir=nowhere"]])
def test_a_forked_run_ends_as_a_fresh_one(args, workdir, shared_cache, fork_server):
    base = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    forked = fork_server.run(args, workdir, {**base, "KDMTL_CACHE": str(shared_cache)}, 60, base=base)
    assert forked is not None, f"the template did not fork the run: {fork_server.reason}"
    fresh = subprocess.run([sys.executable, "-m", "kdmtl_cli", *args], cwd=workdir, capture_output=True, text=True,
                           env={**base, "KDMTL_CACHE": str(shared_cache)}, timeout=60)
    assert (forked.returncode, forked.stdout, forked.stderr) == (fresh.returncode, fresh.stdout, fresh.stderr)
    assert forked.args == fresh.args


def test_a_run_past_its_timeout_is_killed(workdir, shared_cache):
    with pytest.raises(subprocess.TimeoutExpired):
        run_kdmtl(["train", "debug=fast", "loss=none", "optim.epochs=1000", f"hydra.run.dir={workdir / 'long'}"],
                  workdir, shared_cache, timeout=2)
