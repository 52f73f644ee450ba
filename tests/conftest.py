"""Shared test helpers: run the real `kdmtl` CLI in its own process with an isolated cache."""

from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

import pytest

from cli_forkserver import ForkServer

REPO = Path(__file__).resolve().parents[1]

# Every torch in this test session -- pytest's own and each kdmtl process it starts (they inherit
# the environment) -- runs one intra-op thread unless the caller chose otherwise. The tests run
# several tiny-model processes at once (module fixtures, pytest-xdist workers) on a few cores:
# with torch's default of one thread per core each process spin-waits for the others' cores
# (about 2.5x the CPU time of a one-thread run on 2 cores). Set before anything imports torch.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# Small, fast settings shared by end-to-end runs: tiny splits, two batches per epoch; no TensorBoard
# events (its validation panels are most of a short run's logging time): tests of it add TB.
FAST = ["debug=fast", "log.progress=plain", "log.efficiency=false", "log.tensorboard=false"]
TB = "log.tensorboard=true"
WORKERS = 3  # concurrent CLI processes in module fixtures (2 cores; imports overlap with I/O)


def fault_env(faults: dict) -> dict:
    """Environment that makes kdmtl processes inject `faults` (tests/faults/sitecustomize.py)."""
    path = os.pathsep.join(p for p in (str(REPO / "tests" / "faults"), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, "KDMTL_FAULTS": json.dumps(faults)}


# `python -m kdmtl_cli` processes forked from a template that has imported torch & co. once
# (tests/cli_forkserver.py says what a forked child is, and when a fresh process is used instead).
FORK_SERVER = ForkServer()
atexit.register(FORK_SERVER.close)


def run_kdmtl(args: List[str], cwd: Path, cache: Path, env_extra: Optional[dict] = None,
              timeout: int = 300, faults: Optional[dict] = None, fresh: bool = False) -> subprocess.CompletedProcess:
    """`python -m kdmtl_cli ARGS` in `cwd` with KDMTL_CACHE=`cache`, in a process of its own: forked
    from a template that has imported torch & co. (tests/cli_forkserver.py), or a newly started
    interpreter where no template can stand for one (fault injection, an environment of its own).
    `fresh=True`: this run shares its interpreter (hash seed, memory layout) with no other
    `fresh=True` run of the same test -- for runs compared bit for bit, as separate processes."""
    base = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env = {**base, "KDMTL_CACHE": str(cache), **(env_extra or {})}
    if faults:
        env.update(fault_env(faults))
    test = os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" (", 1)[0]
    forked = FORK_SERVER.run(args, cwd, env, timeout, base=base, distinct=test if fresh else None)
    if forked is not None:
        return forked
    return subprocess.run([sys.executable, "-m", "kdmtl_cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def show(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n--- stdout:\n{proc.stdout[-3000:]}\n--- stderr:\n{proc.stderr[-6000:]}"


def assert_one_line_error(proc: subprocess.CompletedProcess, *words: str, rc=None) -> str:
    """Non-zero exit, no traceback, stderr is exactly one `kdmtl: error:` line containing `words`
    (case-insensitive). Returns that line."""
    assert proc.returncode != 0, show(proc)
    if rc is not None:
        assert proc.returncode == rc, show(proc)
    assert "Traceback" not in proc.stderr, show(proc)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, "expected exactly one line on stderr\n" + show(proc)
    line = lines[0]
    assert line.startswith("kdmtl: error:"), show(proc)
    for word in words:
        assert word.lower() in line.lower(), f"{word!r} not in the error line:\n{line}"
    return line


def read_jsonl(path: Path) -> list:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory) -> Path:
    """One cache per test session: generated data and trained teachers are reused across tests.
    Under pytest-xdist the workers share it too (in the session's base directory): kdmtl's cache
    is made for concurrent processes (file locks, atomic renames), as the module fixtures here
    already use it from several processes at once."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent           # popen-gwN/ -> the session's directory, one per xdist run
    cache = root / "kdmtl_cache"
    cache.mkdir(exist_ok=True)
    return cache


@pytest.fixture
def workdir(tmp_path) -> Path:
    d = tmp_path / "work"
    d.mkdir()
    return d


@pytest.fixture(scope="module")
def one_thread():
    """Tiny in-process models run far faster single-threaded (thread hand-offs dominate)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
