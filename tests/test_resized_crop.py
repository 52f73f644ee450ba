"""`data.resized_crop_scale` / `data.resized_crop_ratio`: torchvision's RandomResizedCrop in the
training loaders (kdmtl_cli/data/loader.py), replayable: the windows are torchvision's
`RandomResizedCrop.get_params` on draws from the epoch's generator, the crops are torchvision's
tensor `resized_crop`, both data paths give the same bits, the setting off changes no epoch plan,
the teacher-output cache's stored views carry their windows, and bad settings are one-line errors."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF1
import torchvision.transforms.v2.functional as TF
from omegaconf import OmegaConf
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode, RandomResizedCrop

from kdmtl_cli.build import make_loader
from kdmtl_cli.data import DataBundle, TargetSpec
from kdmtl_cli.data.dataloader_path import DataLoaderPath
from kdmtl_cli.data.loader import ResizedCrop, TensorLoader, ViewTable, check_resized_crop
from kdmtl_cli.engine import teacher_exact
from kdmtl_cli.engine import teacher_outputs as to
from kdmtl_cli.engine.hardware import Hardware
from kdmtl_cli.errors import KdmtlError
from kdmtl_cli.models import build_model
from kdmtl_cli.schema import ModelConfig, TeacherConfig, TrainConfig, validate
from kdmtl_cli.tasks import TASK_KINDS, Task, _load_kinds

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")
HW = Hardware(device=CPU, precision="32", channels_last=False, scaler=None)
KINDS = {"seg": "segmentation", "seg8": "segmentation", "depth": "depth", "normal": "normals", "cls": "classification"}
SCALE, RATIO = [0.08, 1.0], [3 / 4, 4 / 3]


# ---- an independent transcription of torchvision's get_params ------------------------------------

def get_params_transcribed(u, height, width, scale, ratio):
    """torchvision/transforms/transforms.py RandomResizedCrop.get_params, line by line in Python
    floats, with its random draws taken from u (22 uniforms in [0, 1)): attempt t's area from u[t],
    its log-ratio from u[10 + t], the offsets from u[20], u[21] (randint(0, n) = floor(u * n))."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for t in range(10):
        target_area = area * (scale[0] + (scale[1] - scale[0]) * u[t])
        aspect_ratio = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[10 + t])
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            i = min(int(u[20] * (height - h + 1)), height - h)
            j = min(int(u[21] * (width - w + 1)), width - w)
            return i, j, h, w
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w = width
        h = height
    return (height - h) // 2, (width - w) // 2, h, w


class _ReplayTorch:
    """Stands in for `torch` inside torchvision.transforms.transforms so that torchvision's own
    get_params consumes the given uniforms: `torch.empty(1).uniform_(a, b)` alternates between the
    area and the log-ratio draws of successive attempts, `torch.randint(0, n, ...)` takes the
    offsets; everything else (and float64 for `torch.tensor(ratio)`) is torch."""

    def __init__(self, u):
        self.u, self.attempt, self.kind, self.offsets = u, 0, 0, 0

    def __getattr__(self, name):
        return getattr(torch, name)

    def tensor(self, data, **kw):
        return torch.tensor(data, dtype=torch.float64, **kw)

    def empty(self, *size):
        replay = self

        class _Draw:
            def uniform_(self, a, b):
                k = replay.attempt + (10 if replay.kind else 0)
                if replay.kind:
                    replay.attempt += 1
                replay.kind ^= 1
                return torch.tensor([replay.u[k] * (float(b) - float(a)) + float(a)], dtype=torch.float64)
        return _Draw()

    def randint(self, low, high, size=None, **kw):
        u = self.u[20 + self.offsets]
        self.offsets += 1
        return torch.tensor([min(int(u * (high - low)), high - low - 1) + low])


SETTINGS = [  # (H, W, scale, ratio): the usual one; tall/wide images; ranges that force the fallback
    (24, 32, SCALE, RATIO), (40, 12, [0.3, 0.9], [0.5, 2.0]), (9, 9, [0.95, 1.0], [3.0, 4.0]),
    (10, 30, [0.9, 1.0], [0.2, 0.3]), (30, 10, [0.9, 1.0], [3.0, 5.0]), (16, 16, [1.0, 1.0], [1.0, 1.0]),
    (12, 12, [0.6, 1.0], [1.3, 3.0])]      # the last: about 40% fall back, in the same draw as the others


@pytest.mark.parametrize("height, width, scale, ratio", SETTINGS)
def test_windows_are_torchvisions_get_params_on_the_same_draws(height, width, scale, ratio, monkeypatch):
    rc = ResizedCrop.make(scale, ratio, height, width)
    n = 400
    windows = rc.draw(n, torch.Generator().manual_seed(5))
    u = torch.rand(n, ResizedCrop.DRAWS, generator=torch.Generator().manual_seed(5), dtype=torch.float64).tolist()
    expected = [get_params_transcribed(row, height, width, scale, ratio) for row in u]
    assert windows.dtype == torch.int64 and windows.tolist() == [list(e) for e in expected]
    # torchvision's own get_params, fed the same uniforms, gives the same windows
    import torchvision.transforms.transforms as tvt

    image = torch.zeros(3, height, width)
    for row, want in zip(u[:100], expected):
        monkeypatch.setattr(tvt, "torch", _ReplayTorch(row))
        assert RandomResizedCrop.get_params(image, scale, ratio) == want
    monkeypatch.undo()
    i, j, h, w = windows.unbind(1)
    assert ((h >= 1) & (w >= 1) & (i >= 0) & (j >= 0) & (i + h <= height) & (j + w <= width)).all()


def test_the_fallback_and_the_accepted_windows_both_occur():
    # the usual setting accepts almost always; scale ~1 with ratio [3, 4] on a square image never fits
    usual = ResizedCrop.make(SCALE, RATIO, 24, 32).draw(2000, torch.Generator().manual_seed(0))
    assert len({tuple(w) for w in usual.tolist()}) > 1500
    area = (usual[:, 2] * usual[:, 3]).double() / (24 * 32)
    assert 0.07 < float(area.min()) and float(area.max()) <= 1.0 and 0.45 < float(area.mean()) < 0.6
    never = ResizedCrop.make([0.95, 1.0], [3.0, 4.0], 9, 9).draw(50, torch.Generator().manual_seed(0))
    assert (never == torch.tensor([3, 0, 3, 9])).all()          # round(9 / 3) = 3 rows, centred
    mixed = ResizedCrop.make([0.6, 1.0], [1.3, 3.0], 12, 12)
    centre = (mixed.draw(400, torch.Generator().manual_seed(5)) == torch.tensor(mixed.fallback())).all(1)
    assert 0.2 < float(centre.double().mean()) < 0.6 and mixed.fallback() == (1, 0, 9, 12)


# ---- the crops equal torchvision's ----------------------------------------------------------------

def _flips(names):
    _load_kinds()
    return {name: TASK_KINDS.get(KINDS[name])().flip_target for name in names}


def _split(n=6, h=20, w=28, seed=0):
    g = torch.Generator().manual_seed(seed)
    split = {"image": torch.randint(0, 256, (n, 3, h, w), generator=g, dtype=torch.uint8),
             "seg": torch.randint(0, 13, (n, h, w), generator=g), "cls": torch.randint(0, 5, (n,), generator=g),
             "seg8": torch.randint(0, 13, (n, h, w), generator=g, dtype=torch.uint8),
             "depth": torch.rand(n, h, w, generator=g) * 5, "normal": torch.randn(n, 3, h, w, generator=g)}
    split["seg"][:, 0] = 255
    split["depth"][:, :, 0] = 0
    return split


def _loader(split, cls=TensorLoader, names=tuple(KINDS), **kw):
    args = dict(batch_size=4, mean=[0.0] * 3, std=[1.0] * 3, device=CPU, shuffle=True, hflip=True, seed=3,
                resized_crop_scale=SCALE, resized_crop_ratio=RATIO, target_kinds={k: KINDS[k] for k in names})
    args.update(kw)
    return cls(split, _flips(names), **args)


def test_image_and_targets_equal_torchvisions_resized_crop():
    split = _split()
    h, w = split["image"].shape[-2:]
    loader = _loader(split)
    # the full image (torchvision's identity), small, thin, edge and corner windows
    for window in [(0, 0, h, w), (3, 5, 7, 9), (0, 0, 1, w), (h - 4, w - 2, 4, 2), (2, 0, h - 2, 11), (0, 9, h, 1)]:
        index = torch.tensor([0, 3])
        plan = torch.tensor([window, window])
        for flip in (False, True):
            batch = loader.make_batch(index, torch.full((2,), flip), plan)
            assert torch.equal(batch["resized_crop"], plan)
            for row, n in enumerate(index.tolist()):
                mirror = (lambda t: t.flip(-1)) if flip else (lambda t: t)
                image = split["image"][n].float() / 255.0
                want = TF.resized_crop(tv_tensors.Image(image), *window, [h, w], InterpolationMode.BILINEAR,
                                       antialias=True)
                v1 = TF1.resized_crop(image, *window, [h, w], InterpolationMode.BILINEAR, antialias=True)
                got = mirror(batch["image"][row])
                assert (got - want).abs().max() <= 1e-6 and torch.equal(want.as_subclass(torch.Tensor), v1)
                assert torch.equal(got, want.as_subclass(torch.Tensor))      # in fact the same bits
                for name in ("seg", "seg8"):
                    mask = TF.resized_crop(tv_tensors.Mask(split[name][n]), *window, [h, w])
                    assert torch.equal(mirror(batch["targets"][name][row]), mask.as_subclass(torch.Tensor)), name
                    assert batch["targets"][name].dtype == split[name].dtype
                depth = TF1.resized_crop(split["depth"][n][None], *window, [h, w], InterpolationMode.NEAREST)[0]
                assert torch.equal(mirror(batch["targets"]["depth"][row]), depth)           # values kept
                normal = TF1.resized_crop(split["normal"][n], *window, [h, w], InterpolationMode.BILINEAR,
                                          antialias=True)
                flipped = mirror(batch["targets"]["normal"][row])
                if flip:
                    flipped = flipped * torch.tensor([-1.0, 1.0, 1.0]).view(3, 1, 1)   # normals' x sign
                assert (flipped - normal).abs().max() <= 1e-6
                assert torch.equal(batch["targets"]["cls"][row], split["cls"][n])


def test_loader_windows_are_drawn_after_the_flips_from_the_epoch_generator():
    split = _split()
    loader = _loader(split)
    loader.set_epoch(2)
    order, flips, windows, _ = loader.epoch_plan()
    g = torch.Generator().manual_seed(3 * 100_003 + 2)
    assert torch.equal(order, torch.randperm(6, generator=g))
    assert torch.equal(flips, torch.rand(6, generator=g) < 0.5)
    h, w = split["image"].shape[-2:]
    u = torch.rand(6, ResizedCrop.DRAWS, generator=g, dtype=torch.float64).tolist()
    assert windows.tolist() == [list(get_params_transcribed(row, h, w, SCALE, RATIO)) for row in u]


# ---- both data paths, and the setting off -------------------------------------------------------

def _same(a, b, where):
    assert set(a) == set(b), where
    for key in a:
        if isinstance(a[key], dict):
            _same(a[key], b[key], f"{where}/{key}")
        else:
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), f"{where}/{key}"


@pytest.mark.parametrize("workers", [0, 1])
def test_tensor_and_dataloader_paths_give_the_same_bits(workers):
    split = _split(n=11)
    kw = dict(mean=[0.4, 0.5, 0.6], std=[0.2, 0.25, 0.3])
    tensor, path = _loader(split, **kw), _loader(split, cls=DataLoaderPath, num_workers=workers, **kw)
    seen = []
    for epoch in (0, 1):
        tensor.set_epoch(epoch)
        path.set_epoch(epoch)
        first, second = list(tensor), list(path)
        assert len(first) == len(second) == 3
        for b, (x, y) in enumerate(zip(first, second)):
            _same(x, y, f"epoch {epoch} batch {b}")
            assert x["resized_crop"].shape == (x["image"].shape[0], 4)
        seen.append(torch.cat([x["resized_crop"] for x in first]))
    assert not torch.equal(seen[0], seen[1])


def test_setting_off_leaves_the_epoch_plans_and_batches_unchanged():
    split = _split(n=10)
    names = ("seg", "cls")
    on = _loader(split, names=names)
    off = _loader(split, names=names, resized_crop_scale=None)
    plain = TensorLoader(split, _flips(names), batch_size=4, mean=[0.0] * 3, std=[1.0] * 3, device=CPU,
                         shuffle=True, hflip=True, seed=3)
    for epoch in (0, 3):
        for loader in (on, off, plain):
            loader.set_epoch(epoch)
        p_on, p_off, p_plain = on.epoch_plan(), off.epoch_plan(), plain.epoch_plan()
        assert torch.equal(p_on[0], p_plain[0]) and torch.equal(p_on[1], p_plain[1])    # drawn after them
        assert p_off[2] is None and p_plain[2] is None
        for x, y in zip(off, plain):
            _same(x, y, f"epoch {epoch}")
            assert "resized_crop" not in x
    # evaluation never crops: make_loader passes the setting to training loaders only
    tasks, bundle = _tasks(), _bundle(split)
    cfg = _cfg(resized_crop_scale=SCALE)
    assert make_loader(bundle, "train", tasks, cfg, HW, train=True, limit=None).resized_crop is not None
    evaluation = make_loader(bundle, "train", tasks, cfg, HW, train=False, limit=None)
    assert evaluation.resized_crop is None and "resized_crop" not in next(iter(evaluation))


def _tasks():
    _load_kinds()
    specs = {"seg": TargetSpec("segmentation", 13), "cls": TargetSpec("classification", 5)}
    return {name: Task(name, TASK_KINDS.get(KINDS[name])(), specs[name], name) for name in specs}


def _bundle(split):
    return DataBundle(name="fake", targets={"seg": TargetSpec("segmentation", 13), "cls": TargetSpec("classification", 5)},
                      splits={"train": split}, mean=[0.5] * 3, std=[0.25] * 3)


def _cfg(**data):
    return OmegaConf.create({"data": {"batch_size": 4, "eval_batch_size": 4, "hflip": True, "loader": "tensor",
                                      "num_workers": 0, **data}, "seed": 0})


# ---- the teacher-output cache -------------------------------------------------------------------

def _cache_setup(tmp_path, mode="views", views=3, scale=(0.25, 1.0)):
    from test_teacher_outputs import N, split_and_tasks

    split, tasks = split_and_tasks()
    torch.manual_seed(0)
    teacher = build_model(OmegaConf.structured(ModelConfig(width=8, decoder_width=8)), tasks).eval()
    loader = TensorLoader(split, {n: t.kind.flip_target for n, t in tasks.items()}, batch_size=8, mean=[0.5] * 3,
                          std=[0.25] * 3, device=CPU, shuffle=True, hflip=True, seed=3, resized_crop_scale=list(scale),
                          target_kinds={"seg": "segmentation", "cls": "classification"})
    data = SimpleNamespace(name="fake", fingerprint="abc", mean=[0.5] * 3, std=[0.25] * 3)
    cfg = OmegaConf.structured(TeacherConfig(cache=mode, cache_views=views))
    said = []
    table = to.plan_views(mode, views, N, hflip=True, crop_padding=0, seed=3, say=said.append,
                          resized_crop=loader.resized_crop)
    cache = to.open_or_build(cache_dir=str(tmp_path), teacher=teacher, loader=loader, hardware=HW, teacher_cfg=cfg,
                             data=data, views=table, task_kinds={"cls": "classification", "seg": "segmentation"},
                             seed=3, say=said.append, progress_mode="none")
    loader.views = table
    return SimpleNamespace(cache=cache, loader=loader, teacher=teacher, table=table, said=said, split=split, n=N)


def test_stored_views_carry_their_windows_and_the_student_gets_exactly_them(tmp_path):
    s = _cache_setup(tmp_path)
    n, k = s.n, 3
    assert s.table.windows.shape == (n, k, 4) and s.table.crops is None
    # drawn from the table's generator after the flips: row n * K + k is view k of sample n
    g = torch.Generator().manual_seed(3 * 100_003 + 7_777_777)
    assert torch.equal(s.table.flips, torch.rand(n, k, generator=g) < 0.5)
    u = torch.rand(n * k, ResizedCrop.DRAWS, generator=g, dtype=torch.float64).tolist()
    assert s.table.windows.view(-1, 4).tolist() == [list(get_params_transcribed(r, 16, 16, [0.25, 1.0], RATIO))
                                                    for r in u]
    used = set()
    for epoch in (1, 2):
        s.loader.set_epoch(epoch)
        s.cache.new_epoch()
        for batch in s.loader:
            index, view = batch["index"], batch["view"]
            assert torch.equal(batch["resized_crop"], s.table.windows[index, view])
            assert torch.equal(batch["flip"], s.table.flips[index, view])
            # the stored view's input, built as the cache built it, is the student's input bit for bit
            stored = s.loader.make_batch(index, s.table.flips[index, view], s.table.crop_plan(index, view))
            assert torch.equal(stored["image"], batch["image"])
            assert np.array_equal(to.image_crc(batch["image"]), s.cache.crc[index.numpy(), view.numpy()])
            cached = s.cache.lookup(index, view, batch["image"])
            with torch.no_grad():
                live = s.teacher(batch["image"])
            for name, value in live["outputs"].items():
                assert ((cached["outputs"][name] - value).abs() <= 1e-3 * value.abs() + 1e-4).all(), name
            used.update(zip(index.tolist(), view.tolist()))
    assert len({v for _, v in used}) == 3
    # the key holds the windows: the same settings reuse the entry, another scale range builds another
    again, other = _cache_setup(tmp_path), _cache_setup(tmp_path, scale=(0.5, 1.0))
    assert again.cache.root == s.cache.root and any("reusing the cache" in line for line in again.said)
    assert other.cache.root != s.cache.root and "windows" in s.cache.meta["content"]


def test_deterministic_views_are_unaugmented_and_exact_is_refused(tmp_path):
    s = _cache_setup(tmp_path, mode="deterministic")
    assert any("unaugmented images" in line for line in s.said)
    assert s.table.windows is None and s.table.num_views == 1
    s.loader.set_epoch(1)
    batch = next(iter(s.loader))
    assert "resized_crop" not in batch
    plain = s.loader.make_batch(batch["index"], torch.zeros(len(batch["index"]), dtype=torch.bool))
    assert torch.equal(batch["image"], plain["image"])
    # views planned without the loader's windows would silently drop the crop: refused
    table = to.plan_views("views", 2, s.n, hflip=True, crop_padding=0, seed=3)
    with pytest.raises(KdmtlError, match="no resized-crop windows"):
        to.open_or_build(cache_dir=str(tmp_path), teacher=s.teacher, loader=s.loader, hardware=HW,
                         teacher_cfg=OmegaConf.structured(TeacherConfig(cache="views")), data=None, views=table,
                         task_kinds={}, seed=3)
    # exact: windows are no enumerable slots; refused by the settings check and by open_exact
    cfg = validate(OmegaConf.create({"data": {"resized_crop_scale": SCALE}, "teacher": {"cache": "exact"}}), TrainConfig)
    with pytest.raises(KdmtlError) as err:
        to.check_settings(cfg.teacher)
    assert "teacher.cache=exact" in str(err.value) and "data.resized_crop_scale" in str(err.value)
    assert "\n" not in str(err.value)
    for mode in ("views", "deterministic", "off"):
        cfg.teacher.cache = mode
        to.check_settings(cfg.teacher)
    with pytest.raises(KdmtlError, match="resized-crop"):
        teacher_exact.open_exact(cache_dir=str(tmp_path), teacher=s.teacher, loader=s.loader, hardware=HW,
                                 teacher_cfg=OmegaConf.structured(TeacherConfig(cache="exact")), data=None,
                                 task_kinds={}, epochs=1)


# ---- settings -----------------------------------------------------------------------------------

@pytest.mark.parametrize("data, needle", [
    ({"resized_crop_scale": [0.0, 1.0]}, "data.resized_crop_scale"),
    ({"resized_crop_scale": [0.5, 1.2]}, "data.resized_crop_scale"),
    ({"resized_crop_scale": [0.9, 0.5]}, "data.resized_crop_scale"),
    ({"resized_crop_scale": [0.5]}, "data.resized_crop_scale"),
    ({"resized_crop_scale": [0.1, 0.5, 1.0]}, "data.resized_crop_scale"),
    ({"resized_crop_scale": "big"}, "data.resized_crop_scale"),
    ({"resized_crop_scale": [0.1, float("nan")]}, "data.resized_crop_scale"),
    ({"resized_crop_scale": [True, 1.0]}, "data.resized_crop_scale"),
    ({"resized_crop_scale": SCALE, "resized_crop_ratio": [0.0, 1.0]}, "data.resized_crop_ratio"),
    ({"resized_crop_scale": SCALE, "resized_crop_ratio": [2.0, 1.0]}, "data.resized_crop_ratio"),
    ({"resized_crop_scale": SCALE, "resized_crop_ratio": [1.0]}, "data.resized_crop_ratio"),
    ({"resized_crop_scale": SCALE, "resized_crop_ratio": [1.0, float("inf")]}, "data.resized_crop_ratio"),
    ({"resized_crop_scale": SCALE, "crop_padding": 4}, "data.crop_padding"),
    ({"resized_crop_scale": SCALE, "scale_crop": [1.0, 1.2]}, "data.scale_crop"),
])
def test_bad_settings_are_one_line_errors(data, needle):
    cfg = _cfg(**data)
    for check in (lambda: check_resized_crop(cfg.data),
                  lambda: make_loader(_bundle(_split()), "train", _tasks(), cfg, HW, train=True, limit=None)):
        with pytest.raises(KdmtlError) as err:
            check()
        message = str(err.value)
        assert needle in message and "\n" not in message, message
        if "crop_padding" in data or "scale_crop" in data:
            assert "data.resized_crop_scale" in message
    with pytest.raises(ValueError):
        TensorLoader(_split(), _flips(("seg",)), batch_size=2, mean=[0.0] * 3, std=[1.0] * 3, device=CPU,
                     resized_crop_scale=data["resized_crop_scale"], resized_crop_ratio=data.get("resized_crop_ratio", RATIO),
                     crop_padding=data.get("crop_padding", 0), scale_crop=data.get("scale_crop"))


def test_good_settings_pass_and_the_schema_takes_them():
    for data in ({}, {"resized_crop_scale": None}, {"resized_crop_scale": [1.0, 1.0], "resized_crop_ratio": [1.0, 1.0]},
                 {"resized_crop_scale": [0.08, 1.0], "crop_padding": 0, "scale_crop": None}):
        check_resized_crop(_cfg(**data).data)
    cfg = validate(OmegaConf.create({"data": {"resized_crop_scale": [0.2, 1.0]}}), TrainConfig)
    assert list(cfg.data.resized_crop_scale) == [0.2, 1.0] and list(cfg.data.resized_crop_ratio) == RATIO
    check_resized_crop(cfg.data)


def test_train_refuses_them_before_any_work():
    from kdmtl_cli.commands.train import check_protocol

    def config(data, cache="off"):
        return validate(OmegaConf.create({"data": data, "teacher": {"cache": cache},
                                          "tasks": {"cls": {"kind": "classification"}}}), TrainConfig)

    for data, cache, words in [({"resized_crop_scale": [0.5, 2.0]}, "off", ["data.resized_crop_scale=[0.5, 2.0]"]),
                               ({"resized_crop_scale": SCALE, "crop_padding": 4}, "off", ["data.crop_padding"]),
                               ({"resized_crop_scale": SCALE}, "exact", ["teacher.cache=exact", "resized_crop_scale"])]:
        with pytest.raises(KdmtlError) as err:
            check_protocol(config(data, cache))
        assert all(word in str(err.value) for word in words) and "\n" not in str(err.value)
    check_protocol(config({"resized_crop_scale": SCALE}, "views"))
