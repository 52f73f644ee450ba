"""Δm% against single-task baselines: both conventions on stored NYUv2 numbers worked by
hand, and baseline files recorded, read back and checked."""

from __future__ import annotations

import pytest
import yaml

from kdmtl_cli.errors import KdmtlError
from kdmtl_cli.report import baselines
from kdmtl_cli.report.delta_m import delta_m, relative_gains

# NYUv2 (seg: mIoU, pixel acc; depth: abs err, rel err; normals: mean, median angle,
# within 11.25/22.5/30 degrees): a published single-task row and a multi-task row.
DIRECTIONS = {
    "seg": {"miou": True, "pixel_acc": True},
    "depth": {"abs_err": False, "rel_err": False},
    "normal": {"mean": False, "median": False, "within_11_25": True, "within_22_5": True, "within_30": True},
}
SINGLE = [38.30, 63.76, 0.6754, 0.2780, 25.01, 19.21, 30.14, 57.20, 69.15]
MULTI = [39.29, 65.33, 0.5493, 0.2263, 28.15, 23.96, 22.09, 47.50, 61.08]


def _by_task(values):
    it = iter(values)
    return {task: {metric: next(it) for metric in metrics} for task, metrics in DIRECTIONS.items()}


def test_delta_m_default_convention_on_nyuv2_numbers():
    # Signed relative differences, written out: + for higher-is-better, - for lower-is-better.
    gains = [(39.29 - 38.30) / 38.30, (65.33 - 63.76) / 63.76,
             -(0.5493 - 0.6754) / 0.6754, -(0.2263 - 0.2780) / 0.2780,
             -(28.15 - 25.01) / 25.01, -(23.96 - 19.21) / 19.21,
             (22.09 - 30.14) / 30.14, (47.50 - 57.20) / 57.20, (61.08 - 69.15) / 69.15]
    expected = 100 * sum(gains) / 9
    assert expected == pytest.approx(-5.589, abs=5e-4)
    assert delta_m(_by_task(MULTI), _by_task(SINGLE), DIRECTIONS) == pytest.approx(expected, abs=1e-9)
    assert delta_m(_by_task(MULTI), _by_task(SINGLE), DIRECTIONS, "maninis") == pytest.approx(-5.589, abs=5e-4)


def test_delta_m_per_task_convention_on_nyuv2_numbers():
    seg = ((39.29 - 38.30) / 38.30 + (65.33 - 63.76) / 63.76) / 2
    depth = (-(0.5493 - 0.6754) / 0.6754 - (0.2263 - 0.2780) / 0.2780) / 2
    normal = (-(28.15 - 25.01) / 25.01 - (23.96 - 19.21) / 19.21 + (22.09 - 30.14) / 30.14
              + (47.50 - 57.20) / 57.20 + (61.08 - 69.15) / 69.15) / 5
    expected = 100 * (seg + depth + normal) / 3
    assert expected == pytest.approx(0.878, abs=5e-4)
    assert delta_m(_by_task(MULTI), _by_task(SINGLE), DIRECTIONS, "per_task") == pytest.approx(expected, abs=1e-9)


def test_delta_m_signs_and_identity():
    assert delta_m(_by_task(SINGLE), _by_task(SINGLE), DIRECTIONS) == 0.0
    # An error halved is +50% for that metric; an accuracy halved is -50%.
    one = {"depth": {"abs_err": False}}
    assert delta_m({"depth": {"abs_err": 0.5}}, {"depth": {"abs_err": 1.0}}, one) == pytest.approx(50.0)
    acc = {"cls": {"accuracy": True}}
    assert delta_m({"cls": {"accuracy": 0.4}}, {"cls": {"accuracy": 0.8}}, acc) == pytest.approx(-50.0)
    gains = relative_gains({"cls": {"accuracy": 0.9}}, {"cls": {"accuracy": 0.8}}, acc)
    assert gains == {"cls": {"accuracy": pytest.approx(0.125)}}


def test_delta_m_errors_name_the_problem():
    with pytest.raises(KdmtlError, match="no task 'depth'"):
        delta_m(_by_task(MULTI), {"seg": _by_task(SINGLE)["seg"]}, DIRECTIONS)
    with pytest.raises(KdmtlError, match="lacks metric 'rel_err'"):
        delta_m(_by_task(MULTI), {**_by_task(SINGLE), "depth": {"abs_err": 1.0}}, DIRECTIONS)
    with pytest.raises(KdmtlError, match="convention"):
        delta_m(_by_task(MULTI), _by_task(SINGLE), DIRECTIONS, "libmtl")
    with pytest.raises(KdmtlError, match="is 0"):
        delta_m({"d": {"abs_err": 1.0}}, {"d": {"abs_err": 0.0}}, {"d": {"abs_err": False}})


class _Kind:
    def __init__(self, name, directions):
        self.name, self.higher_is_better = name, directions


class _Task:
    def __init__(self, kind, auxiliary=False):
        self.kind, self.auxiliary = kind, auxiliary


class _Data:
    name, fingerprint = "shapes", "abc123"


SEG = _Task(_Kind("segmentation", {"miou": True, "pixel_acc": True}))
DEPTH = _Task(_Kind("depth", {"abs_err": False, "rel_err": False}))


def test_record_then_load_averages_runs_and_replaces_a_rerun(tmp_path):
    path = tmp_path / "baselines.yaml"
    baselines.record(str(path), {"seg": SEG}, {"test/seg/miou": 0.6, "test/seg/pixel_acc": 0.9}, _Data(),
                     {"run_dir": "runs/a", "seed": 0})
    baselines.record(str(path), {"seg": SEG}, {"test/seg/miou": 0.8, "test/seg/pixel_acc": 0.7}, _Data(),
                     {"run_dir": "runs/b", "seed": 1})
    baselines.record(str(path), {"depth": DEPTH}, {"test/depth/abs_err": 0.3, "test/depth/rel_err": 0.1},
                     _Data(), {"run_dir": "runs/c", "seed": 0})
    content = yaml.safe_load(path.read_text())
    assert content["data"] == {"name": "shapes", "fingerprint": "abc123"}
    assert [r["run_dir"] for r in content["tasks"]["seg"]["runs"]] == ["runs/a", "runs/b"]
    loaded = baselines.load_baseline(str(path))
    assert loaded.metrics["seg"] == {"miou": pytest.approx(0.7), "pixel_acc": pytest.approx(0.8)}
    assert loaded.metrics["depth"] == {"abs_err": pytest.approx(0.3), "rel_err": pytest.approx(0.1)}
    assert loaded.runs == {"seg": 2, "depth": 1}
    # Recording the same run dir again replaces its entry instead of counting it twice.
    baselines.record(str(path), {"seg": SEG}, {"test/seg/miou": 1.0, "test/seg/pixel_acc": 0.7}, _Data(),
                     {"run_dir": "runs/a", "seed": 0})
    loaded = baselines.load_baseline(str(path))
    assert loaded.runs["seg"] == 2 and loaded.metrics["seg"]["miou"] == pytest.approx(0.9)
    assert baselines.data_mismatch(loaded, _Data()) is None
    baselines.check_covers(loaded, {"seg": SEG, "depth": DEPTH})


def test_baseline_checks(tmp_path):
    path = tmp_path / "b.yaml"
    with pytest.raises(KdmtlError, match="no baseline file"):
        baselines.load_baseline(str(path))
    path.write_text("tasks:\n  seg:\n    metrics: {miou: 0.5}\n")   # typed in by hand: no data, no runs
    loaded = baselines.load_baseline(str(path))
    assert loaded.data is None and baselines.data_mismatch(loaded, _Data()) is None
    with pytest.raises(KdmtlError, match="lacks metrics pixel_acc"):
        baselines.check_covers(loaded, {"seg": SEG})
    with pytest.raises(KdmtlError, match="no task 'depth'"):
        baselines.check_covers(loaded, {"depth": DEPTH})
    baselines.check_covers(loaded, {"depth": _Task(DEPTH.kind, auxiliary=True)})  # auxiliary: not needed
    path.write_text("tasks:\n  seg:\n    metrics: {miou: high}\n")
    with pytest.raises(KdmtlError, match="needs `metrics"):
        baselines.load_baseline(str(path))
    path.write_text("- 1\n- 2\n")
    with pytest.raises(KdmtlError, match="not a kdmtl baseline file"):
        baselines.load_baseline(str(path))
    other = tmp_path / "o.yaml"
    other.write_text("data: {name: shapes, fingerprint: zzz}\ntasks: {}\n")
    assert "zzz" in baselines.data_mismatch(baselines.load_baseline(str(other)), _Data())
    with pytest.raises(KdmtlError, match="holds baselines of data"):
        baselines.record(str(other), {"seg": SEG}, {"test/seg/miou": 1.0, "test/seg/pixel_acc": 1.0}, _Data(),
                         {"run_dir": "x", "seed": 0})
    assert "zzz" in other.read_text()  # the refused record left the file as it was
    with pytest.raises(KdmtlError, match="single-task"):
        baselines.check_record_target(str(tmp_path / "n.yaml"), {"seg": SEG, "depth": DEPTH})
    with pytest.raises(KdmtlError, match="does not exist"):
        baselines.check_record_target(str(tmp_path / "missing" / "n.yaml"), {"seg": SEG})
    assert baselines.check_record_target(str(tmp_path / "n.yaml"), {"seg": SEG, "d": _Task(DEPTH.kind, True)})


def test_shipped_baseline_resolves_from_the_package():
    path = baselines.resolve("pkg://kdmtl_cli.conf/baselines/shapes_small.yaml")
    assert path.name == "shapes_small.yaml" and path.parent.name == "baselines"
