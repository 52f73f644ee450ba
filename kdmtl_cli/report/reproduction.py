"""The reproduction check of `kdmtl report`: how a group's runs stand against the number a paper
published for the same metric (an experiment's `published:` entries).

- `compared_key`: which of the runs' results stand for the published number: the test of the
  selected checkpoint, or for `epoch: mean_lastN` (MTAN / Nash-MTL / CAGrad) the runs'
  `test_mean_lastN/...` (the mean of the last N epochs' tests).
- `add_reproduction`: per row with a published number, whether the number lies inside the
  bootstrap 95% interval of those values' mean, and the difference in units of their seed-to-seed
  sample standard deviation (how many seeds' spread the runs are away).
- `epoch_choice`: which epoch the runs tested against which epoch the paper reported. A
  checkpoint chosen on validation compared with a paper's last epoch (or the reverse) is another
  protocol, so the report names the difference instead of leaving it to the source text.
"""

from __future__ import annotations

import statistics
from collections import Counter
from typing import List, Optional, Tuple

from kdmtl_cli.report.stats import bootstrap_interval


def compared_key(metric: str, pub: dict) -> str:
    """The results key compared with `pub` for `metric` (`[teacher/]test/task/name`): a student's
    `epoch: mean_lastN` number with `test_mean_lastN/task/name`, anything else with `metric`
    (a teacher has no per-epoch tests to average)."""
    epoch = str(pub.get("epoch", "last"))
    if epoch.startswith("mean_last") and not metric.startswith("teacher/"):
        return f"test_{epoch}/" + metric.split("/", 1)[1]
    return metric


def add_reproduction(table: List[dict]) -> None:
    """Rows with a published number (report/table.rows: `published`, `Δ vs published` and
    `_compared` {seed: value}) get `published in CI95` (yes / no; absent with one run or values
    without spread: no interval to judge by) and `Δ vs published / std` (absent with one run or
    zero std)."""
    for row in table:
        if row.get("published") is None:
            continue
        values = list(row["_compared"].values())
        interval = bootstrap_interval(values)
        if interval and interval[2] != "all equal":
            row["published in CI95"] = "yes" if interval[0] <= row["published"] <= interval[1] else "no"
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        if std > 0 and row.get("Δ vs published") is not None:
            row["Δ vs published / std"] = row["Δ vs published"] / std


def reproduction_text(row: dict, short: bool = False) -> str:
    """`+1.4 std, inside CI` (`inside` when `short`), from add_reproduction's fields; '' without them."""
    parts = []
    if row.get("Δ vs published / std") is not None:
        parts.append(f"{row['Δ vs published / std']:+.1f} std")
    if row.get("published in CI95"):
        where = "inside" if row["published in CI95"] == "yes" else "outside"
        parts.append(where if short else f"{where} CI")
    return ", ".join(parts)


# ---- which epoch: the runs' against the paper's ---------------------------------------------------

def _paper_text(epoch: str) -> str:
    if epoch.startswith("mean_last"):
        return f"mean of the last {epoch[len('mean_last'):]} epochs' tests"
    return f"{epoch} epoch" if epoch in ("last", "best") else epoch


def _student_choice(run) -> Tuple[Optional[str], str]:
    """(last / best / None when not recorded, how the run chose), from results.json's `monitor`
    (the effective one: `last` when there was no validation split) or the config's."""
    monitor = run.results.get("monitor") or (run.config.get("checkpoint") or {}).get("monitor")
    if not monitor:
        return None, "not recorded"
    return ("last", "last epoch") if monitor == "last" else ("best", f"best epoch by {monitor}")


def _teacher_choice(run) -> Tuple[Optional[str], str]:
    """A teacher trained by kdmtl keeps `teacher.keep`; one loaded from a file, whatever it was."""
    teacher = run.config.get("teacher") or {}
    if not teacher or teacher.get("checkpoint") or teacher.get("checkpoints"):
        return None, "teacher's epoch not recorded"
    keep = teacher.get("keep", "best")
    if keep == "last" or (keep == "best" and (run.config.get("data") or {}).get("val_size") == 0):
        return "last", "teacher's last epoch"
    if keep == "best":
        return "best", "teacher's best epoch by val/loss/task"
    return keep, f"teacher kept by {keep}"


def epoch_choice(runs: list, metric: str, pub: dict) -> Tuple[str, Optional[bool]]:
    """(a label such as `runs: best epoch by val/loss/task; paper: last epoch`, whether the runs'
    choice agrees with the paper's: None when the runs did not record theirs) for the published
    entry `pub` of `metric` (`[teacher/]test/...`) and a group's `runs`."""
    paper = str(pub.get("epoch", "last"))
    paper_text = _paper_text(paper)
    if paper.startswith("mean_last") and not metric.startswith("teacher/"):
        key = compared_key(metric, pub)
        if all(key in r.results for r in runs):
            return f"same as paper: {paper_text}", True
        return (f"runs: no {key.split('/', 1)[0]} (train with test.average_last_epochs="
                f"{paper[len('mean_last'):]}); paper: {paper_text}"), False
    choose = _teacher_choice if metric.startswith("teacher/") else _student_choice
    choices = Counter(choose(r) for r in runs)
    if len(choices) > 1:
        mixed = " / ".join(f"{text} in {n} runs" for (_, text), n in choices.items())
        return f"runs: mixed ({mixed}); paper: {paper_text}", False
    ((kind, text),) = choices
    if kind is None:
        return f"runs: {text}; paper: {paper_text}", None
    if kind == paper:
        detail = f" (runs: {text})" if text != paper_text else ""
        return f"same as paper: {paper_text}{detail}", True
    label = f"runs: {text}; paper: {paper_text}"
    if kind == "best" and paper == "last" and not metric.startswith("teacher/"):
        # a best epoch that was the last one tested the same checkpoint: say how often
        at_end = sum(r.results.get("best_epoch") is not None and r.results.get("best_epoch") == r.results.get("epoch")
                     for r in runs)
        if at_end:
            label += f" (the best was the last epoch in {at_end} of {len(runs)} runs)"
    return label, False
