"""The end of a run: a rich table on the terminal (teacher vs student per task metric,
parameters, FLOPs, latency) and the same content as summary.md in the run directory."""

from __future__ import annotations

from typing import Dict, List, Optional

from rich.table import Table

from kdmtl_cli.engine.logging import show_table


def _fmt(value: Optional[float], kind: str = "metric") -> str:
    if value is None:
        return "-"
    if kind == "params":
        return f"{value / 1e6:.3f}M"
    if kind == "flops":
        return f"{value / 1e6:.1f}M"
    if kind == "ms":
        return f"{value:.2f} ms"
    return f"{value:.4f}"


def comparison_rows(tasks, split: str, student: Dict[str, float], teacher: Optional[Dict[str, float]],
                    student_cost: Optional[dict], teacher_cost: Optional[dict],
                    delta: Optional[tuple] = None) -> List[List[str]]:
    """Main tasks first, then auxiliary tasks (marked), then Δm (label, teacher, student)."""
    rows = []
    ordered = sorted(tasks.items(), key=lambda item: bool(getattr(item[1], "auxiliary", False)))
    for name, task in ordered:
        aux = " (auxiliary)" if getattr(task, "auxiliary", False) else ""
        for metric, higher in task.kind.higher_is_better.items():
            key = f"{split}/{name}/{metric}"
            arrow = "↑" if higher else "↓"
            t_value = teacher.get(key) if teacher else None
            rows.append([f"{name}/{metric} {arrow}{aux}", _fmt(t_value), _fmt(student.get(key))])
    if delta is not None:
        label, t_value, s_value = delta
        rows.append([label, "-" if t_value is None else f"{t_value:+.2f}", f"{s_value:+.2f}"])
    for label, field, kind in (("parameters", "params", "params"), ("FLOPs / image", "flops", "flops"),
                               ("latency / image", "latency_ms", "ms")):
        if student_cost:
            rows.append([label, _fmt(teacher_cost[field], kind) if teacher_cost else "-",
                         _fmt(student_cost[field], kind)])
    return rows


def print_table(title: str, rows: List[List[str]], progress_mode: str = "plain") -> None:
    """The table on the terminal (unless log.progress=none) and, as plain text, in the run's log."""
    table = Table()
    table.add_column("metric")
    table.add_column("teacher", justify="right")
    table.add_column("student", justify="right")
    for row in rows:
        table.add_row(*row)
    show_table(title, table, progress_mode)


def markdown(title: str, rows: List[List[str]], header_lines: List[str]) -> str:
    lines = [f"# {title}", "", *header_lines, "", "| metric | teacher | student |", "|---|---:|---:|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines) + "\n"
