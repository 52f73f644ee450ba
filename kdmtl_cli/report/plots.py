"""PNG plots beside the report table (`kdmtl report DIR plot=true`, matplotlib: `pip install
kdmtl[plot]`):

- `tradeoff_<metric>.png`: each group's test metric (mean ± std over seeds) against the
  student's parameters and against its latency per image, with the teacher as its own point;
- `curves.png`: one panel per task with its headline validation metric (the first metric of its
  kind's `higher_is_better`), plus one panel of the task loss (validation `val/loss/task` and
  training `train/loss/task`), per group against the epoch: mean over seeds with a ±std band.
  Only quantities every student is measured on: a KD student's objective (task + distillation
  terms) is not comparable with a vanilla student's, so no total objective is drawn there;
- `search.png`, when the runs were trials of a search (kdmtl_cli/search.py, report/pareto.py):
  its Pareto front (several objectives), or each trial's objective with the best so far;
- `curves_loss_terms.png`: one panel per group with that group's objective (`train/loss/total`)
  and each of its named, unweighted loss terms (task/<t>, kd/<t>, fitnet/<layer>, ...).

Curves read each run's metrics.jsonl (its `epoch` records).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from kdmtl_cli.errors import KdmtlError
from kdmtl_cli.report.runs import Group, mean_std
from kdmtl_cli.report.table import kind_directions
from kdmtl_cli.runfiles import read_jsonl

METRICS_FIX = "delete or repair it (that run then has no curves), or report without plot=true"

# train/<part>/... keys that are not loss terms: sums and weightings of terms, diagnostics
NOT_A_TERM = ("loss", "group", "weight", "grad_norm", "teacher_cache")
OBJECTIVE = "train/loss/total"
TASK_LOSS = (("val/loss/task", "validation", "-"), ("train/loss/task", "training", "--"))
# Names a reader knows the metrics by (others: the key with spaces)
METRIC_NAMES = {"miou": "mIoU", "map": "mAP", "f1": "macro-F1", "recall": "macro recall", "pixel_acc": "pixel acc"}
MAX_COLUMNS = 4
DPI = 90

# {run directory: {epoch: that epoch's record}}: each metrics.jsonl is read once per report
EpochLogs = dict[Path, dict[int, dict]]


@dataclass
class Series:
    """One group's curve of one key: per epoch the mean and sample std over its runs, and n."""

    epochs: list[int]
    means: list[float]
    stds: list[float]
    counts: list[int]


@dataclass
class TaskPanel:
    task: str
    kind: str
    key: str                      # val/<task>/<metric>
    metric: str
    higher: bool | None        # None: the kind is not known here (a plug-in), no arrow
    auxiliary: bool


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")   # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        raise KdmtlError("plot=true needs matplotlib: pip install kdmtl[plot]") from None
    return plt


def _safe(name: str) -> str:
    return name.replace("/", "_").replace(" ", "")


def _arrow(higher: bool | None) -> str:
    return "" if higher is None else (" ↑" if higher else " ↓")


def _metric_name(metric: str) -> str:
    return METRIC_NAMES.get(metric, metric.replace("_", " "))


def _group_colours(groups: list[Group]) -> dict[str, str]:
    return {g.label: f"C{i % 10}" for i, g in enumerate(groups)}


def _group_label(group: Group) -> str:
    # the terminal's short label where report/runs.py gives one (what tells the groups apart, as typed)
    label = getattr(group, "short_label", "") or group.label
    return f"{label[:40]} (n={len(group.runs)})"


# ---- reading the logs ----------------------------------------------------------------------------

def read_epoch_logs(groups: list[Group]) -> EpochLogs:
    logs: EpochLogs = {}
    for group in groups:
        for run in group.runs:
            log = run.path / "metrics.jsonl"
            records = read_jsonl(log, METRICS_FIX) if log.is_file() else []
            # a resumed run's log was cut back to its checkpoint; the last record of an epoch wins
            logs[run.path] = {r["epoch"]: r for r in records if r.get("type") == "epoch" and "epoch" in r}
    return logs


def series(group: Group, key: str, logs: EpochLogs) -> Series | None:
    per_epoch: dict[int, list[float]] = {}
    for run in group.runs:
        for epoch, record in logs.get(run.path, {}).items():
            value = record.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                per_epoch.setdefault(int(epoch), []).append(float(value))
    if not per_epoch:
        return None
    epochs = sorted(per_epoch)
    stats = [mean_std(per_epoch[e]) for e in epochs]
    return Series(epochs, [s[0] for s in stats], [s[1] for s in stats], [s[2] for s in stats])


def _logged_keys(groups: list[Group], logs: EpochLogs) -> list[str]:
    keys = {k for g in groups for r in g.runs for record in logs.get(r.path, {}).values() for k in record}
    return sorted(keys)


def task_panels(groups: list[Group], logs: EpochLogs) -> list[TaskPanel]:
    """One panel per task of the runs (config order), with its headline validation metric."""
    logged = _logged_keys(groups, logs)
    tasks: dict[str, dict] = {}
    for group in groups:
        for run in group.runs:
            for name, node in (run.config.get("tasks") or {}).items():
                tasks.setdefault(name, node or {})
    panels = []
    for name, node in tasks.items():
        kind = str(node.get("kind", ""))
        directions = kind_directions(kind)
        if directions:
            metric = next(iter(directions))
            higher = directions[metric]
        else:   # a kind this process does not know: the first validation metric its logs hold
            own = [k.split("/")[2] for k in logged if k.startswith(f"val/{name}/") and k.count("/") == 2]
            if not own:
                continue
            metric, higher = own[0], None
        panels.append(TaskPanel(name, kind, f"val/{name}/{metric}", metric, higher, bool(node.get("auxiliary"))))
    return panels


def loss_terms(group: Group, logs: EpochLogs) -> list[str]:
    """The group's named loss terms: train/<method>/<name>, unweighted as the objective logs them."""
    keys = {k for r in group.runs for record in logs.get(r.path, {}).values() for k in record}
    terms = [k for k in keys if k.startswith("train/") and k.count("/") >= 2 and k.split("/")[1] not in NOT_A_TERM]
    # the task losses first, then the distillation terms by method
    return sorted(terms, key=lambda k: (k.split("/")[1] != "task", k.split("/")[1] != "kd", k))


# ---- drawing -------------------------------------------------------------------------------------

def _draw(ax, data: Series, key: str, colour: str, style: str = "-", label: str | None = None,
          width: float = 1.6) -> None:
    """The mean curve (its gid is the metrics.jsonl key, so tests and readers can tell what a line
    is) and, where more than one run contributes, a ±std band."""
    (line,) = ax.plot(data.epochs, data.means, style, color=colour, marker="o", markersize=3,
                      linewidth=width, label=label)
    line.set_gid(key)
    if max(data.counts) > 1:
        low = [m - s for m, s in zip(data.means, data.stds)]
        high = [m + s for m, s in zip(data.means, data.stds)]
        band = ax.fill_between(data.epochs, low, high, color=colour, alpha=0.18, linewidth=0)
        band.set_gid(key)


def _epoch_axis(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)


def _grid(plt, panels: int, width: float = 4.2, height: float = 3.3):
    columns = min(MAX_COLUMNS, max(panels, 1))
    rows = math.ceil(max(panels, 1) / columns)
    # at least 7 in wide: the figure's title and the group legend fit beside a single panel
    fig, axes = plt.subplots(rows, columns, figsize=(max(width * columns, 7.0), height * rows + 0.9),
                             squeeze=False, layout="constrained")
    flat = list(axes.flat)
    for ax in flat[panels:]:
        ax.set_visible(False)
    return fig, flat[:panels]


def _task_panel(ax, panel: TaskPanel, groups: list[Group], logs: EpochLogs, colours: dict[str, str]) -> None:
    for group in groups:
        data = series(group, panel.key, logs)
        if data is not None:
            _draw(ax, data, panel.key, colours[group.label])
    about = [panel.kind] if panel.kind and panel.kind != panel.task else []
    about += ["auxiliary"] if panel.auxiliary else []
    named = f"{panel.task} ({', '.join(about)})" if about else panel.task
    ax.set_title(f"{named}: validation {_metric_name(panel.metric)}", fontsize=10)
    ax.set_ylabel(f"{_metric_name(panel.metric)}{_arrow(panel.higher)}")
    _epoch_axis(ax)


def _task_loss_panel(ax, groups: list[Group], logs: EpochLogs, colours: dict[str, str]) -> None:
    from matplotlib.lines import Line2D

    for group in groups:
        for key, _, style in TASK_LOSS:
            data = series(group, key, logs)
            if data is not None:
                _draw(ax, data, key, colours[group.label], style)
    ax.set_title("task loss (sum of the main tasks' losses)", fontsize=10)
    ax.set_ylabel("task loss ↓")
    _epoch_axis(ax)
    styles = [Line2D([], [], color="0.3", linestyle=style, label=name) for _, name, style in TASK_LOSS]
    ax.legend(handles=styles, fontsize=8, loc="upper right")


def _has_task_loss(groups: list[Group], logs: EpochLogs) -> bool:
    return any(series(g, key, logs) is not None for g in groups for key, _, _ in TASK_LOSS)


def curves_figure(groups: list[Group], logs: EpochLogs | None = None):
    """The figure of `curves.png` (not saved): task panels, then the task-loss panel."""
    plt = _pyplot()
    logs = read_epoch_logs(groups) if logs is None else logs
    panels = task_panels(groups, logs)
    with_loss = _has_task_loss(groups, logs)
    fig, axes = _grid(plt, len(panels) + with_loss)
    colours = _group_colours(groups)
    for ax, panel in zip(axes, panels):
        _task_panel(ax, panel, groups, logs, colours)
    if with_loss:
        _task_loss_panel(axes[-1], groups, logs, colours)
    _group_legend(fig, groups, colours)
    seeds = "mean ± std over seeds" if any(len(g.runs) > 1 for g in groups) else "one run per group"
    fig.suptitle(f"Validation curves per task ({seeds})", fontsize=12)
    return fig


def _group_legend(fig, groups: list[Group], colours: dict[str, str]) -> None:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=colours[g.label], marker="o", markersize=4, label=_group_label(g)) for g in groups]
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), MAX_COLUMNS), fontsize=9,
               title="group", title_fontsize=9, frameon=False)


TERM_STYLES = {"task": "-", "kd": "--"}   # any other method: dotted
TASK_COLOURS = ("#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d")   # ColorBrewer Dark2


def _log_scale(ax, values: list[float]) -> None:
    """A log y axis with plain numbers (1, 2, 0.5 rather than 10^0, 2x10^0); the in-between
    ticks are labelled only when the values span less than a decade and a half."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    narrow = max(values) / min(values) < 30
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}") if narrow else NullFormatter())


def _term_look(term: str, task_colours: dict[str, str]) -> tuple[str, str]:
    """Colour by task (grey for a term of a layer or of no task), line style by method."""
    _, method, name = term.split("/", 2)
    return task_colours.get(name, "0.45"), TERM_STYLES.get(method, ":")


def loss_terms_figure(groups: list[Group], logs: EpochLogs | None = None):
    """The figure of `curves_loss_terms.png` (not saved): one panel per group, its objective and
    each of its loss terms; a log scale when every value is positive (terms differ in scale by
    orders of magnitude, e.g. FitNet's weight 100)."""
    plt = _pyplot()
    logs = read_epoch_logs(groups) if logs is None else logs
    tasks = [p.task for p in task_panels(groups, logs)]
    # not the C0, C1... of the groups in curves.png: here a colour is a task, not a group
    task_colours = {t: TASK_COLOURS[i % len(TASK_COLOURS)] for i, t in enumerate(tasks)}
    fig, axes = _grid(plt, len(groups), width=4.8, height=3.6)
    for ax, group in zip(axes, groups):
        drawn = []
        objective = series(group, OBJECTIVE, logs)
        if objective is not None:
            _draw(ax, objective, OBJECTIVE, "black", "-", "objective (total, weighted)", width=2.4)
            drawn.append(objective)
        for term in loss_terms(group, logs):
            data = series(group, term, logs)
            if data is not None:
                colour, style = _term_look(term, task_colours)
                _draw(ax, data, term, colour, style, term.split("/", 1)[1])
                drawn.append(data)
        positive = drawn and all(m > 0 for d in drawn for m in d.means)
        if positive:
            _log_scale(ax, [m for d in drawn for m in d.means])
        ax.set_title(f"{_group_label(group)}: training loss terms", fontsize=10)
        ax.set_ylabel("loss, unweighted terms" + (" (log scale)" if positive else "") + " ↓")
        _epoch_axis(ax)
        if drawn:
            # below the panel: inside, it would cover the curves it names
            ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, frameon=False)
    fig.suptitle("Each group's objective and its loss terms (training; mean ± std over seeds)", fontsize=12)
    return fig


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=DPI)
    _pyplot().close(fig)
    return path


# ---- trade-off -----------------------------------------------------------------------------------

def _direction(metric: str, groups: list[Group]) -> bool | None:
    """Higher-is-better of `test/<task>/<metric>` from the task's kind in the runs' config."""
    _, task, name = metric.split("/", 2)
    for group in groups:
        node = (group.runs[0].config.get("tasks") or {}).get(task)
        if node:
            return (kind_directions(str(node.get("kind", ""))) or {}).get(name)
    return None


def tradeoff(groups: list[Group], metric: str, out_dir: Path) -> Path:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, cost, unit in ((axes[0], "params", "parameters (M)"), (axes[1], "latency_ms", "latency / image (ms)")):
        teacher_done = False
        for group in groups:
            xs = [r.results.get(f"student/{cost}") for r in group.runs]
            ys = [r.results.get(metric) for r in group.runs]
            if None in xs or None in ys:
                continue
            x = mean_std([v / 1e6 if cost == "params" else v for v in xs])[0]
            y, err, _ = mean_std(ys)
            ax.errorbar([x], [y], yerr=[err], fmt="o", capsize=3, label=group.label[:40])
            tx = [r.results.get(f"teacher/{cost}") for r in group.runs]
            ty = [r.results.get(f"teacher/{metric}") for r in group.runs]
            if not teacher_done and None not in tx and None not in ty:
                t_x = mean_std([v / 1e6 if cost == "params" else v for v in tx])[0]
                t_y, t_err, _ = mean_std(ty)
                ax.errorbar([t_x], [t_y], yerr=[t_err], fmt="s", color="black", capsize=3, label="teacher")
                teacher_done = True
        ax.set_xlabel(unit)
        ax.set_ylabel(metric + _arrow(_direction(metric, groups)))
        ax.grid(alpha=0.3)
    if axes[1].get_legend_handles_labels()[0]:      # no points where the runs measured no latency
        axes[1].legend(fontsize=7, loc="best")
    fig.suptitle(f"{metric}: mean ± std over seeds")
    fig.tight_layout()
    return _save(fig, out_dir / f"tradeoff_{_safe(metric)}.png")


def write_plots(groups: list[Group], out_dir: Path) -> list[Path]:
    from kdmtl_cli.report.pareto import figure as search_figure, find_search

    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = sorted({k for g in groups for r in g.runs for k in r.results
                      if k.startswith("test/") and k.count("/") == 2 and k.split("/")[1] not in ("task", "loss")})
    paths = [tradeoff(groups, m, out_dir) for m in metrics]
    found = find_search([r for g in groups for r in g.runs])
    if found:                       # the runs were trials of a search: its front (report/pareto.py)
        paths.append(search_figure(found, out_dir))
    logs = read_epoch_logs(groups)
    if not any(logs.values()):
        return paths      # no run has epoch records: nothing to draw curves from
    paths.append(_save(curves_figure(groups, logs), out_dir / "curves.png"))
    if any(loss_terms(g, logs) or series(g, OBJECTIVE, logs) for g in groups):
        paths.append(_save(loss_terms_figure(groups, logs), out_dir / "curves_loss_terms.png"))
    return paths
