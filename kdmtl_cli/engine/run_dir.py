"""One owner per run directory.

A run holds an exclusive `flock` on `<run dir>/.kdmtl-owner.lock` for its whole life. The kernel
drops the lock when the process ends, however it ends (kill -9 included), so a dead run never
keeps its directory; a live one always does. The lock is taken before anything in the directory is
written — for a `hydra.run.dir` given on the command line, before Hydra writes `.hydra/` — and a
second writer is refused with one line naming the live process. `resume=true` skips directories
whose owner is alive (`is_alive`).

The lock file holds a line describing the owner (pid, host, start time), for that message. It is
not deleted while the directory is in use (see engine/locks.py for why); only a directory this
process made and then left empty, because the command was refused, is removed at exit. Several jobs of one process (a sweep) each take and
release their own directory; taking a directory this process already holds is a no-op.
"""

from __future__ import annotations

import atexit
import fcntl
import json
import os
import socket
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Dict, IO, List, Optional

from kdmtl_cli.errors import KdmtlError

LOCK_NAME = ".kdmtl-owner.lock"
# Set by `hardware.nproc=N` (engine/distributed.launch) for its ranks: the launching process owns
# the directory for all of them.
PARENT_OWNS = "KDMTL_PARENT_OWNS_RUN_DIR"
_held: Dict[Path, IO] = {}
_created: List[Path] = []      # directories this process made to own them


# `resume=true` probes a lock for a moment (is_alive); a run starting at that instant retries
# for this long rather than mistaking the probe for a live owner.
_RETRY_S = 0.5


def _key(run_dir: Path) -> Path:
    return Path(os.path.abspath(Path(run_dir).expanduser()))


def owner_of(run_dir: Path) -> str:
    """Who holds (or last held) the directory, as written in its lock file."""
    try:
        info = json.loads((_key(run_dir) / LOCK_NAME).read_text() or "{}")
    except (OSError, ValueError):
        return "another process"
    if not info:
        return "another process"
    return f"pid {info.get('pid')} on {info.get('host')}, started {info.get('started')}"


def refuse_if_alive(run_dir: Path, fix: str) -> None:
    """Raise the one-line refusal naming the live process that owns `run_dir`, if there is one."""
    if is_alive(run_dir) and not holds(run_dir):
        raise KdmtlError(f"{_key(run_dir)} is in use by a live kdmtl run ({owner_of(run_dir)}); {fix}")


def own(run_dir: Path) -> None:
    """Take the directory for this process, or raise KdmtlError naming its live owner."""
    key = _key(run_dir)
    if key in _held:
        return
    try:
        if not key.exists():
            _created.append(key)
        key.mkdir(parents=True, exist_ok=True)
        handle = open(key / LOCK_NAME, "a+")
    except OSError as err:
        raise KdmtlError(f"cannot write to the run directory {key} ({err.strerror}); choose a writable "
                         "one with hydra.run.dir=PATH") from None
    deadline = time.monotonic() + _RETRY_S
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() > deadline:
                handle.close()
                raise KdmtlError(f"{key} is in use by a live kdmtl run ({owner_of(key)}); wait for it to "
                                 "end, or choose another hydra.run.dir") from None
            time.sleep(0.05)
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "started": datetime.now().isoformat(timespec="seconds"),
                             "command": " ".join(sys.argv)}) + "\n")
    handle.flush()
    _held[key] = handle


def owner_here() -> bool:
    """Whether this process is the one that owns its run directory: rank 0 of a data-parallel
    run started by torchrun, or any single process; not the ranks of `hardware.nproc=N`."""
    return os.environ.get("RANK", "0") == "0" and not os.environ.get(PARENT_OWNS)


def release(run_dir: Path) -> None:
    handle = _held.pop(_key(run_dir), None)
    if handle is not None:
        handle.close()          # closing the file drops the flock


def holds(run_dir: Path) -> bool:
    return _key(run_dir) in _held


def is_alive(run_dir: Path) -> bool:
    """Whether another process owns the directory right now (never creates the lock file)."""
    key = _key(run_dir)
    if key in _held:
        return True
    try:
        fd = os.open(key / LOCK_NAME, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)               # also drops the probe's shared lock


def state(run_dir: Path) -> Optional[str]:
    """What a directory holds: None (no run), 'started' (no checkpoint yet), 'interrupted'
    (checkpoints/last.pt, no results.json) or 'finished' (results.json)."""
    run_dir = Path(run_dir).expanduser()
    if (run_dir / "results.json").exists():
        return "finished"
    if (run_dir / "checkpoints" / "last.pt").exists():
        return "interrupted"
    if (run_dir / "config.yaml").exists():
        return "started"
    return None


@atexit.register
def _discard_unused() -> None:
    """A directory made here but refused before anything was written into it (a bad setting
    found after the directory was owned) is removed again, lock file and all."""
    for key in _created:
        try:
            if holds(key) and os.listdir(key) == [LOCK_NAME]:
                (key / LOCK_NAME).unlink()
                release(key)
                key.rmdir()
        except OSError:
            pass
