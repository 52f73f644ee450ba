"""How long the rest of the run will take, for the progress display.

A run has phases of training steps: a teacher (when one is trained here), then the student. The
student's steps are announced (`expect`) as soon as its loader exists, before any teacher trains,
so the teacher's display already counts them. The estimate is the steps left in this phase and
in the announced later phases, at this phase's measured wall time per step (validation included,
once an epoch has ended). A later phase is assumed to cost what this one does per step: a guess,
shown with ≈, that each phase corrects when it starts measuring its own steps.
"""

from __future__ import annotations

import time
from typing import Dict, Optional

_later: Dict[str, int] = {}    # label -> steps of a phase announced but not started
_now = time.perf_counter


def expect(label: str, steps: int) -> None:
    _later[label] = int(steps)


def forget_all() -> None:
    """A new run in this process (a sweep's next job): nothing announced."""
    _later.clear()


def later_steps() -> int:
    return sum(_later.values())


class Phase:
    """One training phase's clock: steps done since it started here (a resumed phase measures
    only what it runs itself) and steps left."""

    def __init__(self, label: str, epochs: int):
        self.label, self.epochs = label, int(epochs)
        self.batches = 0             # steps per epoch, known at the first epoch
        self.completed_epochs = 0
        self.done_in_epoch = 0
        self.measured_steps = 0
        self._started: Optional[float] = None
        self._epoch_started: Optional[float] = None
        _later.pop(label, None)      # running now

    def start_epoch(self, batches: int, completed_epochs: int) -> None:
        now = _now()
        if self._started is None:
            self._started = now
        self.batches, self.completed_epochs, self.done_in_epoch = int(batches), int(completed_epochs), 0
        self._epoch_started = now

    def step(self) -> None:
        self.done_in_epoch += 1
        self.measured_steps += 1

    def end_epoch(self) -> None:
        self.completed_epochs += 1
        self.done_in_epoch = 0

    def seconds_per_step(self) -> Optional[float]:
        if self._started is None or self.measured_steps == 0:
            return None
        return (_now() - self._started) / self.measured_steps

    def epoch_left(self) -> Optional[float]:
        if self._epoch_started is None or self.done_in_epoch == 0:
            return None
        per_step = (_now() - self._epoch_started) / self.done_in_epoch
        return per_step * max(0, self.batches - self.done_in_epoch)

    def run_left(self) -> Optional[float]:
        per_step = self.seconds_per_step()
        if per_step is None:
            return None
        steps_left = max(0, (self.epochs - self.completed_epochs) * self.batches - self.done_in_epoch)
        return per_step * (steps_left + later_steps())
