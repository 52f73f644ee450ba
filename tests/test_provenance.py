"""Every run records where its numbers come from (kdmtl_cli/provenance.py): code, environment, data,
teacher, config hash, command, host, start; `kdmtl report` keeps runs of other code or data apart."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import FAST, REPO, TB, run_kdmtl, show


def _git(*args, cwd=REPO):
    done = subprocess.run(["git", "-C", str(cwd), *args], capture_output=True, text=True, check=False)
    return done.stdout if done.returncode == 0 else None


@pytest.fixture(scope="module")
def run(tmp_path_factory, shared_cache):
    root = tmp_path_factory.mktemp("prov")
    run_dir = root / "run"
    proc = run_kdmtl(["train", *FAST, TB, f"hydra.run.dir={run_dir}"], root, shared_cache)
    assert proc.returncode == 0, show(proc)
    return run_dir, json.loads((run_dir / "results.json").read_text())


def test_results_record_code_environment_data_and_command(run):
    import torch
    import torchvision

    run_dir, saved = run
    record = saved["provenance"]
    # the config hash, recomputed from the config the run saved
    assert record["config_sha256"] == hashlib.sha256(json.dumps(saved["config"], sort_keys=True).encode()).hexdigest()
    assert record["torch"] == torch.__version__ and record["torchvision"] == torchvision.__version__
    assert record["python"] == ".".join(map(str, sys.version_info[:3]))
    assert record["cuda"] == torch.version.cuda and record["devices"]
    assert record["command"].startswith("kdmtl train ") and f"hydra.run.dir={run_dir}" in record["command"]
    data_dir = Path(saved["config"]["cache_dir"]).expanduser() / "data" / "shapes" / record["data_fingerprint"]
    assert data_dir.is_dir(), data_dir          # the generated data set is cached under its fingerprint
    # the teacher: its cache key is the directory its weights came from
    assert record["teacher_source"] == saved["teacher"]["source"]
    assert record["teacher_key"] == saved["teacher"]["source"].split("/")[-2]
    head = _git("rev-parse", "HEAD")
    if head is None:
        assert record["code"]["commit"] is None
        return
    assert record["code"]["commit"] == head.strip()
    dirty = bool((_git("status", "--porcelain", "--untracked-files=no") or "").strip())
    assert record["code"]["dirty"] == dirty
    patch = run_dir / "code.patch"
    assert patch.exists() == dirty
    if dirty:    # the diff beside the run is the one the record hashes
        assert hashlib.sha256(patch.read_text().encode()).hexdigest() == record["code"]["patch_sha256"]


def test_summary_and_tensorboard_carry_it(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, saved = run
    summary = (run_dir / "summary.md").read_text()
    assert "## Provenance" in summary and saved["provenance"]["config_sha256"] in summary
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"tensors": 0})
    acc.Reload()
    assert "provenance/text_summary" in acc.Tags()["tensors"]
    text = acc.Tensors("provenance/text_summary")[0].tensor_proto.string_val[0].decode()
    assert saved["provenance"]["config_sha256"] in text


def test_code_state_of_a_checkout(tmp_path):
    from kdmtl_cli.provenance import code_state

    assert code_state(tmp_path)["commit"] is None                 # not a git checkout
    repo = tmp_path / "repo"
    (repo / "kdmtl_cli").mkdir(parents=True)
    (repo / "kdmtl_cli" / "a.py").write_text("x = 1\n")
    for args in (["init", "-q"], ["add", "."], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "a"]):
        assert _git(*args, cwd=repo) is not None
    clean = code_state(repo / "kdmtl_cli")
    assert clean == {"commit": _git("rev-parse", "HEAD", cwd=repo).strip(), "dirty": False, "diff": ""}
    (repo / "kdmtl_cli" / "a.py").write_text("x = 2\n")
    dirty = code_state(repo / "kdmtl_cli")
    assert dirty["dirty"] and "-x = 1" in dirty["diff"] and "+x = 2" in dirty["diff"]


def _fabricated(root, name, seed, acc, commit, fingerprint="d1"):
    run = root / name
    run.mkdir(parents=True)
    config = {"seed": seed, "tasks": {"cls": {"kind": "classification"}}, "loss": {"kd": None},
              "weighting": {"name": "equal"}}
    (run / "config.yaml").write_text(json.dumps(config))
    (run / "results.json").write_text(json.dumps({
        "config": config, "results": {"test/cls/accuracy": acc}, "overrides": [f"seed={seed}"],
        "best": {}, "last": {},
        "provenance": {"code": {"commit": commit, "dirty": False, "patch_sha256": None},
                       "data_fingerprint": fingerprint}}))


def test_report_keeps_runs_of_other_code_apart(tmp_path):
    old, new = "a" * 40, "b" * 40
    for seed, acc in ((0, 0.5), (1, 0.6)):
        _fabricated(tmp_path, f"old{seed}", seed, acc, old)
    for seed, acc in ((2, 0.8), (3, 0.9)):
        _fabricated(tmp_path, f"new{seed}", seed, acc, new)
    proc = subprocess.run([sys.executable, "-m", "kdmtl_cli", "report", str(tmp_path)], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "COLUMNS": "160"})
    assert proc.returncode == 0, proc.stderr
    assert "other code or data are not pooled" in proc.stdout
    assert "[code aaaaaaa]" in proc.stdout and "[code bbbbbbb]" in proc.stdout
    with open(tmp_path / "report.csv", encoding="utf-8") as handle:
        rows = {r["group"]: r for r in csv.DictReader(handle)
                if r["metric"].startswith("test/cls/accuracy")}
    (old_row,) = [r for g, r in rows.items() if "aaaaaaa" in g]
    (new_row,) = [r for g, r in rows.items() if "bbbbbbb" in g]
    assert float(old_row["test mean"]) == pytest.approx(statistics.mean([0.5, 0.6]))
    assert float(new_row["test mean"]) == pytest.approx(statistics.mean([0.8, 0.9]))


def test_runs_of_the_same_code_and_data_are_pooled(tmp_path):
    from kdmtl_cli.report.runs import find_runs, group_runs

    for seed in (0, 1):
        _fabricated(tmp_path, f"r{seed}", seed, 0.5 + seed / 10, "c" * 40)
    _fabricated(tmp_path, "other_data", 2, 0.9, "c" * 40, fingerprint="d2")
    runs, _ = find_runs([tmp_path])
    groups = group_runs(runs)
    assert sorted(len(g.runs) for g in groups) == [1, 2]
    assert {g.apart for g in groups} == {"data d1", "data d2"}
