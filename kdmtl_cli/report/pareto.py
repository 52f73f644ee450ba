"""The trials of a search (kdmtl_cli/search.py) as `kdmtl report` and the sweep summary show them:
each finished run's objective values, the best trial of a one-objective search, and the Pareto
front of a several-objective one (the trials no other trial dominates: as good on every
objective and better on one), with a figure of the front for `kdmtl report plot=true`.

A run's objectives are those it was trained with (`search.objectives`, else its
checkpoint.monitor), read from the same records the table uses: validation metrics at its
selected checkpoint (results.json `best`), costs measured at its end (`results`). The front is
computed here rather than by Optuna, so a report needs no Optuna; tests/test_search.py checks it
against Optuna's own `best_trials`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from kdmtl_cli import search
from kdmtl_cli.report.runs import Run


@dataclass
class Trial:
    run: Run
    values: Dict[str, float]       # objective -> value

    @property
    def name(self) -> str:
        """The job's directory name in its sweep (Hydra's job number)."""
        return self.run.path.name


@dataclass
class Search:
    objectives: List[str]
    maximize: List[bool]
    trials: List[Trial]

    @property
    def several(self) -> bool:
        return len(self.objectives) > 1

    def best(self) -> List[Trial]:
        """The Pareto front (several objectives; in the first objective's order, best first) or
        the single best trial."""
        points = [[t.values[n] for n in self.objectives] for t in self.trials]
        chosen = [self.trials[i] for i in front(points, self.maximize)]
        key = self.objectives[0]
        chosen.sort(key=lambda t: t.values[key], reverse=self.maximize[0])
        return chosen if self.several else chosen[:1]

    def arrow(self, name: str) -> str:
        return "↑" if self.maximize[self.objectives.index(name)] else "↓"


def dominates(a: Sequence[float], b: Sequence[float], maximize: Sequence[bool]) -> bool:
    """a is at least as good as b on every objective and better on at least one."""
    better = False
    for x, y, up in zip(a, b, maximize, strict=True):
        if (x < y) if up else (x > y):
            return False
        better = better or x != y
    return better


def front(points: List[Sequence[float]], maximize: Sequence[bool]) -> List[int]:
    """Indices of the points no other point dominates (all of them when tied)."""
    return [i for i, p in enumerate(points)
            if not any(dominates(q, p, maximize) for j, q in enumerate(points) if j != i)]


def find_search(runs: List[Run]) -> Optional[Search]:
    """The runs that were trials of one search: jobs of an Optuna sweep, or runs trained with
    `search.objectives` set, whose objectives are the most common among them; None when no run names objectives or fewer than
    two runs measured them."""
    named = [r for r in runs if (r.config.get("search") or {}).get("objectives") or _optuna_job(r.path)]
    if not named:
        return None
    by_names: Dict[tuple, List[Run]] = {}
    for run in named:
        by_names.setdefault(tuple(search.objectives(run.config)), []).append(run)
    names, members = max(by_names.items(), key=lambda item: len(item[1]))
    trials = []
    for run in members:
        values = search.values(list(names), run.results, run.best)
        if len(values) == len(names):
            trials.append(Trial(run, values))
    if len(trials) < 2:
        return None
    tasks = members[0].config.get("tasks") or {}
    maximize = [search.direction(n, tasks) == "maximize" for n in names]
    return Search(list(names), maximize, sorted(trials, key=lambda t: _job_order(t.name)))


def _optuna_job(run_dir: Path) -> bool:
    """Whether the run is a job of an Optuna search (its sweep's multirun.yaml names the sweeper)."""
    from kdmtl_cli.report.sweep import sweeper_of

    return sweeper_of(run_dir) == search.OPTUNA_SWEEPER


def _job_order(name: str):
    return (0, int(name)) if name.isdigit() else (1, name)


def number(value: float) -> str:
    """A value as the tables show it: counts as integers, the rest with 4 significant digits."""
    return f"{value:.0f}" if value >= 1000 and float(value).is_integer() else f"{value:.4g}"


def best_lines(found: Search, settings) -> List[str]:
    """`Pareto front (val/seg/miou ↑, student/params ↓), 3 of 20 trials:` and a line per trial on
    it (`settings(trial)`: its swept values), or the best trial of a one-objective search."""
    from kdmtl_cli.report.sweep import _shown     # sweep.py imports this module

    heads = ", ".join(f"{n} {found.arrow(n)}" for n in found.objectives)
    best = found.best()
    lines = [f"Pareto front ({heads}), {len(best)} of {len(found.trials)} trials:" if found.several
             else f"best of {len(found.trials)} trials ({heads}):"]
    for trial in best:
        values = ", ".join(f"{n} {number(trial.values[n])}" for n in found.objectives)
        lines.append(f"  job {trial.name} {settings(trial)}: {values}  ({_shown(trial.run.path)})".replace(" :", ":"))
    return lines


def figure(found: Search, out_dir: Path) -> Path:
    """search.png: every trial, the front drawn as a staircase through its trials (several
    objectives: the first against each of the others), or a one-objective search's objective by
    trial with the best so far."""
    from kdmtl_cli.report.plots import _pyplot, _save

    plt = _pyplot()
    best = {id(t) for t in found.best()}
    if found.several:
        others = found.objectives[1:]
        fig, axes = plt.subplots(1, len(others), figsize=(5.5 * len(others), 4.4), squeeze=False)
        x_name = found.objectives[0]
        for ax, y_name in zip(axes[0], others, strict=True):
            _scatter(ax, found, best, x_name, y_name)
        fig.suptitle(f"Pareto front: {len(best)} of {len(found.trials)} trials (red; labels: job numbers)",
                     fontsize=11)
    else:
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        name = found.objectives[0]
        ys = [t.values[name] for t in found.trials]
        running = []
        for y in ys:
            running.append(y if not running else (max if found.maximize[0] else min)(running[-1], y))
        ax.plot(range(len(ys)), ys, "o", color="0.55", label="trial")
        ax.plot(range(len(ys)), running, "-", color="C3", label="best so far")
        ax.set_xlabel("trial (job order)")
        ax.set_ylabel(f"{name} {found.arrow(name)}")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.suptitle(f"Search: {len(ys)} trials", fontsize=11)
    fig.tight_layout()
    return _save(fig, out_dir / "search.png")


def _scatter(ax, found: Search, best: set, x_name: str, y_name: str) -> None:
    on = [t for t in found.trials if id(t) in best]
    off = [t for t in found.trials if id(t) not in best]
    ax.scatter([t.values[x_name] for t in off], [t.values[y_name] for t in off], color="0.6", s=22, label="trial")
    # The front of these two objectives, as a staircase: with more objectives a trial of the
    # whole front may lie off the front of this pair, so the line joins this pair's own front.
    pair = [found.maximize[found.objectives.index(x_name)], found.maximize[found.objectives.index(y_name)]]
    two = [on[i] for i in front([[t.values[x_name], t.values[y_name]] for t in on], pair)]
    two.sort(key=lambda t: t.values[x_name])
    if two:
        ax.step([t.values[x_name] for t in two], [t.values[y_name] for t in two], where="post",
                color="C3", alpha=0.5)
    ax.scatter([t.values[x_name] for t in on], [t.values[y_name] for t in on], color="C3", s=34, zorder=3,
               label="Pareto front")
    for trial in on:
        ax.annotate(trial.name, (trial.values[x_name], trial.values[y_name]), textcoords="offset points",
                    xytext=(4, 4), fontsize=8, color="C3")
    ax.set_xlabel(f"{x_name} {found.arrow(x_name)}")
    ax.set_ylabel(f"{y_name} {found.arrow(y_name)}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
