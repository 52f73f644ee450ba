"""Where numbers and lines go: metrics.jsonl (one JSON object per line), TensorBoard scalars,
the run's log and the terminal.

Every line a run says (status messages, epoch lines, warnings, its error) is a record of the
`kdmtl` logger; Hydra's job logging (conf/hydra/job_logging/kdmtl.yaml) sends it to the terminal
as it is and to `<run dir>/train.log` with a timestamp. Progress bars are drawn on the terminal
only (rich, when it is one) and never reach the log, so `log.progress=plain` prints exactly the
log's lines; `log.progress=none` keeps the terminal quiet and the log complete."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional

from rich.console import Console

from kdmtl_cli.engine import run_clock

console = Console(stderr=False, highlight=False)
log = logging.getLogger("kdmtl")


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no nan/inf literals
    return value


class MetricsLog:
    """metrics.jsonl + TensorBoard. Scalars go to TensorBoard with add_scalar per name
    (add_scalars would create a sub-run per key)."""

    def __init__(self, run_dir: Path, tensorboard: bool, prefix: str = ""):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self._tensorboard_dir = Path(run_dir) / "tensorboard" if tensorboard else None
        self._writer = None

    @property
    def writer(self):
        """TensorBoard's writer, made at the first value written: importing tensorboard costs
        about a second that need not come before the first training step."""
        if self._writer is None and self._tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self._tensorboard_dir))
        return self._writer

    def truncate_after_epoch(self, epoch: int, through_step: Optional[int] = None) -> None:
        """On resume: drop records written after the checkpoint we resume from (a mid-epoch
        checkpoint also keeps the step records up to its global step `through_step`)."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue          # a line cut short by kill -9 during its append
            in_part = through_step is not None and record.get("type") == "step" and record["step"] <= through_step
            if record.get("type") == "final" or (record.get("epoch", 0) > epoch and not in_part):
                continue
            kept.append(line)
        from kdmtl_cli.engine.checkpoint import atomic_write_text

        atomic_write_text("".join(line + "\n" for line in kept), self.path)   # never half a log

    def write(self, record: Dict) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")

    def scalars(self, values: Dict[str, float], step: int) -> None:
        if self.writer is None:
            return
        for name, value in values.items():
            if isinstance(value, (int, float)):
                self.writer.add_scalar(self.prefix + name, value, step)

    def image(self, name: str, image, step: int) -> None:
        """An RGB image [3, H, W] in [0, 1] to TensorBoard."""
        if self.writer is not None:
            self.writer.add_image(name, image, step)

    def text(self, name: str, text: str, step: int) -> None:
        """Markdown to TensorBoard's text tab."""
        if self.writer is not None:
            self.writer.add_text(name, text, step)

    def hparams(self, params: Dict, metrics: Dict[str, float]) -> None:
        """One row of TensorBoard's HParams table per run, so sweeps compare side by side.
        run_name='.' keeps it in this run's event files instead of a new sub-run."""
        if self.writer is None:
            return
        clean = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in params.items()}
        self.writer.add_hparams(clean, {f"hparam/{k}": v for k, v in metrics.items()}, run_name=".")

    def close(self) -> None:
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()


def _terminal_handlers() -> List[logging.Handler]:
    """The root logger's handlers that write to a terminal stream (not to a file)."""
    return [h for h in logging.getLogger().handlers
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]


def _to_terminal(record: logging.LogRecord) -> bool:
    return getattr(record, "terminal", True)


def _install_terminal_filter() -> None:
    """Records marked terminal=False (log.progress=none, or a line the terminal shows otherwise)
    reach the log file only. Added here, not in the logging config: a config may not name code."""
    for handler in _terminal_handlers():
        if _to_terminal not in handler.filters:
            handler.addFilter(_to_terminal)


def say(progress_mode: str, text: str, level: int = logging.INFO) -> None:
    """A status line (teacher trained / reused, cache built, epoch done...): to the run's log, and
    to the terminal unless log.progress=none."""
    _install_terminal_filter()
    log.log(level, text, extra={"terminal": progress_mode != "none"})
    for handler in _terminal_handlers():
        handler.flush()


def to_log_file(text: str, level: int = logging.INFO) -> None:
    """A line for the run's log file only (the terminal shows it its own way: a rich table, the
    CLI's error line)."""
    _install_terminal_filter()
    log.log(level, text, extra={"terminal": False})


def show_table(title: str, table, progress_mode: str) -> None:
    """A titled rich table on the terminal (unless log.progress=none) and, as plain text 100
    columns wide, in the run's log."""
    if progress_mode != "none":
        console.print(title, style="bold", markup=False)
        console.print(table)
    buffer = io.StringIO()
    Console(file=buffer, width=100, color_system=None, highlight=False).print(table)
    text = buffer.getvalue().rstrip("\n")
    to_log_file(f"{title}\n{text}")


@contextlib.contextmanager
def _lines_above(bar) -> Iterator[None]:
    """While rich draws its bars it replaces sys.stdout by a proxy that prints above them; the
    terminal log handler holds the real stdout, so it writes through the proxy meanwhile."""
    swapped = []
    for handler in _terminal_handlers():
        if handler.stream is sys.__stdout__ or handler.stream is bar.console.file:
            swapped.append((handler, handler.setStream(sys.stdout)))
    try:
        yield
    finally:
        for handler, stream in swapped:
            handler.setStream(stream)


def duration(seconds: float) -> str:
    """0.4s, 45s, 3m05s, 1h02m."""
    if seconds < 9.95:
        return f"{max(0.0, seconds):.1f}s"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """Epoch and batch progress: rich bars on a terminal (batches with the epoch's running mean
    objective, samples/s and the epoch's time left; epochs with the run's time left), removed when
    the phase ends; the epoch lines go to the log. Plain mode prints only the log's lines; none,
    nothing on the terminal."""

    def __init__(self, mode: str, label: str, epochs: int):
        if mode == "auto":
            mode = "rich" if console.is_terminal else "plain"
        if mode not in ("rich", "plain", "none"):
            from kdmtl_cli.errors import KdmtlError

            raise KdmtlError(f"unknown log.progress '{mode}'; choose auto, rich, plain or none")
        self.mode, self.label, self.epochs = mode, label, epochs
        self._bar = None
        self._shown = 0.0
        self._lines = contextlib.nullcontext()
        self._clock = run_clock.Phase(label, epochs)

    def __enter__(self):
        if self.mode == "rich":
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress
            from rich.progress import TextColumn, TimeElapsedColumn

            self._bar = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), TextColumn("{task.fields[left]}"),
                                     TextColumn("{task.fields[info]}"), console=console, transient=True)
            self._bar.start()
            self._lines = _lines_above(self._bar)
            self._lines.__enter__()
            self._epoch_task = self._bar.add_task(f"{self.label} epochs", total=self.epochs, info="", left="")
            self._batch_task = self._bar.add_task("  batches", total=1, info="", left="")
        return self

    def __exit__(self, *exc):
        if self._bar is not None:
            self._lines.__exit__(*exc)
            self._bar.stop()

    def start_epoch(self, epoch: int, batches: int, completed_epochs: int) -> None:
        self._clock.start_epoch(batches, completed_epochs)
        if self._bar is not None:
            self._bar.update(self._epoch_task, completed=completed_epochs, left=self._run_left())
            self._bar.reset(self._batch_task, total=batches, info="", left="")
            self._bar.update(self._batch_task, description=f"  epoch {epoch}")

    def _run_left(self) -> str:
        left = self._clock.run_left()
        return "" if left is None else f"run ≈{duration(left)} left"

    def batch(self) -> None:
        """One step done."""
        self._clock.step()
        if self._bar is not None:
            self._bar.update(self._batch_task, advance=1)

    def due(self) -> bool:
        """Whether the bars want fresh numbers (twice a second): reading the running loss waits
        for the device, so the loop asks only then."""
        if self._bar is None or time.perf_counter() - self._shown < 0.5:
            return False
        self._shown = time.perf_counter()
        return True

    def show(self, running_objective: float, samples_per_s: float) -> None:
        """The epoch's mean objective so far, its throughput and the time left."""
        epoch_left = self._clock.epoch_left()
        self._bar.update(self._batch_task, info=f"objective {running_objective:.4f}  {samples_per_s:,.0f}/s",
                         left="" if epoch_left is None else f"epoch ≈{duration(epoch_left)} left")
        self._bar.update(self._epoch_task, left=self._run_left())

    def end_epoch(self, epoch: int, summary: str) -> None:
        self._clock.end_epoch()
        left = self._clock.run_left()
        eta = f"  run ≈{duration(left)} left" if left else ""
        if self._bar is not None:
            self._bar.update(self._epoch_task, completed=epoch, left=self._run_left())
        say(self.mode, f"[{self.label}] epoch {epoch}/{self.epochs}  {summary}{eta}")

    def message(self, text: str) -> None:
        say(self.mode, text)


class NullLog:
    """The log of a data-parallel rank other than 0: rank 0 writes metrics.jsonl and TensorBoard."""

    def write(self, record) -> None:
        pass

    def scalars(self, values, step) -> None:
        pass

    def hparams(self, hparams, metrics) -> None:
        pass

    def text(self, name, text, step) -> None:
        pass

    def image(self, name, image, step) -> None:
        pass

    def truncate_after_epoch(self, epoch, through_step=None) -> None:
        pass

    def close(self) -> None:
        pass
