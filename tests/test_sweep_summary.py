"""The end of a sweep (kdmtl_cli/report/sweep.py), through the real CLI: each job says one line
(its full table goes to its log), and `-m` ends with one table of all jobs -- a row per setting
that varies (seeds pooled), the headline metric of each task as mean ± std over seeds -- the path
of the full report it wrote, and any failed job with its error line, with the basic and the
joblib launcher. Values are checked against the jobs' results.json files read back."""

from __future__ import annotations

import csv
import io
import json
import re
import statistics
from pathlib import Path

import pytest
from conftest import FAST, assert_one_line_error, run_kdmtl, show

HEADLINE = {"test/cls/accuracy": "cls/accuracy", "test/seg/miou": "seg/miou", "test/depth/abs_err": "depth/abs_err"}
WIDTH = 100


def _jobs(sweep: Path) -> dict:
    """job number -> its results.json."""
    return {int(p.parent.name): json.loads(p.read_text()) for p in sweep.glob("*/results.json")}


def _flat(text: str) -> str:
    """Whitespace folded: the terminal wraps long lines at its width."""
    return " ".join(text.split())


def _widest(text: str) -> int:
    from rich.cells import cell_len

    return max(cell_len(line) for line in text.splitlines())


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, shared_cache):
    work = tmp_path_factory.mktemp("sweep")
    proc = run_kdmtl(["train", "-m", *FAST, "loss=none,kd", "seed=0,1", "hydra.sweep.dir=sweep"], work, shared_cache,
                     env_extra={"COLUMNS": str(WIDTH)}, timeout=600)
    assert proc.returncode == 0, show(proc)
    return work / "sweep", proc.stdout


def test_each_job_says_one_line_and_keeps_its_table_in_its_log(sweep):
    sweep_dir, out = sweep
    jobs = _jobs(sweep_dir)
    assert sorted(jobs) == [0, 1, 2, 3]
    for num, saved in jobs.items():
        swept = " ".join(o for o in saved["overrides"] if o.startswith(("loss=", "seed=")))
        metrics = "  ".join(f"{name} {saved['results'][key]:.4f}" for key, name in HEADLINE.items())
        assert f"job {num} {swept}: {metrics}  (sweep/{num})" in out, out
        log = (sweep_dir / str(num) / "train.log").read_text()
        assert "kdmtl train:" in log and "┃ metric" in log and "student" in log      # the full table, in the log
    assert "kdmtl train:" not in out and "run dir:" not in out and "┃ metric" not in out


def test_the_sweep_ends_with_one_table_of_all_jobs_and_its_report(sweep):
    sweep_dir, out = sweep
    jobs = _jobs(sweep_dir)
    summary = out[out.index("kdmtl sweep: 4 of 4 job(s) finished"):]
    assert out.rindex("job ") < out.index("kdmtl sweep:")                    # after the last job's line
    assert _widest(summary) <= WIDTH, summary            # (Hydra's own launch lines are its own)
    header = next(line for line in summary.splitlines() if line.startswith("┃"))
    assert [c.strip() for c in header.strip("┃").split("┃")] == \
        ["settings", "n", "cls/accuracy ↑", "seg/miou ↑", "depth/abs_err ↓"]
    for loss in ("none", "kd"):
        saved = [s for s in jobs.values() if f"loss={loss}" in s["overrides"]]
        row = next(line for line in summary.splitlines() if line.startswith(f"│ loss={loss} "))
        cells = [c.strip() for c in row.strip("│").split("│")]
        expected = [f"loss={loss}", "2"]
        for key in HEADLINE:
            values = [s["results"][key] for s in saved]
            expected.append(f"{statistics.fmean(values):.4f} ± {statistics.stdev(values):.4f}")
        assert cells == expected, summary
    assert "seed=" not in summary and "failed" not in summary
    assert "full report: sweep/report.md (and report.csv)" in _flat(summary)
    groups = {row["group"] for row in csv.DictReader((sweep_dir / "report.csv").open())}
    assert len(groups) == 2 and (sweep_dir / "report.md").read_text().startswith("# kdmtl report: 4 finished run(s)")


@pytest.mark.parametrize("width", [60, 160])
def test_the_summary_fits_narrower_and_wider_terminals(sweep, width):
    from rich.console import Console

    from kdmtl_cli.report.sweep import summarize

    sweep_dir, _ = sweep
    buffer = io.StringIO()
    summarize(sweep_dir, console=Console(file=buffer, width=width, color_system=None))
    text = buffer.getvalue()
    assert _widest(text) <= width, text
    tables = sum(line.startswith("┏") for line in text.splitlines())
    assert tables == (1 if width == 160 else 2), text            # folded at 60: the metric columns split
    acc = [s["results"]["test/cls/accuracy"] for s in _jobs(sweep_dir).values() if "loss=kd" in s["overrides"]]
    assert f"{statistics.fmean(acc):.4f} ± {statistics.stdev(acc):.4f}" in text


@pytest.mark.parametrize("launcher", ["basic", pytest.param("joblib", marks=pytest.mark.slow)])   # joblib ~14 s: -m slow
def test_a_failed_job_is_listed_with_its_error_line(tmp_path, shared_cache, launcher):
    """Job 1's setting is refused inside the job (test.average_last_epochs > optim.epochs): the
    sweep still ends with its summary, the failed job with the error line the CLI prints."""
    extra = []
    if launcher == "joblib":
        pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
        extra = ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]
    proc = run_kdmtl(["train", "-m", *extra, *FAST, "loss=none", "test.average_last_epochs=0,5",
                      "hydra.sweep.dir=sweep"], tmp_path, shared_cache, env_extra={"COLUMNS": str(WIDTH)}, timeout=600)
    if launcher == "basic":
        line = assert_one_line_error(proc, "test.average_last_epochs", rc=1)
    else:    # joblib's worker also prints Hydra's own "Error executing job" banner
        assert proc.returncode == 1, show(proc)
        line = proc.stderr.strip().splitlines()[-1]
    message = line[len("kdmtl: error: "):]
    assert message.startswith("test.average_last_epochs must be"), show(proc)
    log = (tmp_path / "sweep" / "1" / "train.log").read_text()
    logged = r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ERROR error: " + re.escape(message) + "$"
    assert re.search(logged, log, re.MULTILINE), log
    out = proc.stdout
    summary = out[out.index("kdmtl sweep: 1 of 2 job(s) finished"):]
    assert _widest(summary) <= WIDTH, out
    summary = _flat(summary)
    assert f"failed: job 1 test.average_last_epochs=5: error: {message}" in summary, out
    acc = _jobs(tmp_path / "sweep")[0]["results"]["test/cls/accuracy"]
    assert f"│ test.average_last_epochs=0 │ {acc:.4f} │" in summary, out      # one run: no n, no ±
    assert re.search(r"job 0 test\.average_last_epochs=0: cls/accuracy " + f"{acc:.4f}", out), out


def test_the_error_line_of_a_job_and_the_last_one_of_this_sweep(tmp_path):
    from datetime import datetime

    from kdmtl_cli.errors import KdmtlError, job_error_line
    from kdmtl_cli.report.sweep import last_error

    assert job_error_line(KdmtlError("bad value\n\tchoose a or b")) == "bad value; choose a or b"
    assert job_error_line(ValueError("shapes differ:\n[2, 3]")) == "ValueError: shapes differ: [2, 3]"
    log = tmp_path / "train.log"
    log.write_text("2026-01-01 10:00:00 ERROR error: from an earlier attempt\n"
                   "2026-01-02 10:00:00 INFO kdmtl train: a table\n┃ ERROR ┃\n"
                   "2026-01-02 10:00:01 ERROR error: the first\n"
                   "2026-01-02 10:00:02 ERROR error: the last\n2026-01-02 10:00:03 INFO done\n")
    assert last_error(log) == "error: the last"
    assert last_error(log, since=datetime(2026, 1, 2, 10, 0, 2)) == "error: the last"
    assert last_error(log, since=datetime(2026, 1, 2, 10, 0, 3)) is None
    log.write_text("2026-01-01 10:00:00 ERROR error: from an earlier attempt\n")
    assert last_error(log, since=datetime(2026, 1, 2)) is None and last_error(tmp_path / "none.log") is None


def test_unfinished_jobs_say_why_and_only_this_sweeps_errors_count(tmp_path):
    """A restarted sweep: job 0 failed in an earlier attempt, then was preempted in this one (its
    old error line is not this attempt's); job 1 failed in this one; job 2 never started."""
    import os
    import time

    from rich.console import Console

    from kdmtl_cli.report.sweep import summarize

    sweep = tmp_path / "sweep"
    for job, seed in (("0", 0), ("1", 1), ("2", 2)):
        (sweep / job / ".hydra").mkdir(parents=True)
        (sweep / job / ".hydra" / "overrides.yaml").write_text(f"- debug=fast\n- loss=none\n- seed={seed}\n")
    (sweep / "multirun.yaml").write_text("hydra:\n  overrides:\n    task:\n    - debug=fast\n    - loss=none\n"
                                         "    - seed=0,1,2\n")
    started = time.time()
    os.utime(sweep / "multirun.yaml", (started, started))
    (sweep / "0" / "config.yaml").write_text("seed: 0\n")
    (sweep / "0" / "PREEMPTED").write_text("{}")
    (sweep / "0" / "train.log").write_text("2001-01-01 00:00:00 ERROR error: an earlier attempt's\n")
    now = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started + 1))
    (sweep / "1" / "train.log").write_text(f"{now} INFO teacher: ...\n{now} ERROR error: loss.kd.weight must be >= 0\n")
    buffer = io.StringIO()
    summarize(sweep, console=Console(file=buffer, width=WIDTH, color_system=None))
    text = _flat(buffer.getvalue())
    assert _widest(buffer.getvalue()) <= WIDTH
    assert text.startswith("kdmtl sweep: 0 of 3 job(s) finished, in ")
    assert ("not finished: job 0 seed=0: preempted (resume with the same command) "
            "failed: job 1 seed=1: error: loss.kd.weight must be >= 0 "
            "not finished: job 2 seed=2: never started") in text, text
    assert "an earlier attempt" not in buffer.getvalue()
    assert (sweep / "report.md").read_text().count("- `") == 3          # the report lists them too
