"""Start `python -m kdmtl_cli` processes without paying for their imports each time.

Most of a short kdmtl run (debug=fast) is importing torch, torchvision, torchmetrics, tensorboard
and Hydra and tearing them down at exit: about 5 of its 6 CPU seconds. A *template* process
(one per pytest process and environment) imports those third-party libraries once -- never
kdmtl_cli itself: each run imports its own, current copy -- and forks a child for each CLI run.
The child is a real, separate process with its own pid, exit status, signals, file locks, cwd,
environment and stdout/stderr. Before running it turns into what `python -m kdmtl_cli ARGS` is at
start-up: fds 0/1/2 (stdin from /dev/null, stdout and stderr into files the caller reads back),
the caller's cwd and environment, sys.path[0] = the cwd, sys.argv = [kdmtl_cli/__main__.py,
*ARGS], a fresh `__main__` module, then runpy's `-m` entry point. It ends as the interpreter
does (SystemExit's code, or the traceback and exit 1; non-daemon threads joined, atexit
functions run, stdout/stderr flushed), skipping only the teardown of the template's modules.

What a forked child cannot reproduce, where tests/conftest.py's `run_kdmtl` therefore starts a
fresh interpreter instead: what the interpreter reads at start-up -- PYTHONPATH (the fault
injection in tests/faults/ is a sitecustomize hook), interpreter flags, and any environment other
than the template's (it imported torch under that environment; only PER_RUN_ENV may differ).

Children of one template share its string-hash seed and memory layout. Runs a test compares bit
for bit (`run_kdmtl(..., fresh=True)`) are each forked from a different template (ForkServer's
`distinct`), so that, as separately started processes, they share neither.

KDMTL_TEST_FORKSERVER=0 in the environment turns templates off: every run starts fresh.

Run as a script, this file is the template: `python cli_forkserver.py SOCKET`.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Dict, List, Optional

# Third-party libraries a kdmtl run imports (a missing optional one is skipped). Not kdmtl_cli:
# its import-time state (e.g. the per-process run id) must be the child's own.
PRELOAD = ["numpy", "yaml", "omegaconf", "hydra", "hydra.main", "hydra._internal.utils",
           "hydra._internal.config_loader_impl", "hydra.core.global_hydra", "rich", "rich.console",
           "rich.table", "torch", "torch._dynamo", "torch.utils.tensorboard", "torchvision", "torchmetrics",
           "torchmetrics.classification", "safetensors.torch", "PIL.Image"]
# Environment variables that may differ between the template and a run forked from it: none of
# them is read while the PRELOAD libraries are imported.
PER_RUN_ENV = {"KDMTL_CACHE", "HYDRA_FULL_ERROR", "PYTEST_CURRENT_TEST"}


# ---- the template process ------------------------------------------------------------------------

def _template(path: str) -> dict:
    """Import PRELOAD, then serve fork requests on the Unix socket `path` until stdin closes (the
    pytest process went away, or said so). Returns only in a forked child: its request."""
    for name in PRELOAD:
        try:
            __import__(name)
        except ImportError:
            pass
    import gc

    gc.freeze()          # the imported objects: never scanned by a child's collections (no copy-on-write)
    threads = len(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else threading.active_count()
    if threads != 1:  # forking a multi-threaded process is unsafe: refuse, the caller runs subprocesses
        print(f"not forking: the template runs {threads} threads after its imports", flush=True)
        sys.exit(1)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    print("ready", flush=True)
    waiting: Dict[int, socket.socket] = {}       # child pid -> the connection that asked for it
    while True:
        readable, _, _ = select.select([listener, sys.stdin], [], [], 0.01 if waiting else 1.0)
        while waiting:                           # report every child that ended
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            conn = waiting.pop(pid, None)
            if conn is not None:
                try:
                    conn.sendall(json.dumps({"status": status}).encode() + b"\n")
                except OSError:
                    pass
                conn.close()
        if sys.stdin in readable and not sys.stdin.readline():
            listener.close()
            os._exit(0)                          # the template only: no interpreter teardown
        if listener in readable:
            conn, _ = listener.accept()
            request = json.loads(_read_line(conn))
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                listener.close()
                for other in waiting.values():
                    other.close()
                conn.close()
                return request
            waiting[pid] = conn
            conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")


def _read_line(conn: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(65536)
        if not chunk:
            raise ConnectionError("the connection closed mid-message")
        data += chunk
    return data


def _become(request: dict) -> None:
    """In a forked child: become `python -m kdmtl_cli ARGS` started in request's cwd and environment."""
    import runpy
    import types

    for fd, name, flags in ((0, os.devnull, os.O_RDONLY), (1, request["stdout"], os.O_WRONLY | os.O_TRUNC),
                            (2, request["stderr"], os.O_WRONLY | os.O_TRUNC)):
        opened = os.open(name, flags)
        os.dup2(opened, fd)
        os.close(opened)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.path[0] = os.getcwd()                    # `python -m`: the current directory comes first
    sys.argv = ["-m", *request["args"]]
    main = types.ModuleType("__main__")
    main.__dict__["__builtins__"] = __builtins__
    sys.modules["__main__"] = main
    runpy._run_module_as_main("kdmtl_cli", alter_argv=True)


def _run_then_exit(request: dict) -> None:
    """Run the child to its end the way the interpreter would: SystemExit's code, or the traceback
    and exit status 1; then join non-daemon threads, run the atexit functions and flush stdout and
    stderr (CPython's Py_FinalizeEx order) and end the process, skipping only the teardown of the
    template's modules (over a second of CPU for torch's object graph, all of it copy-on-write)."""
    code, interrupted = 0, False
    try:
        _become(request)
    except SystemExit as exc:
        if exc.code is None:
            code = 0
        elif isinstance(exc.code, int):
            code = exc.code
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    except BaseException as exc:  # noqa: BLE001 - what the interpreter does with an uncaught exception
        sys.excepthook(type(exc), exc, exc.__traceback__)
        code, interrupted = 1, isinstance(exc, KeyboardInterrupt)
    threading._shutdown()
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    if interrupted:                              # CPython ends an uncaught KeyboardInterrupt by SIGINT
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    os._exit(code & 0xFF)


# ---- the pytest side -----------------------------------------------------------------------------

class TemplateGone(RuntimeError):
    """The template did not fork the run (it has ended, or never started); nothing was started."""


def _strip(env: dict) -> frozenset:
    return frozenset((k, v) for k, v in env.items() if k not in PER_RUN_ENV)


class _Template:
    """One template process, started with `env`; forks children only for that environment."""

    def __init__(self, env: dict) -> None:
        self.dir = tempfile.mkdtemp(prefix="kdmtl-fork-")
        self.socket = os.path.join(self.dir, "socket")
        with open(os.path.join(self.dir, "template.log"), "w") as errors:
            self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), self.socket],
                                         cwd=self.dir, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=errors, text=True)
        self._started = threading.Lock()
        self._ready: Optional[bool] = None

    def ready(self) -> None:
        """Wait until the template has imported its libraries (raises TemplateGone if it failed)."""
        with self._started:
            if self._ready is None:
                line = self.proc.stdout.readline().strip()
                self._ready = line == "ready"
                if not self._ready:
                    self._failure = f"the template did not start: {line} {self.log()}"
        if not self._ready:
            raise TemplateGone(self._failure)

    def log(self) -> str:
        try:
            return Path(self.dir, "template.log").read_text()[-2000:]
        except OSError:
            return ""

    def run(self, args: List[str], cwd: Path, env: dict, timeout: float) -> subprocess.CompletedProcess:
        self.ready()
        command = [sys.executable, "-m", "kdmtl_cli", *args]
        fd_out, out = tempfile.mkstemp(prefix="out-", dir=self.dir)
        fd_err, err = tempfile.mkstemp(prefix="err-", dir=self.dir)
        os.close(fd_out)
        os.close(fd_err)
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
                try:
                    conn.connect(self.socket)
                    conn.sendall(json.dumps({"args": list(args), "cwd": str(cwd), "env": env,
                                             "stdout": out, "stderr": err}).encode() + b"\n")
                    conn.settimeout(60)
                    first, rest = _read_line(conn).split(b"\n", 1)
                    pid = json.loads(first)["pid"]
                except (OSError, ValueError) as exc:      # no child was started: the caller starts one
                    raise TemplateGone(f"{exc}; {self.log()}") from exc
                conn.settimeout(timeout)
                try:
                    status = json.loads(rest if rest else _read_line(conn))["status"]
                except socket.timeout:                # as subprocess.run: kill, then raise
                    os.kill(pid, signal.SIGKILL)
                    conn.settimeout(60)
                    _read_line(conn)
                    raise subprocess.TimeoutExpired(command, timeout, output=Path(out).read_text(),
                                                    stderr=Path(err).read_text()) from None
            return subprocess.CompletedProcess(command, os.waitstatus_to_exitcode(status),
                                               Path(out).read_text(), Path(err).read_text())
        finally:
            os.unlink(out)
            os.unlink(err)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()                  # the template exits at the end of its input
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        import shutil

        shutil.rmtree(self.dir, ignore_errors=True)


class ForkServer:
    """The templates of one pytest process, each started on first use; thread-safe.

    A template imports its libraries under one environment, so it only serves runs whose
    environment equals its own (PER_RUN_ENV aside). The environment of a test session changes
    rarely (importing scikit-learn sets KMP_* variables, say): templates are started for the
    environment the pytest process itself has (`base`), for at most MAX_ENVIRONMENTS of them; a
    run with an environment of its own (faults, env_extra) is left to a fresh interpreter.

    Per environment there is one shared template, and up to `DISTINCT` more for runs that must
    not share an interpreter with each other (`distinct=` the test's id): each such run of a
    test is forked from a template no other such run of that test used, so runs compared bit for
    bit have their own hash seeds and memory layouts, as separately started processes do."""

    MAX_ENVIRONMENTS = 2
    DISTINCT = 3

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._shared: Dict[frozenset, _Template] = {}
        self._distinct: Dict[frozenset, List[_Template]] = {}
        self._used: Dict[str, set] = {}              # test id -> indices of the distinct templates it used
        self.disabled = os.environ.get("KDMTL_TEST_FORKSERVER", "1") == "0" or not hasattr(os, "fork")
        self.reason = "KDMTL_TEST_FORKSERVER=0" if self.disabled else ""

    def _template(self, env: dict, base: dict, distinct: Optional[str]) -> Optional[_Template]:
        key = _strip(env)
        with self._lock:
            if self.disabled or (key not in self._shared and (key != _strip(base) or
                                                              len(self._shared) >= self.MAX_ENVIRONMENTS)):
                return None
            if key not in self._shared:
                self._shared[key], self._distinct[key] = _Template(env), []
            if distinct is None:
                return self._shared[key]
            pool, used = self._distinct[key], self._used.setdefault(distinct, set())
            index = next((i for i in range(len(pool)) if i not in used), len(pool))
            if index == self.DISTINCT:
                return None                          # every distinct template served this test: a fresh one
            if index == len(pool):
                pool.append(_Template(env))
            used.add(index)
            return pool[index]

    def run(self, args: List[str], cwd: Path, env: dict, timeout: float, base: dict,
            distinct: Optional[str] = None) -> Optional[subprocess.CompletedProcess]:
        """`python -m kdmtl_cli ARGS` forked from a template, or None where no template can fork it:
        the caller starts a fresh interpreter (which also reports a missing cwd as subprocess does)."""
        template = self._template(env, base, distinct) if Path(cwd).is_dir() else None
        if template is None:
            return None
        try:
            return template.run(args, cwd, env, timeout)
        except TemplateGone as gone:
            with self._lock:
                self.disabled, self.reason = True, str(gone)
            warnings.warn(f"kdmtl runs start fresh from now on: {self.reason}")
            return None

    def close(self) -> None:
        with self._lock:
            for template in [*self._shared.values(), *(t for pool in self._distinct.values() for t in pool)]:
                template.close()
            self._shared.clear()
            self._distinct.clear()


if __name__ == "__main__":
    _run_then_exit(_template(sys.argv[1]))
