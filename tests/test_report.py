"""`kdmtl report` on a fabricated multirun directory with known metrics: grouping by everything
but the seed, mean ± sample std by hand, Δm passed through, the published number and the
difference, unfinished runs listed, Markdown and CSV written."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys

import pytest
import yaml

from conftest import assert_one_line_error

TASKS = {"cls": {"kind": "classification"}}
PUBLISHED = [{"model": "student", "metric": "test/cls/accuracy", "value": 0.5, "epoch": "last", "source": "Paper"}]


def _run(root, name, loss, seed, acc, val_best, val_last, delta=None):
    run = root / name
    run.mkdir(parents=True)
    kd = {"weight": 0.5} if loss == "kd" else None
    config = {"seed": seed, "tasks": TASKS, "loss": {"task_weight": 1.0, "kd": kd},
              "weighting": {"name": "equal"}, "log": {"progress": "plain"}, "published": PUBLISHED}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    results = {"test/cls/accuracy": acc, "test/task/cls": 1.0, "teacher/test/cls/accuracy": 0.9,
               "student/params": 1e5, "student/latency_ms": 1.0, "teacher/params": 8e5, "teacher/latency_ms": 3.0}
    epochs = [{"type": "epoch", "epoch": e, "train/loss/total": 2.0 / e, "train/task/cls": 1.0 / e,
               "val/cls/accuracy": acc * e / 2} for e in (1, 2)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in epochs))
    if delta is not None:
        results["test/delta_m/maninis"] = delta
    (run / "results.json").write_text(json.dumps({
        "config": config, "results": results, "overrides": [f"seed={seed}"],
        "best": {"epoch": 3, "val/cls/accuracy": val_best}, "last": {"epoch": 4, "val/cls/accuracy": val_last}}))


def test_report_groups_by_setting_and_computes_mean_std_published(tmp_path):
    sweep = tmp_path / "multirun"
    for i, (acc, vb, vl, dm) in enumerate([(0.40, 0.41, 0.39, 1.0), (0.50, 0.52, 0.50, 2.0), (0.60, 0.61, 0.58, 6.0)]):
        _run(sweep, f"kd/{i}", "kd", i, acc, vb, vl, dm)           # nested one level deeper
    for i, acc in enumerate([0.30, 0.34]):
        _run(sweep, f"vanilla/{i}", "none", i, acc, acc, acc)
    (sweep / "crashed").mkdir()
    (sweep / "crashed" / "config.yaml").write_text("seed: 9\n")
    (sweep / "stopped").mkdir()
    (sweep / "stopped" / "config.yaml").write_text("seed: 8\n")
    (sweep / "stopped" / "PREEMPTED").write_text("{}")
    proc = subprocess.run([sys.executable, "-m", "kdmtl_cli", "report", str(sweep), "group_by=[loss]"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader((sweep / "report.csv").open()))
    kd = {r["metric"]: r for r in rows if r["group"] == "kd"}
    acc = kd["test/cls/accuracy ↑"]
    assert acc["seeds"] == "0,1,2" and acc["n"] == "3"
    assert math.isclose(float(acc["test mean"]), 0.5)
    assert math.isclose(float(acc["test std"]), 0.1)                  # sqrt(((-.1)^2 + 0 + .1^2) / 2)
    assert math.isclose(float(acc["val best mean"]), (0.41 + 0.52 + 0.61) / 3)
    assert math.isclose(float(acc["val last mean"]), (0.39 + 0.50 + 0.58) / 3)
    assert math.isclose(float(acc["published"]), 0.5) and math.isclose(float(acc["Δ vs published"]), 0.0, abs_tol=1e-12)
    dm = kd["test/delta_m/maninis ↑"]
    assert math.isclose(float(dm["test mean"]), 3.0) and math.isclose(float(dm["test std"]), math.sqrt(7.0))
    vanilla = {r["metric"]: r for r in rows if r["group"] == "none"}["test/cls/accuracy ↑"]
    assert math.isclose(float(vanilla["test mean"]), 0.32) and math.isclose(float(vanilla["Δ vs published"]), -0.18)
    assert math.isclose(float(vanilla["test std"]), math.sqrt(0.0008))
    assert any(r["metric"].startswith("teacher/test/cls/accuracy") for r in rows)
    markdown = (sweep / "report.md").read_text()
    assert "Unfinished runs (2)" in markdown and "crashed before its first checkpoint" in markdown
    assert "preempted" in markdown and "| kd | 0,1,2 | 3 |" in markdown
    # without group_by the label names the settings that differ: the loss node
    subprocess.run([sys.executable, "-m", "kdmtl_cli", "report", str(sweep), f"out={tmp_path / 'r.md'}"],
                   cwd=tmp_path, capture_output=True, text=True, timeout=120, check=True)
    groups = {r["group"] for r in csv.DictReader((tmp_path / "r.csv").open())}
    assert len(groups) == 2 and all("loss.kd" in g for g in groups)


def test_report_bad_inputs_are_one_line_errors(tmp_path):
    missing = subprocess.run([sys.executable, "-m", "kdmtl_cli", "report", str(tmp_path / "nope")],
                             cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert_one_line_error(missing, "no such run directory")
    bad = subprocess.run([sys.executable, "-m", "kdmtl_cli", "report", str(tmp_path), "colour=red"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert_one_line_error(bad, "unknown report option 'colour'")


def test_report_plots_are_png_files(tmp_path):
    pytest.importorskip("matplotlib")
    from PIL import Image

    sweep = tmp_path / "multirun"
    for i, acc in enumerate([0.4, 0.5]):
        _run(sweep, f"kd/{i}", "kd", i, acc, acc, acc)
        _run(sweep, f"vanilla/{i}", "none", i, acc - 0.1, acc, acc)
    proc = subprocess.run([sys.executable, "-m", "kdmtl_cli", "report", str(sweep), "group_by=[loss]", "plot=true"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for name in ("tradeoff_test_cls_accuracy.png", "curves.png", "curves_loss_terms.png"):
        with Image.open(sweep / name) as image:
            assert image.format == "PNG" and image.width > 300


def test_unfinished_and_never_started_jobs_are_listed(tmp_path):
    """A stopped sweep: job 0 preempted, job 1 never started (Hydra made its directory and
    .hydra/, the job returned at once); a resumed run's .hydra/resume-* record is not a job."""
    from kdmtl_cli.report.runs import find_runs

    sweep = tmp_path / "sweep"
    (sweep / "0" / ".hydra" / "resume-20261201").mkdir(parents=True)
    (sweep / "0" / "config.yaml").write_text("seed: 0\n")
    (sweep / "0" / "PREEMPTED").write_text("{}")
    (sweep / "1" / ".hydra").mkdir(parents=True)
    (sweep / "1" / ".hydra" / "config.yaml").write_text("seed: 1\n")
    runs, unfinished = find_runs([sweep])
    assert runs == []
    assert [(d.name, why.split(" ")[0]) for d, why in unfinished] == [("0", "preempted"), ("1", "never")]
