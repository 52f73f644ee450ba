"""Single-task baseline files for Δm.

A baseline file is YAML that people can read and edit:

    data: {name: shapes, fingerprint: 1a2b...}      # what the baselines were trained on
    tasks:
      seg:
        kind: segmentation
        metrics: {miou: 0.81, pixel_acc: 0.93}      # mean over `runs` (or typed in by hand)
        runs:                                        # one entry per recorded single-task run
          - {run_dir: outputs/..., seed: 0, split: test, metrics: {miou: 0.80, pixel_acc: 0.93}}

`kdmtl train tasks=seg delta_m.record=FILE` adds a run (test split, checkpoint chosen on
validation) and refreshes the mean; recording the same run dir again replaces its entry.
Published numbers can be entered by hand as `metrics` without `runs` and without `data`.
Writes are atomic and serialised by a lock file, so a sweep of baselines can record in parallel.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Dict, Optional

import yaml

from kdmtl_cli.engine.checkpoint import atomic_write_text
from kdmtl_cli.engine.locks import file_lock
from kdmtl_cli.errors import KdmtlError

HEADER = ("# kdmtl single-task baselines for Δm: test metrics of single-task runs (checkpoint chosen\n"
          "# on validation); `metrics` is the mean over `runs`. Written by `delta_m.record=`.\n")


def resolve(path: str) -> Path:
    """A file path, or `pkg://package/relative/path` for a baseline shipped inside a package."""
    if path.startswith("pkg://"):
        package, _, rest = path[len("pkg://"):].partition("/")
        try:
            return Path(str(resources.files(package) / rest))
        except ModuleNotFoundError:
            raise KdmtlError(f"delta_m: no package '{package}' for {path}") from None
    return Path(path).expanduser()


@dataclass
class Baseline:
    path: Path
    metrics: Dict[str, Dict[str, float]]        # task -> metric -> value
    data: Optional[dict]                        # {name, fingerprint} or None (hand-written)
    runs: Dict[str, int]                        # task -> number of recorded runs


def _read(path: Path, key: str) -> dict:
    try:
        content = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise KdmtlError(f"{key}: no baseline file {path}; record single-task runs into it with "
                         f"`kdmtl train tasks=<task> delta_m.record={path}`") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise KdmtlError(f"{key}: cannot read baseline file {path} ({str(err).splitlines()[0]})") from None
    if not isinstance(content, dict) or not isinstance(content.get("tasks", {}), dict):
        raise KdmtlError(f"{key}: {path} is not a kdmtl baseline file (expected a mapping with `tasks:`)")
    return content


def load_baseline(path: str) -> Baseline:
    file = resolve(path)
    content = _read(file, "delta_m.baseline")
    metrics, runs = {}, {}
    for task, entry in (content.get("tasks") or {}).items():
        values = (entry or {}).get("metrics")
        if not isinstance(values, dict) or not all(isinstance(v, (int, float)) for v in values.values()):
            raise KdmtlError(f"delta_m.baseline: task '{task}' in {file} needs `metrics: {{name: number}}`")
        metrics[task] = {k: float(v) for k, v in values.items()}
        runs[task] = len(entry.get("runs") or [])
    return Baseline(path=file, metrics=metrics, data=content.get("data"), runs=runs)


def check_covers(baseline: Baseline, tasks) -> None:
    """Fail before training when a (non-auxiliary) task or one of its metrics has no baseline."""
    for name, task in tasks.items():
        if task.auxiliary:
            continue
        if name not in baseline.metrics:
            raise KdmtlError(f"delta_m.baseline {baseline.path} has no task '{name}' (has: "
                             f"{', '.join(sorted(baseline.metrics)) or 'none'}); record it with "
                             f"`kdmtl train tasks=<single-task config> delta_m.record={baseline.path}`")
        missing = sorted(set(task.kind.higher_is_better) - set(baseline.metrics[name]))
        if missing:
            raise KdmtlError(f"delta_m.baseline {baseline.path}: task '{name}' lacks metrics {', '.join(missing)}")


def data_mismatch(baseline: Baseline, data) -> Optional[str]:
    """Why the baseline was trained on other data than this run (None when it matches or
    when the baseline does not say, e.g. published numbers typed in by hand)."""
    if not baseline.data:
        return None
    theirs = (baseline.data.get("name"), baseline.data.get("fingerprint"))
    if theirs != (data.name, data.fingerprint):
        return (f"the baseline was recorded on data {theirs[0]}/{theirs[1]}, this run uses "
                f"{data.name}/{data.fingerprint}")
    return None


def _locked(path: Path):
    return file_lock(path.with_name(f".{path.name}.lock"))  # hidden, never removed (kdmtl_cli/engine/locks.py)


def check_record_target(path: str, tasks) -> Path:
    """A record target must be a single-task run's, in a writable place (checked at start)."""
    main = [n for n, t in tasks.items() if not t.auxiliary]
    if len(main) != 1:
        raise KdmtlError(f"delta_m.record is for single-task baseline runs, but this run has tasks "
                         f"{', '.join(main)}; run e.g. `kdmtl train tasks={main[0]} delta_m.record={path}`")
    file = resolve(path)
    if not file.parent.exists():
        raise KdmtlError(f"delta_m.record: directory {file.parent} does not exist; create it or choose another path")
    if file.exists():
        _read(file, "delta_m.record")
    return file


def record(path: str, tasks, test_metrics: Dict[str, float], data, run: dict) -> Path:
    """Add this single-task run's test metrics to the baseline file (atomically, under a lock)."""
    file = resolve(path)
    with _locked(file):
        content = _read(file, "delta_m.record") if file.exists() else {}
        here = {"name": data.name, "fingerprint": data.fingerprint}
        if content.get("data") and content["data"] != here:
            raise KdmtlError(f"delta_m.record: {file} holds baselines of data {content['data']}, this run "
                             f"uses {here}; record into another file")
        content["data"] = here
        entries = content.setdefault("tasks", {}) or {}
        content["tasks"] = entries
        for name, task in tasks.items():
            if task.auxiliary:
                continue
            values = {m: float(test_metrics[f"test/{name}/{m}"]) for m in task.kind.higher_is_better}
            entry = entries.setdefault(name, {}) or {}
            entries[name] = entry
            runs = [r for r in (entry.get("runs") or []) if r.get("run_dir") != run["run_dir"]]
            runs.append({**run, "split": "test", "metrics": values})
            entry.update(kind=task.kind.name,
                         metrics={m: sum(r["metrics"][m] for r in runs) / len(runs) for m in values},
                         runs=runs)
        atomic_write_text(HEADER + yaml.safe_dump(content, sort_keys=False), file)
    return file
