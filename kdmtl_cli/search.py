"""Hyper-parameter search with Hydra's Optuna sweeper (`pip install kdmtl[optuna]`):

    kdmtl train -m hydra/sweeper=optuna hydra.sweeper.n_trials=20 'loss.kd.temperature=interval(1,8)'

Each trial is a job of the sweep and returns its objective values to the sweeper. The
objectives are named by `search.objectives` (default: the checkpoint's `checkpoint.monitor`):

- a validation metric, `val/<task>/<metric>`, a validation loss `val/task/<task>` or
  `val/loss/task`, or the training-loss monitor `train/...` it selects on -- each read at the
  checkpoint selected on validation (results.json `best`); never a test metric: choosing
  hyper-parameters on the test split would leak it into the result;
- a cost the run measures of the student (log.efficiency=true): `student/params`,
  `student/flops`, `student/latency_ms`, for accuracy-versus-cost searches (several objectives:
  Optuna keeps the Pareto front; `kdmtl report plot=true` draws it).

Each objective's direction follows from what it measures (a task kind's `higher_is_better`;
losses and costs are minimised). `prepare` checks the names and sets `hydra.sweeper.direction`
as Hydra composes the sweep's config (before any job), so a search cannot optimise the wrong way
round; a `direction` given on the command line must agree. `OptunaSearch`, a Hydra callback
registered in conf/train.yaml, records the sweep as Hydra's basic sweeper does. A search never continues in a directory that already holds trials (its job numbers would
be given to new trials): resume.py refuses it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List, Mapping, Optional

from hydra.experimental.callback import Callback
from omegaconf import OmegaConf, open_dict, read_write

from kdmtl_cli.errors import KdmtlError

OPTUNA_SWEEPER = "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"
COSTS = ("student/params", "student/flops", "student/latency_ms")
_LAST = "last"                       # checkpoint.monitor=last: no metric selects the checkpoint
_FALLBACK = "val/loss/task"          # what a search optimises then, unless told


def objectives(cfg) -> List[str]:
    """The objective names of a run (`search.objectives`, else its checkpoint.monitor); `cfg` a
    config or the plain dict a results.json holds."""
    named = _get(cfg, "search", "objectives")
    if named:
        return [str(n) for n in named]
    monitor = str(_get(cfg, "checkpoint", "monitor") or _FALLBACK)
    return [_FALLBACK if monitor == _LAST else monitor]


def _get(cfg, section: str, key: str):
    node = cfg.get(section) if hasattr(cfg, "get") else None
    return node.get(key) if hasattr(node, "get") else None


def direction(name: str, tasks: Mapping) -> str:
    """`maximize` for a metric whose task kind says higher is better, else `minimize` (losses,
    costs, and the metrics of a kind this process does not know)."""
    from kdmtl_cli.report.table import kind_directions

    parts = name.split("/")
    task = tasks.get(parts[1]) if len(parts) == 3 and parts[0] == "val" else None
    higher = (kind_directions(str(task["kind"])) or {}).get(parts[2], False) if task is not None else False
    return "maximize" if higher else "minimize"


def check(cfg) -> List[str]:
    """The run's objective names, each one a run measures, or a one-line KdmtlError naming it."""
    from kdmtl_cli.tasks import TASK_KINDS, _load_kinds

    names = objectives(cfg)
    tasks = OmegaConf.select(cfg, "tasks", default={}) or {}
    monitor = str(OmegaConf.select(cfg, "checkpoint.monitor", default=_FALLBACK))
    key = "search.objectives" if OmegaConf.select(cfg, "search.objectives", default=None) else "checkpoint.monitor"
    if len(set(names)) != len(names):
        raise KdmtlError(f"{key} names an objective twice: {names}")
    _load_kinds()
    for name in names:
        parts = name.split("/")
        if parts[0] == "test" or parts[0].startswith("test_"):
            raise KdmtlError(f"{key}: {name} is a test metric; a search chooses on the validation split "
                             f"(e.g. val/{'/'.join(parts[1:]) or '<task>/<metric>'})")
        if name in COSTS:
            if not OmegaConf.select(cfg, "log.efficiency", default=True):
                raise KdmtlError(f"{key}: {name} is measured only with log.efficiency=true")
            continue
        if parts[0] == "train" and name == monitor:
            continue                 # the training-loss monitor: recorded at the selected checkpoint
        if parts[0] != "val" or len(parts) != 3:
            raise KdmtlError(f"{key}: {name} is not an objective a run measures; use val/<task>/<metric>, "
                             f"val/task/<task>, val/loss/task, or {', '.join(COSTS)}")
        if int(OmegaConf.select(cfg, "data.val_size", default=1) or 0) == 0:
            raise KdmtlError(f"{key}: {name} needs a validation split, but data.val_size=0")
        if parts[1:] == ["loss", "task"]:
            continue
        task_name = parts[2] if parts[1] == "task" else parts[1]
        if task_name not in tasks:
            raise KdmtlError(f"{key}: {name} names no task of this run (tasks: {', '.join(tasks) or 'none'})")
        kind = TASK_KINDS.get(str(tasks[task_name]["kind"]))
        if parts[1] != "task" and kind is not None and parts[2] not in kind.higher_is_better:
            raise KdmtlError(f"{key}: task {task_name} reports no metric '{parts[2]}' (it reports: "
                             f"{', '.join(kind.higher_is_better)})")
    return names


def values(names: List[str], results: Mapping[str, object], best: Mapping[str, object]) -> Dict[str, float]:
    """{name: value} of a finished run: metrics at its selected checkpoint, costs measured at its end."""
    found = {}
    for name in names:
        source = results if name in COSTS else best
        if name in source and isinstance(source[name], (int, float)):
            found[name] = float(source[name])
    return found


def trial_value(run_dir: Path):
    """What a finished trial returns to the sweeper: its one objective as a float, or the tuple of
    them (results.json `objectives`, in search.objectives' order); None when the run did not
    finish (the sweeper counts the trial as failed)."""
    try:
        recorded = json.loads((Path(run_dir) / "results.json").read_text()).get("objectives") or {}
    except (OSError, ValueError):
        return None
    found = [float(v) for v in recorded.values()]
    if not found or not all(math.isfinite(v) for v in found):
        return None
    return found[0] if len(found) == 1 else tuple(found)


def is_search(hydra_cfg) -> bool:
    """Whether this (Hydra) config runs an Optuna search."""
    return str(OmegaConf.select(hydra_cfg, "sweeper._target_", default="")) == OPTUNA_SWEEPER


def _directions_given(sweeper) -> Optional[List[str]]:
    given = OmegaConf.select(sweeper, "direction", default=None)
    if given is None:
        return None
    items = list(given) if OmegaConf.is_list(given) or isinstance(given, (list, tuple)) else [given]
    return [getattr(d, "name", str(d)) for d in items]


def prepare(cfg) -> None:
    """For a composed `-m hydra/sweeper=optuna` config, before the sweeper is made from it: check
    the objectives and give the sweeper their directions. A direction set on the command line
    must agree (it would otherwise optimise the wrong way); one left at the sweeper's default is
    replaced. Called by hydra_guard's hook on every config Hydra composes (Hydra's callbacks
    cannot refuse a sweep: it turns their errors into warnings)."""
    from hydra.types import RunMode

    hydra = cfg.get("hydra") if hasattr(cfg, "get") else None
    if hydra is None or not is_search(hydra) or OmegaConf.select(hydra, "mode") != RunMode.MULTIRUN:
        return
    names = check(cfg)
    wanted = [direction(n, cfg.tasks) for n in names]
    given = _directions_given(hydra.sweeper)
    typed = any(str(o).lstrip("+").startswith("hydra.sweeper.direction=") for o in hydra.overrides.hydra)
    if typed and given != wanted:
        raise KdmtlError(f"hydra.sweeper.direction={given} disagrees with the objectives {names} "
                         f"({', '.join(wanted)}); leave it out: kdmtl sets it from search.objectives")
    with read_write(hydra), open_dict(hydra):
        hydra.sweeper.direction = wanted[0] if len(wanted) == 1 else wanted


class OptunaSearch(Callback):
    """At the start of an Optuna search: the sweep's record and quieter libraries."""

    def on_multirun_start(self, config, **kwargs) -> None:
        if is_search(config.hydra):
            _record_sweep(config)
            _quiet_libraries()


def _record_sweep(config) -> None:
    """multirun.yaml in the sweep directory, as Hydra's basic sweeper writes it (the Optuna sweeper
    does not): the sweep summary and `kdmtl report` read the swept keys from it."""
    sweep_dir = Path(str(config.hydra.sweep.dir))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(config, sweep_dir / "multirun.yaml")


def _quiet_libraries() -> None:
    """Optuna 2 imports alembic, whose plug-in set-up logs a line per module at INFO (Hydra's log
    level), and announces the study in its own coloured handler; the sweeper's own lines say
    what matters (study, sampler, directions, the best trials)."""
    import logging

    logging.getLogger("alembic").setLevel(logging.WARNING)   # before optuna imports it
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
