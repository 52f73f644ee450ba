"""Inter-process locks for shared files (trained teachers, teacher-output caches, baseline
files), so sweep jobs that need the same thing build it once and the others wait.

`flock` locks belong to the open file and the kernel drops them when the holder dies (also by
kill -9), so a crashed job never leaves a lock behind. The lock file itself is never removed:
removing it would let a new job lock a fresh file while another still holds the old one.
"""

from __future__ import annotations

import fcntl
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Optional


@contextmanager
def file_lock(lock_path: Path, on_wait: Optional[Callable[[], None]] = None):
    """Hold an exclusive lock on `lock_path` (created if missing); `on_wait` is called once when
    another process holds it, before blocking."""
    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def try_lock(lock_path: Path):
    """An exclusive lock on `lock_path` if free now: the open handle (closing it, or the
    process ending, releases the lock), or None while another process holds it."""
    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(lock_path, "a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return handle
