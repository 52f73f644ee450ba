"""`data.scale_crop`: the NYUv2 / Cityscapes random scale-crop of Nash-MTL / CAGrad
(`RandomScaleCrop`, nash-mtl@cce1840 experiments/nyuv2/data.py), exactly replayed."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from kdmtl_cli.data import build_data, check_scale_crop
from kdmtl_cli.data.dataloader_path import DataLoaderPath
from kdmtl_cli.data.loader import TensorLoader
from kdmtl_cli.engine import teacher_outputs
from kdmtl_cli.errors import KdmtlError
from kdmtl_cli.schema import TrainConfig, validate
from kdmtl_cli.tasks import TASK_KINDS, _load_kinds
from tests.test_nyuv2_cityscapes import data_cfg, write_release

SCALES = [1.0, 1.2, 1.5]
KINDS = {"seg": "segmentation", "depth": "depth", "normal": "normals"}


def official_random_scale_crop(img, label, depth, normal, sc, i, j):
    """The official RandomScaleCrop.__call__ with its draws (sc, i, j) given, transcribed from
    nash-mtl experiments/nyuv2/data.py (img [3,H,W], label [H,W], depth [1,H,W], normal [3,H,W])."""
    height, width = img.shape[-2:]
    h, w = int(height / sc), int(width / sc)
    img_ = F.interpolate(img[None, :, i: i + h, j: j + w], size=(height, width), mode="bilinear",
                         align_corners=True).squeeze(0)
    label_ = F.interpolate(label[None, None, i: i + h, j: j + w], size=(height, width),
                           mode="nearest").squeeze(0).squeeze(0)
    depth_ = F.interpolate(depth[None, :, i: i + h, j: j + w], size=(height, width), mode="nearest").squeeze(0)
    normal_ = F.interpolate(normal[None, :, i: i + h, j: j + w], size=(height, width), mode="bilinear",
                            align_corners=True).squeeze(0)
    return img_, label_, depth_ / sc, normal_


def _flips():
    _load_kinds()
    return {name: TASK_KINDS.get(kind)().flip_target for name, kind in KINDS.items()}


def _train_split(tmp_path, h=10, w=15):
    write_release(tmp_path, "nyuv2", n_train=6, n_val=1, h=h, w=w)
    return build_data(data_cfg(tmp_path, name="nyuv2", val_size=1)).splits["train"]


def _loader(split, cls=TensorLoader, **kw):
    return cls(split, _flips(), batch_size=4, mean=[0.0] * 3, std=[1.0] * 3, device=torch.device("cpu"),
               shuffle=True, hflip=kw.pop("hflip", True), seed=3, scale_crop=SCALES,
               target_kinds=dict(KINDS), **kw)


def test_matches_the_official_random_scale_crop(tmp_path):
    torch.manual_seed(0)
    h, w = 10, 15
    # float64 targets (the loader keeps a target's dtype); the image is uint8 as stored
    split = {"image": torch.randint(0, 256, (3, 3, h, w), dtype=torch.uint8),
             "seg": torch.randint(0, 13, (3, h, w)), "depth": torch.rand(3, h, w, dtype=torch.float64) * 5,
             "normal": torch.randn(3, 3, h, w, dtype=torch.float64)}
    split["seg"][:, 0] = 255
    split["depth"][:, :, 0] = 0
    loader = _loader(split, hflip=False)
    # every scale, the extreme offsets included
    for k, (i, j) in [(0, (0, 0)), (1, (0, 0)), (1, (h - int(h / 1.2), w - int(w / 1.2))), (2, (1, 2)),
                      (2, (h - int(h / 1.5), w - int(w / 1.5)))]:
        sc = SCALES[k]
        index = torch.tensor([0, 2])
        plan = torch.tensor([[k, i, j], [k, i, j]])
        batch = loader.make_batch(index, torch.zeros(2, dtype=torch.bool), plan)
        assert torch.equal(batch["scale_crop"], plan)
        for row, n in enumerate(index.tolist()):
            img = split["image"][n].float() / 255.0
            label = split["seg"][n].double()
            depth = split["depth"][n][None]
            normal = split["normal"][n]
            ref = official_random_scale_crop(img, label, depth, normal, sc, i, j)
            assert torch.equal(batch["image"][row], ref[0])
            assert torch.equal(batch["targets"]["seg"][row], ref[1].long())
            assert torch.equal(batch["targets"]["depth"][row], ref[2][0])
            assert torch.equal(batch["targets"]["normal"][row], ref[3])
        # depth: the nearest-resized crop divided by the scale
        hh, ww = int(h / sc), int(w / sc)
        near = F.interpolate(split["depth"][0][None, None, i:i + hh, j:j + ww], size=(h, w), mode="nearest")[0, 0]
        assert torch.equal(batch["targets"]["depth"][0], near / sc)
    # scale 1 is the identity
    batch = loader.make_batch(torch.tensor([1]), torch.zeros(1, dtype=torch.bool), torch.tensor([[0, 0, 0]]))
    assert torch.equal(batch["targets"]["depth"][0], split["depth"][1])
    assert torch.equal(batch["targets"]["seg"][0], split["seg"][1])


def test_plan_is_per_sample_reproducible_and_both_paths_agree(tmp_path):
    split = _train_split(tmp_path)
    h, w = split["image"].shape[-2:]
    a, b = _loader(split), _loader(split)
    for epoch in (0, 1):
        a.set_epoch(epoch)
        b.set_epoch(epoch)
        first, second = list(a), list(b)
        paths = _loader(split, cls=DataLoaderPath, num_workers=0)
        paths.set_epoch(epoch)
        third = list(paths)
        assert len(first) == len(third) == 2
        for x, y, z in zip(first, second, third):
            for key in ("image", "index", "flip", "scale_crop"):
                assert torch.equal(x[key], y[key]) and torch.equal(x[key], z[key]), key
            for name in KINDS:
                assert torch.equal(x["targets"][name], y["targets"][name])
                assert torch.equal(x["targets"][name], z["targets"][name])
                assert x["targets"][name].dtype == split[name].dtype
        plan = torch.cat([x["scale_crop"] for x in first])
        sizes = torch.tensor([[int(h / s), int(w / s)] for s in SCALES])[plan[:, 0]]
        assert ((plan[:, 1:] >= 0) & (plan[:, 1:] <= torch.tensor([h, w]) - sizes)).all()
    a.set_epoch(0)
    b.set_epoch(1)
    assert not torch.equal(a.epoch_plan()[2], b.epoch_plan()[2])
    # off: the epoch plan is exactly the flip-only one
    off = TensorLoader(split, _flips(), batch_size=4, mean=[0.0] * 3, std=[1.0] * 3, device=torch.device("cpu"),
                       shuffle=True, hflip=True, seed=3)
    plan_on, plan_off = a.epoch_plan(), off.epoch_plan()
    assert torch.equal(plan_on[0], plan_off[0]) and torch.equal(plan_on[1], plan_off[1]) and plan_off[2] is None


@pytest.mark.parametrize("value, needle", [
    ([0.5, 1.0], "data.scale_crop"), ([], "data.scale_crop"), ("big", "data.scale_crop"),
    ([1.0, float("nan")], "data.scale_crop")])
def test_bad_settings_are_one_line_errors(value, needle):
    cfg = OmegaConf.create({"name": "nyuv2", "scale_crop": value, "crop_padding": 0})
    with pytest.raises(KdmtlError) as err:
        check_scale_crop(cfg)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_scale_crop_refused_where_unsupported(tmp_path):
    with pytest.raises(KdmtlError, match="data.scale_crop.*data=shapes"):
        check_scale_crop(OmegaConf.create({"name": "shapes", "scale_crop": SCALES}))
    with pytest.raises(KdmtlError, match="crop_padding"):
        check_scale_crop(OmegaConf.create({"name": "nyuv2", "scale_crop": SCALES, "crop_padding": 4}))
    check_scale_crop(OmegaConf.create({"name": "cityscapes", "scale_crop": SCALES}))
    check_scale_crop(OmegaConf.create({"name": "shapes", "scale_crop": None}))
    # the schema takes the list; the teacher-output cache of views refuses it before any work
    cfg = validate(OmegaConf.create({"data": {"name": "nyuv2", "scale_crop": SCALES},
                                     "teacher": {"cache": "views"}}), TrainConfig)
    assert list(cfg.data.scale_crop) == SCALES
    with pytest.raises(KdmtlError) as err:
        teacher_outputs.check_settings(cfg.teacher)
    assert "teacher.cache" in str(err.value) and "data.scale_crop" in str(err.value) and "\n" not in str(err.value)
    cfg.teacher.cache = "deterministic"
    teacher_outputs.check_settings(cfg.teacher)
