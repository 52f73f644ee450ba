"""`ctkd` (kdmtl_cli/distill/ctkd.py) against zhengli97/CTKD, in float64.

The `Official*` code below is transcribed from zhengli97/CTKD at
7d5252241259ae70d38a832371fed9697d15fc14 (not from kdmtl's code):

- models/temp_global.py `Global_T` (L9-17), `GradientReversalFunction` (L21-40), `GradientReversal` (L43-49);
- train_student.py `CosineDecay` (L186-202), built at L401-402 and read once per epoch at L418-419
  (`decay_value = gradient_decay.get_value(epoch)`, epoch from 1: L409);
- helper/loops.py L132-135: `temp = opt.t_start + opt.t_end * torch.sigmoid(mlp_net(logit_t, logit_s, cos_value))`;
- distiller_zoo/KD.py `DistillKL.forward` (L13-20; `.cuda()` dropped: CPU here);
- helper/loops.py L174: loss = gamma * loss_cls + alpha * loss_div + beta * loss_kd.

Every comparison is at 1e-9 (abs) on random float64 inputs; the max abs difference of each comparison
is printed (`pytest -s`) as `official-diff <what>: <value>`.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch.autograd import Function

from distill_checks import (assert_terms_logged, build_method, cli_terms, loss_yaml, make_tasks, randn, record_diff,
                            resume_equals_straight, settings_from_yaml, train_logs_finite_terms)
from kdmtl_cli.distill import build_methods, method_names
from kdmtl_cli.distill.ctkd import CTKDConfig, CurriculumTemperatureKD, curriculum_lambda
from kdmtl_cli.errors import KdmtlError

ATOL = 1e-9
pytestmark = pytest.mark.usefixtures("one_thread")

# ================================================================ official defaults, transcribed
# scripts/run_cifar_distill.sh L19: `--distill kd --model_s resnet20 -r 0.1 -a 0.9 -b 0 --kd_T 4`
# (kd_T is unused with a learned temperature: helper/loops.py L132-137)
ALPHA = 0.9
# train_student.py L89-90: `--t_start` default 1, `--t_end` default 20
T_START, T_END = 1.0, 20.0
# models/temp_global.py L13: `self.global_T = nn.Parameter(torch.ones(1), requires_grad=True)`
GLOBAL_T_INIT = 1.0
# scripts/run_cifar_distill.sh L22: `--cosine_decay 1 --decay_max 0 --decay_min -1 --decay_loops 10`
DECAY_MAX, DECAY_MIN, DECAY_LOOPS = 0.0, -1.0, 10


# ================================================================ official code, transcribed
class OfficialGradientReversalFunction(Function):
    @staticmethod
    def forward(ctx, x, lambda_):
        ctx.lambda_ = lambda_
        return x.clone()

    @staticmethod
    def backward(ctx, grads):
        lambda_ = ctx.lambda_
        lambda_ = grads.new_tensor(lambda_)
        dx = lambda_ * grads
        return dx, None


class OfficialGradientReversal(nn.Module):
    def forward(self, x, lambda_):
        return OfficialGradientReversalFunction.apply(x, lambda_)


class OfficialGlobalT(nn.Module):
    def __init__(self):
        super().__init__()
        self.global_T = nn.Parameter(torch.ones(1), requires_grad=True)
        self.grl = OfficialGradientReversal()

    def forward(self, fake_input1, fake_input2, lambda_):
        return self.grl(self.global_T, lambda_)


class OfficialCosineDecay(object):
    def __init__(self, max_value, min_value, num_loops):
        self._max_value = max_value
        self._min_value = min_value
        self._num_loops = num_loops

    def get_value(self, i):
        if i < 0:
            i = 0
        if i >= self._num_loops:
            i = self._num_loops
        value = (math.cos(i * math.pi / self._num_loops) + 1.0) * 0.5
        value = value * (self._max_value - self._min_value) + self._min_value
        return value


class OfficialDistillKL(nn.Module):
    def forward(self, y_s, y_t, temp):
        T = temp
        KD_loss = 0
        KD_loss += nn.KLDivLoss(reduction='batchmean')(F.log_softmax(y_s / T, dim=1),
                                                       F.softmax(y_t / T, dim=1)) * T * T
        return KD_loss


def official_loss_div(logit_s, logit_t, mlp, epoch):
    """train_student.py L401-402, L418-419 + helper/loops.py L132-135, L141, in float64."""
    gradient_decay = OfficialCosineDecay(max_value=DECAY_MAX, min_value=DECAY_MIN, num_loops=DECAY_LOOPS)
    decay_value = gradient_decay.get_value(epoch)
    temp = mlp(logit_t, logit_s, decay_value)
    temp = T_START + T_END * torch.sigmoid(temp)
    return OfficialDistillKL()(logit_s, logit_t, temp), decay_value


def as_rows(logits):
    """[N, C, H, W] -> [N*H*W, C]: every pixel a sample (kdmtl's per-pixel reading of the official KL)."""
    return logits.permute(0, 2, 3, 1).reshape(-1, logits.shape[1]) if logits.dim() == 4 else logits


# ================================================================ helpers
DIFFS = {}


record = functools.partial(record_diff, atol=ATOL, diffs=DIFFS)


def _yaml():
    return loss_yaml("ctkd")


def _cfg(**overrides):
    return settings_from_yaml(CTKDConfig, "ctkd", **overrides)


def _tasks():
    return make_tasks(100, 7)


def _method(teacher_tasks=("cls", "seg", "depth"), **overrides):
    method = build_method(CurriculumTemperatureKD, CTKDConfig, "ctkd", _tasks(), teacher_tasks, **overrides)
    method.setup({}, {})
    return method


def _progress(epoch_1_based: int, within: float = 0.5) -> dict:
    """The trainer's progress (kdmtl_cli/engine/trainer.py: epochs done, fractional) within that epoch."""
    return {"fraction": 0.0, "epoch": epoch_1_based - 1 + within}


LOGITS = {"cls": (16, 100), "seg": (2, 7, 6, 5)}


# ================================================================ YAML defaults = official
def test_yaml_defaults_are_the_official_ones():
    cfg = _cfg()
    assert cfg.weight == ALPHA
    assert (cfg.t_start, cfg.t_span, cfg.initial_parameter) == (T_START, T_END, GLOBAL_T_INIT)
    assert (cfg.lambda_start, cfg.lambda_end, cfg.lambda_epochs) == (DECAY_MAX, DECAY_MIN, DECAY_LOOPS)
    assert OmegaConf.to_container(OmegaConf.structured(CTKDConfig)) == OmegaConf.to_container(_yaml())
    assert set(_yaml()) == set(CTKDConfig.__dataclass_fields__)
    # the temperature the official run starts from: 1 + 20 sigmoid(1)
    method = _method(("cls",))
    assert float(method.temperature("cls", _progress(1)).detach()) == pytest.approx(1 + 20 / (1 + math.exp(-1)), abs=1e-6)


def test_the_method_is_found_by_name():
    cfg = OmegaConf.create({"ctkd": _yaml()})
    assert "ctkd" in method_names(cfg)
    assert [type(m) for m in build_methods(cfg, _tasks(), ["cls"])] == [CurriculumTemperatureKD]


def test_needs_a_label_task_and_positive_settings():
    with pytest.raises(KdmtlError, match="classification or segmentation"):
        _method(("depth",))
    with pytest.raises(KdmtlError, match="lambda_epochs"):
        _method(("cls",), lambda_epochs=0)


# ================================================================ the curriculum
@pytest.mark.parametrize("lambda_epochs", [10, 3, 25])
def test_curriculum_lambda_is_the_official_cosine_decay_at_the_1_based_epoch(lambda_epochs):
    official = OfficialCosineDecay(max_value=DECAY_MAX, min_value=DECAY_MIN, num_loops=lambda_epochs)
    method = _method(("cls",), lambda_epochs=lambda_epochs)
    for epoch in range(-1, 2 * lambda_epochs + 2):
        assert curriculum_lambda(epoch, DECAY_MAX, DECAY_MIN, lambda_epochs) == pytest.approx(
            official.get_value(epoch), abs=1e-15)
    for epoch in range(1, 2 * lambda_epochs + 2):     # constant within the epoch, as the official loop
        for within in (0.0, 0.37, 0.999):
            assert method.curriculum(_progress(epoch, within)) == pytest.approx(official.get_value(epoch), abs=1e-15)
    assert official.get_value(1) < 0 and official.get_value(lambda_epochs) == DECAY_MIN


# ================================================================ loss and gradients, float64
EPOCHS = [1, 2, 5, 9, 10, 30]


@pytest.mark.parametrize("task", ["cls", "seg"])
@pytest.mark.parametrize("parameter", [GLOBAL_T_INIT, -0.7, 2.5])
def test_loss_and_gradients_equal_the_official_at_several_epochs(task, parameter):
    """Loss, the temperature parameter's gradient (lambda times the plain one) and the student logits'
    gradient, against Global_T + GradientReversal + CosineDecay + DistillKL in float64. Per-pixel seg:
    the official KL with every pixel a sample (it has only classification)."""
    for epoch in EPOCHS:
        s = randn(*LOGITS[task], seed=epoch, scale=3.0).requires_grad_(True)
        t = randn(*LOGITS[task], seed=100 + epoch, scale=3.0)
        method = _method((task,))
        method.modules.double()
        with torch.no_grad():
            method.modules[task].parameter.fill_(parameter)
        ours = method({"outputs": {task: s}}, {"outputs": {task: t}}, {}, _progress(epoch))[f"ctkd/{task}"]
        ours.backward()
        s_ours_grad, p_ours_grad = s.grad.clone(), method.modules[task].parameter.grad.clone()

        s.grad = None
        rows_s = as_rows(s)
        mlp = OfficialGlobalT().double()
        with torch.no_grad():
            mlp.global_T.fill_(parameter)
        official, decay_value = official_loss_div(rows_s, as_rows(t), mlp, epoch)
        official.backward()
        record(f"ctkd loss ({task})", ours, official)
        record(f"ctkd temperature gradient ({task})", p_ours_grad, mlp.global_T.grad)
        record(f"ctkd student-logit gradient ({task})", s_ours_grad, s.grad)

        # the GRL: the gradient is the un-reversed one times lambda (< 0 from epoch 1: the sign flips)
        p = torch.tensor([parameter], dtype=torch.float64, requires_grad=True)
        plain = OfficialDistillKL()(as_rows(s.detach()), as_rows(t), T_START + T_END * torch.sigmoid(p))
        plain.backward()
        record(f"ctkd temperature gradient = lambda * plain ({task})", p_ours_grad, decay_value * p.grad)
        assert decay_value < 0 and float(p_ours_grad) * float(p.grad) < 0
        assert method.weight(f"ctkd/{task}", _progress(epoch)) == ALPHA


def test_one_term_per_label_task_each_with_its_own_temperature():
    method = _method()
    assert method.label_tasks == ["cls", "seg"]
    state = method.modules.state_dict()
    assert set(state) == {"cls.parameter", "seg.parameter"} and state["cls.parameter"].shape == (1,)
    groups = method.param_groups(0.1)
    assert len(groups) == 1 and len(groups[0]["params"]) == 2 and groups[0]["lr"] == 0.1
    s = {k: randn(*v, seed=1) for k, v in LOGITS.items()}
    t = {k: randn(*v, seed=2) for k, v in LOGITS.items()}
    terms = method({"outputs": s}, {"outputs": t}, {}, _progress(3))
    assert set(terms) == {"ctkd/cls", "ctkd/seg"} and all(torch.isfinite(v) for v in terms.values())
    sum(terms.values()).backward()
    assert all(p.grad is not None and float(p.grad.abs()) > 0 for p in method.modules.parameters())


def test_an_optimiser_step_raises_the_kd_loss_through_the_temperature():
    """The reversed gradient: descending the objective moves T towards a larger KD loss."""
    method = _method(("cls",))
    method.modules.double()
    s, t = randn(32, 100, seed=5, scale=3.0), randn(32, 100, seed=6, scale=3.0)
    batch = ({"outputs": {"cls": s}}, {"outputs": {"cls": t}}, {}, _progress(10))
    before = float(method(*batch)["ctkd/cls"].detach())
    optimiser = torch.optim.SGD(method.modules.parameters(), lr=1.0)
    method(*batch)["ctkd/cls"].backward()
    optimiser.step()
    assert float(method(*batch)["ctkd/cls"].detach()) > before


def test_a_state_dict_restores_the_temperature():
    method = _method(("cls",))
    with torch.no_grad():
        method.modules["cls"].parameter.fill_(-0.3)
    fresh = _method(("cls",))
    fresh.modules.load_state_dict(method.modules.state_dict())
    assert torch.equal(fresh.temperature("cls", _progress(4)), method.temperature("cls", _progress(4)))


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
def test_half_precision_logits_are_computed_in_float32_even_under_autocast(low):
    method = _method(("cls",))
    s, t = randn(8, 10, seed=7).to(low), randn(8, 10, seed=8).to(low)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = method({"outputs": {"cls": s}}, {"outputs": {"cls": t}}, {}, _progress(2))["ctkd/cls"]
    assert ours.dtype == torch.float32
    mlp = OfficialGlobalT().double()
    reference, _ = official_loss_div(s.double(), t.double(), mlp, 2)
    assert float(ours.detach()) == pytest.approx(float(reference.detach()), rel=1e-4, abs=1e-9)


# ================================================================ through the real CLI
@pytest.mark.parametrize("loss, methods", [("ctkd", ["ctkd"]), ("[ctkd,fitnet]", ["ctkd", "fitnet"])])
def test_cli_train_with_the_method(loss, methods, workdir, shared_cache):
    run_dir = train_logs_finite_terms(loss, methods, workdir, shared_cache)
    # the default tasks cls_seg_depth: depth has no ctkd term
    assert_terms_logged(run_dir, "ctkd", ("ctkd/cls", "ctkd/seg"))
    ctkd = cli_terms(run_dir, "ctkd")
    assert not any(k.endswith("ctkd/depth") for k in ctkd), sorted(ctkd)
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["objective"]
    assert {"ctkd.cls.parameter", "ctkd.seg.parameter"} <= set(state)


@pytest.mark.slow   # ~19 s: the method's state_dict round trip above stays in the default run
def test_cli_resume_restores_the_temperature(workdir, shared_cache):
    """An interrupted `loss=ctkd` run, resumed, ends with the temperatures of the uninterrupted run, bit for bit."""
    keys = {"ctkd.cls.parameter", "ctkd.seg.parameter"}
    # the temperature moved during the first and the second epoch: the restore is not trivial
    after_one, a, _ = resume_equals_straight("ctkd", workdir, shared_cache, trained=sorted(keys))
    assert set(after_one["objective"]) == keys
    assert set(a["objective"]) == set(after_one["objective"])
    for key in a["objective"]:
        assert not torch.equal(after_one["objective"][key], torch.ones(1)), key
