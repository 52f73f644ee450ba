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

from typing import Dict, Mapping

from kdmtl_cli.errors import KdmtlError

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
