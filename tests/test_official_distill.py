"""kdmtl's distillation methods against their official implementations, in float64.

Each `official_*` function below is transcribed from the official code (not from kdmtl's), in
plain torch; the sources, at the commits read:

- mdistiller: megvii-research/mdistiller a08d46f10d6102bd6e3f258ca5ac880b020ea259
  (mdistiller/distillers/KD.py `kd_loss`, DKD.py `dkd_loss` + `DKD.forward_train`,
  engine/trainer.py `epoch = 1 ... while epoch < EPOCHS + 1`);
- RepDistiller: HobbitLong/RepDistiller b84f547c5db6a35318d4671d7d5c4de74c822403
  (distiller_zoo/KD.py `DistillKL`, AT.py `Attention`, FitNet.py `HintLoss`, models/util.py `ConvReg`);
- KD4MTL: VICO-UoE/KD4MTL 1d7528eae208e263b2b9609c1352d1990b1347a5 (model_segnet_kdmtl.py
  `transformer` and the distillation lines of the training loop);
- BAM: google-research/google-research bam/task_specific/classification/classification_tasks.py
  (`ClassificationTask.get_prediction_module`, TensorFlow, transcribed op by op to torch).

`F.kl_div(..., size_average=False)` (deprecated) is written `reduction="sum"`, its meaning.
Every comparison is at atol 1e-9 on random float64 inputs; the max abs difference of each
method is printed (`pytest -s`) as `official-diff <method>: <value>`.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import OmegaConf

from distill_checks import make_tasks, randn, record_diff
from kdmtl_cli.distill.dkd import DecoupledKD, dkd_warmup
from kdmtl_cli.distill.fitnet import FitNet
from kdmtl_cli.distill.functional import (ConvReg, HintRegressor, TaskAdaptor, at_loss, bam_loss, dkd_loss,
                                          hint_loss, kd4mtl_loss)
from kdmtl_cli.distill.kd4mtl import KD4MTL
from kdmtl_cli.distill.logit import kl_with_temperature
from kdmtl_cli.data import TargetSpec
from kdmtl_cli.schema import DKDConfig, FitNetConfig, KD4MTLConfig
from kdmtl_cli.tasks import TASK_KINDS, Task, _load_kinds

ATOL = 1e-9
DIFFS = {}
pytestmark = pytest.mark.usefixtures("one_thread")


record = functools.partial(record_diff, atol=ATOL, diffs=DIFFS, flat=False)


# ================================================================ official code, transcribed
# mdistiller/distillers/KD.py
def official_kd_loss(logits_student, logits_teacher, temperature):
    log_pred_student = F.log_softmax(logits_student / temperature, dim=1)
    pred_teacher = F.softmax(logits_teacher / temperature, dim=1)
    loss_kd = F.kl_div(log_pred_student, pred_teacher, reduction="none").sum(1).mean()
    loss_kd *= temperature**2
    return loss_kd


# RepDistiller distiller_zoo/KD.py DistillKL.forward
def official_distill_kl(y_s, y_t, T):
    p_s = F.log_softmax(y_s / T, dim=1)
    p_t = F.softmax(y_t / T, dim=1)
    return F.kl_div(p_s, p_t, reduction="sum") * (T**2) / y_s.shape[0]


# mdistiller/distillers/DKD.py
def _get_gt_mask(logits, target):
    target = target.reshape(-1)
    return torch.zeros_like(logits).scatter_(1, target.unsqueeze(1), 1).bool()


def _get_other_mask(logits, target):
    target = target.reshape(-1)
    return torch.ones_like(logits).scatter_(1, target.unsqueeze(1), 0).bool()


def cat_mask(t, mask1, mask2):
    t1 = (t * mask1).sum(dim=1, keepdims=True)
    t2 = (t * mask2).sum(1, keepdims=True)
    return torch.cat([t1, t2], dim=1)


def official_dkd_loss(logits_student, logits_teacher, target, alpha, beta, temperature):
    gt_mask = _get_gt_mask(logits_student, target)
    other_mask = _get_other_mask(logits_student, target)
    pred_student = F.softmax(logits_student / temperature, dim=1)
    pred_teacher = F.softmax(logits_teacher / temperature, dim=1)
    pred_student = cat_mask(pred_student, gt_mask, other_mask)
    pred_teacher = cat_mask(pred_teacher, gt_mask, other_mask)
    log_pred_student = torch.log(pred_student)
    tckd_loss = F.kl_div(log_pred_student, pred_teacher, reduction="sum") * (temperature**2) / target.shape[0]
    pred_teacher_part2 = F.softmax(logits_teacher / temperature - 1000.0 * gt_mask, dim=1)
    log_pred_student_part2 = F.log_softmax(logits_student / temperature - 1000.0 * gt_mask, dim=1)
    nckd_loss = (F.kl_div(log_pred_student_part2, pred_teacher_part2, reduction="sum")
                 * (temperature**2) / target.shape[0])
    return alpha * tckd_loss + beta * nckd_loss


# mdistiller DKD.forward_train: loss_dkd = min(kwargs["epoch"] / self.warmup, 1.0) * dkd_loss(...),
# engine/trainer.py: epoch = 1; while epoch < EPOCHS + 1: train_epoch(epoch); epoch += 1
def official_dkd_warmup(epoch_1_based, warmup):
    return min(epoch_1_based / warmup, 1.0)


# RepDistiller distiller_zoo/AT.py Attention
def official_at(f, p):
    return F.normalize(f.pow(p).mean(1).view(f.size(0), -1))


def official_at_loss(f_s, f_t, p=2):
    s_H, t_H = f_s.shape[2], f_t.shape[2]
    if s_H > t_H:
        f_s = F.adaptive_avg_pool2d(f_s, (t_H, t_H))
    elif s_H < t_H:
        f_t = F.adaptive_avg_pool2d(f_t, (s_H, s_H))
    return (official_at(f_s, p) - official_at(f_t, p)).pow(2).mean()


# RepDistiller models/util.py ConvReg
class OfficialConvReg(nn.Module):
    def __init__(self, s_shape, t_shape, use_relu=True):
        super().__init__()
        self.use_relu = use_relu
        s_N, s_C, s_H, s_W = s_shape
        t_N, t_C, t_H, t_W = t_shape
        if s_H == 2 * t_H:
            self.conv = nn.Conv2d(s_C, t_C, kernel_size=3, stride=2, padding=1)
        elif s_H * 2 == t_H:
            self.conv = nn.ConvTranspose2d(s_C, t_C, kernel_size=4, stride=2, padding=1)
        elif s_H >= t_H:
            self.conv = nn.Conv2d(s_C, t_C, kernel_size=(1 + s_H - t_H, 1 + s_W - t_W))
        else:
            raise NotImplementedError("student size {}, teacher size {}".format(s_H, t_H))
        self.bn = nn.BatchNorm2d(t_C)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        x = self.conv(x)
        if self.use_relu:
            return self.relu(self.bn(x))
        return self.bn(x)


# RepDistiller distiller_zoo/FitNet.py HintLoss
official_hint_loss = nn.MSELoss()


# VICO-UoE/KD4MTL model_segnet_kdmtl.py: the per-task distillation of the training loop
# (transformer: conv1 512->512 and conv2 64->64, 1x1, bias=False, xavier_normal_; here any channels)
def official_kd4mtl_task_loss(feat_s, feat_ti, transformer_convs):
    feat_ti0 = feat_ti[0].detach()
    feat_ti0 = feat_ti0 / (feat_ti0.pow(2).sum(1) + 1e-6).sqrt().view(feat_ti0.size(0), 1, feat_ti0.size(2), feat_ti0.size(3))
    feat_ti1 = feat_ti[1].detach()
    feat_ti1 = feat_ti1 / (feat_ti1.pow(2).sum(1) + 1e-6).sqrt().view(feat_ti1.size(0), 1, feat_ti1.size(2), feat_ti1.size(3))
    feat_si = [transformer_convs[0](feat_s[0]), transformer_convs[1](feat_s[1])]
    feat_si0 = feat_si[0] / (feat_si[0].pow(2).sum(1) + 1e-6).sqrt().view(feat_si[0].size(0), 1, feat_si[0].size(2), feat_si[0].size(3))
    feat_si1 = feat_si[1] / (feat_si[1].pow(2).sum(1) + 1e-6).sqrt().view(feat_si[1].size(0), 1, feat_si[1].size(2), feat_si[1].size(3))
    dist_0 = (feat_si0 - feat_ti0).pow(2).sum(1).mean()
    dist_1 = (feat_si1 - feat_ti1).pow(2).sum(1).mean()
    return dist_0 + dist_1


# google-research bam ClassificationTask.get_prediction_module (teacher_annealing=True), per example
def official_bam_losses(logits, teacher_logits, label_ids, percent_done):
    num_labels = logits.shape[-1]
    log_probs = F.log_softmax(logits, dim=-1)                     # tf.nn.log_softmax(logits, axis=-1)
    teacher_labels = F.softmax(teacher_logits / 1.0, dim=-1)      # tf.nn.softmax(features[..._logits] / 1.0)
    true_labels = F.one_hot(label_ids, num_labels).to(logits.dtype)
    labels = (true_labels * percent_done) + (teacher_labels * (1 - percent_done))
    return -(labels * log_probs).sum(-1)                          # -tf.reduce_sum(labels * log_probs, axis=-1)


# ================================================================ the comparisons
def _tasks():
    return make_tasks(10, 5, depth=False)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_kd_equals_mdistiller_and_repdistiller(temperature):
    s, t = randn(64, 100, seed=1, scale=3.0), randn(64, 100, seed=2, scale=3.0)
    ours = kl_with_temperature(s, t, temperature)
    record("kd (mdistiller kd_loss)", ours, official_kd_loss(s, t, temperature))
    record("kd (RepDistiller DistillKL)", ours, official_distill_kl(s, t, temperature))


def test_dense_seg_kd_equals_mdistiller_kd_per_pixel():
    """kd/seg: the task kind's rule is mdistiller's kd_loss with every pixel as a sample."""
    s, t = randn(2, 5, 6, 7, seed=3, scale=2.0), randn(2, 5, 6, 7, seed=4, scale=2.0)
    ours = _tasks()["seg"].kind.distill(s, t, 4.0, "l1")
    rows = lambda x: x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])  # noqa: E731
    record("kd/seg dense (mdistiller kd_loss per pixel)", ours, official_kd_loss(rows(s), rows(t), 4.0))


@pytest.mark.parametrize("alpha, beta, temperature", [(1.0, 8.0, 4.0), (1.0, 2.0, 4.0), (0.5, 6.0, 1.0)])
def test_dkd_loss_equals_mdistiller(alpha, beta, temperature):
    s, t = randn(64, 100, seed=5, scale=3.0), randn(64, 100, seed=6, scale=3.0)
    target = torch.randint(0, 100, (64,), generator=torch.Generator().manual_seed(7))
    ours = dkd_loss(s, t, target, alpha, beta, temperature)
    record("dkd (mdistiller dkd_loss)", ours, official_dkd_loss(s, t, target, alpha, beta, temperature))


def test_dkd_dense_equals_mdistiller_per_pixel():
    s, t = randn(2, 5, 4, 3, seed=8, scale=2.0), randn(2, 5, 4, 3, seed=9, scale=2.0)
    target = torch.randint(0, 5, (2, 4, 3), generator=torch.Generator().manual_seed(10))
    rows = lambda x: x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])  # noqa: E731
    ours = dkd_loss(s, t, target, 1.0, 8.0, 4.0)
    record("dkd/seg dense (mdistiller dkd_loss per pixel)", ours,
           official_dkd_loss(rows(s), rows(t), target.reshape(-1), 1.0, 8.0, 4.0))


def test_dkd_method_with_warmup_equals_mdistiller_forward_train():
    """The DKD method's weighted term over 25 epochs (warm-up 20, 3 steps an epoch, as kdmtl's
    trainer reports progress: epochs done = epoch - 1 + step / steps) vs mdistiller's."""
    tasks = _tasks()
    cfg = OmegaConf.merge(OmegaConf.structured(DKDConfig), OmegaConf.load("conf/loss/dkd.yaml"))
    method = DecoupledKD(cfg, tasks, ["cls"])
    s, t = randn(8, 10, seed=11, scale=2.0), randn(8, 10, seed=12, scale=2.0)
    target = torch.randint(0, 10, (8,), generator=torch.Generator().manual_seed(13))
    batch = {"targets": {"cls": target}}
    worst = 0.0
    for epoch in range(1, 26):                                    # mdistiller's epochs, from 1
        for step in range(3):
            progress = {"fraction": 0.0, "epoch": epoch - 1 + step / 3}
            term = method({"outputs": {"cls": s}}, {"outputs": {"cls": t}}, batch, progress)["dkd/cls"]
            ours = method.weight("dkd/cls", progress) * term
            official = official_dkd_warmup(epoch, cfg.warmup_epochs) * official_dkd_loss(s, t, target, 1.0, 8.0, 4.0)
            worst = max(worst, record("dkd + warm-up (mdistiller DKD.forward_train)", ours, official))
    assert dkd_warmup(0.0, 20.0) == 1 / 20 and dkd_warmup(19.0, 20.0) == 1.0


@pytest.mark.parametrize("s_shape, t_shape", [
    ((4, 16, 8, 8), (4, 32, 8, 8)),     # same size
    ((4, 16, 16, 16), (4, 32, 8, 8)),   # student larger: the student is pooled
    ((4, 16, 4, 4), (4, 32, 8, 8)),     # teacher larger: the TEACHER is pooled
    ((4, 16, 7, 7), (4, 8, 3, 3)),      # odd sizes: adaptive windows overlap
])
def test_at_equals_repdistiller(s_shape, t_shape):
    f_s, f_t = randn(*s_shape, seed=14), randn(*t_shape, seed=15)
    record("at (RepDistiller Attention.at_loss)", at_loss(f_s, f_t, 2.0), official_at_loss(f_s, f_t, 2))
    # f.pow(p), not |f|^p: an odd p shows it
    record("at (RepDistiller Attention.at_loss)", at_loss(f_s, f_t, 3.0), official_at_loss(f_s, f_t, 3))


# (student shape, teacher shape, expected conv kind, kernel, parameter count)
CONVREG_CASES = [
    ((2, 16, 8, 8), (2, 32, 4, 4), nn.Conv2d, (3, 3), 16 * 32 * 9 + 32 + 2 * 32),            # s_H = 2 t_H
    ((2, 16, 4, 4), (2, 32, 8, 8), nn.ConvTranspose2d, (4, 4), 16 * 32 * 16 + 32 + 2 * 32),  # 2 s_H = t_H
    ((2, 16, 8, 8), (2, 32, 8, 8), nn.Conv2d, (1, 1), 16 * 32 + 32 + 2 * 32),                # equal
    ((2, 16, 7, 6), (2, 32, 5, 5), nn.Conv2d, (3, 2), 16 * 32 * 6 + 32 + 2 * 32),            # s >= t
]


@pytest.mark.parametrize("s_shape, t_shape, kind, kernel, n_params", CONVREG_CASES)
def test_fitnet_convreg_and_hint_loss_equal_repdistiller(s_shape, t_shape, kind, kernel, n_params):
    torch.manual_seed(0)
    ours, official = HintRegressor(s_shape, t_shape), OfficialConvReg(s_shape, t_shape).double()
    ours = ours.double()
    assert isinstance(ours, ConvReg) and type(ours.conv) is kind and ours.conv.kernel_size == kernel
    assert ours.conv.bias is not None
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in official.parameters()) == n_params
    assert type(official.conv) is kind
    official.load_state_dict(ours.state_dict())                      # the same weights
    x, target = randn(*s_shape, seed=16), randn(*t_shape, seed=17)
    for train in (True, False):                                      # BN with batch stats, then running stats
        ours.train(train), official.train(train)
        out_ours, out_official = ours(x), official(x)
        assert out_ours.shape == t_shape
        record("fitnet ConvReg output (RepDistiller models/util.py)", out_ours, out_official)
        record("fitnet hint loss (RepDistiller HintLoss)", hint_loss(out_ours, target),
               official_hint_loss(out_official, target))


def test_fitnet_method_equals_repdistiller_hint():
    cfg = OmegaConf.merge(OmegaConf.structured(FitNetConfig), OmegaConf.load("conf/loss/fitnet.yaml"))
    assert (cfg.weight, list(cfg.student)) == (100.0, ["trunk.stages.1"])    # -b 100, hint layer 2
    method = FitNet(cfg, _tasks(), ["cls"])
    f_s, f_t = randn(4, 16, 16, 16, seed=18), randn(4, 32, 8, 8, seed=19)
    method.setup({"trunk.stages.1": f_s}, {"trunk.stages.1": f_t})
    method.modules.double()
    [regressor] = method.modules.values()
    official = OfficialConvReg(f_s.shape, f_t.shape).double()
    official.load_state_dict(regressor.state_dict())
    term = method({"features": {"trunk.stages.1": f_s}}, {"features": {"trunk.stages.1": f_t}}, {}, {})
    ours = method.weight("fitnet/trunk.stages.1", {}) * term["fitnet/trunk.stages.1"]
    record("fitnet method (RepDistiller -b 100 * HintLoss(ConvReg))", ours, 100 * official_hint_loss(official(f_s), f_t))


def test_kd4mtl_equals_official_with_its_two_features():
    """The official pair per task: (pooled encoder bottleneck, last decoder output); lambda [1, 1, 2]."""
    _load_kinds()
    tasks = {name: Task(name, TASK_KINDS.get(kind)(), TargetSpec(kind, n), name)
             for name, kind, n in (("seg", "segmentation", 13), ("depth", "depth", None), ("normal", "normals", None))}
    cfg = OmegaConf.merge(OmegaConf.structured(KD4MTLConfig), OmegaConf.load("conf/loss/kd4mtl.yaml"),
                          {"weight": {"seg": 1.0, "depth": 1.0, "normal": 2.0}})
    method = KD4MTL(cfg, tasks, list(tasks))
    # SegNet sizes scaled down: bottleneck 512 -> 32 ch at 1/32, decoder 64 -> 8 ch at full size.
    feat_s = [randn(2, 32, 2, 3, seed=20), randn(2, 8, 16, 24, seed=21)]
    s_feats = {"trunk/-1": feat_s[0], "trunk/0": feat_s[1]}
    t_feats, teacher_lists = {}, {}
    for i, task in enumerate(tasks):
        teacher_lists[task] = [randn(2, 32, 2, 3, seed=30 + i), randn(2, 8, 16, 24, seed=40 + i)]
        t_feats[f"{task}:trunk/-1"], t_feats[f"{task}:trunk/0"] = teacher_lists[task]
    method.setup(s_feats, t_feats)
    method.modules.double()
    terms = method({"features": s_feats}, {"features": t_feats}, {}, {})
    ours = sum(method.weight(f"kd4mtl/{task}", {}) * terms[f"kd4mtl/{task}"] for task in tasks)
    lambda_ = [1, 1, 2]
    official = sum(lambda_[i] * official_kd4mtl_task_loss(
        feat_s, teacher_lists[task], [method.modules[f"{task}__0"].conv, method.modules[f"{task}__1"].conv])
        for i, task in enumerate(tasks))
    record("kd4mtl (VICO-UoE/KD4MTL model_segnet_kdmtl.py)", ours, official)
    # Each adaptor is the official transformer conv: 1x1, no bias; xavier_normal_ init (std sqrt(2/(fan_in+fan_out))).
    big = TaskAdaptor(512, 512)
    assert big.conv.bias is None and big.conv.kernel_size == (1, 1)
    assert float(big.conv.weight.std()) == pytest.approx(math.sqrt(2.0 / 1024), rel=0.02)
    [group] = method.param_groups(1e-4)
    assert (group["lr"], group["weight_decay"]) == (0.1, 5e-4)      # official --alr 1e-1, Adam weight_decay 5e-4


def test_kd4mtl_loss_equals_official_normalisation():
    s, t = randn(2, 6, 5, 4, seed=50), randn(2, 6, 5, 4, seed=51)
    s[0, :, 0, 0] = 0.0                                              # an all-zero pixel: the 1e-6 matters
    n = lambda x: x / (x.pow(2).sum(1) + 1e-6).sqrt().view(x.size(0), 1, x.size(2), x.size(3))  # noqa: E731
    record("kd4mtl (VICO-UoE/KD4MTL model_segnet_kdmtl.py)", kd4mtl_loss(s, t), (n(s) - n(t)).pow(2).sum(1).mean())


@pytest.mark.parametrize("percent_done", [0.0, 0.3, 1.0])
def test_bam_equals_official_teacher_annealing(percent_done):
    s, t = randn(32, 7, seed=52, scale=2.0), randn(32, 7, seed=53, scale=2.0)
    labels = torch.randint(0, 7, (32,), generator=torch.Generator().manual_seed(54))
    per_example = official_bam_losses(s, t, labels, percent_done)
    # kdmtl averages over the batch by default; reduction="sum" is the official tf.reduce_sum.
    record("bam (google-research bam get_prediction_module)", bam_loss(s, t, labels, percent_done), per_example.mean())
    record("bam, reduction=sum (official sum over the batch)",
           bam_loss(s, t, labels, percent_done, reduction="sum"), per_example.sum())


def test_dtypes_half_inputs_are_computed_in_float32():
    s, t = randn(4, 10, seed=55).to(torch.bfloat16), randn(4, 10, seed=56).to(torch.bfloat16)
    target = torch.randint(0, 10, (4,), generator=torch.Generator().manual_seed(57))
    assert kl_with_temperature(s, t, 4.0).dtype == torch.float32
    assert dkd_loss(s, t, target, 1.0, 8.0, 4.0).dtype == torch.float32
    assert bam_loss(s, t, target, 0.5).dtype == torch.float32
    f = randn(2, 3, 4, 4, seed=58).to(torch.float16)
    assert at_loss(f, f).dtype == hint_loss(f, f).dtype == kd4mtl_loss(f, f).dtype == torch.float32


def test_zz_print_the_figures():
    """The max abs difference per method over this module's comparisons (run with -s)."""
    for method, diff in sorted(DIFFS.items()):
        print(f"official-diff-max {method}: {diff:.3e}")
