"""The papers' evaluation protocols as settings (docs/recipes/README.md): training on the whole
training split (`data.val_size=0`, the last epoch kept), a trained teacher's last epoch
(`teacher.keep=last`, its own cache key), the mean of the last N epochs' tests
(`test.average_last_epochs=N`, exact on resume), selection by training loss
(`checkpoint.monitor=train/loss/task`), and the refusals of combinations that cannot work.
Real runs through the CLI on tiny fabricated CIFAR-10 files."""

from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from omegaconf import OmegaConf

from conftest import assert_one_line_error, read_jsonl, run_kdmtl, show
from test_experiments_e2e import write_fake_cifar10
from test_nyuv2_cityscapes import data_cfg as nyu_data_cfg, write_release

from kdmtl_cli.data import build_data
from kdmtl_cli.engine.checkpoint import load_checkpoint
from kdmtl_cli.engine.teacher_cache import teacher_key
from kdmtl_cli.errors import KdmtlError
from kdmtl_cli.schema import TrainConfig, validate

N_TRAIN = 200   # write_fake_cifar10: 5 batches of 40


@pytest.fixture(scope="module")
def fake_cifar10(tmp_path_factory):
    return write_fake_cifar10(tmp_path_factory.mktemp("cifar10"))


def _base(root, run_dir, *extra):
    """A tiny CIFAR-10 run: every training image in 2 batches of 100, a 16-image test split."""
    return ["train", "data=cifar10", f"data.root={root}", "data.download=false", "tasks=cls", "student=tiny",
            "data.train_size=100000", "data.val_size=40", "data.test_size=16", "data.batch_size=100", "data.eval_batch_size=64",
            "log.progress=plain", "log.efficiency=false", "log.tensorboard=false", "hardware.num_threads=1",
            *extra, f"hydra.run.dir={run_dir}"]


def _ok(proc):
    assert proc.returncode == 0, show(proc)
    return proc


# ---- data.val_size=0 -------------------------------------------------------------------------

def test_cifar_and_nyuv2_val_size_zero_keep_every_training_image(fake_cifar10, tmp_path):
    cfg = validate(OmegaConf.create({"data": {"name": "cifar10", "root": str(fake_cifar10), "download": False,
                                              "train_size": 100000, "val_size": 0}}), TrainConfig)
    bundle = build_data(cfg.data)
    assert bundle.size("train") == N_TRAIN and bundle.size("val") == 0
    with_val = build_data(OmegaConf.merge(cfg.data, {"val_size": 10}))
    assert with_val.size("train") == N_TRAIN - 10 and with_val.fingerprint != bundle.fingerprint
    write_release(tmp_path, "nyuv2", n_train=3)
    dense = build_data(nyu_data_cfg(tmp_path, name="nyuv2", val_size=0))
    assert dense.size("train") == 3 and dense.size("val") == 0
    assert dense.splits["val"]["normal"].shape[1:] == dense.splits["train"]["normal"].shape[1:]


def test_val_size_zero_refused_for_generated_data_and_negative():
    for data in ({"name": "shapes", "val_size": 0}, {"name": "cifar10", "val_size": -1}):
        cfg = validate(OmegaConf.create({"data": data}), TrainConfig)
        with pytest.raises(KdmtlError, match="data.val_size") as err:
            build_data(cfg.data)
        assert "\n" not in str(err.value)


def test_debug_fast_keeps_no_validation_split_and_shrinks_the_average():
    from kdmtl_cli.commands.train import apply_debug

    cfg = validate(OmegaConf.create({"data": {"name": "cifar10", "val_size": 0}, "optim": {"epochs": 50},
                                     "test": {"average_last_epochs": 10}, "debug": {}}), TrainConfig)
    cfg = apply_debug(cfg)
    assert cfg.data.val_size == 0 and cfg.optim.epochs == 1 and cfg.test.average_last_epochs == 1


def test_val_size_zero_trains_on_every_image_and_keeps_the_last_epoch(fake_cifar10, tmp_path, shared_cache):
    run_dir = tmp_path / "run"
    proc = _ok(run_kdmtl(_base(fake_cifar10, run_dir, "data.val_size=0", "loss=none", "optim.epochs=2",
                               "test.average_last_epochs=2"), tmp_path, shared_cache))
    assert proc.stdout.count("no validation split (data.val_size=0)") == 1, show(proc)
    assert f"training on all {N_TRAIN} training images" in proc.stdout
    saved = json.loads((run_dir / "results.json").read_text())
    assert saved["results"]["monitor"] == "last" and saved["results"]["best_epoch"] == 2 == saved["results"]["epoch"]
    assert f"({N_TRAIN} train / 0 val / 16 test)" in (run_dir / "summary.md").read_text()
    epochs = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r["type"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2]
    assert not any(k.startswith("val/") for r in epochs for k in r)
    # every training image, every epoch: 2 batches of 100
    steps = [r["step"] for r in epochs]
    assert steps == [2, 4]
    best, last = (load_checkpoint(run_dir / "checkpoints" / f"{n}.pt") for n in ("best", "last"))
    assert best["epoch"] == last["epoch"] == 2
    assert all(torch.equal(best["model"][k], last["model"][k]) for k in last["model"])
    # the mean of the two epochs' tests, as the log has them (the resume case: the slow test below)
    expected = _means_from_log(run_dir, 2)
    assert expected and all(math.isclose(saved["results"][k], v, rel_tol=0, abs_tol=1e-12)
                            for k, v in expected.items())


def test_refusals_are_one_line_before_any_work(fake_cifar10, tmp_path, shared_cache):
    """Through the CLI: one line naming the key, no run directory content."""
    cases = {
        "val_monitor": (["data.val_size=0", "checkpoint.monitor=val/cls/accuracy"],
                        ["checkpoint.monitor=val/cls/accuracy", "data.val_size=0", "checkpoint.monitor=last"]),
        "average": (["optim.epochs=2", "test.average_last_epochs=3"], ["test.average_last_epochs", "optim.epochs=2"]),
    }
    with ThreadPoolExecutor(max_workers=2) as pool:
        procs = {name: pool.submit(run_kdmtl, _base(fake_cifar10, tmp_path / name, *args), tmp_path, shared_cache)
                 for name, (args, _) in cases.items()}
    for name, (_, words) in cases.items():
        assert_one_line_error(procs[name].result(), *words)
        assert not (tmp_path / name / "checkpoints").exists(), name


@pytest.mark.parametrize("settings, words", [
    ({"data": {"name": "shapes", "val_size": 0}}, ["data.val_size=0", "shapes"]),
    ({"teacher": {"keep": "middle"}}, ["teacher.keep", "best, last or train_loss"]),
    ({"test": {"metric_reduction": "per_batch"}}, ["test.metric_reduction", "batch_mean"]),
    ({"optim": {"epochs": 2}, "test": {"average_last_epochs": -1}}, ["test.average_last_epochs"]),
    ({"published": [{"metric": "test/cls/accuracy", "value": 0.5, "epoch": "mean10"}]},
     ["published[0].epoch", "mean_lastN"]),
    ({"data": {"name": "nyuv2", "val_size": 0}, "checkpoint": {"monitor": "val/seg/miou"}},
     ["checkpoint.monitor=val/seg/miou", "checkpoint.monitor=last"]),
])
def test_protocol_checks_name_the_key(settings, words):
    from kdmtl_cli.commands.train import check_protocol

    with pytest.raises(KdmtlError) as err:
        check_protocol(validate(OmegaConf.create(settings), TrainConfig))
    assert "\n" not in str(err.value) and all(w in str(err.value) for w in words), str(err.value)


def test_protocol_accepts_the_paper_settings():
    from kdmtl_cli.commands.train import check_protocol

    for monitor in ("val/loss/task", "last", "train/loss/task"):
        check_protocol(validate(OmegaConf.create({
            "data": {"name": "nyuv2", "val_size": 0}, "checkpoint": {"monitor": monitor}, "teacher": {"keep": "last"},
            "optim": {"epochs": 10}, "test": {"average_last_epochs": 10},
            "published": [{"metric": "test/seg/miou", "value": 0.4, "epoch": "mean_last10"}]}), TrainConfig))


def test_train_loss_monitor_is_checked_against_the_tasks():
    from types import SimpleNamespace

    from kdmtl_cli.engine.trainer import check_monitor

    tasks = {"cls": SimpleNamespace(kind=SimpleNamespace(higher_is_better={"accuracy": True}))}
    for monitor in ("train/task/cls", "train/loss/task", "last", "val/cls/accuracy"):
        check_monitor(monitor, tasks)
    with pytest.raises(KdmtlError, match="train/loss/task"):
        check_monitor("train/nope", tasks)


# ---- teacher.keep -----------------------------------------------------------------------------

def _key(keep=None, val_size=10):
    teacher = {"arch": "convnet", "width": 8, "optim": {"epochs": 2}}
    if keep is not None:
        teacher["keep"] = keep
    return teacher_key(OmegaConf.create(teacher), {"cls": {"kind": "classification"}},
                       OmegaConf.create({"name": "cifar10", "val_size": val_size}), "fp", 0, "32", None)


def test_teacher_keep_is_in_the_cache_key_only_when_not_best():
    assert _key("best") == _key(None)            # keys of teachers kept at best are those of before
    assert _key("last") != _key("best")          # a teacher kept at best is never reused as last
    assert _key("best", val_size=0) == _key("last", val_size=0)   # no validation split: best is last
    assert len({_key("last"), _key("train_loss"), _key("train_loss", val_size=0), _key("best")}) == 4


def test_teacher_keep_last_keeps_the_last_epochs_weights(fake_cifar10, tmp_path, shared_cache):
    from kdmtl_cli.engine.checkpoint import load_tensor_file

    run_dir = tmp_path / "run"
    _ok(run_kdmtl(_base(fake_cifar10, run_dir, "teacher.keep=last", "teacher.width=4",
                        "teacher.optim.epochs=2", "optim.epochs=1", f"cache_dir={tmp_path / 'cache'}"),
                  tmp_path, shared_cache))
    info = json.loads((run_dir / "results.json").read_text())["teacher"]
    assert info["cached"] is False
    cached = load_tensor_file(info["source"], what="teacher")
    last = load_checkpoint(run_dir / "teacher" / "checkpoints" / "last.pt")
    assert last["epoch"] == 2 and last["monitor"] == "last"
    assert all(torch.equal(cached[k], last["model"][k]) for k in last["model"])
    entry = json.loads((tmp_path / "cache" / "teachers" / info["source"].split("/")[-2] / "teacher.json").read_text())
    assert entry["config"]["keep"] == "last"


# ---- test.average_last_epochs ------------------------------------------------------------------

def _means_from_log(run_dir, n):
    """The mean of each `epoch_test/...` value over the last n epoch records, computed here."""
    epochs = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r["type"] == "epoch"]
    last = epochs[-n:]
    assert all(any(k.startswith("epoch_test/") for k in r) for r in last)
    assert not any(k.startswith("epoch_test/") for r in epochs[:-n] for k in r)
    keys = [k for k in last[-1] if k.startswith("epoch_test/")]
    return {"test_mean_last%d/" % n + k[len("epoch_test/"):]: sum(r[k] for r in last) / n for k in keys}


AVERAGE = ["loss=none", "optim.epochs=3", "test.average_last_epochs=2", "checkpoint.monitor=train/loss/task"]


def _resumed_run(root, run_dir, cwd, cache):
    """Stopped after epoch 2 of 3, then resumed: the mean needs epoch 2's test from before the stop."""
    _ok(run_kdmtl(_base(root, run_dir, *AVERAGE, "stop_after_epoch=2"), cwd, cache))
    assert not (run_dir / "results.json").exists()
    _ok(run_kdmtl(["train", f"resume={run_dir}", "log.progress=plain"], cwd, cache))
    return json.loads((run_dir / "results.json").read_text())["results"]


@pytest.mark.slow
def test_mean_of_the_last_epochs_tests_equals_the_log_and_survives_resume(fake_cifar10, tmp_path, shared_cache):
    run_dir = tmp_path / "parts"
    results = _resumed_run(fake_cifar10, run_dir, tmp_path, shared_cache)
    expected = _means_from_log(run_dir, 2)
    assert expected and set(expected) <= set(results)
    assert all(math.isclose(results[k], v, rel_tol=0, abs_tol=1e-12) for k, v in expected.items())
    assert "test/cls/accuracy" in results          # the selected checkpoint is still tested once
    assert results["monitor"] == "train/loss/task"     # KD4MTL: the lowest epoch-mean training loss
    epochs = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r["type"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2, 3]
    assert results["best_epoch"] == min(epochs, key=lambda r: r["train/loss/task"])["epoch"]


@pytest.mark.slow
def test_mean_of_the_last_epochs_tests_is_exact_on_resume(fake_cifar10, tmp_path, shared_cache):
    whole = tmp_path / "whole"
    _ok(run_kdmtl(_base(fake_cifar10, whole, *AVERAGE), tmp_path, shared_cache))
    resumed = _resumed_run(fake_cifar10, tmp_path / "parts", tmp_path, shared_cache)
    uninterrupted = json.loads((whole / "results.json").read_text())["results"]
    means = [k for k in uninterrupted if k.startswith("test_mean_last2/")]
    assert means and all(uninterrupted[k] == resumed[k] for k in means)


def test_report_compares_a_mean_last_published_number_with_the_mean(tmp_path):
    from kdmtl_cli.report.runs import Group, Run
    from kdmtl_cli.report.table import rows

    pub = [{"model": "student", "metric": "test/cls/accuracy", "value": 0.5, "epoch": "mean_last10", "source": "P"}]
    config = {"tasks": {"cls": {"kind": "classification"}}, "published": pub, "seed": 0}
    run = Run(tmp_path, config, {"test/cls/accuracy": 0.9, "test_mean_last10/cls/accuracy": 0.6}, {}, {})
    (row,) = rows([Group("g", [run])])
    assert math.isclose(row["Δ vs published"], 0.1) and "mean of the last 10 epochs" in row["source"]
