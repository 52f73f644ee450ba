"""Hyper-parameter search through Hydra's Optuna sweeper (kdmtl_cli/search.py, report/pareto.py):
real searches through the CLI on the embedded data, their trials' files read back, the Pareto
front against Optuna's own, and every refused setting as one line before any work."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import FAST, assert_one_line_error, run_kdmtl, show

optuna = pytest.importorskip("optuna")       # pip install kdmtl[optuna] (in the test extra)

SEARCH = ["train", "-m", "hydra/sweeper=optuna", "hydra.sweeper.sampler.seed=0"]
TWO = ["search.objectives=[val/seg/miou,student/params]", "log.efficiency=true"]


def _jobs(sweep: Path) -> list:
    return sorted((p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))


def _results(job: Path) -> dict:
    return json.loads((job / "results.json").read_text())


@pytest.fixture(scope="module")
def pareto_search(tmp_path_factory):
    """4 trials over the KD temperature and the student's width, maximising validation mIoU and
    minimising the student's parameters, in an empty cache."""
    root = tmp_path_factory.mktemp("search")
    cache, sweep = root / "cache", root / "sweep"
    proc = run_kdmtl([*SEARCH, "hydra.sweeper.n_trials=4", "hydra.sweeper.n_jobs=2",
                      "loss.kd.temperature=interval(1,8)", "student.width=choice(8,16)", *FAST, *TWO,
                      f"hydra.sweep.dir={sweep}"], root, cache, timeout=600)
    assert proc.returncode == 0, show(proc)
    return root, cache, sweep, proc


def test_each_trial_returns_its_validation_objectives(pareto_search):
    _, _, sweep, proc = pareto_search
    jobs = _jobs(sweep)
    assert len(jobs) == 4
    assert "Directions: ['maximize', 'minimize']" in proc.stdout          # set by kdmtl from the objectives
    for job in jobs:
        found = _results(job)
        # the selected checkpoint's validation mIoU and the measured parameter count, never a test metric
        assert found["objectives"] == {"val/seg/miou": found["best"]["val/seg/miou"],
                                       "student/params": found["results"]["student/params"]}
        overrides = OmegaConf.load(job / ".hydra" / "overrides.yaml")
        width = int(next(o for o in overrides if o.startswith("student.width=")).split("=")[1])
        assert found["config"]["student"]["width"] == width
        temperature = float(next(o for o in overrides if o.startswith("loss.kd.temperature=")).split("=")[1])
        assert 1 <= temperature <= 8 and found["config"]["loss"]["kd"]["temperature"] == temperature


def test_the_front_is_optunas_and_the_report_draws_it(pareto_search):
    root, cache, sweep, proc = pareto_search
    points = {job.name: (_results(job)["objectives"]["val/seg/miou"], _results(job)["objectives"]["student/params"])
              for job in _jobs(sweep)}
    # Optuna's record of the study: its Pareto solutions, by value
    solutions = OmegaConf.to_container(OmegaConf.load(sweep / "optimization_results.yaml"))["solutions"]
    optuna_front = sorted(tuple(s["values"]) for s in solutions)
    # the front written out by hand: no other trial as good on both and better on one
    by_hand = sorted({p for p in points.values()
                      if not any(q[0] >= p[0] and q[1] <= p[1] and q != p for q in points.values())})
    assert sorted(set(optuna_front)) == by_hand
    assert "Pareto front (val/seg/miou ↑, student/params ↓)" in proc.stdout     # the sweep's summary
    front_jobs = [name for name, p in points.items() if p in by_hand]
    report = run_kdmtl(["report", str(sweep), "plot=true", f"out={root / 'rep' / 'report.md'}"], root, cache)
    assert report.returncode == 0, show(report)
    lines = report.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Pareto front"))
    listed = [line.split()[1] for line in lines[start + 1:] if line.startswith("  job ")]
    assert sorted(listed) == sorted(front_jobs)
    assert f"{len(front_jobs)} of 4 trials" in lines[start]
    png = root / "rep" / "search.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_teacher_is_trained_once_for_all_trials(pareto_search):
    _, cache, sweep, _ = pareto_search
    logs = [(job / "train.log").read_text() for job in _jobs(sweep)]
    assert sum("training it" in log for log in logs) == 1
    assert sum("reusing cached teacher" in log for log in logs) == 3
    assert len([p for p in (cache / "teachers").iterdir() if p.is_dir()]) == 1


def test_a_search_does_not_continue_in_its_directory(pareto_search):
    root, cache, sweep, _ = pareto_search
    before = sorted(p.name for p in sweep.iterdir())
    proc = run_kdmtl([*SEARCH, "hydra.sweeper.n_trials=4", "hydra.sweeper.n_jobs=2",
                      "loss.kd.temperature=interval(1,8)", "student.width=choice(8,16)", *FAST, *TWO,
                      f"hydra.sweep.dir={sweep}"], root, cache)
    assert_one_line_error(proc, "Optuna search", "does not continue", "hydra.sweep.dir")
    assert sorted(p.name for p in sweep.iterdir()) == before


def test_one_objective_defaults_to_the_checkpoint_monitor(tmp_path, shared_cache):
    sweep = tmp_path / "sweep"
    proc = run_kdmtl([*SEARCH, "hydra.sweeper.n_trials=2", "loss.kd.temperature=interval(1,8)", *FAST,
                      f"hydra.sweep.dir={sweep}"], tmp_path, shared_cache, timeout=600)
    assert proc.returncode == 0, show(proc)
    assert "Directions: ['minimize']" in proc.stdout
    values = {job.name: _results(job)["best"]["val/loss/task"] for job in _jobs(sweep)}
    assert all(_results(job)["objectives"] == {"val/loss/task": values[job.name]} for job in _jobs(sweep))
    best = OmegaConf.load(sweep / "optimization_results.yaml")
    assert best.best_value == min(values.values())
    assert "best of 2 trials (val/loss/task ↓):" in proc.stdout


@pytest.mark.parametrize("objectives, words", [
    ("[test/seg/miou]", ["search.objectives", "test/seg/miou", "test metric", "val/seg/miou"]),
    ("[val/seg/nope]", ["search.objectives", "nope", "miou"]),
    ("[val/normals/angle_mean]", ["search.objectives", "no task", "normals"]),
    ("[val/seg/miou,val/seg/miou]", ["search.objectives", "twice"]),
    ("[student/latency]", ["search.objectives", "student/latency_ms"]),
])
def test_bad_objectives_are_refused_before_any_work(tmp_path, objectives, words):
    cache = tmp_path / "cache"
    sweep = tmp_path / "sweep"
    proc = run_kdmtl([*SEARCH, "hydra.sweeper.n_trials=2", "loss.kd.temperature=interval(1,8)",
                      f"search.objectives={objectives}", *FAST, f"hydra.sweep.dir={sweep}"], tmp_path, cache)
    assert_one_line_error(proc, *words)
    assert not cache.exists()                                  # no data generated, no teacher trained
    assert not any(sweep.glob("*/results.json")) and not any(sweep.glob("[0-9]*"))
    single = run_kdmtl(["train", f"search.objectives={objectives}", *FAST], tmp_path, cache)   # a plain run says the same
    assert_one_line_error(single, *words)
    assert not cache.exists()


def test_costs_need_efficiency_and_directions_must_agree(tmp_path):
    cache = tmp_path / "cache"
    proc = run_kdmtl([*SEARCH, "loss.kd.temperature=interval(1,8)", "search.objectives=[student/params]",
                      *FAST], tmp_path, cache)
    assert_one_line_error(proc, "student/params", "log.efficiency=true")
    proc = run_kdmtl([*SEARCH, "loss.kd.temperature=interval(1,8)", "search.objectives=[val/seg/miou]",
                      "hydra.sweeper.direction=minimize", *FAST], tmp_path, cache)
    assert_one_line_error(proc, "hydra.sweeper.direction", "val/seg/miou", "maximize")
    assert not cache.exists()


def test_a_failed_trial_is_named_by_its_own_error(tmp_path, shared_cache):
    """A trial refused by its settings stops the search (the sweeper's default max_failure_rate=0)
    with the trial's own error line, not the sweeper's complaint about its return value."""
    sweep = tmp_path / "sweep"
    proc = run_kdmtl([*SEARCH, "hydra.sweeper.n_trials=1", "hydra.sweeper.n_jobs=1", "optim.lr=choice(-1.0)",
                      *FAST, f"hydra.sweep.dir={sweep}"], tmp_path, shared_cache)
    line = assert_one_line_error(proc, "optim.lr")
    assert "float-castable" not in line
    assert "failed: job 0 optim.lr=-1.0" in proc.stdout        # the sweep's summary lists it


def test_max_failure_rate_keeps_the_search_going(tmp_path, shared_cache):
    """hydra.sweeper.max_failure_rate=1.0: a failed trial is Optuna's FAIL and the search goes on;
    the sweep still ends with exit status 1 and the failed trial's error line."""
    sweep = tmp_path / "sweep"
    proc = run_kdmtl([*SEARCH, "hydra.sweeper.n_trials=3", "hydra.sweeper.n_jobs=1",
                      "hydra.sweeper.max_failure_rate=1.0", "optim.lr=choice(-1.0,0.001)", *FAST,
                      f"hydra.sweep.dir={sweep}"], tmp_path, shared_cache, timeout=600)
    assert_one_line_error(proc, "optim.lr must be > 0")
    finished = [job for job in _jobs(sweep) if (job / "results.json").is_file()]
    failed = [job for job in _jobs(sweep) if job not in finished]
    assert len(_jobs(sweep)) == 3 and finished and failed       # sampler seed 0: both values drawn
    assert all(_results(job)["config"]["optim"]["lr"] == 0.001 for job in finished)
    best = OmegaConf.load(sweep / "optimization_results.yaml")
    assert best.best_params["optim.lr"] == 0.001
    assert best.best_value == min(_results(job)["objectives"]["val/loss/task"] for job in finished)
    assert all(f"failed: job {job.name} optim.lr=-1.0: error: optim.lr must be > 0" in proc.stdout for job in failed)


def test_front_matches_optuna_on_random_points():
    """report/pareto.front against Optuna's best_trials on random 2- and 3-objective studies,
    with ties and mixed directions."""
    from kdmtl_cli.report.pareto import front

    rng = random.Random(0)
    for case in range(30):
        k = 2 + case % 2
        maximize = [rng.random() < 0.5 for _ in range(k)]
        points = [tuple(float(rng.randint(0, 6)) for _ in range(k)) for _ in range(rng.randint(1, 25))]
        study = optuna.create_study(directions=["maximize" if m else "minimize" for m in maximize])
        for p in points:
            study.add_trial(optuna.trial.create_trial(values=list(p)))
        theirs = sorted(t.number for t in study.best_trials)
        assert sorted(front(points, maximize)) == theirs, (points, maximize)


def test_a_missing_sweeper_names_the_extra():
    from hydra.errors import MissingConfigException

    from kdmtl_cli.cli import _format_error
    from kdmtl_cli.schema import TrainConfig

    err = MissingConfigException("In 'hydra/config': Could not find 'hydra/sweeper/optuna'\n"
                                 "Available options in 'hydra/sweeper':\n\tbasic", missing_cfg_file="optuna")
    line = _format_error(err, TrainConfig)
    assert "pip install 'kdmtl[optuna]'" in line and "\n" not in line


@pytest.mark.slow
def test_parallel_trials_through_joblib_share_one_teacher(tmp_path):
    """hydra/launcher=joblib runs a batch of hydra.sweeper.n_jobs trials at once: the first to
    need the teacher trains it under the cache's lock, the other waits and reuses it."""
    cache, sweep = tmp_path / "cache", tmp_path / "sweep"
    proc = run_kdmtl([*SEARCH, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "hydra.sweeper.n_jobs=2",
                      "hydra.sweeper.n_trials=2", "loss.kd.temperature=interval(1,8)", *FAST,
                      f"hydra.sweep.dir={sweep}"], tmp_path, cache, timeout=600)
    assert proc.returncode == 0, show(proc)
    logs = [(job / "train.log").read_text() for job in _jobs(sweep)]
    assert len(logs) == 2
    assert sum("training it" in log for log in logs) == 1
    assert len([p for p in (cache / "teachers").iterdir() if p.is_dir()]) == 1
    assert all((job / "results.json").is_file() for job in _jobs(sweep))
