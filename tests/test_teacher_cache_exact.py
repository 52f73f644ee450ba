"""`teacher.cache=exact` (kdmtl_cli/engine/teacher_exact.py): the outputs it hands the objective
are bit-identical to the live teacher's on the same training batch, whether just computed, read
back from an earlier epoch or run, or held in device memory; views are slotted as
flip * S^2 + dy * S + dx; the shared entry has one writer (another run fills a private one);
settings it cannot honour are refused in one line; and a CLI run ends bit-identical to
`teacher.cache=off`, also when the next job of a sweep reads the first one's stored views."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from conftest import FAST, read_jsonl, run_kdmtl, show
from test_teacher_outputs import N, split_and_tasks
from kdmtl_cli.data.loader import TensorLoader
from kdmtl_cli.engine import teacher_exact, teacher_outputs
from kdmtl_cli.engine.hardware import Hardware
from kdmtl_cli.errors import KdmtlError
from kdmtl_cli.models import build_model
from kdmtl_cli.schema import ModelConfig, TeacherConfig

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")
BATCH = 8                        # N = 30: 3 full batches of 8 and a last one of 6 (run live) per epoch


def _setup(tmp_path, crop=1, hflip=True, resident=False, topk=None, dtype=None, channels_last=True):
    split, tasks = split_and_tasks()
    hw = Hardware(device=CPU, precision="32", channels_last=channels_last, scaler=None)
    torch.manual_seed(0)
    teacher = hw.prepare_model(build_model(OmegaConf.structured(ModelConfig(width=8, decoder_width=8)), tasks)).eval()
    teacher.capture_features(["trunk.stages.1"])
    loader = TensorLoader(split, {n: t.kind.flip_target for n, t in tasks.items()}, batch_size=BATCH,
                          mean=[0.5] * 3, std=[0.25] * 3, device=CPU, shuffle=True, hflip=hflip, seed=3,
                          crop_padding=crop, pad_values={"seg": 255})
    data = SimpleNamespace(name="fake", fingerprint="abc", mean=[0.5] * 3, std=[0.25] * 3)
    cfg = OmegaConf.structured(TeacherConfig(cache="exact", cache_topk=topk, cache_dtype=dtype))
    said = []
    cache = teacher_exact.open_exact(cache_dir=str(tmp_path), teacher=teacher, loader=loader, hardware=hw,
                                     teacher_cfg=cfg, data=data, task_kinds={"cls": "classification",
                                                                             "seg": "segmentation"},
                                     epochs=4, say=said.append, resident=resident)
    return SimpleNamespace(cache=cache, loader=loader, teacher=teacher, said=said, hw=hw)


def _epoch(s, epoch: int, check=True):
    """One epoch through the cache as the objective uses it; every covered batch's outputs are
    compared bit for bit with the live teacher's on that very batch."""
    s.loader.set_epoch(epoch)
    s.cache.new_epoch()
    covered = 0
    for batch in s.loader:
        batch["image"] = s.hw.to_input(batch["image"])
        if not s.cache.covers(batch):
            assert batch["image"].shape[0] != BATCH        # only the last, smaller batch runs live
            continue
        covered += 1
        cached = s.cache.teacher_outputs(batch)
        if check:
            with torch.no_grad():
                live = s.teacher(batch["image"])
            for group in ("outputs", "features"):
                assert set(cached[group]) == set(live[group])
                for name, value in live[group].items():
                    assert torch.equal(cached[group][name], value), (epoch, group, name)
    return covered, s.cache.epoch_metrics()


def test_view_slots_enumerate_flip_and_crop_offsets():
    p = 2
    side = 2 * p + 1
    flips, crops, expected = [], [], []
    for f in (0, 1):
        for dy in range(side):
            for dx in range(side):
                flips.append(bool(f))
                crops.append((dy, dx))
                expected.append(len(expected))
    slots = teacher_exact.view_slots(torch.tensor(flips), torch.tensor(crops), p)
    assert slots.tolist() == expected
    assert teacher_exact.num_views(True, p) == 2 * side * side == len(expected)
    assert teacher_exact.num_views(True, 4) == 162          # CIFAR's pad-4 crop and flip
    assert teacher_exact.view_slots(torch.tensor([True, False]), None, 0).tolist() == [1, 0]
    assert teacher_exact.num_views(False, 0) == 1


@pytest.mark.parametrize("resident", [False, True], ids=["memory-mapped", "resident"])
def test_outputs_are_bitwise_the_live_teachers_computed_or_read_back(tmp_path, resident):
    s = _setup(tmp_path, crop=0, resident=resident)          # 2 views per sample: most repeat by epoch 3
    assert any("30 samples x 2 views" in line and "float32" in line for line in s.said), s.said
    rates = []
    for epoch in range(1, 6):
        covered, metrics = _epoch(s, epoch)
        assert covered == N // BATCH
        rates.append(metrics["teacher_cache/hit_rate"])
    # work skipped grows as views repeat; every stored (sample, view) row was flagged
    assert rates[0] < rates[-1] and rates[-1] > 0.5, rates
    assert int(s.cache.flags.sum()) <= N * 2
    if not resident:
        assert (s.cache.root / "meta.json").exists()


def test_a_second_cache_reads_the_first_ones_views_bit_identically(tmp_path):
    first = _setup(tmp_path, crop=1)
    for epoch in (1, 2):
        _epoch(first, epoch)
    stored = int(first.cache.flags.sum())
    assert stored > 0
    # while the first run holds the shared entry, a second one fills a private entry, removed at its end
    second = _setup(tmp_path, crop=1)
    assert second.cache.private and any("private" in line for line in second.said)
    _epoch(second, 1)
    second.cache.close()
    assert not second.cache.root.exists()
    # once the first has ended, the shared entry is reused: its rows read back exactly
    first.cache.close()
    third = _setup(tmp_path, crop=1)
    assert not third.cache.private and any("reusing" in line for line in third.said), third.said
    assert int(third.cache.flags.sum()) == stored
    covered, metrics = _epoch(third, 1)                    # epoch 1 again: every view is stored
    assert metrics["teacher_cache/teacher_batches"] == 0.0


def test_float16_or_topk_is_said_to_be_approximate(tmp_path):
    s = _setup(tmp_path, topk=2, dtype="float16")
    assert any("not bit-identical" in line for line in s.said)
    _, metrics = _epoch(s, 1, check=False)
    assert metrics["teacher_cache/teacher_batches"] >= 1


def test_disk_bound_is_checked_before_use(tmp_path, monkeypatch):
    import shutil

    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    with pytest.raises(KdmtlError, match="teacher.cache=exact needs up to .* free"):
        _setup(tmp_path)


def test_exact_with_scale_crop_is_refused():
    cfg = OmegaConf.create({"teacher": OmegaConf.structured(TeacherConfig(cache="exact")),
                            "data": {"scale_crop": [1.0, 1.2]}})
    with pytest.raises(KdmtlError, match="teacher.cache=exact does not store random scale-crop views"):
        teacher_outputs.check_settings(cfg.teacher)


def test_views_cache_resident_in_memory_reads_what_the_memory_maps_hold(tmp_path):
    """The device-resident form of the `views` cache (a CUDA device with room) returns what the
    memory-mapped one does; checked here with host memory standing in for the device."""
    from test_teacher_outputs import _setup as setup_views  # noqa: PLC0415

    s = setup_views(tmp_path, topk=2)
    resident = teacher_outputs.TeacherOutputCache(s.cache.root, s.cache.meta, s.table, CPU, resident=True)
    assert resident.resident and not s.cache.resident
    s.loader.set_epoch(1)
    for batch in s.loader:
        a = s.cache.lookup(batch["index"], batch["view"])
        b = resident.lookup(batch["index"], batch["view"])
        for group in a:
            for name in a[group]:
                assert torch.equal(a[group][name], b[group][name])


def test_cli_exact_ends_bit_identical_to_off_and_the_next_sweep_job_reuses_the_views(workdir, shared_cache):
    common = ["train", *FAST, "optim.epochs=2", "data.crop_padding=1"]
    off = run_kdmtl([*common, f"hydra.run.dir={workdir / 'off'}"], workdir, shared_cache)
    assert off.returncode == 0, show(off)
    # two jobs of one sweep, in one process (Hydra's basic launcher), differing only in logging:
    # the first fills the exact store and releases it when it ends, the second reads it back
    sweep = run_kdmtl(["train", "-m", *common[1:], "teacher.cache=exact", "log.every_n_steps=25,26",
                       f"hydra.sweep.dir={workdir / 'sweep'}"], workdir, shared_cache)
    assert sweep.returncode == 0, show(sweep)
    assert sweep.stdout.count("teacher outputs (exact)") == 2 and "private" not in sweep.stdout, show(sweep)
    assert "filling" in sweep.stdout and "reusing" in sweep.stdout, show(sweep)
    final = {name: read_jsonl(workdir / name / "metrics.jsonl")[-1] for name in ("off", "sweep/0", "sweep/1")}
    keys = [k for k in final["off"] if k.startswith(("test/", "val/"))]
    assert keys
    off_weights = torch.load(workdir / "off" / "checkpoints" / "last.pt", weights_only=True)["model"]
    for name in ("sweep/0", "sweep/1"):
        assert all(final[name][k] == final["off"][k] for k in keys), name
        weights = torch.load(workdir / name / "checkpoints" / "last.pt", weights_only=True)["model"]
        assert all(torch.equal(weights[k], off_weights[k]) for k in off_weights), name
    epochs = [r for r in read_jsonl(workdir / "sweep/1" / "metrics.jsonl") if r["type"] == "epoch"]
    # the second job draws the first job's views (same seed): its teacher never runs
    assert all(r["train/teacher_cache/teacher_batches"] == 0 for r in epochs), epochs
    assert all(r["train/teacher_cache/hit_rate"] == 1.0 for r in epochs)
