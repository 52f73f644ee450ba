"""test.metric_reduction: `split` (kdmtl's default, every valid pixel of the split) and
`batch_mean` (per evaluation batch, averaged over batches, as the official NYUv2/Cityscapes code)."""

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from kdmtl_cli.data import TargetSpec
from kdmtl_cli.errors import KdmtlError
from kdmtl_cli.schema import TrainConfig, validate
from kdmtl_cli.tasks import build_tasks


# --- transcription of the official per-batch functions ---------------------------------------
# AvivNavon/nash-mtl@cce1840 experiments/nyuv2/utils.py L26-59 (= lorenmt/mtan im2im_pred/utils.py
# L105-120, CAGrad cityscapes/utils.py L117-125, KD4MTL model/segnet.py L178-190).
def official_depth_error(x_pred, x_output):
    binary_mask = (torch.sum(x_output, dim=1) != 0).unsqueeze(1)
    x_pred_true = x_pred.masked_select(binary_mask)
    x_output_true = x_output.masked_select(binary_mask)
    abs_err = torch.abs(x_pred_true - x_output_true)
    rel_err = torch.abs(x_pred_true - x_output_true) / x_output_true
    return (torch.sum(abs_err) / torch.nonzero(binary_mask, as_tuple=False).size(0)).item(), \
           (torch.sum(rel_err) / torch.nonzero(binary_mask, as_tuple=False).size(0)).item()


def official_normal_error(x_pred, x_output):
    binary_mask = torch.sum(x_output, dim=1) != 0
    error = torch.acos(torch.clamp(torch.sum(x_pred * x_output, 1).masked_select(binary_mask), -1, 1)).numpy()
    error = np.degrees(error)
    return np.mean(error), np.median(error), np.mean(error < 11.25), np.mean(error < 22.5), np.mean(error < 30)


# nash-mtl trainer.py L166-191: avg_cost[epoch, 12:] += cost[12:] / test_batch (equal weight per batch;
# float64 here instead of the official float32 array).
def official_average(fn, batches):
    values = np.array([fn(p, t) for p, t in batches], dtype=np.float64)
    return values.sum(0) / len(batches)


def _unit(x):
    return x / torch.norm(x, p=2, dim=1, keepdim=True)   # as the official networks' normal heads


def _batches(seed=0, sizes=(2, 2, 3, 1)):
    g = torch.Generator().manual_seed(seed)
    depth, normal = [], []
    for n in sizes:
        target = torch.rand(n, 1, 6, 7, generator=g, dtype=torch.float64) * 5 + 0.1
        target[torch.rand(n, 1, 6, 7, generator=g) < 0.3] = 0.0          # invalid pixels
        pred = torch.rand(n, 1, 6, 7, generator=g, dtype=torch.float64) * 5
        depth.append((pred, target))
        nt = _unit(torch.randn(n, 3, 6, 7, generator=g, dtype=torch.float64))
        nt = nt * (torch.rand(n, 1, 6, 7, generator=g) > 0.25)            # invalid pixels: zero vectors
        npred = _unit(nt + 0.6 * torch.randn(n, 3, 6, 7, generator=g, dtype=torch.float64))
        normal.append((npred, nt))
    return depth, normal


def _tasks(reduction):
    cfg = validate(OmegaConf.create({"tasks": {"depth": {"kind": "depth"}, "normal": {"kind": "normals"},
                                               "seg": {"kind": "segmentation"}},
                                     "test": {"metric_reduction": reduction}}), TrainConfig)
    targets = {"depth": TargetSpec("depth"), "normal": TargetSpec("normals"), "seg": TargetSpec("segmentation", 3)}
    return build_tasks(cfg.tasks, targets)


def _run(task, batches):
    metrics = task.metrics()
    for pred, target in batches:
        p, t = task.kind.prepare_for_metrics(pred, target.squeeze(1) if task.kind.name == "depth" else target)
        for m in metrics.values():
            m.update(p, t)
    return {k: float(m.compute()) for k, m in metrics.items()}


def test_batch_mean_matches_official_per_batch_average():
    depth_batches, normal_batches = _batches()
    tasks = _tasks("batch_mean")
    assert tasks["depth"].metric_reduction == tasks["normal"].metric_reduction == "batch_mean"
    assert tasks["seg"].metric_reduction == "split"     # segmentation: confusion matrix over the split
    got = _run(tasks["depth"], depth_batches)
    want = official_average(official_depth_error, depth_batches)
    assert got["abs_err"] == pytest.approx(want[0], abs=1e-9, rel=1e-9)
    assert got["rel_err"] == pytest.approx(want[1], abs=1e-9, rel=1e-9)
    got = _run(tasks["normal"], normal_batches)
    want = official_average(official_normal_error, normal_batches)
    for i, key in enumerate(["mean_angle", "median_angle", "within_11_25", "within_22_5", "within_30"]):
        assert got[key] == pytest.approx(want[i], abs=1e-9, rel=1e-9), key


def test_split_is_the_whole_split_value():
    depth_batches, normal_batches = _batches(seed=1)
    tasks = _tasks("split")
    assert tasks["depth"].metric_reduction == "split"
    got = _run(tasks["depth"], depth_batches)
    pred = torch.cat([p.flatten() for p, _ in depth_batches])
    target = torch.cat([t.flatten() for _, t in depth_batches])
    valid = target > 0
    assert got["abs_err"] == pytest.approx(float((pred - target).abs()[valid].mean()), rel=1e-5)
    assert got["rel_err"] == pytest.approx(float(((pred - target).abs() / target)[valid].mean()), rel=1e-5)
    whole = official_normal_error(torch.cat([p for p, _ in normal_batches]), torch.cat([t for _, t in normal_batches]))
    got = _run(tasks["normal"], normal_batches)
    for i, key in enumerate(["mean_angle", "median_angle", "within_11_25", "within_22_5", "within_30"]):
        assert got[key] == pytest.approx(float(whole[i]), rel=1e-5, abs=1e-5), key
    per_batch = official_average(official_depth_error, depth_batches)
    assert abs(_run(tasks["depth"], depth_batches)["abs_err"] - per_batch[0]) > 1e-6   # the two differ here


def test_default_is_split():
    tasks = build_tasks(OmegaConf.create({"depth": {"kind": "depth"}}), {"depth": TargetSpec("depth")})
    assert tasks["depth"].metric_reduction == "split"


def test_bad_setting_is_a_one_line_error():
    with pytest.raises(KdmtlError) as err:
        _tasks("per_batch")
    message = str(err.value)
    assert "test.metric_reduction" in message and "batch_mean" in message and "\n" not in message
