"""User-facing errors: one clear line, a non-zero exit code, no traceback.

Code raises ``KdmtlError`` for anything the user can fix (bad config, missing
file, diverged loss...). The CLI turns it, and the errors Hydra and OmegaConf
raise while composing the config, into a single line on stderr; the full
traceback is shown only with ``HYDRA_FULL_ERROR=1``.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import sys
from typing import List


class KdmtlError(Exception):
    """An error the user can fix; its message says what is wrong and how to fix it."""

    exit_code = 1


class Preempted(KdmtlError):
    """The run was asked to stop (SIGTERM / SIGUSR1), wrote a checkpoint and exits with
    EX_TEMPFAIL (75): a launcher may requeue it, and the same command resumes it."""

    exit_code = 75


class NothingToResume(KdmtlError):
    """`resume=` names a run that has finished: nothing to do, and nothing is touched (exit 0, so a
    requeued job whose run finished just before it was killed ends cleanly)."""

    exit_code = 0


def one_line(message: str) -> str:
    """Fold a multi-line message (Hydra lists choices on tab-indented lines) into one line."""
    lines = [line.strip() for line in str(message).splitlines()]
    lines = [line for line in lines if line and not line.startswith("full_key:")
             and not line.startswith("object_type=") and not line.startswith("reference_type=")]
    text = ""
    for line in lines:
        if not text:
            text = line
        elif text.endswith(":"):
            text += " " + line
        elif re.match(r"^[\w./\-=]+$", line) and re.search(r"(options in|choices)[^:]*:\s*[\w./\-, =]*$", text):
            text += ", " + line  # continuation of a list of choices
        else:
            text += "; " + line
    return text.replace(":,", ":")


class JobErrors:
    """Errors raised inside Hydra jobs, kept so Hydra does not print its own
    'Error executing job' banner; the CLI re-raises the first after Hydra returns."""

    errors: List[BaseException] = []
    cli_pid = None   # set by cli._run: the process that re-raises `errors` (a launcher's worker has another)

    @classmethod
    def guard(cls, job):
        @functools.wraps(job)
        def wrapped(cfg):
            stopped = [e for e in cls.errors if isinstance(e, Preempted)]
            if stopped:     # a sweep stopped by a signal starts no further job; the same command continues it
                print(f"kdmtl: job not started: the sweep was stopped ({stopped[0]})", file=sys.stderr, flush=True)
                return None
            try:
                return job(cfg)
            except Exception as err:  # noqa: BLE001 - re-raised by _run
                _log_job_error(err)
                if os.getpid() != cls.cli_pid:
                    raise      # a launcher's worker process (joblib): its caller re-raises it in the CLI
                cls.errors.append(err)
                return None

        return wrapped


def job_error_line(err: BaseException) -> str:
    """The one line a failed job records: a KdmtlError's message, else `TypeName: message`."""
    text = one_line(str(err))
    return text if isinstance(err, KdmtlError) else f"{type(err).__name__}: {text}"


def _log_job_error(err: BaseException) -> None:
    """`error: <one line>` in the failed job's own log (<job dir>/train.log, not on the terminal:
    the CLI prints its error once), where the sweep's summary (report/sweep.py) finds it. Not for
    a job stopped by a signal (it resumes) or one with nothing to do, and not when another live
    process owns the job's directory (the job was refused because of it)."""
    if getattr(err, "exit_code", 1) in (0, Preempted.exit_code):
        return
    try:
        from hydra.core.hydra_config import HydraConfig

        from kdmtl_cli.engine import run_dir

        job_dir = HydraConfig.get().runtime.output_dir
        if run_dir.is_alive(job_dir) and not run_dir.holds(job_dir):
            return
    except (ImportError, ValueError):    # not run by Hydra: no job directory
        return
    from kdmtl_cli.engine.logging import to_log_file

    to_log_file(f"error: {job_error_line(err)}", logging.ERROR)
