"""Helpers shared by the distillation-method test files: float64 comparisons with the official code,
task sets and methods built from their YAML, and runs of the real CLI (terms logged, resume exact)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable, Optional

import torch
from omegaconf import OmegaConf

from conftest import FAST, REPO, read_jsonl, run_kdmtl, show
from kdmtl_cli.data import TargetSpec
from kdmtl_cli.tasks import TASK_KINDS, Task, _load_kinds


# ================================================================ float64 comparisons
def randn(*shape, seed=0, scale=1.0):
    """A float64 standard-normal tensor of `shape` from its own generator seeded `seed`, times `scale`."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


def record_diff(what: str, ours: torch.Tensor, official: torch.Tensor, *, atol: float,
                diffs: Optional[dict] = None, rel: bool = False, flat: bool = True) -> float:
    """Assert float64 `ours` is within `atol` (times max(1, |official|) if `rel`) of `official`; print and keep the max diff."""
    assert ours.dtype == torch.float64, f"{what}: computed in {ours.dtype}, not the input's float64"
    ours, official = ours.detach(), official.detach()
    if flat:
        ours, official = ours.reshape(-1), official.reshape(-1)
    diff = float((ours - official).abs().max())
    if diffs is not None:
        diffs[what] = max(diffs.get(what, 0.0), diff)
    print(f"official-diff {what}: {diff:.3e}")
    bound = atol * max(1.0, float(official.abs().max())) if rel else atol
    assert diff <= bound, f"{what}: max abs diff {diff} > {bound}"
    return diff


# ================================================================ kdmtl's side, built as the trainer does
def make_tasks(cls_classes: int, seg_classes: int, depth: bool = True, tags: Optional[int] = None) -> dict:
    """Tasks cls and seg (with these class counts), then depth (mean 2, std 1) and multilabel `tags` if asked."""
    _load_kinds()
    kind = lambda name: TASK_KINDS.get(name)()  # noqa: E731
    tasks = {"cls": Task("cls", kind("classification"), TargetSpec("classification", cls_classes), "cls"),
             "seg": Task("seg", kind("segmentation"), TargetSpec("segmentation", seg_classes), "seg")}
    if depth:
        tasks["depth"] = Task("depth", kind("depth"), TargetSpec("depth", mean=2.0, std=1.0), "depth")
    if tags is not None:
        tasks["tags"] = Task("tags", kind("multilabel"), TargetSpec("multilabel", tags), "tags")
    return tasks


def loss_yaml(name: str):
    """conf/loss/NAME.yaml, as loaded."""
    return OmegaConf.load(REPO / "conf" / "loss" / f"{name}.yaml")


def settings_from_yaml(settings, name: str, **overrides):
    """A method's node from conf/loss/NAME.yaml with `overrides`, validated by its settings class."""
    return OmegaConf.merge(OmegaConf.structured(settings), loss_yaml(name), overrides)


def build_method(method_cls, settings, name: str, tasks: dict, teacher_tasks: Iterable[str], **overrides):
    """`method_cls` built from its YAML (plus `overrides`) for `tasks` and `teacher_tasks`."""
    return method_cls(settings_from_yaml(settings, name, **overrides), tasks, list(teacher_tasks))


def assert_same_terms(method, other, student_features: dict, teacher_features: dict) -> None:
    """Both methods (e.g. one restored from the other's state) give bit-identical terms on these features."""
    batch = ({"features": student_features}, {"features": teacher_features}, {}, {})
    ours, theirs = method(*batch), other(*batch)
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name


# ================================================================ through the real CLI
def cli_terms(run_dir: Path, prefix: str) -> dict:
    """Every `<prefix>/` metric of a run's metrics.jsonl (the last value of each)."""
    values = {}
    for row in read_jsonl(run_dir / "metrics.jsonl"):
        values.update({k: v for k, v in row.items() if f"/{prefix}/" in k or k.startswith(f"{prefix}/")})
    return values


def train_logs_finite_terms(loss: str, methods: Iterable[str], workdir: Path, cache: Path, extra=()) -> Path:
    """Run `kdmtl train loss=LOSS` (FAST); assert it finished and each method logged finite terms; return its run folder."""
    run_dir = workdir / "run"
    proc = run_kdmtl(["train", f"loss={loss}", *extra, *FAST, f"hydra.run.dir={run_dir}"], workdir, cache)
    assert proc.returncode == 0, show(proc)
    assert (run_dir / "results.json").exists(), show(proc)
    json.loads((run_dir / "results.json").read_text())
    for method in methods:
        terms = cli_terms(run_dir, method)
        assert terms, f"no {method}/ term in metrics.jsonl\n" + show(proc)
        assert all(isinstance(v, (int, float)) and math.isfinite(v) for v in terms.values()), terms
    return run_dir


def assert_terms_logged(run_dir: Path, method: str, suffixes: Iterable[str]) -> None:
    """Assert each suffix ends some `<method>/` metric of the run."""
    for term in suffixes:
        terms = cli_terms(run_dir, method)
        assert any(k.endswith(term) for k in terms), (term, sorted(terms))


def resume_equals_straight(loss: str, workdir: Path, cache: Path, trained: Iterable[str], extra=()):
    """2 epochs of `loss=LOSS` (+ `extra` overrides) straight vs stopped after 1 and resumed: equal learned
    parts bit for bit, the `trained` ones changed in epoch 2; returns the (after one epoch, straight,
    resumed) checkpoints."""
    common = ["train", f"loss={loss}", *extra, *FAST, "optim.epochs=2"]
    straight, interrupted = workdir / "straight", workdir / "interrupted"
    for args in ([f"hydra.run.dir={straight}"], ["stop_after_epoch=1", f"hydra.run.dir={interrupted}"]):
        proc = run_kdmtl([*common, *args], workdir, cache, fresh=True)
        assert proc.returncode == 0, show(proc)
    after_one = torch.load(interrupted / "checkpoints" / "last.pt", weights_only=True)
    assert after_one["epoch"] == 1
    proc = run_kdmtl(["train", f"resume={interrupted}", "log.progress=plain"], workdir, cache, fresh=True)
    assert proc.returncode == 0 and "resuming" in proc.stdout, show(proc)
    reference = torch.load(straight / "checkpoints" / "last.pt", weights_only=True)
    resumed = torch.load(interrupted / "checkpoints" / "last.pt", weights_only=True)
    assert set(reference["objective"]) == set(resumed["objective"])
    for key, value in reference["objective"].items():
        assert torch.equal(resumed["objective"][key], value), key
    for key in trained:   # trained during the second epoch (so the restore above is not trivial)
        assert not torch.equal(after_one["objective"][key], reference["objective"][key]), key
    return after_one, reference, resumed


def train_at_once(runs: dict, root: Path, cache: Path) -> dict:
    """`kdmtl train <args> FAST` for every named argument list, concurrently: {name: (run dir, process)}."""
    from concurrent.futures import ThreadPoolExecutor

    from conftest import WORKERS

    def run(name):
        run_dir = root / name
        return run_dir, run_kdmtl(["train", *runs[name], *FAST, f"hydra.run.dir={run_dir}"], root, cache)

    with ThreadPoolExecutor(WORKERS) as pool:
        return dict(zip(runs, pool.map(run, runs)))


def epoch_terms_are_finite(run_dir: Path, proc, terms: Iterable[str]):
    """The run finished (exit 0, results.json readable) and logged every `train/<term>`, finite, in its
    epoch records; returns its composed config (.hydra/config.yaml)."""
    assert proc.returncode == 0, show(proc)
    assert (run_dir / "results.json").is_file()
    json.loads((run_dir / "results.json").read_text())
    records = read_jsonl(run_dir / "metrics.jsonl")
    epochs = [r for r in records if r.get("type") == "epoch"]
    assert epochs, records
    for term in terms:
        values = [r[f"train/{term}"] for r in epochs if f"train/{term}" in r]
        assert values, f"train/{term} not in {sorted(epochs[-1])}"
        assert all(math.isfinite(v) for v in values), (term, values)
    return OmegaConf.load(run_dir / ".hydra" / "config.yaml")
