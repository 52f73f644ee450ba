"""Per-task weights: a number applies to every task; a mapping must name each task exactly."""

from __future__ import annotations

from typing import Dict, Iterable

from kdmtl_cli.errors import KdmtlError


def per_task_weights(value, tasks: Iterable[str], key: str) -> Dict[str, float]:
    tasks = list(tasks)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return {name: float(value) for name in tasks}
    if hasattr(value, "items"):
        weights = dict(value.items())
        unknown = sorted(set(weights) - set(tasks))
        missing = sorted(set(tasks) - set(weights))
        if unknown or missing:
            raise KdmtlError(f"{key} must give a weight for each task ({', '.join(tasks)}); "
                             + (f"unknown: {', '.join(unknown)}" if unknown else f"missing: {', '.join(missing)}"))
        bad = {n: w for n, w in weights.items() if isinstance(w, bool) or not isinstance(w, (int, float))}
        if bad:
            raise KdmtlError(f"{key} values must be numbers (got {bad})")
        return {name: float(w) for name, w in weights.items()}
    raise KdmtlError(f"{key} must be a number or a mapping task -> number (got {value!r})")
