"""Stopping on a signal without losing work, in every phase of a run.

SLURM (and most schedulers) send SIGTERM, or SIGUSR1 with `--signal=USR1@T`, some time before
they kill a job. From the start of `run_training` to its end these signals only *request* a stop;
the work in progress reaches its next safe point and stops there:

- a training loop (teacher or student, engine/trainer.py): after the current step, writing its
  `last.pt` with the position inside the epoch (a teacher's goes to its cache staging area);
- the teacher-output cache build: after the current batch, discarding the partial entry;
- anything else (data, loading, the final test): at the next phase boundary (`check`).

Then `Preempted` is raised (exit 75, EX_TEMPFAIL), the run directory gets the PREEMPTED marker,
and the same command started again continues where the run stopped.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Callable, Optional

from kdmtl_cli.errors import Preempted

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_requested: Optional[int] = None


def requested() -> Optional[int]:
    """The stop signal received since `stop_on_signals` was entered, or None."""
    return _requested


def signal_name() -> str:
    return signal.Signals(_requested).name if _requested is not None else "stop signal"


def check(where: str) -> None:
    """A safe point with nothing (more) to save: stop here if a signal arrived."""
    if _requested is not None:
        stop(where)


def stop(where: str) -> None:
    """Stop now (a signal arrived here, or at another data-parallel rank)."""
    raise Preempted(f"{signal_name()} received {where}; nothing was lost: run the same command again to continue")


def _request(signum: int, _frame) -> None:
    global _requested
    _requested = signum


@contextmanager
def stop_on_signals(on_stop: Callable[[str, str], None]):
    """Within the block, SIGTERM / SIGUSR1 request a stop. When `Preempted` leaves the block,
    `on_stop(signal name, message)` records it, and a launcher's own handler (submitit requeues
    the job from it) receives the signal, now that the work is saved."""
    global _requested
    if threading.current_thread() is not threading.main_thread():   # signals only reach the main thread
        yield
        return
    _requested = None
    previous = {sig: signal.signal(sig, _request) for sig in STOP_SIGNALS}
    try:
        yield
    except Preempted as stop:
        on_stop(signal_name(), str(stop))
        handler = previous.get(_requested)
        for sig, old in previous.items():     # the launcher's handlers back before calling one
            signal.signal(sig, old)
        if callable(handler):
            handler(_requested, None)
        raise
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        _requested = None
