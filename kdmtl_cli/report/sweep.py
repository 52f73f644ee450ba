"""The end of a sweep (`kdmtl train -m`): one compact table of all its jobs, the full report
written beside them, and the jobs that failed, each with its error line.

`SweepSummary` is a Hydra callback (conf/train.yaml, `hydra.callbacks.kdmtl_sweep_summary`; allowed
by hydra_guard.KDMTL_CALLBACKS). Hydra calls its `on_multirun_end` in the process that started the
sweep once every job has returned, whichever the launcher (basic, joblib, submitit): so it reads
only what the jobs left in their directories -- `results.json` of a finished job, the last ERROR
line of an unfinished job's `train.log` (errors.JobErrors.guard writes it) -- never in-process
state. While the sweep runs, each job prints one line instead of its full table (`job_line`; the
table goes to the job's log).

Rows are the settings that vary across jobs, seed excluded (report.runs.group_runs: the same
groups as `kdmtl report`); columns are each task's headline metric (the first of its kind's
`higher_is_better`) and Δm when the runs had a baseline; mean ± std over seeds when seeds vary.
"""

from __future__ import annotations

import atexit
import os
import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

from kdmtl_cli.report import pareto

_SWEEP_RECORD = "multirun.yaml"      # Hydra's record of the sweep's command line, in the sweep directory
_ERROR_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) ERROR (.*)$")   # conf/hydra/job_logging/kdmtl.yaml


class SweepSummary(Callback):
    """Prints the sweep's summary and writes its report when the sweep ends.

    Hydra skips on_multirun_end when its sweeper raises: under a parallel launcher (joblib,
    submitit) a failed job's error reaches the CLI that way. So the sweep is also summarized when
    the process exits without on_multirun_end having run (or when the CLI calls summarize_pending
    before it prints that error)."""

    def on_multirun_start(self, config, **kwargs) -> None:
        global _pending
        _pending = (Path(str(config.hydra.sweep.dir)), _quiet(config))
        atexit.register(summarize_pending)

    def on_multirun_end(self, config, **kwargs) -> None:
        global _pending
        _pending = (Path(str(config.hydra.sweep.dir)), _quiet(config))
        summarize_pending()


_pending: tuple[Path, bool] | None = None     # the sweep this process runs, until it is summarized


def summarize_pending() -> None:
    """Summarize the sweep this process started, once."""
    global _pending
    if _pending is None:
        return
    sweep_dir, quiet = _pending
    _pending = None
    try:
        summarize(sweep_dir, quiet=quiet)
    except Exception as err:  # noqa: BLE001 - a summary that fails must not hide the sweep's own outcome
        from kdmtl_cli.errors import one_line

        print(f"kdmtl: no sweep summary ({type(err).__name__}: {one_line(str(err))}); "
              f"run kdmtl report {sweep_dir}", flush=True)


def _quiet(config) -> bool:
    return str(OmegaConf.select(config, "log.progress", default="auto")) == "none"


# ---- during the sweep: one line per job -----------------------------------------------------------

def in_sweep() -> bool:
    """Whether this run is a job of `kdmtl train -m`."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.get().mode == RunMode.MULTIRUN
    except (ImportError, ValueError):    # not run by Hydra
        return False


def job_line(run_dir: Path, results: Mapping[str, object], config: Mapping) -> str:
    """`job 3 loss=none seed=1: cls/accuracy 0.4100  seg/miou 0.3100  depth/abs_err 1.0000  (multirun/.../3)`:
    the job's swept values and its headline test metrics (`config`: the run's)."""
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    swept = swept_overrides(list(hydra_cfg.overrides.task), _sweep_dir_of(run_dir))
    metrics = [f"{name.rsplit(' ', 1)[0]} {_plain(results[key], key)}"
               for key, name in headline_metrics(config["tasks"]) + _delta_m(results, _convention(config))
               if key in results]
    job = " ".join([f"job {hydra_cfg.job.num}", *map(short_override, swept)])
    return f"{job}: {'  '.join(metrics)}  ({_shown(run_dir)})"


def _shown(path: Path) -> str:
    """A path as short as it reads: relative to the working directory when below it."""
    relative = os.path.relpath(path)
    return str(path) if relative.startswith("..") else relative


def _plain(value, key: str) -> str:
    return f"{value:+.2f}" if "/delta_m/" in key else f"{value:.4f}"


def sweeper_of(job_dir: Path) -> str | None:
    """The `_target_` of the sweeper that ran the sweep a job directory lies in (None: not a job
    of a recorded sweep)."""
    sweep_dir = _sweep_dir_of(job_dir)
    return None if sweep_dir is None else _recorded_sweeper(sweep_dir)


def _recorded_sweeper(sweep_dir: Path) -> str | None:
    import yaml

    try:
        hydra = (yaml.safe_load((sweep_dir / _SWEEP_RECORD).read_text()) or {}).get("hydra") or {}
    except (OSError, yaml.YAMLError):
        return None
    return str((hydra.get("sweeper") or {}).get("_target_") or "") or None


def short_override(override: str) -> str:
    """`loss.kd.temperature=6.536781365768524` -> `loss.kd.temperature=6.537`: the values a search
    samples, with 4 significant digits (the job's files keep every digit)."""
    key, sep, value = override.partition("=")
    if sep and re.fullmatch(r"-?\d+\.\d{5,}(e-?\d+)?", value):
        return f"{key}={float(value):.4g}"
    return override


def job_settings(run) -> str:
    """A finished job's swept values as the summary shows them (`loss.kd.temperature=6.537`)."""
    return " ".join(map(short_override, swept_overrides(run.overrides, _sweep_dir_of(run.path))))


def _sweep_dir_of(job_dir: Path) -> Path | None:
    """The sweep directory a job directory lies in: the nearest parent with Hydra's multirun.yaml."""
    for parent in list(Path(job_dir).resolve().parents)[:4]:
        if (parent / _SWEEP_RECORD).is_file():
            return parent
    return None


def swept_overrides(overrides: Sequence[str], sweep_dir: Path | None) -> list[str]:
    """The overrides of a job whose key the sweep varies (`loss=kd`, `seed=1`), not those every job
    shares (`debug=fast`); all of them when the sweep's record cannot be read."""
    return _only_swept(overrides, _swept_keys(sweep_dir) if sweep_dir is not None else None)


def _only_swept(overrides: Sequence[str], keys: set[str] | None) -> list[str]:
    if keys is None:
        return list(overrides)
    return [o for o in overrides if o.split("=", 1)[0].lstrip("+~") in keys]


def _swept_keys(sweep_dir: Path) -> set[str] | None:
    """Keys given several values on the sweep's command line (`a=1,2`, `range(...)`, `choice(...)`)
    or in `hydra.sweeper.params`, from the sweep's multirun.yaml."""
    import yaml
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        hydra = (yaml.safe_load((sweep_dir / _SWEEP_RECORD).read_text()) or {}).get("hydra") or {}
        parsed = OverridesParser.create().parse_overrides(list(hydra["overrides"]["task"]))
    except Exception:  # noqa: BLE001 - unreadable or unparsable: no way to tell which keys vary
        return None
    keys = {o.key_or_group for o in parsed if o.is_sweep_override()}
    params = (hydra.get("sweeper") or {}).get("params") or {}
    return keys | {str(k).lstrip("+~") for k in params}


def headline_metrics(tasks: Mapping) -> list[tuple[str, str]]:
    """(`test/<task>/<metric>`, `<task>/<metric> ↑`) of each main task: the first metric its kind reports."""
    from kdmtl_cli.report.table import kind_directions

    out = []
    for name, task in tasks.items():
        directions = None if task.get("auxiliary") else kind_directions(task["kind"])
        if not directions:         # auxiliary, or a plug-in kind this process has not loaded
            continue
        metric, higher = next(iter(directions.items()))
        out.append((f"test/{name}/{metric}", f"{name}/{metric} {'↑' if higher else '↓'}"))
    return out


def _convention(config: Mapping) -> str:
    return str((config.get("delta_m") or {}).get("convention", "maninis"))


def _delta_m(results: Mapping[str, object], convention: str) -> list[tuple[str, str]]:
    key = f"test/delta_m/{convention}"
    return [(key, "Δm% ↑")] if key in results else []


# ---- at the end: the summary ----------------------------------------------------------------------

def summarize(sweep_dir: Path, quiet: bool = False, console=None) -> None:
    """Write the sweep's report (report.md / report.csv, as `kdmtl report`) and, unless `quiet`,
    print its summary table, the report's path and the jobs that did not finish."""
    from rich.console import Console

    from kdmtl_cli.errors import KdmtlError
    from kdmtl_cli.report import table
    from kdmtl_cli.report.runs import find_runs, group_runs

    try:
        runs, unfinished = find_runs([sweep_dir])
    except KdmtlError:          # no job left a directory (all refused before Hydra made one)
        return
    groups = group_runs(runs) if runs else []
    report, _ = table.write_report(groups, unfinished, table.title(len(runs), len(groups)),
                                  sweep_dir / "report.md")
    if quiet:
        return
    console = console or Console(highlight=False)
    swept = _swept_keys(sweep_dir)
    heading = f"kdmtl sweep: {len(runs)} of {len(runs) + len(unfinished)} job(s) finished, in {_shown(sweep_dir)}"
    found = pareto.find_search(runs) if runs else None
    if groups:
        objectives = [(n, found.arrow(n)) for n in found.objectives] if found else []
        for view in table.fitted_tables(heading, summary_columns(groups, swept, objectives), console.width):
            console.print(view)
        over_seeds = ", mean ± std over seeds (n runs)" if any(len(g.runs) > 1 for g in groups) else ""
        console.print(f"test metrics at the checkpoint selected on validation{over_seeds}", markup=False)
    else:
        console.print(heading, markup=False)
    console.print(f"full report: {_shown(report)} (and report.csv)", markup=False)
    if found:
        for line in pareto.best_lines(found, lambda trial: job_settings(trial.run)):
            console.print(line, markup=False, soft_wrap=True)
    for line in unfinished_lines(sweep_dir, unfinished, swept):
        console.print(line, markup=False)


def summary_columns(groups, swept: set[str] | None = None, objectives=()):
    """build(decimals) for table.fitted_tables: a row per group (the settings that vary), n when
    seeds vary, a search's objectives ([(name, arrow)], validation and costs), then each task's
    headline test metric (and Δm) as columns."""
    from kdmtl_cli import search
    from kdmtl_cli.report import table
    from kdmtl_cli.report.runs import mean_std

    metrics = list(dict.fromkeys(m for g in groups for r in g.runs for m in _summary_metrics(r)))
    labels = row_labels(groups, swept)
    seeds_vary = any(len(g.runs) > 1 for g in groups)

    def build(decimals: int):
        columns = [table.Column("n", [str(len(g.runs)) for g in groups])] if seeds_vary else []
        for name, arrow in objectives:
            cells = []
            for group in groups:
                found = [search.values([name], r.results, r.best).get(name) for r in group.runs]
                mean, std, _ = mean_std([v for v in found if v is not None])
                cells.append(pareto.number(mean) if mean == mean and not std else table.number(mean, std, decimals))
            columns.append(table.Column(f"{name} {arrow}", cells))
        for key, name in metrics:
            delta = "/delta_m/" in key
            cells = []
            for group in groups:
                mean, std, _ = mean_std([r.results[key] for r in group.runs if key in r.results])
                cells.append(table.number(mean, std, 2 if delta else decimals, signed=delta))
            columns.append(table.Column(name, cells))
        return table.Column("settings", labels), columns

    return build


def _summary_metrics(run) -> list[tuple[str, str]]:
    return headline_metrics(run.config.get("tasks") or {}) + _delta_m(run.results, _convention(run.config))


def row_labels(groups, swept: set[str] | None) -> list[str]:
    """Each group's swept values as typed on the command line (`loss=kd optim.lr=0.01`), seed
    excluded; the groups' own short labels when those do not tell every group apart."""
    from kdmtl_cli.report.runs import override_items

    if swept is None:
        return [g.short_label for g in groups]
    labels = []
    for group in groups:
        items = [override_items(r) for r in group.runs]
        shared = [short_override(f"{k}={v}") for k, v in items[0].items()
                  if k in swept and all(i.get(k) == v for i in items[1:])]
        labels.append(" ".join(shared))
    return labels if all(labels) and len(set(labels)) == len(labels) else [g.short_label for g in groups]


def unfinished_lines(sweep_dir: Path, unfinished: Sequence[tuple[Path, str]],
                     keys: set[str] | None) -> list[str]:
    """`failed: job 1 test.average_last_epochs=5: error: ...` for a job that logged an error during
    this sweep; `not finished: job 3 ...: <why>` for one that did not (stopped, never started)."""
    since = _started(sweep_dir)
    lines = []
    for job_dir, why in unfinished:
        name = os.path.relpath(job_dir, sweep_dir)
        swept = _only_swept(_job_overrides(job_dir), keys)
        error = last_error(job_dir / "train.log", since)
        what = f"job {name}" + (f" {' '.join(swept)}" if swept else "")
        lines.append(f"failed: {what}: {error}" if error else f"not finished: {what}: {why}")
    return lines


def _started(sweep_dir: Path) -> datetime | None:
    """When this sweep (or its latest restart) began: Hydra rewrites multirun.yaml as it starts. An
    error line older than that belongs to an earlier attempt of a job the restart continued."""
    try:
        return datetime.fromtimestamp(int((sweep_dir / _SWEEP_RECORD).stat().st_mtime))
    except OSError:
        return None


def _job_overrides(job_dir: Path) -> list[str]:
    import yaml

    try:
        found = yaml.safe_load((job_dir / ".hydra" / "overrides.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return []
    return [str(o) for o in found] if isinstance(found, list) else []


def last_error(log: Path, since: datetime | None = None) -> str | None:
    """The message of the last ERROR line of a job's log (`error: ...`), if written at or after `since`."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return None
    found = None
    for line in text.splitlines():
        match = _ERROR_LINE.match(line)
        if match and (since is None or datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S") >= since):
            found = match.group(2)
    return found
