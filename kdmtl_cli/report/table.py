"""The report table: one row per (group, metric) with mean ± std over seeds of the test metric
(checkpoint selected on validation), the validation metric at that best epoch and at the last
epoch, and the published value with the difference when the experiment stores one -- in
report.md and report.csv, with the evidence over seeds (report/stats.py: intervals, each group
against the reference group) and the reproduction check (report/reproduction.py). The terminal
shows the test metrics only, turned around to fit its width: metrics as rows, groups as columns,
the teacher once; each value marked against the reference group, with its interval, Holm p and
seeds needed on rows below, and published rows only where a number was published (`print_rich`;
several narrower tables when one does not fit).

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
           # report/reproduction.py: the published number against the runs' spread, and which epoch each took
           "published in CI95", "Δ vs published / std", "epoch choice",
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


def _by_seed(group: Group, key: str) -> Dict[int, float]:
    return {int(r.config.get("seed", 0)): r.results[key] for r in group.runs if key in r.results}


def rows(groups: List[Group]) -> List[dict]:
    """One row per (group, metric); `_values` {seed: test value} feed report/stats.py, `_compared`
    {seed: value compared with the published number} feed report/reproduction.py."""
    from kdmtl_cli.report.reproduction import compared_key, epoch_choice

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
            compared_values = _by_seed(group, compared_key(metric, pub)) if pub else {}
            compared = mean_std(list(compared_values.values()))[0]
            choice, agrees = epoch_choice(group.runs, metric, pub) if pub else ("", None)
            out.append({
                "group": group.label, "seeds": ",".join(map(str, group.seeds)), "n": test[2],
                "metric": f"{metric} {_direction(plain, group.runs[0].config)}",
                "test mean": test[0], "test std": test[1], "val best mean": best[0], "val best std": best[1],
                "val last mean": last[0], "val last std": last[1],
                "published": pub["value"] if pub else None,
                "Δ vs published": (compared - pub["value"]) if pub and not math.isnan(compared) else None,
                "source": f"{pub.get('source', '')} ({_epoch_text(pub)})" if pub else "",
                "epoch choice": choice, "_epoch agrees": agrees,
                "_values": _by_seed(group, metric), "_compared": compared_values,
            })
    return out


def evidence_rows(groups: List[Group], reference: Optional[str] = None) -> Tuple[List[dict], Optional[str]]:
    """rows(groups) with their intervals, the comparison of every group with the `reference` group
    (report/stats.py: needs all groups at once) and the reproduction check (report/reproduction.py);
    and the reference's label. The files and the terminal both start from these (seeded bootstrap:
    the same numbers in both)."""
    from kdmtl_cli.report.reproduction import add_reproduction
    from kdmtl_cli.report.stats import add_evidence

    table = rows(groups)
    reference = add_evidence(table, reference)
    add_reproduction(table)
    return table, reference


def _pm(mean: Optional[float], std: Optional[float]) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    return f"{mean:.4f} ± {std:.4f}"


def cells(row: dict) -> List[str]:
    from kdmtl_cli.report.reproduction import reproduction_text

    pub = row["published"]
    published = "–" if pub is None else f"{pub:.4f}"
    if pub is not None and row.get("_epoch agrees") is False:      # another protocol than the paper's
        published += f" ({row['epoch choice']})"
    delta = "–" if row["Δ vs published"] is None else f"{row['Δ vs published']:+.4f}"
    if row["Δ vs published"] is not None and reproduction_text(row):
        delta += f" ({reproduction_text(row)})"
    return [row["group"], row["seeds"], str(row["n"]), row["metric"], _pm(row["test mean"], row["test std"]),
            _pm(row["val best mean"], row["val best std"]), _pm(row["val last mean"], row["val last std"]),
            published, delta, _intervals(row), _versus(row)]


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
    report` and a sweep's end write the same): the rows with their intervals, the comparisons
    with the `reference` group and the reproduction check (evidence_rows). Returns both paths."""
    from kdmtl_cli.engine.checkpoint import atomic_write_text

    table, _ = evidence_rows(groups, reference)
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
    as many as needed with 4 (the label column repeated in each; a sub-row that is blank in every
    column of a table, e.g. `Holm p vs ref` beside the teacher alone, is left out of it)."""
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
            row = [column.cells[r] for column in chunk]
            if text.startswith(" ") and not any(cell.strip() for cell in row):
                continue
            view.add_row(Text(text), *(Text(cell) for cell in row))
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
    """One model's report rows (test metric and its evidence) in one group, by display name."""
    rows: Dict[str, dict]


def _group_cells(group_rows: List[dict]) -> Tuple[_Cells, _Cells]:
    student, teacher = _Cells({}), _Cells({})
    for row in group_rows:
        name, from_teacher = _display(row["metric"])
        (teacher if from_teacher else student).rows[name] = row
    return student, teacher


def _teachers(groups: List[Group], cells: List[_Cells]) -> List[Tuple[_Cells, List[Group]]]:
    """The distinct teachers (by where they came from and by their test metrics) and their groups."""
    found: Dict[tuple, Tuple[_Cells, List[Group]]] = {}
    for group, teacher in zip(groups, cells, strict=True):
        if not teacher.rows:
            continue          # no distillation: no teacher
        sources = tuple(sorted({str(r.teacher.get("source", "")) for r in group.runs}))
        numbers = tuple(sorted((name, row["test mean"], row["test std"], row["published"], row["Δ vs published"])
                               for name, row in teacher.rows.items()))
        found.setdefault((sources, numbers), (teacher, []))[1].append(group)
    return list(found.values())


# Under each metric's values, the rows of its evidence (report/stats.py) and of the published
# number (report/reproduction.py), each only where some column has its data; the teacher, one
# model trained once, gets its interval only (it is not compared with the reference).
_SUB_ROWS = {"ci": "  95% CI", "p": "  Holm p vs ref", "seeds": "  seeds needed",
             "published": "  published", "delta": "  Δ vs published"}
_MARKERS = {"better": "▲", "worse": "▼", "no evidence": "="}


def _interval(row: dict) -> Optional[Tuple[float, float]]:
    """The bootstrap 95% CI; None with one run or values without spread (nothing to bound)."""
    if row.get("CI95 low") is None or row.get("CI method") == "all equal":
        return None
    return row["CI95 low"], row["CI95 high"]


def _has(kind: str, row: dict, teacher: bool) -> bool:
    if kind == "ci":
        return _interval(row) is not None
    if kind in ("p", "seeds"):
        return not teacher and row.get({"p": "Holm p", "seeds": "seeds needed"}[kind]) is not None
    return row.get("published") is not None


def _metric_rows(students: List[_Cells], teachers: List[_Cells], tasks: List[str]) -> List[Tuple[str, str]]:
    """(metric, what its row shows: value / ci / p / seeds / published / delta), the metrics in
    the order of the runs' `tasks` (as the training table), Δm last; each followed by the rows of
    _SUB_ROWS that some model has data for."""
    names = list(dict.fromkeys([n for c in students for n in c.rows] + [n for c in teachers for n in c.rows]))
    names.sort(key=lambda n: tasks.index(n.split("/")[0]) if n.split("/")[0] in tasks else len(tasks))
    models = [(c, False) for c in students] + [(c, True) for c in teachers]
    out = []
    for name in names:
        out.append((name, "value"))
        out += [(name, kind) for kind in _SUB_ROWS
                if any(name in c.rows and _has(kind, c.rows[name], teacher) for c, teacher in models)]
    return out


def _cell(row: dict, kind: str, signed: bool, decimals: int, teacher: bool) -> str:
    from kdmtl_cli.report.reproduction import reproduction_text
    from kdmtl_cli.report.stats import MAX_SEEDS

    digits, sign = (2, "+") if signed else (decimals, "")
    compared = not teacher and row.get("Δ vs reference") is not None     # not the reference itself
    if kind == "value":
        text = number(row["test mean"], row["test std"], digits, signed)
        marker = _MARKERS.get(row.get("evidence")) if compared and row["n"] >= 2 else None
        return f"{text} {marker}" if marker else text
    if kind == "ci":
        interval = _interval(row)
        return "–" if interval is None else f"[{interval[0]:{sign}.{digits}f}, {interval[1]:{sign}.{digits}f}]"
    if kind == "p":
        return "" if not compared else "–" if row.get("Holm p") is None else f"{row['Holm p']:.3g}"
    if kind == "seeds":
        seeds = row.get("seeds needed")
        return "" if not compared else "–" if seeds is None else f"≥{MAX_SEEDS}" if seeds >= MAX_SEEDS else str(seeds)
    if row.get("published") is None:
        return ""
    if kind == "published":
        return number(row["published"], 0, digits, signed)
    extra = reproduction_text(row, short=True)
    text = number(row["Δ vs published"], 0, digits, True)
    return f"{text} ({extra})" if extra and row["Δ vs published"] is not None else text


def _column_cells(cells: _Cells, layout: List[Tuple[str, str]], decimals: int, teacher: bool = False) -> List[str]:
    return [_cell(cells.rows[name], kind, name.startswith("Δm"), decimals, teacher) if name in cells.rows
            else "–" if kind == "value" else "" for name, kind in layout]


_HEADER_MIN = 9          # a header wraps to its column's numbers, but not narrower than this


def _value_column(name: str, n: int, cells: List[str], reference: bool = False) -> Column:
    """A column headed by `name` wrapped to the width of its numbers, `(reference)` for the group
    the others are compared with, and n (the runs it averages)."""
    from rich.cells import cell_len

    width = max([_HEADER_MIN, *(cell_len(c) for c in cells)])
    lines = [wrap_header(name, width), *(["(reference)"] if reference else []), f"n={n}"]
    return Column("\n".join(lines), cells)


def _evidence_note(table: List[dict], shown: str) -> str:
    """What the markers and the evidence rows mean, naming the reference group and the test."""
    tested = [row for row in table if row.get("Holm p") is not None]
    paired = {row.get("paired p") is not None for row in tested}
    test = ("the paired t-test on the same seeds" if paired == {True} else "Welch's t-test" if paired == {False}
            else "the paired t-test where the seeds are the same, else Welch's")
    return (f"▲ better than, ▼ worse than, = no evidence against the reference {shown}: {test}, Holm-adjusted "
            f"p < 0.05 (Holm over the groups compared on each metric). Rows below a metric: the bootstrap 95% CI "
            f"over seeds, that Holm p, the seeds per group for 80% power to detect the difference.")


def _epoch_notes(groups: List[Group], table: List[dict]) -> List[str]:
    """One line per way the runs' tested epoch differs from the paper's, naming where."""
    shown = {g.label: g.short_label or g.label for g in groups}
    differ: Dict[str, List[str]] = {}
    for row in table:
        if row.get("_epoch agrees") is False:
            name, teacher = _display(row["metric"])
            differ.setdefault(row["epoch choice"], []).append(
                f"{shown[row['group']]} {'teacher ' if teacher else ''}{name}")
    return [f"epoch choice differs from the paper's for {', '.join(where)}: {choice}" for choice, where in differ.items()]


def terminal_columns(groups: List[Group], reference: Optional[str] = None):
    """build(decimals) -> (the metric column, one column per group, then the teacher(s)), and the
    notes printed under the table. The rows of all groups are computed together (evidence_rows:
    each group is compared with the `reference` group, default the first)."""
    from kdmtl_cli.report.reproduction import reproduction_text

    table, reference = evidence_rows(groups, reference)
    by_group: Dict[str, List[dict]] = {}
    for row in table:
        by_group.setdefault(row["group"], []).append(row)
    pairs = [_group_cells(by_group.get(g.label, [])) for g in groups]
    students = [s for s, _ in pairs]
    teachers = _teachers(groups, [t for _, t in pairs])
    tasks = list(dict.fromkeys(t for g in groups for r in g.runs for t in r.config.get("tasks") or {}))
    layout = _metric_rows(students, [t for t, _ in teachers], tasks)
    compared = any(row.get("Δ vs reference") is not None for row in table)
    notes = [("cells: test metric at the checkpoint selected on validation, mean ± std over the group's n runs "
              "(seeds); the validation metrics are in report.md / report.csv")]
    shown = next((g.short_label or g.label for g in groups if g.label == reference), reference)
    if compared:
        notes.append(_evidence_note(table, shown))
    if len(teachers) > 1:
        owners = [", ".join(g.short_label for g in owned) for _, owned in teachers]
        notes.append("the groups had different teachers: "
                     + "; ".join(f"teacher {i + 1} for {names}" for i, names in enumerate(owners)))
    sources: Dict[str, List[str]] = {}          # a source may publish numbers of several epochs
    for pub in (p for g in groups for p in g.published):
        epochs = sources.setdefault(pub.get("source", ""), [])
        epochs += [] if _epoch_text(pub) in epochs else [_epoch_text(pub)]
    notes += [f"published: {source} ({'; '.join(epochs)})" for source, epochs in sources.items() if source]
    if any(row.get("published") is not None and reproduction_text(row) for row in table):
        notes.append("(±x std, inside/outside): the difference in units of the seeds' std; the paper's number "
                     "inside or outside the 95% CI")
    notes += _epoch_notes(groups, table)

    def build(decimals: int) -> Tuple[Column, List[Column]]:
        label = Column("metric", [_SUB_ROWS.get(kind, name) for name, kind in layout])
        columns = [_value_column(g.short_label, len(g.runs), _column_cells(s, layout, decimals),
                                 reference=compared and g.label == reference)
                   for g, s in zip(groups, students, strict=True)]
        for i, (teacher, owners) in enumerate(teachers):
            name = "teacher" if len(teachers) == 1 else f"teacher {i + 1}"
            columns.append(_value_column(name, sum(len(g.runs) for g in owners),
                                         _column_cells(teacher, layout, decimals, teacher=True)))
        return label, columns

    return build, notes


def print_rich(groups: List[Group], unfinished, heading: str, console=None, reference: Optional[str] = None) -> None:
    """Metrics as rows, groups as columns (the teacher once), fitted to the console's width; each
    group's values marked against the `reference` group (a label, as stats.check_reference
    resolves it; default the first group), with their intervals and tests on the rows below."""
    from rich.console import Console

    console = console or Console(highlight=False)
    if groups:
        build, notes = terminal_columns(groups, reference)
        for view in fitted_tables(heading, build, console.width):
            console.print(view)
        for note in notes:
            console.print(note, markup=False)
    else:
        console.print(heading, markup=False)
    for path, why in unfinished:
        console.print(f"unfinished: {path}: {why}", markup=False)
