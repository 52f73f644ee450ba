"""The init stage (kdmtl_cli/engine/init_stage.py) against RepDistiller's, in float64, and through the CLI.

The `official_init` loop below is transcribed from HobbitLong/RepDistiller at
b84f547c5db6a35318d4671d7d5c4de74c822403 (not from kdmtl's code): helper/pretrain.py `init` (L11-31:
model_t.eval(), model_s.eval(), init_modules.train(), SGD over init_modules with lr, opt.momentum and
opt.weight_decay; L36-84: init_epochs epochs of forward, loss, zero_grad, backward, step; abound
L63-67: sum(ABLoss(connector(feat_s[1:-1]), feat_t[1:-1])); fsp L72-74: sum(FSP(feat_s[:-1], feat_t[:-1])));
train_student.py L227-236 (abound: init_modules = [connector, model_s.get_feat_modules()]) and L254-261
(fsp: init_modules = [model_s.get_feat_modules()]); models/resnet.py L154-162 `get_feat_modules` (the
stem and layer1..3: here the student's `trunk`). The losses' transcriptions are those of
tests/test_distill_ab_ft.py and tests/test_distill_fsp_cc.py.

Also here: the student's heads are untouched by the stage, its epoch means are logged as `init/<term>`,
a run resumed from a main-stage checkpoint skips it, a restarted stage drops the stopped attempt's
records and redoes it identically, methods with `main_stage: false` add no term to the main training,
and (slow) a run with an init stage stopped after its first main epoch and resumed equals the straight run.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
from omegaconf import OmegaConf

from conftest import REPO, read_jsonl, show
from distill_checks import (build_method, epoch_terms_are_finite, make_tasks, record_diff, resume_equals_straight,
                            train_at_once)
from test_distill_ab_ft import OfficialABLoss, OfficialConnector
from test_distill_fsp_cc import OfficialFSP
from kdmtl_cli.distill.ab import ABConfig, ActivationBoundaries
from kdmtl_cli.distill.fsp import FlowOfSolutionProcedure, FSPConfig
from kdmtl_cli.distill.ft import FactorTransfer, FTConfig
from kdmtl_cli.distill.objective import Objective
from kdmtl_cli.engine.distributed import Ranks
from kdmtl_cli.engine.init_stage import check_init_stages, run_init_stages
from kdmtl_cli.models import build_model

ATOL = 1e-9
pytestmark = pytest.mark.usefixtures("one_thread")
record = functools.partial(record_diff, atol=ATOL)

S_PRE = [f"trunk.stages.{i}.0.preact" for i in range(3)]
STEM_AND_STAGES = ["trunk.stem", "trunk.stages.0", "trunk.stages.1", "trunk.stages.2"]
METHODS = {"ab": (ActivationBoundaries, ABConfig), "fsp": (FlowOfSolutionProcedure, FSPConfig),
           "ft": (FactorTransfer, FTConfig)}


# ================================================================ official code, transcribed
# helper/pretrain.py init (L11-31, L36-84), the data loop reduced to its images
def official_init(model_s, model_t, init_modules, criterion, train_loader, opt):
    model_t.eval()
    model_s.eval()
    init_modules.train()
    lr = opt.learning_rate
    optimizer = torch.optim.SGD(init_modules.parameters(), lr=lr, momentum=opt.momentum,
                                weight_decay=opt.weight_decay)
    for epoch in range(1, opt.init_epochs + 1):
        for idx, input in enumerate(train_loader):
            feat_s = model_s(input)
            with torch.no_grad():
                feat_t = model_t(input)
            loss = criterion(feat_s, feat_t)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


class IsFeat(nn.Module):
    """`model(input, is_feat=True)`'s feature list, taken by forward hooks of its own on a fresh copy."""

    def __init__(self, model, names):
        super().__init__()
        self.model, self.names, self.store = model, list(names), {}
        modules = dict(model.named_modules())
        for n in self.names:
            modules[n].register_forward_hook(lambda _m, _i, out, n=n: self.store.__setitem__(n, out))

    def forward(self, x):
        self.model(x)
        return [self.store[n] for n in self.names]


# ================================================================ kdmtl's side, in process
class Loader:
    """A training loader's interface as the init stage uses it: a fixed list of float64 batches."""

    def __init__(self, batches):
        self.batches, self.epochs, self.views = batches, [], "stored views"

    def set_epoch(self, epoch):
        self.epochs.append(epoch)

    def __iter__(self):
        assert self.views is None, "the init stage runs the teacher: no stored views"
        return iter([{"image": image, "targets": {}, "index": torch.arange(len(image))} for image in self.batches])


HARDWARE = SimpleNamespace(device=torch.device("cpu"), scaler=None, to_input=lambda x: x,
                           autocast=contextlib.nullcontext)


def _cfg(lr=0.05):
    return OmegaConf.create({"log": {"progress": "none"}, "optim": {"lr": lr, "momentum": 0.9, "weight_decay": 5e-4}})


def _setup(name, student_width=16, **overrides):
    """(objective, student, teacher, loader) in float64: the default student/teacher convnets (the student
    `student_width` wide), `name` built from its YAML with `overrides`, set up on a first batch."""
    torch.manual_seed(0)
    tasks = make_tasks(4, 3)
    student_cfg = OmegaConf.merge(OmegaConf.load(REPO / "conf/student/small.yaml"), {"width": student_width})
    student = build_model(student_cfg, tasks).double()
    teacher = build_model(OmegaConf.load(REPO / "conf/teacher/multitask.yaml"), tasks).double()
    cls, settings = METHODS[name]
    method = build_method(cls, settings, name, tasks, ["cls", "seg", "depth"], **overrides)
    objective = Objective(tasks, 1.0, [method], teacher)
    g = torch.Generator().manual_seed(5)
    batches = [torch.randn(6, 3, 32, 32, generator=g, dtype=torch.float64) for _ in range(2)]
    objective.setup(student, {"image": batches[0]}, "cpu")
    objective.modules.double()
    student.fresh_copy = lambda: _copy(build_model(student_cfg, tasks), student)
    teacher.fresh_copy = lambda: _copy(build_model(OmegaConf.load(REPO / "conf/teacher/multitask.yaml"), tasks), teacher)
    return objective, method, student, teacher, Loader(batches)


def _copy(fresh, model):
    """`fresh` (the same architecture, without kdmtl's feature hooks) with `model`'s weights, float64."""
    fresh.double().load_state_dict(model.state_dict())
    return fresh


def _state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def _changed(before, module):
    return sorted(k for k, v in module.state_dict().items() if not torch.equal(before[k], v))


# ================================================================ equal to RepDistiller's init
@pytest.mark.parametrize("name", ["ab", "fsp"])
def test_init_stage_equals_repdistillers_init(name, tmp_path):
    """Two init epochs train the same weights (student trunk, connectors) as the transcribed loop."""
    objective, method, student, teacher, loader = _setup(name, student_width=32 if name == "fsp" else 16,
                                                         init_epochs=2)
    o_modules = copy.deepcopy(method.modules)      # the learned parts before the stage
    if name == "ab":     # train_student.py L227-236; helper/pretrain.py L57-67 (preact features)
        o_student = IsFeat(student.fresh_copy(), S_PRE)
        o_teacher = IsFeat(teacher.fresh_copy(), method.teacher_features)
        connector = OfficialConnector([], [])
        connector.connectors = nn.ModuleList([o_modules[n.replace(".", "__")] for n in S_PRE])
        init_modules = nn.ModuleList([connector, o_student.model.trunk])

        def criterion(feat_s, feat_t):   # helper/pretrain.py L63-67 (on feat[1:-1])
            g_s = init_modules[0](feat_s)
            return sum(OfficialABLoss(len(g_s))(g_s, feat_t))
    else:                # train_student.py L254-261
        o_student = IsFeat(student.fresh_copy(), STEM_AND_STAGES)
        o_teacher = IsFeat(teacher.fresh_copy(), STEM_AND_STAGES)
        init_modules = nn.ModuleList([o_student.model.trunk])

        def criterion(feat_s, feat_t):   # helper/pretrain.py L72-74 (on feat[:-1])
            return sum(OfficialFSP([f.shape for f in feat_s], [f.shape for f in feat_t])(feat_s, feat_t))
    trunk_before, heads, teacher_before = _state(student.trunk), _state(student.heads), _state(teacher)
    run_init_stages(objective, student, loader, HARDWARE, _cfg(), tmp_path, False, Ranks())
    opt = SimpleNamespace(learning_rate=0.05, momentum=0.9, weight_decay=5e-4, init_epochs=2)
    official_init(o_student, o_teacher, init_modules, criterion, loader.batches, opt)
    ours, official = student.trunk.state_dict(), o_student.model.trunk.state_dict()
    for key, value in official.items():
        if value.is_floating_point():
            record(f"{name} init stage, student trunk after 2 epochs", ours[key], value)
        else:
            assert torch.equal(ours[key], value), key
    if name == "ab":
        for n, part in zip(S_PRE, connector.connectors):
            ours_part = method.modules[n.replace(".", "__")].state_dict()
            for key, value in part.state_dict().items():
                if value.is_floating_point():
                    record("ab init stage, connector after 2 epochs", ours_part[key], value)
                else:
                    assert torch.equal(ours_part[key], value), key
    # the trunk (incl. its BN statistics: trained in train mode) changed; the heads and the teacher did not
    assert _changed(trunk_before, student.trunk) and _changed(heads, student.heads) == []
    assert _changed(teacher_before, teacher) == []


def test_init_stage_trains_the_trunk_not_the_heads_logs_and_restores_the_loader(tmp_path):
    objective, method, student, teacher, loader = _setup("ab", init_epochs=3)
    trunk, heads = _state(student.trunk), _state(student.heads)
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"type": "init", "init_epoch": 9}) + "\n")  # a stopped attempt
    run_init_stages(objective, student, loader, HARDWARE, _cfg(), tmp_path, False, Ranks())
    assert _changed(trunk, student.trunk) and _changed(heads, student.heads) == []
    assert loader.epochs == [-1, -2, -3, 0] and loader.views == "stored views"
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["init_epoch"] for r in records] == [1, 2, 3] and all(r["type"] == "init" for r in records)
    for r in records:
        assert {f"init/ab/{n}" for n in S_PRE} <= set(r) and all(math.isfinite(r[f"init/ab/{n}"]) for n in S_PRE)
        assert math.isclose(r["init/ab/init_loss"], sum(r[f"init/ab/{n}"] for n in S_PRE), rel_tol=1e-6)


def test_init_stage_is_repeatable_and_skipped_when_resuming_a_checkpoint(tmp_path):
    results = []
    for _ in range(2):
        objective, method, student, teacher, loader = _setup("ft", init_epochs=2)
        pair = method.modules["trunk__stages__2"]
        student_before, translator = _state(student), _state(pair.translator)
        paraphraser = _state(pair.paraphraser)
        run_init_stages(objective, student, loader, HARDWARE, _cfg(), tmp_path / str(len(results)), False, Ranks())
        # ft's init stage trains the paraphraser only
        assert _changed(student_before, student) == [] and _changed(translator, pair.translator) == []
        assert _changed(paraphraser, pair.paraphraser)
        results.append(_state(pair.paraphraser))
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])
    objective, method, student, teacher, loader = _setup("ab")
    (tmp_path / "resumed" / "checkpoints").mkdir(parents=True)
    (tmp_path / "resumed" / "checkpoints" / "last.pt").write_bytes(b"")
    before = _state(student)
    run_init_stages(objective, student, loader, HARDWARE, _cfg(), tmp_path / "resumed", True, Ranks())
    assert _changed(before, student) == [] and loader.epochs == []
    assert not (tmp_path / "resumed" / "metrics.jsonl").exists()


def test_init_stage_refuses_several_processes_in_one_line(tmp_path):
    from kdmtl_cli.errors import KdmtlError

    objective, method, student, teacher, loader = _setup("fsp", student_width=32)
    with pytest.raises(KdmtlError, match="init stage of loss.fsp is not supported with several processes"):
        check_init_stages(objective.methods, Ranks(rank=0, world=2))   # run.py, before any teacher is trained
    objective, method, student, teacher, loader = _setup("fsp", student_width=32, init_epochs=0)
    before = _state(student)
    run_init_stages(objective, student, loader, HARDWARE, _cfg(), tmp_path, False, Ranks(rank=0, world=2))
    assert _changed(before, student) == []    # init_epochs=0: no init stage


# ================================================================ through the real CLI
RUNS = {"fsp": ["loss=fsp", "student.width=32", "loss.fsp.init_epochs=2"],
        "fsp_main": ["loss=fsp", "student.width=32", "loss.fsp.init_epochs=1", "loss.fsp.main_stage=true"],
        "ab": ["loss=ab", "loss.ab.init_epochs=2", "optim.epochs=2"]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shared_cache):
    return train_at_once(RUNS, tmp_path_factory.mktemp("init_stage"), shared_cache)


@pytest.mark.parametrize("name, method, epochs", [("fsp", "fsp", 2), ("ab", "ab", 2)])
def test_cli_init_stage_logs_its_terms_then_the_main_stage_trains_without_them(runs, name, method, epochs):
    run_dir, proc = runs[name]
    epoch_terms_are_finite(run_dir, proc, ["loss/task", "loss/total"])
    records = read_jsonl(run_dir / "metrics.jsonl")
    init = [r for r in records if r.get("type") == "init"]
    assert [r["init_epoch"] for r in init] == list(range(1, epochs + 1)), records
    assert all(k.startswith(f"init/{method}/") and math.isfinite(v) for r in init for k, v in r.items()
               if k.startswith("init/")), init
    assert sum(f"[init {method}] epoch" in line for line in proc.stdout.splitlines()) == epochs, show(proc)
    main = [r for r in records if r.get("type") in ("epoch", "step")]
    assert main and not [k for r in main for k in r if f"/{method}/" in k], "main_stage: false adds no term"
    first = records.index(init[-1])
    assert all(records.index(r) > first for r in main)      # the init stage comes first
    epochs_done = [r for r in records if r.get("type") == "epoch"]
    assert all(math.isclose(r["train/loss/total"], r["train/loss/task"], rel_tol=1e-6) for r in epochs_done)


def test_cli_main_stage_true_adds_the_terms_to_the_main_training(runs):
    run_dir, proc = runs["fsp_main"]
    epoch_terms_are_finite(run_dir, proc, ["fsp/trunk.stem+trunk.stages.0", "fsp/trunk.stages.1+trunk.stages.2"])
    assert any(r.get("type") == "init" for r in read_jsonl(run_dir / "metrics.jsonl"))


@pytest.mark.slow   # ~90 s: three runs with ft's default 30-epoch init stage
def test_cli_resume_after_the_first_main_epoch_equals_the_straight_run(workdir, shared_cache):
    """`loss=ft` (an init stage of 30 epochs for the paraphraser, then translators trained with the
    student) stopped after its first main epoch and resumed: the same weights as the straight run, bit
    for bit; the resumed run skips the init stage; the paraphraser is not trained in the main stage."""
    after_one, reference, resumed = resume_equals_straight(
        "ft", workdir, shared_cache, trained=["ft.trunk__stages__2.translator.encoder.0.weight"])
    for key, value in reference["model"].items():
        assert torch.equal(resumed["model"][key], value), key
    for key, value in reference["objective"].items():
        if ".paraphraser." in key:
            assert torch.equal(after_one["objective"][key], value), key
    log = (workdir / "interrupted" / "train.log").read_text()
    assert log.count("[init ft] epoch 30/30") == 1 and "init stage of ft: skipped" in log, log[-3000:]


def test_debug_fast_shrinks_init_stages_and_crd_negatives_unless_the_command_line_sets_them():
    from kdmtl_cli.commands.train import apply_debug

    def config(init_epochs):
        return OmegaConf.create({
            "debug": {"epochs": 1, "max_batches": 2, "train_size": 128, "val_size": 64, "test_size": 64},
            "loss": {"task_weight": 1.0, "fsp": {"init_epochs": init_epochs}, "kd": {"weight": 0.5},
                     "crd": {"nce_k": 16384}},
            "data": {"val_size": 1000, "train_size": 4000, "test_size": 2000}, "test": {"average_last_epochs": 0},
            "optim": {"epochs": 6}, "teacher": {"optim": {"epochs": 8}},
            "limit_train_batches": None, "limit_eval_batches": None})

    assert apply_debug(config(30)).loss.fsp.init_epochs == 1
    assert apply_debug(config(0)).loss.fsp.init_epochs == 0          # no init stage stays none
    assert apply_debug(config(3), ["loss.fsp.init_epochs=3"]).loss.fsp.init_epochs == 3
    assert "init_epochs" not in apply_debug(config(30)).loss.kd
    assert apply_debug(config(30)).loss.crd.nce_k == 128 // 4                 # CRD's negatives fit the split
    assert apply_debug(config(30), ["loss.crd.nce_k=16384"]).loss.crd.nce_k == 16384
