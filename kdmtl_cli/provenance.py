"""Where a run's numbers come from: the code (kdmtl's version and git commit, with the uncommitted
diff when the checkout is dirty), the environment (Python, torch, torchvision, CUDA, cuDNN,
devices), the data (its fingerprint), the teacher (cache key and source), the resolved config (a
hash), the command line, the host and the start time.

`collect` is called when the run starts; run.py stores the record in results.json, summary.md and
TensorBoard's text tab, and `kdmtl report` keeps runs of other code or other data apart
(`differs`). The dirty diff goes to `<run dir>/code.patch`, so the exact code can be rebuilt:
`git checkout <commit> && git apply code.patch`.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shlex
import socket
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

COMMAND_ENV = "KDMTL_COMMAND"   # the command as typed, set by the CLI; inherited by sweep workers and ranks
PATCH = "code.patch"


def remember_command(argv) -> None:
    """The command line as the user typed it (the CLI rewrites sys.argv for Hydra)."""
    os.environ.setdefault(COMMAND_ENV, shlex.join(["kdmtl", *argv]))


def config_hash(config: dict) -> str:
    """sha256 of the resolved config as canonical JSON (sorted keys)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def _git(source: Path, *args: str) -> Optional[str]:
    try:
        done = subprocess.run(["git", "-C", str(source), *args], capture_output=True, text=True, timeout=20,
                              check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def code_state(source: Optional[Path] = None) -> dict:
    """kdmtl's git commit, whether its checkout has uncommitted changes, and the diff; commit None
    when kdmtl was installed from a wheel (no checkout)."""
    source = Path(source) if source else Path(__file__).resolve().parent.parent
    top = _git(source, "rev-parse", "--show-toplevel")
    if top is None or not (Path(top.strip()) / "kdmtl_cli").is_dir():
        return {"commit": None, "dirty": None, "diff": ""}
    commit = (_git(source, "rev-parse", "HEAD") or "").strip() or None
    status = _git(source, "status", "--porcelain", "--untracked-files=no") or ""
    diff = (_git(source, "diff", "HEAD", "--binary") or "") if status.strip() else ""
    return {"commit": commit, "dirty": bool(status.strip()), "diff": diff}


def _devices(device) -> list:
    import torch

    if getattr(device, "type", str(device)) == "cuda" and torch.cuda.is_available():
        return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return [f"{name} ({os.cpu_count()} cores)"]


def collect(config: dict, device, data_fingerprint: str) -> tuple:
    """(the run's provenance record, the uncommitted diff), at its start; the teacher's part is
    added once the teacher is known (`with_teacher`)."""
    import torch
    import torchvision

    from kdmtl_cli import __version__

    code = code_state()
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {
        "kdmtl": __version__,
        "code": {"commit": code["commit"], "dirty": code["dirty"],
                 "patch_sha256": hashlib.sha256(code["diff"].encode()).hexdigest() if code["diff"] else None},
        "python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
        "cuda": torch.version.cuda, "cudnn": cudnn, "devices": _devices(device),
        "data_fingerprint": data_fingerprint,
        "config_sha256": config_hash(config),
        "command": os.environ.get(COMMAND_ENV) or shlex.join(sys.argv),
        "host": socket.gethostname(),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }, code["diff"]


def with_teacher(record: dict, info: dict) -> dict:
    """The teacher's cache key (per task for per-task teachers) and where it came from."""
    def key_of(one: dict):
        return Path(one["source"]).parent.name if "cached" in one else None   # a loaded checkpoint has none

    if "per_task" in info:
        record["teacher_key"] = {task: key_of(one) for task, one in info["per_task"].items()}
    elif info:
        record["teacher_key"] = key_of(info)
    record["teacher_source"] = info.get("source")
    return record


def write_patch(run_dir: Path, diff: str) -> None:
    """The uncommitted diff of a dirty checkout, beside the run (nothing when clean)."""
    if diff:
        from kdmtl_cli.engine.checkpoint import atomic_write_text

        atomic_write_text(diff, Path(run_dir) / PATCH)


def markdown(record: dict) -> str:
    """The record as a Markdown list (summary.md, TensorBoard's text tab)."""
    code = record.get("code") or {}
    commit = code.get("commit") or "unknown (not a git checkout)"
    dirty = " + uncommitted changes (code.patch)" if code.get("dirty") else ""
    lines = [f"- kdmtl {record.get('kdmtl')}, commit {commit}{dirty}",
             f"- Python {record.get('python')}, torch {record.get('torch')}, torchvision {record.get('torchvision')}, "
             f"CUDA {record.get('cuda') or 'none'}, cuDNN {record.get('cudnn') or 'none'}",
             f"- devices: {', '.join(record.get('devices') or [])}",
             f"- data fingerprint: {record.get('data_fingerprint')}",
             f"- teacher: {record.get('teacher_key') or 'none'} ({record.get('teacher_source') or 'none'})",
             f"- config sha256: {record.get('config_sha256')}",
             f"- command: `{record.get('command')}`",
             f"- host: {record.get('host')}, started {record.get('started')}"]
    return "\n".join(lines) + "\n"


def identity(record: Optional[dict]) -> tuple:
    """What must agree for two runs to be compared: the code (commit, dirty diff) and the data."""
    record = record or {}
    code = record.get("code") or {}
    return ((code.get("commit"), code.get("patch_sha256")), record.get("data_fingerprint"))


def differs(a: Optional[dict], b: Optional[dict]) -> list:
    """Which of code / data differ between two records ([] when they agree or one is missing)."""
    if not a or not b:
        return []
    ia, ib = identity(a), identity(b)
    return [what for what, x, y in zip(("code", "data"), ia, ib, strict=True) if x != y]
