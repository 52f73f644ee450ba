"""`kdmtl report DIR plot=true` on real runs (the CLI: two KD students of seeds 0 and 1, a vanilla
student, two epochs each): curves.png has one panel per task with that task's headline validation
metric and one task-loss panel, never a total objective (a KD student's objective and a vanilla
student's are different sums); curves_loss_terms.png has one panel per group with its objective
and its own terms. The figures are inspected through matplotlib (each line's gid is the
metrics.jsonl key it draws)."""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import FAST, WORKERS, run_kdmtl, show

pytest.importorskip("matplotlib")

RUNS = {"kd-0": ["seed=0"], "kd-1": ["seed=1"], "vanilla-0": ["seed=0", "loss=none"]}
HEADLINE = {"cls": ("val/cls/accuracy", "↑"), "seg": ("val/seg/miou", "↑"), "depth": ("val/depth/abs_err", "↓")}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, shared_cache):
    root = tmp_path_factory.mktemp("plots")
    with ThreadPoolExecutor(WORKERS) as pool:
        procs = dict(zip(RUNS, pool.map(lambda name: run_kdmtl(
            ["train", *FAST, "optim.epochs=2", *RUNS[name], f"hydra.run.dir={root / 'sweep' / name}"],
            root, shared_cache), RUNS)))
    for proc in procs.values():
        assert proc.returncode == 0, show(proc)
    return root / "sweep"


@pytest.fixture(scope="module")
def groups(sweep):
    from kdmtl_cli.report.runs import find_runs, group_runs

    runs, unfinished = find_runs([sweep])
    assert len(runs) == 3 and not unfinished
    return group_runs(runs, ["loss"])


def _lines(ax):
    return [line for line in ax.get_lines() if line.get_gid()]


def _bands(ax):
    return [c for c in ax.collections if c.get_gid()]


def _panels(fig):
    """{task name, or "task" for the task-loss panel: the panel}, titles read "seg (segmentation): ..."."""
    return {ax.get_title().split(":")[0].split(" ")[0]: ax for ax in fig.axes if ax.get_visible()}


def test_report_plot_writes_the_curves(sweep):
    from PIL import Image

    proc = subprocess.run([sys.executable, "-m", "kdmtl_cli", "report", str(sweep), "group_by=[loss]", "plot=true"],
                          cwd=sweep, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    for name in ("curves.png", "curves_loss_terms.png", "tradeoff_test_seg_miou.png"):
        with Image.open(sweep / name) as image:
            assert image.format == "PNG" and image.width >= 600


def test_curves_have_a_panel_per_task_and_the_task_loss(groups):
    from kdmtl_cli.report.plots import curves_figure

    fig = curves_figure(groups)
    panels = _panels(fig)
    assert list(panels) == ["cls", "seg", "depth", "task"]          # config order, then the task loss
    labels = {g.label for g in groups}
    assert labels == {"fitnet+kd", "none"}
    for task, (key, arrow) in HEADLINE.items():
        ax = panels[task]
        assert [line.get_gid() for line in _lines(ax)] == [key, key]      # one curve per group
        assert ax.get_ylabel().endswith(arrow) and ax.get_xlabel() == "epoch"
        assert "validation" in ax.get_title()
        assert len(_bands(ax)) == 1                                     # ±std: the KD group has 2 seeds, vanilla 1
        assert all(list(line.get_xdata()) == [1, 2] for line in _lines(ax))
    loss = panels["task"]
    assert sorted(line.get_gid() for line in _lines(loss)) == sorted(["val/loss/task", "train/loss/task"] * 2)
    assert loss.get_ylabel() == "task loss ↓"
    drawn = {a.get_gid() for ax in fig.axes for a in [*_lines(ax), *_bands(ax)]}
    assert not any(gid == "train/loss/total" or gid.split("/")[1] in ("kd", "fitnet") for gid in drawn)
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["fitnet+kd (n=2)", "none (n=1)"]


def test_loss_terms_are_drawn_per_group_with_their_objective(groups):
    from kdmtl_cli.report.plots import loss_terms_figure

    fig = loss_terms_figure(groups)
    by_group = {ax.get_title().split(" (")[0]: {line.get_gid() for line in _lines(ax)}
                for ax in fig.axes if ax.get_visible()}
    tasks = {f"train/task/{t}" for t in HEADLINE}
    assert by_group["fitnet+kd"] == {"train/loss/total", *tasks, *{f"train/kd/{t}" for t in HEADLINE},
                                     "train/fitnet/trunk.stages.1"}
    assert by_group["none"] == {"train/loss/total", *tasks}            # a vanilla student has no KD terms
