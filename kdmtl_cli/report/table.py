"""The report table: one row per (group, metric) with mean ± std over seeds of the test metric
(checkpoint selected on validation), the validation metric at that best epoch and at the last
epoch, and the published value with the difference when the experiment stores one.

A published number of `epoch: mean_lastN` (MTAN / Nash-MTL / CAGrad: the mean of the last N
epochs' test metrics) is compared with the runs' `test_mean_lastN/...` (test.average_last_epochs=N),
and `last` / `best` with the test of the selected checkpoint."""

from __future__ import annotations

import csv
import io
import math
from typing import List, Optional

from kdmtl_cli.report.runs import Group, mean_std

COLUMNS = ["group", "seeds", "n", "metric", "test mean", "test std", "val best mean", "val best std",
           "val last mean", "val last std", "published", "Δ vs published", "source"]


def higher_is_better(metric: str, config: dict) -> bool:
    """Direction of `[teacher/]split/task/metric` from the task's kind (a run's config); Δm is
    higher-is-better, losses are not."""
    from kdmtl_cli.tasks import TASK_KINDS, _load_kinds

    parts = metric.split("/")
    if parts[-2] == "delta_m":
        return True
    task = config.get("tasks", {}).get(parts[-2])
    if task is None:
        return False
    _load_kinds()
    return TASK_KINDS.get(task["kind"]).higher_is_better.get(parts[-1], False)


def _direction(metric: str, config: dict) -> str:
    return "↑" if higher_is_better(metric, config) else "↓"


def _metrics(group: Group) -> List[str]:
    """Task metrics and Δm of the student (test/...) and of the teacher (teacher/test/...)."""
    keys = set()
    for run in group.runs:
        for key in run.results:
            parts = key.split("/")
            if parts[0] == "teacher":
                parts = parts[1:]
            if len(parts) == 3 and parts[0] == "test" and parts[1] not in ("task", "loss"):
                keys.add(key)
    return sorted(keys, key=lambda k: (k.startswith("teacher/"), "/delta_m/" in k, k))


def _epoch_text(pub: dict) -> str:
    epoch = str(pub.get("epoch", "last"))
    if epoch.startswith("mean_last"):
        return f"mean of the last {epoch[len('mean_last'):]} epochs' tests; compared with test_{epoch}"
    return f"{epoch} epoch"


def rows(groups: List[Group]) -> List[dict]:
    out = []
    for group in groups:
        published = {(p.get("model", "student"), p["metric"]): p for p in group.published}
        for metric in _metrics(group):
            teacher = metric.startswith("teacher/")
            plain = metric[len("teacher/"):] if teacher else metric
            val_key = "val/" + plain.split("/", 1)[1]
            test = mean_std([r.results[metric] for r in group.runs if metric in r.results])
            best = mean_std([r.best[val_key] for r in group.runs if not teacher and val_key in r.best])
            last = mean_std([r.last[val_key] for r in group.runs if not teacher and val_key in r.last])
            pub = published.get(("teacher" if teacher else "student", plain))
            compared = test[0]
            if pub and str(pub.get("epoch", "last")).startswith("mean_last") and not teacher:
                mean_key = f"test_{pub['epoch']}/" + plain.split("/", 1)[1]
                compared = mean_std([r.results[mean_key] for r in group.runs if mean_key in r.results])[0]
            out.append({
                "group": group.label, "seeds": ",".join(map(str, group.seeds)), "n": test[2],
                "metric": f"{metric} {_direction(plain, group.runs[0].config)}",
                "test mean": test[0], "test std": test[1], "val best mean": best[0], "val best std": best[1],
                "val last mean": last[0], "val last std": last[1],
                "published": pub["value"] if pub else None,
                "Δ vs published": (compared - pub["value"]) if pub and not math.isnan(compared) else None,
                "source": f"{pub.get('source', '')} ({_epoch_text(pub)})" if pub else "",
            })
    return out


def _pm(mean: Optional[float], std: Optional[float]) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    return f"{mean:.4f} ± {std:.4f}"


def cells(row: dict) -> List[str]:
    pub = row["published"]
    return [row["group"], row["seeds"], str(row["n"]), row["metric"], _pm(row["test mean"], row["test std"]),
            _pm(row["val best mean"], row["val best std"]), _pm(row["val last mean"], row["val last std"]),
            "–" if pub is None else f"{pub:.4f}",
            "–" if row["Δ vs published"] is None else f"{row['Δ vs published']:+.4f}"]


HEADER = ["group", "seeds", "n", "metric", "test (best ckpt)", "val, best epoch", "val, last epoch",
          "published", "Δ vs published"]


def markdown(table: List[dict], unfinished) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * 3 + "---|" + "---:|" * 5]
    lines += ["| " + " | ".join(cells(row)) + " |" for row in table]
    if unfinished:
        lines += ["", f"Unfinished runs ({len(unfinished)}), not in the table:", ""]
        lines += [f"- `{path}`: {why}" for path, why in unfinished]
    return "\n".join(lines) + "\n"


def to_csv(table: List[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS)
    writer.writeheader()
    for row in table:
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    return buffer.getvalue()


def print_rich(table: List[dict], unfinished, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    view = Table(title=title)
    for name in HEADER:
        view.add_column(name, justify="right" if name not in ("group", "metric") else "left")
    for row in table:
        view.add_row(*cells(row))
    console = Console(width=220)
    console.print(view)
    for path, why in unfinished:
        console.print(f"unfinished: {path}: {why}", markup=False)
