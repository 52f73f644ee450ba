"""User-facing errors: one clear line, a non-zero exit code, no traceback.

Code raises ``KdmtlError`` for anything the user can fix (bad config, missing
file, diverged loss...). The CLI turns it, and the errors Hydra and OmegaConf
raise while composing the config, into a single line on stderr; the full
traceback is shown only with ``HYDRA_FULL_ERROR=1``.
"""

from __future__ import annotations

import functools
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
                if os.getpid() != cls.cli_pid:
                    raise      # a launcher's worker process (joblib): its caller re-raises it in the CLI
                cls.errors.append(err)
                return None

        return wrapped
