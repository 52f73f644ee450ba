"""Where numbers go: metrics.jsonl (one JSON object per line), TensorBoard scalars, and
the terminal (rich progress bars on a terminal, plain lines otherwise)."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Dict, Optional

from rich.console import Console

console = Console(stderr=False, highlight=False)


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


def say(progress_mode: str, text: str) -> None:
    """A one-line status message (teacher trained / reused, cache built...), unless log.progress=none."""
    if progress_mode != "none":
        print(text, flush=True)


class Progress:
    """Epoch and batch progress with loss and samples/s. Rich bars on a terminal; plain
    lines (one per epoch) when output is redirected; nothing with mode=none."""

    def __init__(self, mode: str, label: str, epochs: int):
        if mode == "auto":
            mode = "rich" if console.is_terminal else "plain"
        if mode not in ("rich", "plain", "none"):
            from kdmtl_cli.errors import KdmtlError

            raise KdmtlError(f"unknown log.progress '{mode}'; choose auto, rich, plain or none")
        self.mode, self.label, self.epochs = mode, label, epochs
        self._bar = None

    def __enter__(self):
        if self.mode == "rich":
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress
            from rich.progress import TextColumn, TimeElapsedColumn

            self._bar = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), TextColumn("{task.fields[info]}"),
                                     console=console, transient=False)
            self._bar.start()
            self._epoch_task = self._bar.add_task(f"{self.label} epochs", total=self.epochs, info="")
            self._batch_task = self._bar.add_task("  batches", total=1, info="")
        return self

    def __exit__(self, *exc):
        if self._bar is not None:
            self._bar.stop()

    def start_epoch(self, epoch: int, batches: int, completed_epochs: int) -> None:
        self._t0 = time.perf_counter()
        if self._bar is not None:
            self._bar.update(self._epoch_task, completed=completed_epochs)
            self._bar.reset(self._batch_task, total=batches)
            self._bar.update(self._batch_task, description=f"  epoch {epoch}")

    def batch(self, loss: Optional[float], samples_per_s: float) -> None:
        if self._bar is not None:
            if loss is None:
                self._bar.update(self._batch_task, advance=1)
            else:
                self._bar.update(self._batch_task, advance=1, info=f"loss {loss:.3f} {samples_per_s:,.0f}/s")

    def end_epoch(self, epoch: int, summary: str) -> None:
        if self._bar is not None:
            self._bar.update(self._epoch_task, completed=epoch)
            self._bar.console.print(f"[{self.label}] epoch {epoch}/{self.epochs} {summary}", markup=False)
        elif self.mode == "plain":
            print(f"[{self.label}] epoch {epoch}/{self.epochs} {summary}", flush=True)

    def message(self, text: str) -> None:
        if self.mode != "none":
            (self._bar.console.print if self._bar is not None else print)(text)
            sys.stdout.flush()


class NullLog:
    """The log of a data-parallel rank other than 0: rank 0 writes metrics.jsonl and TensorBoard."""

    def write(self, record) -> None:
        pass

    def scalars(self, values, step) -> None:
        pass

    def hparams(self, hparams, metrics) -> None:
        pass

    def image(self, name, image, step) -> None:
        pass

    def truncate_after_epoch(self, epoch, through_step=None) -> None:
        pass

    def close(self) -> None:
        pass
