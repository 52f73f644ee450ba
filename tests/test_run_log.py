"""The run's log on disk (train.log) and what the progress display says.

Every line a run prints reaches `<run dir>/train.log` with a timestamp (engine/logging.py,
conf/hydra/job_logging/kdmtl.yaml); with log.progress=plain the terminal shows exactly the log's
lines; with none the terminal is quiet and the log complete. The epoch lines name their numbers,
and the time left is estimated from the steps still to come (engine/run_clock.py)."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest

from conftest import FAST, run_kdmtl, show

STAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d (INFO|WARNING|ERROR) ")


def log_messages(path: Path) -> list:
    """train.log's lines without their timestamp and level (a record's continuation lines, such as
    a table's, have none)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines and STAMP.match(lines[0]), lines[:3]
    return [STAMP.sub("", line) for line in lines]


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory, shared_cache):
    """A default run whose teacher is trained here (a teacher setting no other test uses, so no
    cached one; the generated data comes from the shared cache), 2 student epochs."""
    root = tmp_path_factory.mktemp("plain")
    run_dir = root / "run"
    proc = run_kdmtl(["train", *FAST, "optim.epochs=2", "teacher.optim.lr=0.00271", f"hydra.run.dir={run_dir}"],
                     root, shared_cache)
    assert proc.returncode == 0, show(proc)
    return proc, run_dir


def test_plain_terminal_output_equals_the_log(plain_run):
    proc, run_dir = plain_run
    messages = log_messages(run_dir / "train.log")
    assert proc.stdout.splitlines() == messages, show(proc)
    for expected in ("training it", "[teacher] epoch 1/1", "[student] epoch 1/2", "[student] epoch 2/2",
                     "cls/accuracy", f"run dir: {run_dir}"):
        assert any(expected in line for line in messages), expected


def test_epoch_lines_name_their_numbers_and_match_metrics(plain_run):
    _, run_dir = plain_run
    lines = [m for m in log_messages(run_dir / "train.log") if m.startswith("[student] epoch")]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    epochs = {r["epoch"]: r for r in records if r.get("type") == "epoch"}
    for line in lines:
        epoch = int(re.search(r"epoch (\d+)/", line).group(1))
        found = dict((name, float(value)) for name, value in
                     re.findall(r"(objective|val task loss|task loss) ([-\d.e+]+)", line))
        record = epochs[epoch]
        assert found["objective"] == pytest.approx(record["train/loss/total"], rel=1e-3)
        assert found["task loss"] == pytest.approx(record["train/loss/task"], rel=1e-3)
        assert found["val task loss"] == pytest.approx(record["val/loss/task"], rel=1e-3)
        # KD + FitNet terms make the objective another number than the task loss
        assert found["objective"] != pytest.approx(found["task loss"], rel=1e-3)
        assert ("*best" in line) == (record["best_epoch"] == epoch)


def test_time_left_counts_the_student_while_the_teacher_trains(plain_run):
    _, run_dir = plain_run
    messages = log_messages(run_dir / "train.log")
    teacher_last = next(m for m in messages if m.startswith("[teacher] epoch 1/1"))
    student_first = next(m for m in messages if m.startswith("[student] epoch 1/2"))
    student_last = next(m for m in messages if m.startswith("[student] epoch 2/2"))
    assert re.search(r"run ≈[\d.hms]+ left$", teacher_last), teacher_last   # the student's epochs are still to come
    assert re.search(r"run ≈[\d.hms]+ left$", student_first), student_first
    assert "left" not in student_last                                        # nothing is


def test_progress_none_keeps_the_terminal_quiet_and_the_log_complete(workdir, shared_cache):
    run_dir = workdir / "quiet"
    args = [a for a in FAST if not a.startswith("log.progress")]
    proc = run_kdmtl(["train", *args, "log.progress=none", "loss=none", f"hydra.run.dir={run_dir}"],
                     workdir, shared_cache)
    assert proc.returncode == 0 and proc.stdout == "", show(proc)
    messages = log_messages(run_dir / "train.log")
    assert any(m.startswith("[student] epoch 1/1") for m in messages)
    assert any(m.startswith("run dir:") for m in messages)


def test_a_refused_setting_leaves_its_error_line_in_the_log(workdir, shared_cache):
    """An error found inside the run (after its directory exists) is the run log's last line."""
    run_dir = workdir / "refused"
    proc = run_kdmtl(["train", *FAST, "test.average_last_epochs=5", f"hydra.run.dir={run_dir}"],
                     workdir, shared_cache)
    assert proc.returncode == 1 and "test.average_last_epochs" in proc.stderr, show(proc)
    last = (run_dir / "train.log").read_text(encoding="utf-8").splitlines()[-1]
    assert STAMP.match(last) and " ERROR " in last and "test.average_last_epochs" in last, last


def test_python_warnings_reach_the_log(tmp_path):
    """warnings.warn inside a job goes through logging (captureWarnings), to the log file too."""
    import logging
    import warnings

    from kdmtl_cli.engine.logging import say

    path = tmp_path / "x.log"
    root = logging.getLogger()
    handler = logging.FileHandler(path, encoding="utf-8")
    root.addHandler(handler)
    level = root.level
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)
    try:
        say("none", "a status line")
        warnings.warn("careful", UserWarning)
    finally:
        logging.captureWarnings(False)
        root.removeHandler(handler)
        root.setLevel(level)
        handler.close()
    text = path.read_text(encoding="utf-8")
    assert "a status line" in text and "UserWarning: careful" in text


# ---- the progress display, in process ---------------------------------------------------------

class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_run_clock_counts_this_phase_and_the_announced_ones(monkeypatch):
    from kdmtl_cli.engine import run_clock

    clock = FakeClock()
    monkeypatch.setattr(run_clock, "_now", clock)
    run_clock.forget_all()
    run_clock.expect("student", 30)                 # 3 epochs x 10 steps, announced first
    teacher = run_clock.Phase("teacher", 2)
    assert run_clock.later_steps() == 30
    teacher.start_epoch(batches=5, completed_epochs=0)
    for _ in range(2):
        clock.now += 0.5
        teacher.step()
    # 0.5 s per step measured; 8 teacher steps (2 epochs x 5, 2 done) and 30 student steps left
    assert teacher.run_left() == pytest.approx(0.5 * (8 + 30))
    assert teacher.epoch_left() == pytest.approx(0.5 * 3)
    student = run_clock.Phase("student", 3)         # starts: no longer "to come"
    assert run_clock.later_steps() == 0
    student.start_epoch(batches=10, completed_epochs=0)
    assert student.run_left() is None                # nothing measured yet: no guess
    clock.now += 2.0
    student.step()
    assert student.run_left() == pytest.approx(2.0 * 29)
    run_clock.forget_all()


def test_duration_reads_like_a_clock():
    from kdmtl_cli.engine.logging import duration

    assert [duration(s) for s in (0.44, 9.9, 45, 185, 3720)] == ["0.4s", "9.9s", "45s", "3m05s", "1h02m"]


def test_rich_bars_show_the_running_objective_and_vanish(monkeypatch):
    from rich.console import Console

    from kdmtl_cli.engine import logging as kdmtl_logging

    screen = io.StringIO()
    monkeypatch.setattr(kdmtl_logging, "console", Console(file=screen, force_terminal=True, width=100))
    with kdmtl_logging.Progress("rich", "student", 2) as progress:
        progress.start_epoch(1, 4, 0)
        progress.batch()
        progress._shown = 0.0                        # due now
        assert progress.due()
        progress.show(1.23456, 100.0)
        assert "objective 1.2346" in progress._bar.tasks[1].fields["info"]
        assert not progress.due()                    # not twice in the same half second
        bar = progress._bar
    assert bar.live.transient and not bar.live.is_started
