"""Δm%: how much a multi-task model gains over single-task baselines, in percent.

Two conventions, both with positive = better than single-task:

* ``maninis`` (Maninis et al., CVPR 2019; used by CAGrad, Nash-MTL, FAMO): one average
  over all K reported metrics of all (non-auxiliary) tasks,
      Δm% = (100 / K) · Σ_k s_k (M_k − B_k) / B_k,
  with s_k = +1 when higher is better and −1 when lower is better.
* ``per_task`` (LibMTL): the same signed relative differences averaged within each task
  first, then over the T tasks: Δm% = (100 / T) · Σ_t mean_{k ∈ t} s_k (M_k − B_k) / B_k.
  Tasks with many metrics (surface normals has five) weigh as much as tasks with one.

Papers that print their table in "lower is better" form show −Δm; kdmtl never flips it.
Unlike LibMTL, the baseline is a separately trained single-task model (not epoch 0 of the
same run) and the epoch is chosen on the validation split.
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional

from kdmtl_cli.errors import KdmtlError
from kdmtl_cli.report.baselines import Baseline, data_mismatch

CONVENTIONS = ("maninis", "per_task")

Metrics = Mapping[str, Mapping[str, float]]          # task -> metric -> value


def relative_gains(results: Metrics, baseline: Metrics, higher_is_better: Mapping[str, Mapping[str, bool]]
                   ) -> Dict[str, Dict[str, float]]:
    """s_k (M_k − B_k) / B_k for every metric of every task in `higher_is_better`."""
    gains: Dict[str, Dict[str, float]] = {}
    for task, directions in higher_is_better.items():
        if task not in baseline:
            raise KdmtlError(f"the Δm baseline has no task '{task}'; record one with "
                             f"`kdmtl train tasks=<that task> delta_m.record=FILE`")
        gains[task] = {}
        for metric, higher in directions.items():
            if metric not in baseline[task]:
                raise KdmtlError(f"the Δm baseline of task '{task}' lacks metric '{metric}' "
                                 f"(has: {', '.join(sorted(baseline[task]))})")
            base, value = float(baseline[task][metric]), float(results[task][metric])
            if base == 0:
                raise KdmtlError(f"the Δm baseline of {task}/{metric} is 0; a relative difference is undefined")
            sign = 1.0 if higher else -1.0
            gains[task][metric] = sign * (value - base) / abs(base)
    return gains


def delta_m(results: Metrics, baseline: Metrics, higher_is_better: Mapping[str, Mapping[str, bool]],
            convention: str = "maninis") -> float:
    """Δm in percent (see the module docstring); positive = better than single-task."""
    if convention not in CONVENTIONS:
        raise KdmtlError(f"delta_m.convention must be one of {', '.join(CONVENTIONS)} (got '{convention}')")
    gains = relative_gains(results, baseline, higher_is_better)
    if not gains or not any(gains.values()):
        raise KdmtlError("Δm needs at least one non-auxiliary task metric")
    if convention == "maninis":
        flat = [g for per_task in gains.values() for g in per_task.values()]
        return 100.0 * sum(flat) / len(flat)
    per_task = [sum(g.values()) / len(g) for g in gains.values() if g]
    return 100.0 * sum(per_task) / len(per_task)


def delta_m_of_run(baseline: Optional[Baseline], data, tasks, metrics: Optional[Dict[str, float]], split: str,
                   who: str = "") -> Dict[str, object]:
    """`{who}{split}/delta_m/<convention>` for a run's metrics ({split/task/metric: value}) in both
    conventions, over its non-auxiliary tasks; nothing when there is no baseline or when the
    metrics do not cover every main task (e.g. a teacher of a subset); the reason when the
    baseline was recorded on other data."""
    if baseline is None or not metrics:
        return {}
    out: Dict[str, object] = {"delta_m/baseline": str(baseline.path)}
    mismatch = data_mismatch(baseline, data)
    if mismatch:
        out["delta_m/skipped"] = mismatch
        return out
    main = {name: task for name, task in tasks.items() if not task.auxiliary}
    directions = {name: task.kind.higher_is_better for name, task in main.items()}
    keys = {name: {m: f"{split}/{name}/{m}" for m in directions[name]} for name in main}
    if any(key not in metrics for per_task in keys.values() for key in per_task.values()):
        return out
    values = {name: {m: metrics[key] for m, key in per_task.items()} for name, per_task in keys.items()}
    for convention in CONVENTIONS:
        out[f"{who}{split}/delta_m/{convention}"] = delta_m(values, baseline.metrics, directions, convention)
    return out
