"""The report table: one row per (group, metric) with mean ± std over seeds of the test metric
(checkpoint selected on validation), the validation metric at that best epoch and at the last
epoch, and the published value with the difference when the experiment stores one -- in
report.md and report.csv. The terminal shows the test metrics only, turned around to fit its
width: metrics as rows, groups as columns, the teacher once, published rows only where a number
was published (`print_rich`; several narrower tables when one does not fit).

A published number of `epoch: mean_lastN` (MTAN / Nash-MTL / CAGrad: the mean of the last N
epochs' test metrics) is compared with the runs' `test_mean_lastN/...` (test.average_last_epochs=N),
and `last` / `best` with the test of the selected checkpoint."""

from __future__ import annotations

import csv
import io
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from kdmtl_cli.report.runs import Group, mean_std

COLUMNS = ["group", "seeds", "n", "metric", "test mean", "test std", "val best mean", "val best std",
           "val last mean", "val last std", "published", "Δ vs published", "source",
           # report/stats.py: the test mean's 95% intervals, and the comparison with the reference group
           "CI95 low", "CI95 high", "CI method", "t CI95 low", "t CI95 high", "reference", "Δ vs reference",
           "Welch p", "paired p", "Holm p", "evidence", "seeds needed"]


def kind_directions(kind: str) -> Optional[Dict[str, bool]]:
    """A task kind's {metric: higher is better}, in its reported order (the first is its headline
    metric); None for a kind this process does not know (a user's plug-in, which `kdmtl report`
    does not load)."""
    from kdmtl_cli.tasks import TASK_KINDS, _load_kinds

    _load_kinds()
    return dict(TASK_KINDS.get(kind).higher_is_better) if kind in TASK_KINDS else None


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
                "_values": {int(r.config.get("seed", 0)): r.results[metric] for r in group.runs if metric in r.results},
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
            "–" if row["Δ vs published"] is None else f"{row['Δ vs published']:+.4f}",
            _intervals(row), _versus(row)]


def _intervals(row: dict) -> str:
    if row.get("CI95 low") is None:
        return "–"
    text = f"[{row['CI95 low']:.4f}, {row['CI95 high']:.4f}] {row['CI method']}"
    if row.get("t CI95 low") is not None:
        text += f"; t [{row['t CI95 low']:.4f}, {row['t CI95 high']:.4f}]"
    return text


def _versus(row: dict) -> str:
    if row.get("Δ vs reference") is None:
        return "–" if row.get("reference") is None else "(reference)"
    p = row.get("Holm p")
    parts = [f"{row['Δ vs reference']:+.4f}", "p –" if p is None else f"p {p:.3g}", row["evidence"]]
    if row.get("seeds needed") is not None:
        parts.append(f"{row['seeds needed']} seeds")
    return ", ".join(parts)


HEADER = ["group", "seeds", "n", "metric", "test (best ckpt)", "val, best epoch", "val, last epoch",
          "published", "Δ vs published", "test 95% CI (bootstrap; t)", "vs reference: Δ, Holm p, evidence, seeds needed"]


def markdown(table: List[dict], unfinished) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * 3 + "---|" + "---:|" * 7]
    lines += ["| " + " | ".join(cells(row)) + " |" for row in table]
    if unfinished:
        lines += ["", f"Unfinished runs ({len(unfinished)}), not in the table:", ""]
        lines += [f"- `{path}`: {why}" for path, why in unfinished]
    return "\n".join(lines) + "\n"


def to_csv(table: List[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for row in table:
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    return buffer.getvalue()


def title(n_runs: int, n_groups: int) -> str:
    return f"kdmtl report: {n_runs} finished run(s) in {n_groups} group(s)"


def write_report(groups: List[Group], unfinished, heading: str, out: Path,
                 reference: Optional[str] = None) -> Tuple[Path, Path]:
    """report.md (every column, the unfinished runs) and report.csv beside it, for `groups` (`kdmtl
    report` and a sweep's end write the same): the rows with their intervals and the comparisons
    with the `reference` group (report/stats.py). Returns both paths."""
    from kdmtl_cli.engine.checkpoint import atomic_write_text
    from kdmtl_cli.report.stats import add_evidence

    table = rows(groups)
    add_evidence(table, reference)
    atomic_write_text(f"# {heading}\n\n" + markdown(table, unfinished), out)
    atomic_write_text(to_csv(table), out.with_suffix(".csv"))
    return out, out.with_suffix(".csv")


# ---- the terminal: tables that fit its width ------------------------------------------------------
# The files keep every column; the terminal shows the test metrics only, as few columns as tell
# the groups apart, in tables no wider than the console (folded into several when needed).

@dataclass
class Column:
    header: str
    cells: List[str]


# A rich table with its default box: one border character per column plus one, one space of
# padding each side of every cell.
_BORDER_PER_COLUMN, _BORDER = 3, 1
_LABEL_MIN = 12          # the row-label column wraps, but not narrower than this


def number(mean: Optional[float], std: Optional[float], decimals: int = 4, signed: bool = False) -> str:
    """`mean ± std`; the mean alone when the std is 0 (one run, or runs that agree) or unknown."""
    if mean is None or math.isnan(mean):
        return "–"
    sign = "+" if signed else ""
    if not std or math.isnan(std):
        return f"{mean:{sign}.{decimals}f}"
    return f"{mean:{sign}.{decimals}f} ± {std:.{decimals}f}"


def wrap_header(text: str, width: int) -> str:
    """A group label on lines of at most `width` characters: between settings (`, `), then after
    `=` inside one (`loss=` / `[kd,fitnet]`), then after `,` `+` `.`, then anywhere."""
    lines: List[str] = []
    for part in text.split(", "):
        pieces = _fill(_tokens(part, width), width)
        if lines and len(lines[-1]) + 2 + len(pieces[0]) <= width:
            lines[-1] += ", " + pieces.pop(0)
        lines += pieces
    return "\n".join(lines)


def _tokens(part: str, width: int) -> List[str]:
    out = []
    for token in re.findall(r"[^=]+=?", part) or [""]:
        for piece in re.findall(r"[^,+.]+[,+.]?", token) if len(token) > width else [token]:
            out += [piece[i:i + width] for i in range(0, len(piece), width)] or [""]
    return out


def _fill(tokens: List[str], width: int) -> List[str]:
    """Tokens joined into as few lines of at most `width` as their order allows."""
    lines: List[str] = []
    for token in tokens:
        if lines and len(lines[-1]) + len(token) <= width:
            lines[-1] += token
        else:
            lines.append(token)
    return lines


def _width(column: Column) -> int:
    from rich.cells import cell_len

    return max(cell_len(line) for text in [column.header, *column.cells] for line in (text or " ").split("\n"))


def _label_width(label: Column, width: int) -> int:
    """The row labels' width: theirs, or at most a third of the terminal (they wrap beyond it)."""
    return min(_width(label), max(_LABEL_MIN, width // 3))


def fold(label: Column, columns: Sequence[Column], width: int) -> List[List[Column]]:
    """The value columns in chunks that fit `width` beside the label column (at least one each)."""
    label_width = _label_width(label, width)
    chunks: List[List[Column]] = [[]]
    used = label_width + _BORDER_PER_COLUMN + _BORDER
    for column in columns:
        need = _width(column) + _BORDER_PER_COLUMN
        if chunks[-1] and used + need > width:
            chunks.append([])
            used = label_width + _BORDER_PER_COLUMN + _BORDER
        chunks[-1].append(column)
        used += need
    return chunks


def fitted_tables(heading: str, build: Callable[[int], Tuple[Column, List[Column]]], width: int) -> list:
    """Rich tables no wider than `width`: one with 4 decimals if it fits, else one with 3, else
    as many as needed with 4 (the label column repeated in each)."""
    from rich.table import Table
    from rich.text import Text      # not markup: `loss=[kd,fitnet]` is a label, not a style

    for decimals in (4, 3, 4):
        label, columns = build(decimals)
        chunks = fold(label, columns, width)
        if len(chunks) == 1:
            break
    label_width = _label_width(label, width)
    tables = []
    for i, chunk in enumerate(chunks):
        view = Table(title=heading if i == 0 else "(continued)", title_justify="left")
        view.add_column(Text(label.header), overflow="fold", max_width=label_width)
        for column in chunk:
            view.add_column(Text(column.header), justify="right", no_wrap=True)
        for r, text in enumerate(label.cells):
            view.add_row(Text(text), *(Text(column.cells[r]) for column in chunk))
        tables.append(view)
    return tables


def _display(metric: str) -> Tuple[str, bool]:
    """`[teacher/]test/cls/accuracy ↑` -> (`cls/accuracy ↑`, from the teacher); Δm as `Δm% maninis ↑`."""
    teacher = metric.startswith("teacher/")
    name = metric[len("teacher/"):] if teacher else metric
    name = name.split("/", 1)[1] if name.startswith("test/") else name
    if name.startswith("delta_m/"):
        name = "Δm% " + name[len("delta_m/"):]
    return name, teacher


@dataclass
class _Cells:
    """One model's test metrics in one group: display name -> (mean, std), and the published
    numbers with the differences: display name -> (published, Δ)."""
    values: Dict[str, Tuple[float, float]]
    published: Dict[str, Tuple[float, Optional[float]]]


def _group_cells(group: Group) -> Tuple[_Cells, _Cells]:
    student, teacher = _Cells({}, {}), _Cells({}, {})
    for row in rows([group]):
        name, from_teacher = _display(row["metric"])
        cells = teacher if from_teacher else student
        cells.values[name] = (row["test mean"], row["test std"])
        if row["published"] is not None:
            cells.published[name] = (row["published"], row["Δ vs published"])
    return student, teacher


def _teachers(groups: List[Group], cells: List[_Cells]) -> List[Tuple[_Cells, List[Group]]]:
    """The distinct teachers (by where they came from and by their test metrics) and their groups."""
    found: Dict[tuple, Tuple[_Cells, List[Group]]] = {}
    for group, teacher in zip(groups, cells, strict=True):
        if not teacher.values:
            continue          # no distillation: no teacher
        sources = tuple(sorted({str(r.teacher.get("source", "")) for r in group.runs}))
        key = (sources, tuple(sorted(teacher.values.items())), tuple(sorted(teacher.published.items())))
        found.setdefault(key, (teacher, []))[1].append(group)
    return list(found.values())


def _metric_rows(students: List[_Cells], teachers: List[_Cells], tasks: List[str]) -> List[Tuple[str, str]]:
    """(metric, what its row shows: value / published / delta), the metrics in the order of the
    runs' `tasks` (as the training table), Δm last; each followed by its published rows when some
    model has a published number for it."""
    names = list(dict.fromkeys([n for c in students for n in c.values] + [n for c in teachers for n in c.values]))
    names.sort(key=lambda n: tasks.index(n.split("/")[0]) if n.split("/")[0] in tasks else len(tasks))
    out = []
    for name in names:
        out.append((name, "value"))
        if any(name in c.published for c in [*students, *teachers]):
            out += [(name, "published"), (name, "delta")]
    return out


def _column_cells(cells: _Cells, layout: List[Tuple[str, str]], decimals: int) -> List[str]:
    out = []
    for name, kind in layout:
        signed = name.startswith("Δm")
        digits = 2 if signed else decimals
        if kind == "value":
            out.append(number(*cells.values.get(name, (None, None)), decimals=digits, signed=signed))
        elif name in cells.published:
            pub, delta = cells.published[name]
            out.append(number(pub, 0, digits, signed) if kind == "published" else number(delta, 0, digits, True))
        else:
            out.append("")
    return out


_ROW_LABELS = {"published": "  published", "delta": "  Δ vs published"}
_HEADER_MIN = 9          # a header wraps to its column's numbers, but not narrower than this


def _value_column(name: str, n: int, cells: List[str]) -> Column:
    """A column headed by `name` wrapped to the width of its numbers, and n (the runs it averages)."""
    from rich.cells import cell_len

    width = max([_HEADER_MIN, *(cell_len(c) for c in cells)])
    return Column(f"{wrap_header(name, width)}\nn={n}", cells)


def terminal_columns(groups: List[Group]):
    """build(decimals) -> (the metric column, one column per group, then the teacher(s)), and the
    notes printed under the table."""
    pairs = [_group_cells(g) for g in groups]
    students = [s for s, _ in pairs]
    teachers = _teachers(groups, [t for _, t in pairs])
    tasks = list(dict.fromkeys(t for g in groups for r in g.runs for t in r.config.get("tasks") or {}))
    layout = _metric_rows(students, [t for t, _ in teachers], tasks)
    notes = [("cells: test metric at the checkpoint selected on validation, mean ± std over the group's n runs "
              "(seeds); the validation metrics are in report.md / report.csv")]
    if len(teachers) > 1:
        owners = [", ".join(g.short_label for g in owned) for _, owned in teachers]
        notes.append("the groups had different teachers: "
                     + "; ".join(f"teacher {i + 1} for {names}" for i, names in enumerate(owners)))
    sources = {p.get("source", ""): _epoch_text(p) for g in groups for p in g.published}
    notes += [f"published: {source} ({epoch})" for source, epoch in sources.items() if source]

    def build(decimals: int) -> Tuple[Column, List[Column]]:
        label = Column("metric", [_ROW_LABELS.get(kind, name) for name, kind in layout])
        columns = [_value_column(g.short_label, len(g.runs), _column_cells(s, layout, decimals))
                   for g, s in zip(groups, students, strict=True)]
        for i, (teacher, owners) in enumerate(teachers):
            name = "teacher" if len(teachers) == 1 else f"teacher {i + 1}"
            columns.append(_value_column(name, sum(len(g.runs) for g in owners),
                                         _column_cells(teacher, layout, decimals)))
        return label, columns

    return build, notes


def print_rich(groups: List[Group], unfinished, heading: str, console=None) -> None:
    """Metrics as rows, groups as columns (the teacher once), fitted to the console's width."""
    from rich.console import Console

    console = console or Console(highlight=False)
    if groups:
        build, notes = terminal_columns(groups)
        for view in fitted_tables(heading, build, console.width):
            console.print(view)
        for note in notes:
            console.print(note, markup=False)
    else:
        console.print(heading, markup=False)
    for path, why in unfinished:
        console.print(f"unfinished: {path}: {why}", markup=False)
