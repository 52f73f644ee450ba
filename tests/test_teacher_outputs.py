"""The teacher-output cache (kdmtl_cli/engine/teacher_outputs.py): cached targets equal the live
teacher's on the same replayed views, the student's inputs are bitwise the cached views, a
changed teacher or preprocessing builds a new cache, a damaged one is rebuilt, top-k logits are
rebuilt as documented, and the CLI builds once and reuses.

Tolerance for fp16 storage: |cached - live| <= 1e-3 |live| + 1e-4 (fp16 rounds to a relative
2^-11 ~ 4.9e-4; the live forward runs in other batch compositions, which moves fp32 results by
~1e-6)."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from conftest import assert_one_line_error, read_jsonl, run_kdmtl, show
from kdmtl_cli.data import TargetSpec
from kdmtl_cli.data.loader import TensorLoader, ViewTable
from kdmtl_cli.engine import teacher_outputs as to
from kdmtl_cli.engine.hardware import Hardware
from kdmtl_cli.errors import KdmtlError
from kdmtl_cli.models import build_model
from kdmtl_cli.schema import ModelConfig, TeacherConfig
from kdmtl_cli.tasks import build_tasks

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")
HW = Hardware(device=CPU, precision="32", channels_last=False, scaler=None)
N, SIZE = 30, 16


def split_and_tasks():
    """N random SIZE x SIZE images with `cls` and `seg` targets, and their two tasks."""
    g = torch.Generator().manual_seed(0)
    split = {"image": torch.randint(0, 256, (N, 3, SIZE, SIZE), generator=g, dtype=torch.uint8),
             "cls": torch.randint(0, 5, (N,), generator=g),
             "seg": torch.randint(0, 4, (N, SIZE, SIZE), generator=g)}
    tasks = build_tasks(OmegaConf.create({"cls": {"kind": "classification"}, "seg": {"kind": "segmentation"}}),
                        {"cls": TargetSpec("classification", 5), "seg": TargetSpec("segmentation", 4)})
    return split, tasks


def _setup(tmp_path, mean=(0.5, 0.5, 0.5), mode="views", views=3, topk=None, crop=2, seed=0):
    split, tasks = split_and_tasks()
    torch.manual_seed(seed)
    teacher = build_model(OmegaConf.structured(ModelConfig(width=8, decoder_width=8)), tasks).eval()
    teacher.capture_features(["trunk.stages.1"])
    loader = TensorLoader(split, {n: t.kind.flip_target for n, t in tasks.items()}, batch_size=8, mean=list(mean),
                          std=[0.25] * 3, device=CPU, shuffle=True, hflip=True, seed=3, crop_padding=crop,
                          pad_values={"seg": 255})
    data = SimpleNamespace(name="fake", fingerprint="abc", mean=list(mean), std=[0.25] * 3)
    cfg = OmegaConf.structured(TeacherConfig(cache=mode, cache_views=views, cache_topk=topk))
    said = []
    table = to.plan_views(mode, views, N, hflip=True, crop_padding=crop, seed=3, say=said.append)
    cache = to.open_or_build(cache_dir=str(tmp_path), teacher=teacher, loader=loader, hardware=HW, teacher_cfg=cfg,
                             data=data, views=table, task_kinds={"cls": "classification", "seg": "segmentation"},
                             seed=3, say=said.append, progress_mode="none")
    loader.views = table
    return SimpleNamespace(cache=cache, loader=loader, teacher=teacher, said=said, data=data, cfg=cfg, table=table)


def _close(cached, live):
    return bool(((cached - live).abs() <= 1e-3 * live.abs() + 1e-4).all())


def test_cached_targets_equal_the_live_teacher_on_replayed_views(tmp_path):
    s = _setup(tmp_path)
    assert any("caching 30 samples x 3 view(s)" in line for line in s.said)
    used = set()
    for epoch in (1, 2, 3):
        s.loader.set_epoch(epoch)
        for batch in s.loader:
            cached = s.cache.lookup(batch["index"], batch["view"], batch["image"])
            with torch.no_grad():
                live = s.teacher(batch["image"])
            for group in ("outputs", "features"):
                assert set(cached[group]) == set(live[group])
                for name in live[group]:
                    assert cached[group][name].shape == live[group][name].shape
                    assert _close(cached[group][name], live[group][name]), (group, name)
            used.update(zip(batch["index"].tolist(), batch["view"].tolist()))
    assert len({v for _, v in used}) == 3   # epochs draw different stored views
    # the stored augmentations are really used: a flipped view's input is the mirror of another view's
    flips = s.table.flips
    assert flips.any() and not flips.all()


def test_student_inputs_are_bitwise_the_cached_views(tmp_path):
    s = _setup(tmp_path)
    for epoch in (1, 2):
        s.loader.set_epoch(epoch)
        for batch in s.loader:
            stored = s.cache.crc[batch["index"].numpy(), batch["view"].numpy()]
            assert np.array_equal(to.image_crc(batch["image"]), stored)
    # a drifted replay is caught at the first batch of an epoch, not used
    s.loader.set_epoch(4)
    batch = next(iter(s.loader))
    s.cache.new_epoch()
    with pytest.raises(KdmtlError, match="differ from the views cached"):
        s.cache.lookup(batch["index"], (batch["view"] + 1) % 3, batch["image"])


def test_changed_teacher_or_preprocessing_builds_a_new_cache_and_same_reuses(tmp_path):
    first = _setup(tmp_path)
    again = _setup(tmp_path)
    assert any("reusing the cache" in line for line in again.said) and again.cache.root == first.cache.root
    other_teacher = _setup(tmp_path, seed=1)                 # other weights
    other_norm = _setup(tmp_path, mean=(0.4, 0.5, 0.5))      # other preprocessing
    other_crop = _setup(tmp_path, crop=1)
    roots = {first.cache.root, other_teacher.cache.root, other_norm.cache.root, other_crop.cache.root}
    assert len(roots) == 4
    assert all(any("caching" in line for line in s.said) for s in (other_teacher, other_norm, other_crop))
    # one weight changed by 1e-3 is another teacher
    with torch.no_grad():
        first.teacher.trunk.stem[0].weight[0, 0, 0, 0] += 1e-3
    assert to.weights_digest(first.teacher) != to.weights_digest(again.teacher)


def test_damaged_cache_is_rebuilt_and_a_foreign_one_refused(tmp_path):
    s = _setup(tmp_path)
    root = s.cache.root
    victim = sorted(root.glob("entry_*.npy"))[0]
    victim.write_bytes(victim.read_bytes()[:100])           # truncated, e.g. by a full disk
    rebuilt = _setup(tmp_path)
    assert any("incomplete or damaged; rebuilding" in line for line in rebuilt.said)
    assert rebuilt.cache.root == root and len(victim.read_bytes()) > 100
    meta = json.loads((root / "meta.json").read_text())
    meta["content"]["view_seed"] = 99                      # same key, other settings: never used
    (root / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(KdmtlError, match="built for other settings"):
        _setup(tmp_path)
    assert not list(tmp_path.glob("teacher_outputs/.*building*"))   # no half-built directory left


def test_topk_logits_rebuild_by_hand():
    # logits (2, 1, 0, 0), top-2 kept: the other two share (e^0 + e^0) / 2 = 1 -> logit 0: exact here
    logits = torch.tensor([[2.0, 1.0, 0.0, 0.0]])
    values, index, lse = to.topk_parts(logits, 2)
    assert math.isclose(float(lse), math.log(math.e ** 2 + math.e + 2), rel_tol=1e-6)
    assert torch.allclose(to.rebuild_logits(values, index, lse, 4), logits, atol=1e-6)
    # in general: softmax at T = 1 exact on the top k, the rest spread evenly
    torch.manual_seed(0)
    logits = torch.randn(6, 100) * 3
    values, index, lse = to.topk_parts(logits, 10)
    rebuilt = to.rebuild_logits(values, index, lse, 100)
    p, q = logits.softmax(1), rebuilt.softmax(1)
    assert torch.allclose(q.gather(1, index), p.gather(1, index), atol=1e-6)
    rest = torch.ones_like(p, dtype=torch.bool).scatter(1, index, False)
    assert torch.allclose(q[rest].view(6, 90), ((1 - p.gather(1, index).sum(1)) / 90)[:, None].expand(6, 90),
                          atol=1e-6)


def test_topk_cache_stores_k_values_and_rebuilds_the_logits(tmp_path):
    s = _setup(tmp_path, topk=2)
    spec = s.cache.meta["entries"]["outputs/cls"]
    assert spec["topk"] == 2 and spec["classes"] == 5
    assert s.cache.arrays["outputs/cls:values"].shape == (N, 3, 2)
    assert "topk" not in s.cache.meta["entries"]["outputs/seg"]        # dense logits are kept whole
    s.loader.set_epoch(1)
    batch = next(iter(s.loader))
    cached = s.cache.lookup(batch["index"], batch["view"])["outputs"]["cls"]
    with torch.no_grad():
        live = s.teacher(batch["image"])["outputs"]["cls"]
    values, index, lse = to.topk_parts(live, 2)
    assert torch.allclose(cached, to.rebuild_logits(values, index, lse, 5), atol=2e-3, rtol=1e-3)


def test_deterministic_cache_turns_augmentation_off_and_says_so(tmp_path):
    s = _setup(tmp_path, mode="deterministic")
    assert any("unaugmented images" in line for line in s.said)
    assert s.table.num_views == 1 and not s.table.flips.any() and s.table.crops is None
    s.loader.set_epoch(2)
    batch = next(iter(s.loader))
    plain = s.loader.make_batch(batch["index"], torch.zeros(len(batch["index"]), dtype=torch.bool))
    assert torch.equal(batch["image"], plain["image"])
    table = to.plan_views("views", 4, 10, hflip=False, crop_padding=0, seed=0, say=s.said.append)
    assert table.num_views == 1 and "1 view per sample" in s.said[-1]


def test_view_table_draws_are_a_function_of_seed_and_epoch():
    a = ViewTable.draw(50, 4, hflip=True, crop_padding=4, seed=1)
    b = ViewTable.draw(50, 4, hflip=True, crop_padding=4, seed=1)
    assert torch.equal(a.flips, b.flips) and torch.equal(a.crops, b.crops)
    assert torch.equal(a.choose(1, 3), b.choose(1, 3)) and not torch.equal(a.choose(1, 3), a.choose(1, 4))
    assert int(a.crops.max()) <= 8 and int(a.crops.min()) >= 0


def test_cli_builds_the_cache_once_and_reuses_it(tmp_path, shared_cache):
    # views=2 and top-3 logits: no other test builds this entry in the shared cache
    args = ["train", "debug=fast", "loss=kd", "teacher.cache=views", "teacher.cache_views=2", "teacher.cache_topk=3"]
    first = run_kdmtl([*args, f"hydra.run.dir={tmp_path / 'a'}"], tmp_path, shared_cache)
    assert first.returncode == 0, show(first)
    built = [line for line in first.stdout.splitlines() if line.startswith("teacher outputs: caching")]
    assert built and "x 2 view(s)" in built[0] and "top-3 logits" in built[0], first.stdout
    entry = built[0].rsplit(" at ", 1)[1]
    second = run_kdmtl([*args, f"hydra.run.dir={tmp_path / 'b'}"], tmp_path, shared_cache)
    assert second.returncode == 0, show(second)
    assert f"teacher outputs: reusing the cache at {entry}" in second.stdout
    # the two runs are the same run: identical final metrics
    final = [next(r for r in read_jsonl(tmp_path / d / "metrics.jsonl") if r["type"] == "final") for d in "ab"]
    assert {k: v for k, v in final[0].items() if k.startswith("test/")} == \
        {k: v for k, v in final[1].items() if k.startswith("test/")}
    bad = run_kdmtl(["train", "debug=fast", "loss=kd", "teacher.cache=index", f"hydra.run.dir={tmp_path / 'c'}"],
                    tmp_path, shared_cache)
    assert_one_line_error(bad, "teacher.cache", "views")
