"""Several teachers for the same tasks (`teacher=ensemble`, kdmtl_cli/teachers.py TeacherEnsemble and
member_configs; kdmtl_cli/distill/objective.py): each method runs once per teacher with its own learned
parts, each teacher's terms are logged on their own (`kd:t<k>/cls`) and weighted 1 / (number of teachers),
or with `teacher.balance=true` form the weighting's groups `teacher.<k>`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import OmegaConf

from conftest import FAST, assert_one_line_error, read_jsonl, run_kdmtl, show
from distill_checks import loss_yaml, make_tasks, randn
from kdmtl_cli.distill import build_methods
from kdmtl_cli.distill.objective import Objective
from kdmtl_cli.teachers import TeacherEnsemble

pytestmark = pytest.mark.usefixtures("one_thread")


class FixedTeacher(nn.Module):
    """A teacher answering fixed outputs, whatever the image."""

    def __init__(self, outputs):
        super().__init__()
        self.outputs = outputs

    def forward(self, image):
        return {"outputs": {k: v.clone() for k, v in self.outputs.items()}, "features": {}}


def _kd_cls_by_hand(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton's KD, float64, written out: T^2 * mean over samples of sum_c p_t (log p_t - log p_s)."""
    log_p_s = student / temperature - torch.logsumexp(student / temperature, dim=1, keepdim=True)
    log_p_t = teacher / temperature - torch.logsumexp(teacher / temperature, dim=1, keepdim=True)
    return temperature ** 2 * (log_p_t.exp() * (log_p_t - log_p_s)).sum(1).mean()


def _objective(teacher, members: int, balance: bool = False):
    tasks = make_tasks(5, 3, depth=False)
    loss_cfg = OmegaConf.create({"task_weight": 1.0, "kd": loss_yaml("kd")})
    methods = build_methods(loss_cfg, tasks, list(tasks), members=members)
    return Objective(tasks, 1.0, methods, teacher, balance=balance), tasks


def _answers(seed):
    return {"cls": randn(4, 5, seed=seed, scale=3.0), "seg": randn(4, 3, 6, 6, seed=seed + 1, scale=2.0)}


def test_each_teacher_is_distilled_on_its_own_and_weighted_by_one_over_their_number():
    teachers = [FixedTeacher(_answers(10)), FixedTeacher(_answers(20)), FixedTeacher(_answers(30))]
    student_out = {"outputs": _answers(0), "features": {}}
    batch = {"image": torch.zeros(4, 3, 6, 6, dtype=torch.float64),
             "targets": {"cls": torch.tensor([0, 1, 2, 3]), "seg": torch.randint(0, 3, (4, 6, 6),
                                                                                 generator=torch.Generator().manual_seed(0))}}
    ensemble, _ = _objective(TeacherEnsemble(teachers), members=3)
    groups, extra, terms = ensemble.losses(student_out, batch)
    assert extra is None
    weight, temperature = float(loss_yaml("kd").weight), float(loss_yaml("kd").temperature)
    by_hand = [_kd_cls_by_hand(student_out["outputs"]["cls"], t.outputs["cls"], temperature) for t in teachers]
    for k, value in enumerate(by_hand):      # each teacher's term, logged on its own
        assert abs(float(terms[f"kd:t{k}/cls"]) - float(value)) < 1e-9
    task = float(terms["task/cls"])      # the task losses run in float32 (tasks/classification.py)
    assert abs(task - float(F.cross_entropy(student_out["outputs"]["cls"], batch["targets"]["cls"]))) < 1e-6
    expected = task + weight * sum(by_hand) / 3
    assert abs(float(groups["cls"]) - float(expected)) < 1e-9
    # seg: each teacher alone (its own one-teacher objective) gives the same per-teacher term
    for k, teacher in enumerate(teachers):
        single, _ = _objective(teacher, members=0)
        _, _, alone = single.losses(student_out, batch)
        assert abs(float(terms[f"kd:t{k}/seg"]) - float(alone["kd/seg"])) < 1e-12
    seg_task = float(terms["task/seg"])
    assert abs(float(groups["seg"]) - (seg_task + weight * sum(float(terms[f"kd:t{k}/seg"]) for k in range(3)) / 3)) \
        < 1e-9


def test_balance_makes_each_teacher_a_group_of_the_weighting():
    teachers = [FixedTeacher(_answers(10)), FixedTeacher(_answers(20))]
    student_out = {"outputs": _answers(0), "features": {}}
    batch = {"image": torch.zeros(4, 3, 6, 6), "targets": {"cls": torch.tensor([0, 1, 2, 3]),
                                                           "seg": torch.zeros(4, 6, 6, dtype=torch.long)}}
    objective, _ = _objective(TeacherEnsemble(teachers), members=2, balance=True)
    groups, extra, terms = objective.losses(student_out, batch)
    assert sorted(groups) == ["cls", "seg", "teacher.0", "teacher.1"]
    assert float(groups["cls"]) == float(terms["task/cls"])     # the tasks' own losses only
    weight = float(loss_yaml("kd").weight)
    for k in range(2):
        expected = weight * (float(terms[f"kd:t{k}/cls"]) + float(terms[f"kd:t{k}/seg"])) / 2
        assert abs(float(groups[f"teacher.{k}"]) - expected) < 1e-9


def test_the_ensemble_answers_the_members_mean():
    teachers = [FixedTeacher(_answers(10)), FixedTeacher(_answers(20))]
    out = TeacherEnsemble(teachers)(torch.zeros(1))
    for task in ("cls", "seg"):
        assert torch.allclose(out["outputs"][task], (teachers[0].outputs[task] + teachers[1].outputs[task]) / 2)
    assert len(out["members"]) == 2


# ================================================================ through the CLI
def _teacher_file(run_dir: Path) -> Path:
    """The cached weights file the run's single teacher came from (results.json `teacher.source`)."""
    return Path(json.loads((run_dir / "results.json").read_text())["teacher"]["source"])


def test_an_ensemble_of_one_teachers_copies_trains_the_student_as_that_teacher(workdir, shared_cache):
    """Two members loaded from the same file: each term is half of the single teacher's, so the student's
    training is bit for bit the single teacher's (kd has no learned parts; x/2 + x/2 = x exactly)."""
    first = workdir / "first"
    proc = run_kdmtl(["train", "loss=kd", *FAST, f"hydra.run.dir={first}"], workdir, shared_cache)
    assert proc.returncode == 0, show(proc)
    weights = _teacher_file(first)
    assert weights.is_file()
    single, pair = workdir / "single", workdir / "pair"
    proc = run_kdmtl(["train", "loss=kd", f"teacher.checkpoint={weights}", *FAST, f"hydra.run.dir={single}"],
                     workdir, shared_cache)
    assert proc.returncode == 0, show(proc)
    proc = run_kdmtl(["train", "loss=kd", "teacher=ensemble",
                      f"teacher.members=[{{checkpoint: '{weights}'}},{{checkpoint: '{weights}'}}]",
                      *FAST, f"hydra.run.dir={pair}"], workdir, shared_cache)
    assert proc.returncode == 0, show(proc)
    a = torch.load(single / "checkpoints" / "last.pt", weights_only=True)["model"]
    b = torch.load(pair / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = [r for r in read_jsonl(pair / "metrics.jsonl") if r.get("type") == "epoch"]
    assert {"train/kd:t0/cls", "train/kd:t1/cls", "train/kd:t0/seg", "train/kd:t1/seg"} <= set(rows[-1])
    assert rows[-1]["train/kd:t0/cls"] == rows[-1]["train/kd:t1/cls"]
    single_results = json.loads((single / "results.json").read_text())["results"]
    pair_results = json.loads((pair / "results.json").read_text())["results"]
    teacher_metrics = {k: v for k, v in single_results.items() if k.startswith("teacher/test/")}
    assert teacher_metrics       # the mean of two equal answers is the answer
    assert {k: pair_results[k] for k in teacher_metrics} == teacher_metrics


def test_members_of_other_architectures_get_their_own_learned_parts_and_cache_entries(workdir, tmp_path):
    cache = tmp_path / "cache"
    run_dir = workdir / "run"
    proc = run_kdmtl(["train", "loss=[kd,fitnet]", "teacher=ensemble", "teacher.members=[{},{width: 24}]",
                      *FAST, f"hydra.run.dir={run_dir}"], workdir, cache)
    assert proc.returncode == 0, show(proc)
    entries = [json.loads(p.read_text()) for p in (cache / "teachers").glob("*/teacher.json")]
    assert sorted(e["config"]["width"] for e in entries) == [24, 32]
    checkpoint = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    regressors = {k: v.shape for k, v in checkpoint["objective"].items() if k.startswith("fitnet:")}
    t0 = [s for k, s in regressors.items() if k.startswith("fitnet:t0.")]
    t1 = [s for k, s in regressors.items() if k.startswith("fitnet:t1.")]
    assert t0 and t1 and t0 != t1            # each regressor maps to its own teacher's channels
    rows = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r.get("type") == "epoch"]
    assert any(k.startswith("train/fitnet:t1/") for k in rows[-1]), sorted(rows[-1])
    results = json.loads((run_dir / "results.json").read_text())["results"]
    assert results["student/distill_params"] == sum(v.numel() for k, v in checkpoint["objective"].items()
                                                    if k.endswith("weight") or k.endswith("bias"))


def test_balanced_teachers_are_weighted_by_the_strategy(workdir, shared_cache):
    run_dir = workdir / "run"
    proc = run_kdmtl(["train", "loss=kd", "teacher=ensemble", "teacher.balance=true", "weighting=uncertainty",
                      *FAST, f"hydra.run.dir={run_dir}"], workdir, shared_cache)
    assert proc.returncode == 0, show(proc)
    last = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r.get("type") == "epoch"][-1]
    for group in ("cls", "seg", "depth", "teacher.0", "teacher.1"):
        assert f"train/weight/{group}" in last and f"train/group/{group}" in last, sorted(last)
    checkpoint = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    log_vars = [v for k, v in checkpoint["weighting"].items() if v.dim() == 1]
    assert log_vars and log_vars[0].numel() == 5      # one learned uncertainty per task and per teacher


@pytest.mark.parametrize("args,words", [
    (["teacher.members=[{}]"], ["at least two teachers", "teacher.members"]),
    (["teacher.members=[{},{widht: 3}]"], ["teacher.members[1]", "widht"]),
    (["teacher.members=[{},{mode: per_task}]"], ["teacher.members[1].mode"]),
    (["teacher.members=[{},{seed: one}]"], ["teacher.members[1].seed"]),
    (["teacher.cache=views"], ["teacher.cache", "ensemble"]),
    (["teacher.checkpoint=x.pt"], ["per member", "teacher.members"]),
])
def test_bad_ensembles_fail_in_one_line_before_any_teacher_is_trained(args, words, workdir, tmp_path):
    cache = tmp_path / "cache"
    proc = run_kdmtl(["train", "loss=kd", "teacher=ensemble", *args, *FAST, f"hydra.run.dir={workdir / 'run'}"],
                     workdir, cache)
    assert_one_line_error(proc, *words)
    assert not (cache / "teachers").exists()


@pytest.mark.slow
def test_an_ensemble_run_resumes_exactly(workdir, shared_cache):
    """The members' own learned parts (two FitNet regressor sets) are saved and restored."""
    common = ["train", "loss=fitnet", "teacher=ensemble", *FAST, "optim.epochs=2"]
    straight, interrupted = workdir / "straight", workdir / "interrupted"
    for args in ([f"hydra.run.dir={straight}"], ["stop_after_epoch=1", f"hydra.run.dir={interrupted}"]):
        proc = run_kdmtl([*common, *args], workdir, shared_cache)
        assert proc.returncode == 0, show(proc)
    proc = run_kdmtl(["train", f"resume={interrupted}", "log.progress=plain"], workdir, shared_cache)
    assert proc.returncode == 0, show(proc)
    a = torch.load(straight / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(interrupted / "checkpoints" / "last.pt", weights_only=True)
    assert any(k.startswith("fitnet:t1.") for k in a["objective"])
    for part in ("model", "objective"):
        assert a[part].keys() == b[part].keys() and all(torch.equal(a[part][k], b[part][k]) for k in a[part])


def test_an_init_stage_with_an_ensemble_is_refused_before_any_teacher_is_trained(workdir, tmp_path):
    cache = tmp_path / "cache"
    proc = run_kdmtl(["train", "loss=ab", "teacher=ensemble", *FAST, f"hydra.run.dir={workdir / 'run'}"],
                     workdir, cache)
    assert_one_line_error(proc, "init stage of loss.ab", "teacher=ensemble", "loss.ab.init_epochs=0")
    assert not (cache / "teachers").exists()
