"""`loss.kd.standardize` / `loss.dkd.standardize`: logit standardisation (Sun et al., "Logit
Standardization in Knowledge Distillation", CVPR 2024) against the official code, in float64.

The `official_*` functions below are transcribed from sunshangquan/logit-standardization-KD at
f6e5aa5172bad618e801163c3385322eea673754 (not from kdmtl's code), in plain torch:

- mdistiller/distillers/KD.py `normalize` (L7-10) and `kd_loss(..., logit_stand)` (L12-20);
- mdistiller/distillers/DKD.py `normalize`, `dkd_loss(..., logit_stand)` and its mask helpers.

`F.kl_div(..., size_average=False)` (deprecated) is written `reduction="sum"`, its meaning. The
official code only has [N, C] logits; a segmentation map is compared as its pixels taken as
samples ([N*H*W, C] rows, `rows`), leaving out ignored pixels for DKD, which is what kdmtl's
per-pixel rules mean. Every comparison is at atol 1e-9; the max abs difference is printed
(`pytest -s`) as `official-diff <case>: <value>`.
"""

from __future__ import annotations

import functools
import json
import math

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from conftest import FAST, run_kdmtl, show
from distill_checks import build_method, loss_yaml, make_tasks, randn, record_diff
from kdmtl_cli.distill.dkd import DecoupledKD
from kdmtl_cli.distill.functional import dkd_loss
from kdmtl_cli.distill.logit import LogitKD, kl_with_temperature, standardize_logits
from kdmtl_cli.schema import DKDConfig, KDConfig

ATOL = 1e-9
DIFFS = {}
TEMPERATURES = [0.5, 1.0, 2.0, 4.0, 8.0]
pytestmark = pytest.mark.usefixtures("one_thread")


record = functools.partial(record_diff, atol=ATOL, diffs=DIFFS, flat=False)


def rows(x):
    """[N, C, H, W] -> [N*H*W, C]: every pixel a sample, classes last."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


# ================================================================ official code, transcribed
# mdistiller/distillers/KD.py (the same `normalize` is in DKD.py and MLKD.py)
def official_normalize(logit):
    mean = logit.mean(dim=-1, keepdims=True)
    stdv = logit.std(dim=-1, keepdims=True)
    return (logit - mean) / (1e-7 + stdv)


def official_kd_loss(logits_student_in, logits_teacher_in, temperature, logit_stand):
    logits_student = official_normalize(logits_student_in) if logit_stand else logits_student_in
    logits_teacher = official_normalize(logits_teacher_in) if logit_stand else logits_teacher_in
    log_pred_student = F.log_softmax(logits_student / temperature, dim=1)
    pred_teacher = F.softmax(logits_teacher / temperature, dim=1)
    loss_kd = F.kl_div(log_pred_student, pred_teacher, reduction="none").sum(1).mean()
    loss_kd *= temperature**2
    return loss_kd


# mdistiller/distillers/DKD.py
def _get_gt_mask(logits, target):
    target = target.reshape(-1)
    mask = torch.zeros_like(logits).scatter_(1, target.unsqueeze(1), 1).bool()
    return mask


def _get_other_mask(logits, target):
    target = target.reshape(-1)
    mask = torch.ones_like(logits).scatter_(1, target.unsqueeze(1), 0).bool()
    return mask


def cat_mask(t, mask1, mask2):
    t1 = (t * mask1).sum(dim=1, keepdims=True)
    t2 = (t * mask2).sum(1, keepdims=True)
    rt = torch.cat([t1, t2], dim=1)
    return rt


def official_dkd_loss(logits_student_in, logits_teacher_in, target, alpha, beta, temperature, logit_stand):
    logits_student = official_normalize(logits_student_in) if logit_stand else logits_student_in
    logits_teacher = official_normalize(logits_teacher_in) if logit_stand else logits_teacher_in

    gt_mask = _get_gt_mask(logits_student, target)
    other_mask = _get_other_mask(logits_student, target)
    pred_student = F.softmax(logits_student / temperature, dim=1)
    pred_teacher = F.softmax(logits_teacher / temperature, dim=1)
    pred_student = cat_mask(pred_student, gt_mask, other_mask)
    pred_teacher = cat_mask(pred_teacher, gt_mask, other_mask)
    log_pred_student = torch.log(pred_student)
    tckd_loss = (
        F.kl_div(log_pred_student, pred_teacher, reduction="sum")
        * (temperature**2)
        / target.shape[0]
    )
    pred_teacher_part2 = F.softmax(logits_teacher / temperature - 1000.0 * gt_mask, dim=1)
    log_pred_student_part2 = F.log_softmax(logits_student / temperature - 1000.0 * gt_mask, dim=1)
    nckd_loss = (
        F.kl_div(log_pred_student_part2, pred_teacher_part2, reduction="sum")
        * (temperature**2)
        / target.shape[0]
    )
    return alpha * tckd_loss + beta * nckd_loss


# ================================================================ kdmtl's methods, built as the trainer does
def _tasks():
    return make_tasks(100, 7, tags=5)


_yaml = loss_yaml


def _kd(tasks, teacher_tasks, **overrides):
    return build_method(LogitKD, KDConfig, "kd", tasks, teacher_tasks, **overrides)


def _dkd(tasks, teacher_tasks, **overrides):
    return build_method(DecoupledKD, DKDConfig, "dkd", tasks, teacher_tasks, **overrides)


def _terms(method, student, teacher, targets=None):
    batch = {"targets": targets or {}}
    return method({"outputs": student, "features": {}}, {"outputs": teacher, "features": {}}, batch,
                  {"fraction": 0.0, "epoch": 0.0})


CLS_S, CLS_T = randn(64, 100, seed=1, scale=3.0), randn(64, 100, seed=2, scale=5.0)
CLS_Y = torch.randint(0, 100, (64,), generator=torch.Generator().manual_seed(3))
SEG_S, SEG_T = randn(2, 7, 6, 5, seed=4, scale=2.0), randn(2, 7, 6, 5, seed=5, scale=4.0)
SEG_Y = torch.randint(0, 7, (2, 6, 5), generator=torch.Generator().manual_seed(6))
SEG_Y[0, 0, :3] = 255                                  # ignored pixels: left out of DKD's mean
SEG_VALID = SEG_Y.reshape(-1) != 255


# ================================================================ the standardisation itself
def test_standardize_logits_is_the_official_normalize():
    record("normalize [N, C]", standardize_logits(CLS_S), official_normalize(CLS_S))
    # dense logits: over the classes at every pixel (the official dim -1 is the class dim of [N, C])
    record("normalize per pixel [N, C, H, W]", rows(standardize_logits(SEG_S)), official_normalize(rows(SEG_S)))


def test_standardize_logits_uses_the_unbiased_std_and_the_official_epsilon():
    z = torch.tensor([[1.0, 2.0, 3.0, 6.0]], dtype=torch.float64)
    unbiased = (((z - 3.0) ** 2).sum() / 3).sqrt()         # divisor C - 1, torch.std's default
    assert torch.allclose(standardize_logits(z), (z - 3.0) / (1e-7 + unbiased), atol=0, rtol=1e-15)
    # all classes equal: std 0, and the epsilon turns 0 / 0 into zeros
    assert torch.equal(standardize_logits(torch.full((2, 5), 3.0, dtype=torch.float64)),
                       torch.zeros(2, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="C >= 2"):
        standardize_logits(torch.zeros(4, 1))


def test_standardize_logits_upcasts_half_inputs():
    assert standardize_logits(CLS_S.to(torch.bfloat16)).dtype == torch.float32
    assert standardize_logits(SEG_S.to(torch.float16)).dtype == torch.float32


# ================================================================ kd, standardize=true
@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_kd_cls_with_standardize_equals_official(temperature):
    method = _kd(_tasks(), ["cls"], standardize=True, temperature=temperature)
    ours = _terms(method, {"cls": CLS_S}, {"cls": CLS_T})["kd/cls"]
    record("kd cls, standardize (official kd_loss logit_stand=True)", ours,
           official_kd_loss(CLS_S, CLS_T, temperature, True))


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_kd_seg_with_standardize_equals_official_per_pixel(temperature):
    method = _kd(_tasks(), ["seg"], standardize=True, temperature=temperature)
    ours = _terms(method, {"seg": SEG_S}, {"seg": SEG_T})["kd/seg"]
    record("kd seg, standardize (official kd_loss logit_stand=True per pixel)", ours,
           official_kd_loss(rows(SEG_S), rows(SEG_T), temperature, True))


def test_kd_standardize_leaves_the_other_task_kinds_unchanged():
    tasks = _tasks()
    student = {"cls": CLS_S[:4], "seg": SEG_S, "depth": randn(2, 1, 6, 5, seed=7), "tags": randn(4, 5, seed=8)}
    teacher = {"cls": CLS_T[:4], "seg": SEG_T, "depth": randn(2, 1, 6, 5, seed=9), "tags": randn(4, 5, seed=10)}
    on = _terms(_kd(tasks, list(tasks), standardize=True), student, teacher)
    off = _terms(_kd(tasks, list(tasks)), student, teacher)
    assert torch.equal(on["kd/depth"], off["kd/depth"]) and torch.equal(on["kd/tags"], off["kd/tags"])
    assert not torch.allclose(on["kd/cls"], off["kd/cls"]) and not torch.allclose(on["kd/seg"], off["kd/seg"])


def test_kd_standardize_ignores_each_samples_logit_scale_and_shift():
    """What the paper is after: a student whose logits are an affine map a * z + b (a > 0, per
    sample) of the teacher's matches it perfectly once both are standardised."""
    a, b = randn(64, 1, seed=11).abs() + 0.1, randn(64, 1, seed=12, scale=10.0)
    method = _kd(_tasks(), ["cls"], standardize=True)
    loss = _terms(method, {"cls": a * CLS_T + b}, {"cls": CLS_T})["kd/cls"]
    assert float(loss) < 1e-12
    assert float(_terms(_kd(_tasks(), ["cls"]), {"cls": a * CLS_T + b}, {"cls": CLS_T})["kd/cls"]) > 1e-3


# ================================================================ dkd, standardize=true
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("alpha, beta", [(1.0, 8.0), (9.0, 72.0), (0.5, 2.0)])
def test_dkd_cls_with_standardize_equals_official(temperature, alpha, beta):
    method = _dkd(_tasks(), ["cls"], standardize=True, alpha=alpha, beta=beta, temperature=temperature)
    ours = _terms(method, {"cls": CLS_S}, {"cls": CLS_T}, {"cls": CLS_Y})["dkd/cls"]
    record("dkd cls, standardize (official dkd_loss logit_stand=True)", ours,
           official_dkd_loss(CLS_S, CLS_T, CLS_Y, alpha, beta, temperature, True))


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_dkd_seg_with_standardize_equals_official_per_pixel(temperature):
    method = _dkd(_tasks(), ["seg"], standardize=True, temperature=temperature)
    ours = _terms(method, {"seg": SEG_S}, {"seg": SEG_T}, {"seg": SEG_Y})["dkd/seg"]
    official = official_dkd_loss(rows(SEG_S)[SEG_VALID], rows(SEG_T)[SEG_VALID], SEG_Y.reshape(-1)[SEG_VALID],
                                 1.0, 8.0, temperature, True)
    record("dkd seg, standardize (official dkd_loss logit_stand=True per valid pixel)", ours, official)


# ================================================================ standardize=false: as before
@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_kd_without_standardize_is_the_plain_kl(temperature):
    tasks = _tasks()
    terms = _terms(_kd(tasks, ["cls", "seg"], temperature=temperature), {"cls": CLS_S, "seg": SEG_S},
                   {"cls": CLS_T, "seg": SEG_T})
    # bit for bit the rule kdmtl had, and the official code with logit_stand=False
    assert torch.equal(terms["kd/cls"], kl_with_temperature(CLS_S, CLS_T, temperature))
    assert torch.equal(terms["kd/seg"], kl_with_temperature(SEG_S, SEG_T, temperature))
    record("kd cls, no standardize (official logit_stand=False)", terms["kd/cls"],
           official_kd_loss(CLS_S, CLS_T, temperature, False))
    record("kd seg, no standardize (official logit_stand=False per pixel)", terms["kd/seg"],
           official_kd_loss(rows(SEG_S), rows(SEG_T), temperature, False))


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_dkd_without_standardize_is_the_plain_dkd(temperature):
    tasks = _tasks()
    terms = _terms(_dkd(tasks, ["cls", "seg"], temperature=temperature), {"cls": CLS_S, "seg": SEG_S},
                   {"cls": CLS_T, "seg": SEG_T}, {"cls": CLS_Y, "seg": SEG_Y})
    assert torch.equal(terms["dkd/cls"], dkd_loss(CLS_S, CLS_T, CLS_Y, 1.0, 8.0, temperature))
    assert torch.equal(terms["dkd/seg"], dkd_loss(SEG_S, SEG_T, SEG_Y, 1.0, 8.0, temperature))
    record("dkd cls, no standardize (official logit_stand=False)", terms["dkd/cls"],
           official_dkd_loss(CLS_S, CLS_T, CLS_Y, 1.0, 8.0, temperature, False))


# ================================================================ settings
def test_yaml_defaults_are_off_and_load_into_the_schemas():
    for name, schema in (("kd", KDConfig), ("dkd", DKDConfig)):
        assert _yaml(name).standardize is False, name
        cfg = OmegaConf.merge(OmegaConf.structured(schema), _yaml(name))
        assert cfg.standardize is False and schema().standardize is False, name
        assert OmegaConf.merge(cfg, {"standardize": "true"}).standardize is True   # as a CLI override reads


def test_composed_train_config_has_the_keys_and_rejects_a_non_boolean():
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from kdmtl_cli.schema import TrainConfig, validate

    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module="kdmtl_cli.conf", version_base="1.3"):
            kd = validate(compose("train", overrides=["loss=kd"]), TrainConfig)
            dkd = validate(compose("train", overrides=["loss=dkd", "loss.dkd.standardize=true"]), TrainConfig)
            assert kd.loss.kd.standardize is False and dkd.loss.dkd.standardize is True
            with pytest.raises(Exception, match="standardize"):
                validate(compose("train", overrides=["loss=kd", "loss.kd.standardize=sometimes"]), TrainConfig)
    finally:
        GlobalHydra.instance().clear()


# ================================================================ the real CLI
@pytest.mark.parametrize("loss", ["kd", "dkd"])
def test_cli_trains_with_standardize(loss, tmp_path, shared_cache):
    run_dir = tmp_path / "run"
    proc = run_kdmtl(["train", f"loss={loss}", f"loss.{loss}.standardize=true", *FAST, f"hydra.run.dir={run_dir}"],
                     tmp_path, shared_cache)
    assert proc.returncode == 0, show(proc)
    results = run_dir / "results.json"
    assert results.is_file(), show(proc)
    assert json.loads(results.read_text())["results"], results.read_text()
    saved = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    assert saved.loss[loss].standardize is True
    epochs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    terms = {k: v for e in epochs if e.get("type") == "epoch" for k, v in e.items() if k.startswith(f"train/{loss}/")}
    assert {f"train/{loss}/cls", f"train/{loss}/seg"} <= set(terms) and all(math.isfinite(v) for v in terms.values())


def test_zz_print_the_figures():
    """The max abs difference per case over this module's comparisons (run with -s)."""
    for case, diff in sorted(DIFFS.items()):
        print(f"official-diff-max {case}: {diff:.3e}")
