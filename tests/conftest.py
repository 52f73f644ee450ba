"""Shared test helpers: run the real `kdmtl` CLI in a subprocess with an isolated cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

import pytest

REPO = Path(__file__).resolve().parents[1]

# Small, fast settings shared by end-to-end runs: tiny splits, two batches per epoch.
FAST = ["debug=fast", "log.progress=plain", "log.efficiency=false"]
WORKERS = 3  # concurrent CLI processes in module fixtures (2 cores; imports overlap with I/O)


def fault_env(faults: dict) -> dict:
    """Environment that makes kdmtl processes inject `faults` (tests/faults/sitecustomize.py)."""
    path = os.pathsep.join(p for p in (str(REPO / "tests" / "faults"), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, "KDMTL_FAULTS": json.dumps(faults)}


def run_kdmtl(args: List[str], cwd: Path, cache: Path, env_extra: Optional[dict] = None,
              timeout: int = 300, faults: Optional[dict] = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env["KDMTL_CACHE"] = str(cache)
    env.update(env_extra or {})
    if faults:
        env.update(fault_env(faults))
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
    """One cache per test session: generated data and trained teachers are reused across tests."""
    return tmp_path_factory.mktemp("kdmtl_cache")


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
