"""`kdmtl report` shows its evidence over seeds: a fabricated 5-seed KD-against-vanilla set (same
seeds 0..4, results.json in the format kdmtl train writes), reported through the real CLI with
`reference=loss:none`. Every number in report.csv and in the terminal table is recomputed here by
hand in float64 -- the t interval, Welch's t and its Welch–Satterthwaite df, the paired t, Holm's
adjustment, the seeds needed for 80% power (a plain loop over n with scipy's noncentral t) -- and
the bootstrap interval by calling scipy.stats.bootstrap directly. Also: the Δm interval, the
reproduction check against a published number (inside / outside the CI, the difference in seed
std, which epoch the runs and the paper took, `mean_lastN` against the runs' test_mean_lastN
values) and `reference=` values that name no group or several (one error line, nothing written)."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml
from scipy import stats as sps

from conftest import assert_one_line_error

SEEDS = [0, 1, 2, 3, 4]
TASKS = {"cls": {"kind": "classification", "target": None, "auxiliary": False},
         "seg": {"kind": "segmentation", "target": None, "auxiliary": False},
         "depth": {"kind": "depth", "target": None, "auxiliary": False}}
# test metric -> group -> value per seed (0..4): KD clearly better on accuracy (every seed), no
# evidence on mIoU, worse on depth error (lower is better)
VALUES = {
    "test/cls/accuracy": {"kd": [0.612, 0.634, 0.598, 0.641, 0.620], "vanilla": [0.571, 0.590, 0.566, 0.602, 0.575]},
    "test/seg/miou": {"kd": [0.402, 0.391, 0.415, 0.388, 0.409], "vanilla": [0.398, 0.405, 0.389, 0.401, 0.394]},
    "test/depth/abs_err": {"kd": [0.951, 0.968, 0.957, 0.979, 0.944], "vanilla": [0.902, 0.915, 0.931, 0.920, 0.905]},
    "test/delta_m/maninis": {"kd": [2.1, 3.4, 1.2, 4.0, 2.7], "vanilla": [-1.0, 0.3, -0.4, 0.8, -0.2]},
}
TEACHER = {"teacher/test/cls/accuracy": 0.734, "teacher/test/seg/miou": 0.574, "teacher/test/depth/abs_err": 0.848}
LOSSES = {"kd": {"kd": {"weight": 0.5, "temperature": 4.0, "dense": "l1"},
                 "fitnet": {"weight": 100.0, "student": ["trunk.stages.1"], "teacher": ["trunk.stages.1"],
                            "regressor": "convreg"}},
          "vanilla": {"kd": None, "fitnet": None},
          "kd_only": {"kd": {"weight": 0.5, "temperature": 4.0, "dense": "l1"}, "fitnet": None}}
OVERRIDE = {"kd": "loss=[kd,fitnet]", "vanilla": "loss=none", "kd_only": "loss=kd"}
# the paper: accuracy at its last epoch (0.62: inside KD's interval, outside vanilla's), mIoU at
# its best epoch (0.45: outside both)
PUBLISHED = [{"model": "student", "metric": "test/cls/accuracy", "value": 0.62, "epoch": "last", "source": "Paper A"},
             {"model": "student", "metric": "test/seg/miou", "value": 0.45, "epoch": "best", "source": "Paper A"}]
EPOCHS, BEST_EPOCH = 6, {0: 6, 1: 6, 2: 5, 3: 4, 4: 5}      # the best epoch was the last in 2 of 5 runs


def _config(group: str, seed: int, monitor: str = "val/loss/task", published=PUBLISHED) -> dict:
    return {"seed": seed, "cache_dir": "cache", "resume": None,
            "data": {"name": "shapes", "root": "cache/data", "image_size": 32, "val_size": 1000, "seed": 0},
            "tasks": TASKS,
            "teacher": {"arch": "convnet", "checkpoint": None, "checkpoints": {}, "keep": "best"},
            "student": {"arch": "convnet", "width": 16},
            "loss": {"task_weight": 1.0, "at": None, **LOSSES[group]},
            "weighting": {"name": "equal"}, "optim": {"name": "adam", "lr": 0.003, "epochs": EPOCHS},
            "checkpoint": {"monitor": monitor, "mode": "auto"},
            "test": {"average_last_epochs": 0, "metric_reduction": "split"},
            "log": {"progress": "plain"}, "published": list(published)}


def write_run(root, group: str, seed: int, values: dict, monitor: str = "val/loss/task", published=PUBLISHED):
    """A finished run directory as kdmtl train leaves it (config.yaml, results.json)."""
    run = root / f"{group}-{seed}"
    run.mkdir(parents=True)
    config = _config(group, seed, monitor, published)
    best_epoch = EPOCHS if monitor == "last" else BEST_EPOCH[seed]
    val = {"val/loss/task": 2.5, "val/cls/accuracy": 0.5, "val/seg/miou": 0.4, "val/depth/abs_err": 0.9}
    results = {"type": "final", "epoch": EPOCHS, "best_epoch": best_epoch, "monitor": monitor, "best_value": 2.5,
               **val, **values, "test/task/cls": 1.0, "test/loss/task": 2.5, "student/params": 86010,
               "student/latency_ms": 1.3, "wall_time_s": 100.0}
    if LOSSES[group]["kd"]:
        results.update({**TEACHER, "teacher/params": 728938, "teacher/latency_ms": 2.6})
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    (run / "results.json").write_text(json.dumps({
        "config": config, "overrides": ["log.progress=plain", OVERRIDE[group], f"seed={seed}"], "results": results,
        "best": {"epoch": best_epoch, **val}, "last": {"epoch": EPOCHS, **val},
        "teacher": {"source": "cache/teachers/7b8c/teacher.safetensors", "cached": True} if LOSSES[group]["kd"] else {}}))


def report(*args, columns: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": str(columns)}
    return subprocess.run([sys.executable, "-m", "kdmtl_cli", "report", *map(str, args)], capture_output=True,
                          text=True, timeout=120, env=env)


# ---- the statistics, written out -------------------------------------------------------------------

def mean(xs):
    return sum(xs) / len(xs)


def sd(xs):
    m = mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def t_interval(xs):
    half = sps.t.ppf(0.975, len(xs) - 1) * sd(xs) / math.sqrt(len(xs))
    return mean(xs) - half, mean(xs) + half


def bootstrap(xs):
    result = sps.bootstrap((np.asarray(xs, dtype=np.float64),), np.mean, confidence_level=0.95, n_resamples=9999,
                           method="BCa", random_state=np.random.default_rng(0))
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def welch_p(a, b):
    va, vb, na, nb = sd(a) ** 2, sd(b) ** 2, len(a), len(b)
    t = (mean(a) - mean(b)) / math.sqrt(va / na + vb / nb)
    df = (va / na + vb / nb) ** 2 / ((va / na) ** 2 / (na - 1) + (vb / nb) ** 2 / (nb - 1))   # Welch–Satterthwaite
    return 2 * sps.t.sf(abs(t), df)


def paired_p(a, b):
    d = [x - y for x, y in zip(a, b, strict=True)]
    t = mean(d) / (sd(d) / math.sqrt(len(d)))
    return 2 * sps.t.sf(abs(t), len(d) - 1)


def holm(ps):
    """Sorted ascending p_(1..m): adjusted p_(i) = max_{j<=i} min(1, (m - j + 1) p_(j)), back in input order."""
    order = sorted(range(len(ps)), key=lambda i: ps[i])
    out, running = [0.0] * len(ps), 0.0
    for j, i in enumerate(order):
        running = max(running, min(1.0, (len(ps) - j) * ps[i]))
        out[i] = running
    return out


def seeds_needed(a, b):
    pooled = math.sqrt(((len(a) - 1) * sd(a) ** 2 + (len(b) - 1) * sd(b) ** 2) / (len(a) + len(b) - 2))
    d = abs(mean(a) - mean(b)) / pooled
    n = 2
    while True:
        df = 2 * n - 2
        critical, noncentrality = sps.t.ppf(0.975, df), d * math.sqrt(n / 2)
        power = sps.nct.sf(critical, df, noncentrality) + sps.nct.cdf(-critical, df, noncentrality)
        if power >= 0.8:
            return n
        n += 1


def test_the_written_out_power_loop_matches_the_tables():
    assert seeds_needed([0, 1, 2], [1, 2, 3]) == 17          # d = 1, two-sample t, α 0.05, power 0.8


# ---- the two groups through the CLI ----------------------------------------------------------------

def _table_rows(out: str) -> dict:
    """The terminal table as {(metric, row label): [cell per column]} (sub-rows under their metric)."""
    found, metric = {}, None
    for line in out.splitlines():
        if not line.startswith("│"):
            continue
        cells = [c.strip() for c in line.strip("│").split("│")]
        label = line.split("│")[1]
        if not label.startswith("   "):        # "│ cls/accuracy ↑ │": a metric; "│   95% CI │": under it
            metric = cells[0]
        found[(metric, cells[0])] = cells[1:]
    return found


def _headers(out: str) -> list:
    """Each column's header text (its lines joined), the metric column first."""
    lines = [line.strip("┃").split("┃") for line in out.splitlines() if line.startswith("┃")]
    return [" ".join(parts[i].strip() for parts in lines).strip() for i in range(len(lines[0]))]


@pytest.fixture(scope="module")
def two_groups(tmp_path_factory):
    root = tmp_path_factory.mktemp("evidence") / "runs"
    for group in ("kd", "vanilla"):
        for i, seed in enumerate(SEEDS):
            write_run(root, group, seed, {k: v[group][i] for k, v in VALUES.items()})
    proc = report(root, "reference=loss:none")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "", proc.stderr            # no warnings either
    rows = {(r["group"], r["metric"]): r for r in csv.DictReader((root / "report.csv").open())}
    return root, proc.stdout, rows


def _kd_label(rows) -> str:
    (label,) = {g for g, _ in rows if "loss.kd.weight=0.5" in g}
    return label


def test_report_csv_holds_the_hand_computed_evidence(two_groups):
    _, _, rows = two_groups
    kd = _kd_label(rows)
    (vanilla,) = {g for g, _ in rows} - {kd}
    for metric, by_group in VALUES.items():
        arrow = "↓" if metric.endswith("abs_err") else "↑"
        a, b = by_group["kd"], by_group["vanilla"]
        for label, xs in ((kd, a), (vanilla, b)):
            row = rows[(label, f"{metric} {arrow}")]
            assert (float(row["CI95 low"]), float(row["CI95 high"])) == pytest.approx(bootstrap(xs), abs=1e-12)
            assert row["CI method"] == "BCa"
            assert (float(row["t CI95 low"]), float(row["t CI95 high"])) == pytest.approx(t_interval(xs), abs=1e-12)
            assert row["reference"] == vanilla           # reference=loss:none resolved to the vanilla group
        row = rows[(kd, f"{metric} {arrow}")]
        assert float(row["Δ vs reference"]) == pytest.approx(mean(a) - mean(b), abs=1e-12)
        assert float(row["Welch p"]) == pytest.approx(welch_p(a, b), rel=1e-9)
        assert float(row["paired p"]) == pytest.approx(paired_p(a, b), rel=1e-9)
        assert float(row["Holm p"]) == pytest.approx(holm([paired_p(a, b)])[0], rel=1e-9)   # one comparison
        assert int(row["seeds needed"]) == seeds_needed(a, b)
        assert rows[(vanilla, f"{metric} {arrow}")]["Holm p"] == ""
    verdicts = {m.split("/")[1]: rows[(kd, m)]["evidence"] for g, m in rows if g == kd and not m.startswith("teacher")}
    assert verdicts == {"cls": "better", "seg": "no evidence", "depth": "worse", "delta_m": "better"}


def test_terminal_shows_markers_and_the_evidence_rows(two_groups):
    from rich.cells import cell_len

    root, out, rows = two_groups
    assert max(cell_len(line) for line in out.splitlines()) <= 120, out
    assert sum(line.startswith("┏") for line in out.splitlines()) == 1, out
    headers = _headers(out)
    assert headers[1:] == ["loss=[kd,fitnet] n=5", "loss=none (reference) n=5", "teacher n=5"], out
    table = _table_rows(out)
    for metric, by_group in VALUES.items():
        name = metric.split("/", 1)[1]
        shown = "Δm% maninis ↑" if "delta_m" in metric else f"{name} {'↓' if name.endswith('abs_err') else '↑'}"
        a, b = by_group["kd"], by_group["vanilla"]
        digits, sign = (2, "+") if "delta_m" in metric else (4, "")
        kd_value, vanilla_value = table[(shown, shown)][:2]
        marker = {"cls": "▲", "seg": "=", "depth": "▼", "delta_m": "▲"}[metric.split("/")[1]]
        assert kd_value == f"{mean(a):{sign}.{digits}f} ± {sd(a):.{digits}f} {marker}", out
        assert vanilla_value == f"{mean(b):{sign}.{digits}f} ± {sd(b):.{digits}f}", out   # the reference: no marker
        for xs, cell in zip((a, b), table[(shown, "95% CI")][:2], strict=True):
            low, high = bootstrap(xs)
            assert cell == f"[{low:{sign}.{digits}f}, {high:{sign}.{digits}f}]", out
        assert table[(shown, "Holm p vs ref")][:2] == [f"{holm([paired_p(a, b)])[0]:.3g}", ""], out
        assert table[(shown, "seeds needed")][:2] == [str(seeds_needed(a, b)), ""], out
    # the teacher: its value and the CI row only (one teacher for all runs: no interval to show)
    assert table[("cls/accuracy ↑", "cls/accuracy ↑")][2] == "0.7340"
    assert table[("cls/accuracy ↑", "95% CI")][2] == "–"
    assert table[("cls/accuracy ↑", "Holm p vs ref")][2] == table[("cls/accuracy ↑", "seeds needed")][2] == ""
    text = " ".join(out.split())
    assert ("▲ better than, ▼ worse than, = no evidence against the reference loss=none: the paired t-test "
            "on the same seeds, Holm-adjusted p < 0.05 (Holm over the groups compared on each metric)") in text, out
    print(out)          # the excerpt quoted in the README


def test_reproduction_check_in_the_files_and_the_terminal(two_groups):
    root, out, rows = two_groups
    kd = _kd_label(rows)
    (vanilla,) = {g for g, _ in rows} - {kd}
    table = _table_rows(out)
    for label, group, column in ((kd, "kd", 0), (vanilla, "vanilla", 1)):
        for pub in PUBLISHED:
            xs = VALUES[pub["metric"]][group]
            row = rows[(label, pub["metric"] + " ↑")]
            low, high = bootstrap(xs)
            inside = low <= pub["value"] <= high
            in_std = (mean(xs) - pub["value"]) / sd(xs)
            assert row["published in CI95"] == ("yes" if inside else "no")
            assert float(row["Δ vs published / std"]) == pytest.approx(in_std, rel=1e-9)
            shown = pub["metric"].split("/", 1)[1] + " ↑"
            expected = f"{mean(xs) - pub['value']:+.4f} ({in_std:+.1f} std, {'inside' if inside else 'outside'})"
            assert table[(shown, "Δ vs published")][column] == expected, out
    # 0.62 lies inside the KD runs' interval, outside the vanilla runs'; 0.45 outside both
    assert rows[(kd, "test/cls/accuracy ↑")]["published in CI95"] == "yes"
    assert rows[(vanilla, "test/cls/accuracy ↑")]["published in CI95"] == "no"
    assert {rows[(g, "test/seg/miou ↑")]["published in CI95"] for g in (kd, vanilla)} == {"no"}
    # the runs chose their checkpoint on validation; the paper's accuracy is its last epoch's
    differs = "runs: best epoch by val/loss/task; paper: last epoch (the best was the last epoch in 2 of 5 runs)"
    assert rows[(kd, "test/cls/accuracy ↑")]["epoch choice"] == differs
    assert rows[(kd, "test/seg/miou ↑")]["epoch choice"] == "same as paper: best epoch (runs: best epoch by val/loss/task)"
    assert rows[(kd, "test/depth/abs_err ↓")]["epoch choice"] == ""
    text = " ".join(out.split())
    assert ("epoch choice differs from the paper's for loss=[kd,fitnet] cls/accuracy ↑, loss=none cls/accuracy ↑: "
            + differs) in text, out
    assert "published: Paper A (last epoch; best epoch)" in text, out
    # Markdown: the same words in the published and Δ cells
    markdown = (root / "report.md").read_text()
    xs = VALUES["test/cls/accuracy"]["kd"]
    assert f"| 0.6200 ({differs}) | {mean(xs) - 0.62:+.4f} ({(mean(xs) - 0.62) / sd(xs):+.1f} std, inside CI) |" in markdown


def test_holm_over_two_compared_groups(tmp_path):
    """Three groups against vanilla: the two p-values of each metric adjusted together."""
    kd_only = {k: [x - 0.004 * (i % 3) for i, x in enumerate(v["kd"])] for k, v in VALUES.items()}
    for i, seed in enumerate(SEEDS):
        write_run(tmp_path, "kd", seed, {k: v["kd"][i] for k, v in VALUES.items()})
        write_run(tmp_path, "vanilla", seed, {k: v["vanilla"][i] for k, v in VALUES.items()})
        write_run(tmp_path, "kd_only", seed, {k: v[i] for k, v in kd_only.items()})
    proc = report(tmp_path, "reference=loss:none", "group_by=[loss]")
    assert proc.returncode == 0, proc.stderr
    rows = {(r["group"], r["metric"]): r for r in csv.DictReader((tmp_path / "report.csv").open())}
    for metric, by_group in VALUES.items():
        arrow = "↓" if metric.endswith("abs_err") else "↑"
        b = by_group["vanilla"]
        p = [paired_p(by_group["kd"], b), paired_p(kd_only[metric], b)]
        adjusted = holm(p)
        assert float(rows[("fitnet+kd", f"{metric} {arrow}")]["Holm p"]) == pytest.approx(adjusted[0], rel=1e-9)
        assert float(rows[("kd", f"{metric} {arrow}")]["Holm p"]) == pytest.approx(adjusted[1], rel=1e-9)
        assert rows[("none", f"{metric} {arrow}")]["reference"] == "none"


# ---- reproduction check: which epoch, and mean_lastN -----------------------------------------------

def _rows_of(tmp_path, monitor, published, extra=None):
    from kdmtl_cli.report.runs import find_runs, group_runs
    from kdmtl_cli.report.table import evidence_rows

    for i, seed in enumerate(SEEDS):
        values = {k: v["kd"][i] for k, v in VALUES.items()}
        write_run(tmp_path, "kd", seed, {**values, **(extra(i) if extra else {})}, monitor, published)
    runs, _ = find_runs([tmp_path])
    table, _ = evidence_rows(group_runs(runs))
    return {row["metric"]: row for row in table}


def test_epoch_choice_last_against_best_and_agreeing(tmp_path):
    published = [{"model": "student", "metric": "test/cls/accuracy", "value": 0.62, "epoch": "best", "source": "P"},
                 {"model": "student", "metric": "test/seg/miou", "value": 0.40, "epoch": "last", "source": "P"},
                 {"model": "teacher", "metric": "test/cls/accuracy", "value": 0.75, "epoch": "last", "source": "P"}]
    rows = _rows_of(tmp_path, "last", published)
    assert rows["test/cls/accuracy ↑"]["epoch choice"] == "runs: last epoch; paper: best epoch"
    assert rows["test/cls/accuracy ↑"]["_epoch agrees"] is False
    assert rows["test/seg/miou ↑"]["epoch choice"] == "same as paper: last epoch"
    assert rows["test/seg/miou ↑"]["_epoch agrees"] is True
    # the teacher trained here kept its best epoch on validation (teacher.keep=best)
    assert rows["teacher/test/cls/accuracy ↑"]["epoch choice"] == \
        "runs: teacher's best epoch by val/loss/task; paper: last epoch"
    # one teacher for all runs: no spread, so neither an interval test nor std units
    assert "published in CI95" not in rows["teacher/test/cls/accuracy ↑"]
    assert "Δ vs published / std" not in rows["teacher/test/cls/accuracy ↑"]


def test_mean_last_n_is_checked_with_the_runs_test_mean_last_n_values(tmp_path):
    # the mean of the last 10 epochs' tests sits 0.03 below the selected checkpoint's test, with
    # its own spread; 0.595 lies inside their interval and outside the selected tests' interval
    mean_last = [x - 0.03 + 0.002 * (i - 2) ** 2 for i, x in enumerate(VALUES["test/cls/accuracy"]["kd"])]
    published = [{"model": "student", "metric": "test/cls/accuracy", "value": 0.595, "epoch": "mean_last10",
                  "source": "Nash-MTL"}]
    rows = _rows_of(tmp_path, "val/loss/task", published,
                    extra=lambda i: {"test_mean_last10/cls/accuracy": mean_last[i]})
    row = rows["test/cls/accuracy ↑"]
    low, high = bootstrap(mean_last)
    assert low <= 0.595 <= high and not bootstrap(VALUES["test/cls/accuracy"]["kd"])[0] <= 0.595
    assert row["published in CI95"] == "yes"
    assert row["Δ vs published"] == pytest.approx(mean(mean_last) - 0.595, abs=1e-12)
    assert row["Δ vs published / std"] == pytest.approx((mean(mean_last) - 0.595) / sd(mean_last), rel=1e-9)
    assert row["epoch choice"] == "same as paper: mean of the last 10 epochs' tests"
    # runs without those values (test.average_last_epochs=0): no difference, and said why
    other = _rows_of(tmp_path / "other", "val/loss/task", published)["test/cls/accuracy ↑"]
    assert other["Δ vs published"] is None and "published in CI95" not in other
    assert other["epoch choice"] == ("runs: no test_mean_last10 (train with test.average_last_epochs=10); "
                                     "paper: mean of the last 10 epochs' tests")


# ---- reference= ------------------------------------------------------------------------------------

def test_reference_key_value_names_one_group(tmp_path):
    from kdmtl_cli.errors import KdmtlError
    from kdmtl_cli.report.runs import find_runs, group_runs
    from kdmtl_cli.report.stats import check_reference

    for i, seed in enumerate(SEEDS[:2]):
        write_run(tmp_path, "kd", seed, {k: v["kd"][i] for k, v in VALUES.items()})
        write_run(tmp_path, "vanilla", seed, {k: v["vanilla"][i] for k, v in VALUES.items()})
    groups = group_runs(find_runs([tmp_path])[0])
    kd, vanilla = (g.label for g in groups)
    for value in ("loss:fitnet+kd", "loss:kd+fitnet", "loss:[kd,fitnet]", "loss=[kd,fitnet]", kd):   # or its header
        assert check_reference(value, groups) == kd
    assert check_reference("loss:none", groups) == vanilla
    assert check_reference(None, groups) is None
    with pytest.raises(KdmtlError, match="matches 2 groups"):
        check_reference("weighting:equal", groups)


@pytest.mark.parametrize("value, words", [("loss:fitnet", ["reference=loss:fitnet matches no group", "loss:none"]),
                                          ("weighting:equal", ["matches 2 groups"]),
                                          ("nope", ["reference=nope is not a group"])])
def test_bad_reference_is_one_line_and_writes_nothing(tmp_path, value, words):
    for i, seed in enumerate(SEEDS[:2]):
        write_run(tmp_path, "kd", seed, {k: v["kd"][i] for k, v in VALUES.items()})
        write_run(tmp_path, "vanilla", seed, {k: v["vanilla"][i] for k, v in VALUES.items()})
    proc = report(tmp_path, f"reference={value}")
    line = assert_one_line_error(proc, *words)
    assert "loss.kd.weight=0.5" in line                          # the groups are listed
    assert proc.stdout == "" and not (tmp_path / "report.md").exists() and not (tmp_path / "report.csv").exists()


# ---- the README's example, recomputed ---------------------------------------------------------------

# Per-seed test metrics (seeds 0..4) of the README's 5-seed sweep `kdmtl train -m 'loss=[kd,fitnet],none'
# seed=0,1,2,3,4` (README "Evidence over seeds"), transcribed from its results.json files.
README_SWEEP = {
    "test/cls/accuracy": {"kd": [0.5339999794960022, 0.5475000143051147, 0.5684999823570251, 0.578499972820282,
                                 0.5534999966621399],
                          "vanilla": [0.42250001430511475, 0.37299999594688416, 0.43650001287460327,
                                      0.414000004529953, 0.4415000081062317]},
    "test/seg/miou": {"kd": [0.3831515312194824, 0.41307979822158813, 0.435075581073761, 0.4332597255706787,
                             0.40949153900146484],
                      "vanilla": [0.31798505783081055, 0.28653714060783386, 0.3216426968574524,
                                  0.30083227157592773, 0.30169588327407837]},
    "test/depth/abs_err": {"kd": [0.9371277093887329, 0.9381710290908813, 0.9315658211708069, 0.9513440132141113,
                                  0.9210354089736938],
                           "vanilla": [0.9960262179374695, 1.0175204277038574, 1.0073362588882446,
                                       1.025268793106079, 0.9989425539970398]},
}


def test_the_readme_example_is_recomputed_by_hand(tmp_path):
    """The README's KD-against-vanilla report: every student cell of its headline metrics -- mean ±
    std with the marker, the bootstrap interval, the Holm p, the seeds needed -- recomputed here by
    hand from the sweep's per-seed values, found in the README's block and in report.csv."""
    from pathlib import Path

    root = tmp_path / "runs"
    for group in ("kd", "vanilla"):
        for i, seed in enumerate(SEEDS):
            write_run(root, group, seed, {k: v[group][i] for k, v in README_SWEEP.items()}, published=[])
    proc = report(root, "reference=loss:none", columns=100)
    assert proc.returncode == 0, proc.stderr
    rows = {(r["group"], r["metric"]): r for r in csv.DictReader((root / "report.csv").open())}
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme[readme.index("$ COLUMNS=100 kdmtl report runs/sweep5"):]
    block = block[:block.index("```")]
    table = _table_rows("\n".join(line[2:] for line in block.splitlines()))     # the README indents it
    kd = _kd_label(rows)
    for metric, by_group in README_SWEEP.items():
        name = metric.split("/", 1)[1]
        higher = not name.endswith("abs_err")
        a, b = by_group["kd"], by_group["vanilla"]
        p = paired_p(a, b)
        better = (mean(a) > mean(b)) == higher
        marker = "=" if p >= 0.05 else ("▲" if better else "▼")
        shown = f"{name} {'↑' if higher else '↓'}"
        low, high = bootstrap(a)
        assert table[(shown, shown)][0] == f"{mean(a):.4f} ± {sd(a):.4f} {marker}"
        assert table[(shown, shown)][1] == f"{mean(b):.4f} ± {sd(b):.4f}"
        assert table[(shown, "95% CI")][0] == f"[{low:.4f}, {high:.4f}]"
        assert table[(shown, "Holm p vs ref")][0] == f"{p:.3g}"
        assert table[(shown, "seeds needed")][0] == str(seeds_needed(a, b))
        row = rows[(kd, f"{metric} {'↑' if higher else '↓'}")]
        assert float(row["paired p"]) == pytest.approx(p, rel=1e-9)
        assert float(row["Welch p"]) == pytest.approx(welch_p(a, b), rel=1e-9)
