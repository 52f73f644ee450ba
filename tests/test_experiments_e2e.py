"""Shipped paper experiments through the real CLI, one short step each (`debug=fast`) on
fabricated data in the real CIFAR-100 on-disk format: the recipe composes, the zoo teacher is
trained and the zoo student distilled, and the published numbers travel into results.json.
Three representative experiments run by default (one per method); all of them with -m slow."""

from __future__ import annotations

import json
import pickle
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import yaml

from conftest import FAST, REPO, WORKERS, run_kdmtl, show

REPDISTILLER = sorted(p.stem for p in (REPO / "conf" / "experiment").glob("cifar100_*.yaml"))
DEFAULT = ["cifar100_resnet32x4_resnet8x4_kd", "cifar100_wrn_40_2_wrn_16_2_dkd", "cifar100_vgg13_vgg8_vanilla"]


def write_fake_cifar100(root, n_train=200, n_test=80, seed=0):
    """Random images and cycling labels in the `cifar-100-python/{train,test,meta}` pickle layout."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for name, n in (("train", n_train), ("test", n_test)):
        rows = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        (folder / name).write_bytes(pickle.dumps({"data": rows, "fine_labels": [i % 100 for i in range(n)],
                                                  "coarse_labels": [i % 20 for i in range(n)]}))
    (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": [f"class{i}" for i in range(100)],
                                                "coarse_label_names": [f"super{i}" for i in range(20)]}))
    return root


@pytest.fixture(scope="module")
def fake_cifar(tmp_path_factory):
    return write_fake_cifar100(tmp_path_factory.mktemp("cifar"))


def _run_all(names, fake_cifar, area, cache):
    args = {name: ["train", f"+experiment={name}", *FAST, f"data.root={fake_cifar}", "data.download=false",
                   "data.eval_batch_size=64", f"hydra.run.dir={area / name}"] for name in names}
    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        futures = {name: pool.submit(run_kdmtl, a, area, cache) for name, a in args.items()}
        return {name: future.result() for name, future in futures.items()}


def _check(name, proc, run_dir):
    assert proc.returncode == 0, show(proc)
    saved = json.loads((run_dir / "results.json").read_text())
    config, results = saved["config"], saved["results"]
    recipe = yaml.safe_load((REPO / "conf" / "experiment" / f"{name}.yaml").read_text())
    assert config["student"]["arch"] == recipe["student"]["arch"]
    assert config["data"]["name"] == "cifar100" and config["data"]["crop_padding"] == 4
    assert config["optim"]["milestones"] == [150, 180, 210] and config["optim"]["name"] == "sgd"
    assert 0.0 <= results["test/cls/accuracy"] <= 1.0
    assert config["published"], "the experiment's published numbers are recorded with the run"
    if name.endswith("_vanilla"):
        assert "teacher/test/cls/accuracy" not in results
    else:
        assert config["teacher"]["optim"] == config["optim"]         # the teacher follows the recipe
        assert "teacher/test/cls/accuracy" in results
        assert config["teacher"]["arch"] == recipe["teacher"]["arch"]


def test_representative_experiments_run_one_short_step(fake_cifar, tmp_path, shared_cache):
    procs = _run_all(DEFAULT, fake_cifar, tmp_path, shared_cache)
    for name, proc in procs.items():
        _check(name, proc, tmp_path / name)


@pytest.mark.slow
def test_every_repdistiller_experiment_runs_one_short_step(fake_cifar, tmp_path, shared_cache):
    procs = _run_all(REPDISTILLER, fake_cifar, tmp_path, shared_cache)
    for name, proc in procs.items():
        _check(name, proc, tmp_path / name)
