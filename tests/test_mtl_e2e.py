"""Multi-task learning through the real CLI: weighting strategies, per-step task weights and
trunk gradient norms in metrics.jsonl, single-task baselines recorded and Δm reported,
auxiliary tasks, exact resume with a weighting's state, and one trunk forward per step.

The CLI runs are launched concurrently by the module fixture; each test checks one result.
"""

from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import yaml

from conftest import FAST, TB, WORKERS, assert_one_line_error, read_jsonl, run_kdmtl, show

VANILLA = [*FAST, "loss=none"]


@pytest.fixture(scope="module")
def mtl(tmp_path_factory, shared_cache):
    area = tmp_path_factory.mktemp("mtl")
    base = area / "baselines.yaml"
    first = {
        "base_seg": [*VANILLA, "tasks=seg", f"delta_m.record={base}"],
        "base_depth": [*VANILLA, "tasks=depth", f"delta_m.record={base}"],
        "pcgrad": [*VANILLA, "tasks=seg_depth", "weighting=pcgrad", "log.every_n_steps=1"],
        "dwa_straight": [*VANILLA, "weighting=dwa", "optim.epochs=3"],
        "dwa_stopped": [*VANILLA, "weighting=dwa", "optim.epochs=3", "stop_after_epoch=2"],
        "kd_gradnorm": [*FAST, "tasks=seg_depth", "weighting=gradnorm", "log.every_n_steps=1"],
        # errors, all before any training
        "bad_name": [*VANILLA, "weighting=nope"],
        "unused_knob": [*VANILLA, "weighting=pcgrad", "weighting.alpha=2"],
        "fixed_missing": [*VANILLA, "tasks=seg_depth", "weighting=fixed", "weighting.weights={seg:1}"],
        "no_baseline": [*VANILLA, f"delta_m.baseline={area / 'missing.yaml'}"],
        "record_multi": [*VANILLA, "tasks=seg_depth", f"delta_m.record={area / 'x.yaml'}"],
        "convention": [*VANILLA, "delta_m.convention=libmtl"],
    }
    second = {
        "uncertainty": [*VANILLA, TB, "tasks=seg_depth", "weighting=uncertainty", f"delta_m.baseline={base}",
                        "log.every_n_steps=1", "log.grad_norms_every_n_steps=1"],
        "aux": [*VANILLA, "tasks=seg_depth_aux_normal", f"delta_m.baseline={base}", "delta_m.convention=per_task"],
        "baseline_lacks_task": [*VANILLA, "tasks=cls_seg_depth", f"delta_m.baseline={base}"],
        "other_data": [*VANILLA, "tasks=seg", "data.seed=1", f"delta_m.baseline={base}"],
    }
    dirs = {name: area / name for name in [*first, *second]}
    fresh = {"dwa_straight", "dwa_stopped"}   # compared bit for bit (conftest.run_kdmtl)

    def launch(pool, jobs, extra=None):
        futures = {name: pool.submit(run_kdmtl, ["train", *args, f"hydra.run.dir={dirs[name]}"], area, shared_cache,
                                     fresh=name in fresh)
                   for name, args in jobs.items()}
        return {name: future.result() for name, future in futures.items()}

    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        procs = launch(pool, first)
        baseline_text = base.read_text() if base.exists() else ""
        procs.update(launch(pool, second))
        resumed = pool.submit(run_kdmtl, ["train", f"resume={dirs['dwa_stopped']}", "log.progress=plain"],
                              area, shared_cache, fresh=True)
        evaluated = pool.submit(run_kdmtl, ["eval", f"run_dir={dirs['uncertainty']}", "log.progress=plain",
                                            f"hydra.run.dir={area / 'eval'}"], area, shared_cache)
        procs["dwa_resumed"], procs["eval"] = resumed.result(), evaluated.result()
        dirs["eval"] = area / "eval"
    return {"procs": procs, "dirs": dirs, "base": base, "baseline_text": baseline_text}


def _ok(mtl, name):
    proc = mtl["procs"][name]
    assert proc.returncode == 0, show(proc)
    return mtl["dirs"][name]


def _final(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())["results"]


def test_single_task_runs_record_a_baseline_file(mtl):
    seg, depth = _final(_ok(mtl, "base_seg")), _final(_ok(mtl, "base_depth"))
    content = yaml.safe_load(mtl["baseline_text"])
    assert content["data"]["name"] == "shapes" and len(content["data"]["fingerprint"]) == 16
    assert content["tasks"]["seg"]["kind"] == "segmentation"
    assert content["tasks"]["seg"]["metrics"] == {"miou": seg["test/seg/miou"], "pixel_acc": seg["test/seg/pixel_acc"]}
    assert content["tasks"]["depth"]["metrics"] == {"abs_err": depth["test/depth/abs_err"],
                                                    "rel_err": depth["test/depth/rel_err"]}
    [run] = content["tasks"]["seg"]["runs"]
    assert run["run_dir"] == str(mtl["dirs"]["base_seg"]) and run["seed"] == 0 and run["split"] == "test"


def test_multi_task_run_reports_delta_m_by_hand(mtl):
    final = _final(_ok(mtl, "uncertainty"))
    base = yaml.safe_load(mtl["baseline_text"])["tasks"]
    b_miou, b_acc = base["seg"]["metrics"]["miou"], base["seg"]["metrics"]["pixel_acc"]
    b_abs, b_rel = base["depth"]["metrics"]["abs_err"], base["depth"]["metrics"]["rel_err"]
    gains = [(final["test/seg/miou"] - b_miou) / b_miou, (final["test/seg/pixel_acc"] - b_acc) / b_acc,
             -(final["test/depth/abs_err"] - b_abs) / b_abs, -(final["test/depth/rel_err"] - b_rel) / b_rel]
    assert final["test/delta_m/maninis"] == pytest.approx(100 * sum(gains) / 4, abs=1e-9)
    per_task = 100 * ((gains[0] + gains[1]) / 2 + (gains[2] + gains[3]) / 2) / 2
    assert final["test/delta_m/per_task"] == pytest.approx(per_task, abs=1e-9)
    assert final["delta_m/baseline"] == str(mtl["base"])
    summary = (mtl["dirs"]["uncertainty"] / "summary.md").read_text()
    assert f"| Δm% (maninis) ↑ | - | {final['test/delta_m/maninis']:+.2f} |" in summary
    assert "- weighting: uncertainty" in summary


def test_baseline_of_other_data_is_not_used(mtl):
    final = _final(_ok(mtl, "other_data"))
    assert "test/delta_m/maninis" not in final
    assert "recorded on data shapes/" in final["delta_m/skipped"]
    assert "Δm not computed: the baseline was recorded on data" in mtl["procs"]["other_data"].stdout


def test_eval_reports_the_same_delta_m(mtl):
    final = _final(_ok(mtl, "uncertainty"))
    metrics = json.loads((_ok(mtl, "eval") / "eval.json").read_text())["metrics"]
    assert metrics["test/delta_m/maninis"] == final["test/delta_m/maninis"]
    assert metrics["test/delta_m/per_task"] == final["test/delta_m/per_task"]


def test_uncertainty_weights_and_grad_norms_are_logged_each_step(mtl):
    run_dir = _ok(mtl, "uncertainty")
    steps = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r["type"] == "step"]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        for task in ("seg", "depth"):
            assert r[f"train/grad_norm/{task}"] > 0
            assert f"train/weight/{task}" in r
    # step 1 runs with s = -0.5 (weights 1 / (2 exp(-0.5))); after one Adam step the log-variances moved.
    first = math.exp(0.5) / 2
    assert steps[0]["train/weight/seg"] == pytest.approx(first) and steps[1]["train/weight/seg"] != pytest.approx(first)
    # The uncertainty objective: sum_t L_t / (2 exp(s_t)) + s_t / 2; with s = -0.5 and two tasks,
    # first * (L_seg + L_depth) - 0.5.
    assert steps[0]["train/loss/total"] == pytest.approx(
        first * (steps[0]["train/group/seg"] + steps[0]["train/group/depth"]) - 0.5, rel=1e-6)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    assert {"train/weight/seg", "train/grad_norm/depth"} <= set(acc.Tags()["scalars"])
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert "weighting" in state and state["weighting"]


def test_pcgrad_logs_unit_weights_and_free_grad_norms(mtl):
    steps = [r for r in read_jsonl(_ok(mtl, "pcgrad") / "metrics.jsonl") if r["type"] == "step"]
    assert len(steps) == 2
    for r in steps:
        assert r["train/weight/seg"] == 1.0 and r["train/weight/depth"] == 1.0
        assert r["train/grad_norm/seg"] > 0 and r["train/grad_norm/depth"] > 0  # measured every step


def test_distillation_terms_join_their_task_before_weighting(mtl):
    run_dir = _ok(mtl, "kd_gradnorm")
    steps = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r["type"] == "step"]
    epoch = next(r for r in read_jsonl(run_dir / "metrics.jsonl") if r["type"] == "epoch")
    for task in ("seg", "depth"):   # group = task loss + 0.5 * its KD term (epoch means)
        expected = epoch[f"train/task/{task}"] + 0.5 * epoch[f"train/kd/{task}"]
        assert epoch[f"train/group/{task}"] == pytest.approx(expected, rel=1e-5)
    # GradNorm (as LibMTL) keeps equal weights during the first epoch, whose mean losses become L(0).
    for r in steps:
        assert r["train/weight/seg"] == 1.0 and r["train/weight/depth"] == 1.0


def test_auxiliary_task_is_trained_reported_and_left_out(mtl):
    run_dir = _ok(mtl, "aux")
    final = _final(run_dir)
    epoch = next(r for r in read_jsonl(run_dir / "metrics.jsonl") if r["type"] == "epoch")
    assert "train/task/normal" in epoch and "val/normal/mean_angle" in epoch
    assert epoch["val/loss/task"] == pytest.approx(epoch["val/task/seg"] + epoch["val/task/depth"], rel=1e-6)
    assert "test/normal/median_angle" in final
    assert "test/delta_m/per_task" in final     # computed without a normals baseline
    summary = (run_dir / "summary.md").read_text()
    assert "normal/mean_angle ↓ (auxiliary)" in summary
    assert summary.index("(auxiliary)") > summary.index("depth/abs_err")
    assert "Δm% (per_task)" in summary


def test_dwa_resume_is_exact(mtl):
    straight, stopped = _ok(mtl, "dwa_straight"), mtl["dirs"]["dwa_stopped"]
    assert mtl["procs"]["dwa_resumed"].returncode == 0, show(mtl["procs"]["dwa_resumed"])
    a, b = read_jsonl(straight / "metrics.jsonl"), read_jsonl(stopped / "metrics.jsonl")
    epochs = [r for r in a if r["type"] == "epoch"]
    # Epoch 3 is the first with DWA weights != 1 (they need two epochs of losses).
    assert all(epochs[0][f"train/weight/{t}"] == 1.0 for t in ("cls", "seg", "depth"))
    assert any(epochs[2][f"train/weight/{t}"] != 1.0 for t in ("cls", "seg", "depth"))
    assert sum(epochs[2][f"train/weight/{t}"] for t in ("cls", "seg", "depth")) == pytest.approx(3.0, abs=1e-5)
    for key in [k for k in a[-1] if k.startswith(("test/", "val/"))]:
        assert a[-1][key] == b[-1][key], key


@pytest.mark.parametrize("name,words", [
    ("bad_name", ["weighting/nope", "pcgrad"]),
    ("unused_knob", ["weighting.alpha", "pcgrad"]),
    ("fixed_missing", ["weighting.weights", "depth"]),
    ("no_baseline", ["delta_m.baseline", "missing.yaml", "delta_m.record"]),
    ("record_multi", ["delta_m.record", "single-task"]),
    ("convention", ["delta_m.convention", "maninis"]),
    ("baseline_lacks_task", ["delta_m.baseline", "no task 'cls'"]),
])
def test_bad_weighting_and_delta_m_settings(mtl, name, words):
    assert_one_line_error(mtl["procs"][name], *words)
    assert not (mtl["dirs"][name] / "checkpoints").exists()  # refused before any training


# ---- in process: the trunk runs once per training step -------------------------------------------

@pytest.mark.parametrize("strategy", ["equal", "pcgrad"])
def test_trunk_forward_runs_once_per_step(tmp_path, strategy, one_thread):
    from kdmtl_cli.build import make_loader
    from kdmtl_cli.data import build_data
    from kdmtl_cli.distill.objective import Objective
    from kdmtl_cli.engine.hardware import setup_hardware
    from kdmtl_cli.engine.logging import MetricsLog
    from kdmtl_cli.engine.optim import build_optimizer, build_scheduler
    from kdmtl_cli.engine.trainer import Trainer
    from kdmtl_cli.models import build_model
    from kdmtl_cli.schema import TrainConfig, validate
    from kdmtl_cli.tasks import build_tasks
    from kdmtl_cli.weighting import build_weighting
    from omegaconf import OmegaConf

    cfg = validate(OmegaConf.create({
        "cache_dir": str(tmp_path), "tasks": {"cls": {"kind": "classification"}, "seg": {"kind": "segmentation"},
                                              "depth": {"kind": "depth"}},
        "data": {"train_size": 40, "val_size": 8, "test_size": 8, "batch_size": 8},
        "hardware": {"device": "cpu"}, "optim": {"epochs": 2}, "weighting": {"name": strategy}}), TrainConfig)
    hardware = setup_hardware(cfg.hardware)
    data = build_data(cfg.data)
    tasks = build_tasks(cfg.tasks, data.targets)
    model = build_model(cfg.student, tasks)
    calls = []
    model.trunk.register_forward_hook(lambda module, *_: calls.append(module.training))
    loader = make_loader(data, "train", tasks, cfg, hardware, train=True, limit=None)
    val_loader = make_loader(data, "val", tasks, cfg, hardware, train=False, limit=None)
    optimizer = build_optimizer(model.parameters(), cfg.optim)
    trainer = Trainer(model=model, objective=Objective(tasks, 1.0), tasks=tasks, optimizer=optimizer,
                      scheduler=build_scheduler(optimizer, cfg.optim, len(loader)), hardware=hardware,
                      train_loader=loader, val_loader=val_loader, epochs=2, checkpoint_dir=tmp_path / "ckpt",
                      log=MetricsLog(tmp_path, tensorboard=False), progress_mode="none", label="t",
                      monitor="val/loss/task", weighting=build_weighting(cfg.weighting, list(tasks)),
                      grad_norms_every_n_steps=1)
    trainer.fit()
    assert len(loader) == 5 and trainer.state.global_step == 10
    assert calls.count(True) == 10            # training forwards: exactly one per step
    assert calls.count(False) == 2            # validation: one batch per epoch
