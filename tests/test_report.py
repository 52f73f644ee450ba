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
    _run(tmp_path / "runs", "a", "kd", 0, 0.5, 0.5, 0.5)
    _run(tmp_path / "runs", "b", "none", 0, 0.4, 0.4, 0.4)
    wrong = subprocess.run([sys.executable, "-m", "kdmtl_cli", "report", str(tmp_path / "runs"), "reference=nope"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert_one_line_error(wrong, "reference=nope is not a group")
    assert wrong.stdout == "" and not (tmp_path / "runs" / "report.md").exists()   # refused before any output


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


# ---- the terminal table: metrics as rows, groups as columns, fitted to the terminal's width --------

MTL_TASKS = {"cls": {"kind": "classification"}, "seg": {"kind": "segmentation"}, "depth": {"kind": "depth"}}
METRICS = {"test/cls/accuracy": "cls/accuracy ↑", "test/seg/miou": "seg/miou ↑",
           "test/depth/abs_err": "depth/abs_err ↓", "test/delta_m/maninis": "Δm% maninis ↑"}
# group override -> (its loss methods, weighting, test metrics of seed 0; seed s adds 0.01 * s * (s + 1))
GROUPS = {"loss=[kd,fitnet]": (["kd", "fitnet"], "equal", 0.61), "loss=none": ([], "equal", 0.42),
          "weighting=pcgrad": (["kd", "fitnet"], "pcgrad", 0.55), "loss=kd": (["kd"], "equal", 0.58)}
TEACHER = {"test/cls/accuracy": 0.7712, "test/seg/miou": 0.5523, "test/depth/abs_err": 0.8611}


def _mtl_values(base: float, seed: int) -> dict:
    shift = 0.01 * seed * (seed + 1)
    return {"test/cls/accuracy": base + shift, "test/seg/miou": base / 2 + shift,
            "test/depth/abs_err": 2 - base - shift, "test/delta_m/maninis": 10 * (base - 0.5) + shift * 100}


def _mtl_run(root, name, group, seed, teacher=TEACHER, source="cache/teachers/a1/teacher.safetensors", published=()):
    methods, weighting, base = GROUPS[group]
    run = root / name
    run.mkdir(parents=True)
    config = {"seed": seed, "tasks": MTL_TASKS, "loss": {"task_weight": 1.0, **{m: {"weight": 1.0} for m in methods}},
              "weighting": {"name": weighting}, "log": {"progress": "plain"}, "published": list(published)}
    results = {**_mtl_values(base, seed), "test/task/cls": 1.0}
    if methods:
        results.update({f"teacher/{k}": v for k, v in teacher.items()})
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    (run / "results.json").write_text(json.dumps({
        "config": config, "results": results, "overrides": ["debug=fast", group, f"seed={seed}"],
        "best": {"epoch": 1, "val/cls/accuracy": 0.1}, "last": {"epoch": 1, "val/cls/accuracy": 0.1},
        "teacher": {"source": source} if methods else {}}))


def _expected(group: str, key: str, decimals: int, seeds=(0, 1, 2)) -> str:
    import statistics

    values = [_mtl_values(GROUPS[group][2], s)[key] for s in seeds]
    mean, std = statistics.fmean(values), statistics.stdev(values)
    if key.endswith("maninis"):
        return f"{mean:+.2f} ± {std:.2f}"
    return f"{mean:.{decimals}f} ± {std:.{decimals}f}"


def _report_at(width: int, *args) -> str:
    import os

    env = {**os.environ, "COLUMNS": str(width)}
    proc = subprocess.run([sys.executable, "-m", "kdmtl_cli", "report", *map(str, args)], capture_output=True,
                          text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _rows_of(out: str, label: str) -> str:
    """Every table line of the row `label` (one per folded table), joined."""
    return " ".join(line for line in out.splitlines() if line.startswith(f"│ {label} "))


@pytest.fixture(scope="module")
def four_groups(tmp_path_factory):
    sweep = tmp_path_factory.mktemp("report") / "multirun"
    for g, group in enumerate(GROUPS):
        for seed in (0, 1, 2):
            _mtl_run(sweep, f"{g}{seed}", group, seed)
    return sweep


@pytest.mark.parametrize("width", [60, 100, 160])
def test_terminal_table_fits_the_width_with_every_group_and_the_teacher_once(four_groups, width):
    from rich.cells import cell_len

    out = _report_at(width, four_groups)
    assert max(cell_len(line) for line in out.splitlines()) <= width, out
    tables = sum(line.startswith("┏") for line in out.splitlines())
    assert tables == 1 if width >= 100 else tables > 1, out        # four groups fit 100 columns
    decimals = 4 if _expected("loss=none", "test/cls/accuracy", 4) in out else 3   # 3 if only that makes one table
    assert decimals == 4 or width == 100, out
    for key, label in METRICS.items():
        row = _rows_of(out, label)
        for group in GROUPS:
            assert _expected(group, key, decimals) in row, f"{group} {label}:\n{out}"
    # the teacher: one column, its numbers once (three distilling groups share it), no std (one teacher)
    headers = [line for line in out.splitlines() if line.startswith("┃")]
    assert sum(line.count("teacher") for line in headers) == 1, out
    assert out.count(f"{TEACHER['test/cls/accuracy']:.{decimals}f}") == 1, out
    assert "n=3" in out and "published" not in out and "val" not in " ".join(headers)
    for piece in ("loss=", "[kd,fitnet]", "loss=none", "weighting=", "pcgrad", "loss=kd"):   # labels as typed
        assert piece in " ".join(headers), out
    # the files keep a row per group x metric (the teacher's in each distilling group), labelled by settings
    rows = list(csv.DictReader((four_groups / "report.csv").open()))
    assert len(rows) == 4 * 4 + 3 * 3 and all("weighting.name=" in r["group"] for r in rows)
    assert sum(r["metric"].startswith("teacher/") for r in rows) == 3 * 3


def test_terminal_table_published_rows_and_different_teachers(tmp_path):
    import io

    from rich.cells import cell_len
    from rich.console import Console

    from kdmtl_cli.report import table
    from kdmtl_cli.report.runs import find_runs, group_runs

    published = [{"model": "student", "metric": "test/cls/accuracy", "value": 0.5, "epoch": "last", "source": "Paper"},
                 {"model": "teacher", "metric": "test/cls/accuracy", "value": 0.8, "epoch": "last", "source": "Paper"}]
    other_teacher = {k: v - 0.1 for k, v in TEACHER.items()}
    for seed in (0, 1, 2):
        _mtl_run(tmp_path, f"a{seed}", "loss=kd", seed, published=published)
        _mtl_run(tmp_path, f"b{seed}", "loss=[kd,fitnet]", seed, teacher=other_teacher, source="other/teacher.pt",
                 published=published)
        _mtl_run(tmp_path, f"c{seed}", "loss=none", seed)
    runs, unfinished = find_runs([tmp_path])
    groups = group_runs(runs)
    buffer = io.StringIO()
    table.print_rich(groups, unfinished, "report", console=Console(file=buffer, width=100, color_system=None))
    out = buffer.getvalue()
    assert max(cell_len(line) for line in out.splitlines()) <= 100, out
    assert "teacher 1" in out and "teacher 2" in out and "different teachers" in out
    assert "teacher 1 for loss=kd; teacher 2 for loss=[kd,fitnet]" in " ".join(out.split()), out
    # published and Δ rows under cls/accuracy only: each distilling group's own, the teachers' own
    published_row, delta_row = _rows_of(out, "  published").split(), _rows_of(out, "  Δ vs published").split()
    assert published_row.count("0.5000") == 2 and published_row.count("0.8000") == 2, out
    kd_mean = sum(_mtl_values(GROUPS["loss=kd"][2], s)["test/cls/accuracy"] for s in (0, 1, 2)) / 3
    assert f"{kd_mean - 0.5:+.4f}" in delta_row and f"{TEACHER['test/cls/accuracy'] - 0.8:+.4f}" in delta_row, out
    assert f"{other_teacher['test/cls/accuracy'] - 0.8:+.4f}" in delta_row, out
    tables = sum(line.startswith("┏") for line in out.splitlines())
    assert out.count("published") == 2 * tables + 1, out      # the two rows of each table, and the source note
    assert "published: Paper (last epoch)" in out
