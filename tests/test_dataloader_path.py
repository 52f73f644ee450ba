"""The DataLoader data path (kdmtl_cli/data/dataloader_path.py) against the tensor-resident one:
bitwise-identical batches for the same seed and epoch (order, flips, crops, stored views,
normalisation, partial last batch, limit_batches), with and without worker processes; the
`data.loader` choice in make_loader (auto rule, bad values); one CLI run on each path."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from omegaconf import OmegaConf

from conftest import FAST, run_kdmtl, show
from kdmtl_cli.build import _fits_resident, make_loader
from kdmtl_cli.data import DataBundle, TargetSpec
from kdmtl_cli.data.dataloader_path import DataLoaderPath
from kdmtl_cli.data.loader import TensorLoader, ViewTable
from kdmtl_cli.engine.hardware import Hardware
from kdmtl_cli.errors import KdmtlError
from kdmtl_cli.tasks import TASK_KINDS, Task, _load_kinds

_load_kinds()
CPU = torch.device("cpu")
HW = Hardware(device=CPU, precision="32", channels_last=False, scaler=None)
N, SIZE = 37, 8   # batch 5: seven full batches and a partial one of two


def _split(n=N, size=SIZE):
    g = torch.Generator().manual_seed(0)
    return {"image": torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8),
            "cls": torch.randint(0, 10, (n,), generator=g),
            "seg": torch.randint(0, 5, (n, size, size), generator=g, dtype=torch.uint8),
            "depth": torch.rand(n, size, size, generator=g) + 0.5}


FLIPS = {"cls": TASK_KINDS.get("classification")().flip_target,
         "seg": TASK_KINDS.get("segmentation")().flip_target,
         "depth": TASK_KINDS.get("depth")().flip_target}


def _pair(num_workers, split=None, **kw):
    split = split if split is not None else _split()
    args = dict(batch_size=5, mean=[0.4, 0.5, 0.6], std=[0.2, 0.25, 0.3], device=CPU, seed=3,
                pad_values={"seg": 255, "depth": 0})
    args.update(kw)
    return TensorLoader(split, FLIPS, **args), DataLoaderPath(split, FLIPS, num_workers=num_workers, **args)


def _assert_same(a: dict, b: dict, where: str):
    assert set(a) == set(b), where
    for key in a:
        if isinstance(a[key], dict):
            _assert_same(a[key], b[key], f"{where}/{key}")
        else:
            assert a[key].dtype == b[key].dtype and a[key].device == b[key].device, f"{where}/{key}"
            assert torch.equal(a[key], b[key]), f"{where}/{key}"


def _same_epochs(tensor, dataloader, epochs=(0, 1)) -> list:
    """Every batch of each epoch equal on every key (also re-iterating the persistent workers)."""
    seen = []
    for epoch in epochs:
        tensor.set_epoch(epoch)
        dataloader.set_epoch(epoch)
        expected, got = list(tensor), list(dataloader)
        assert len(expected) == len(got) == len(tensor) == len(dataloader)
        for b, (x, y) in enumerate(zip(expected, got)):
            _assert_same(x, y, f"epoch {epoch} batch {b}")
        seen.append(expected)
    return seen


@pytest.mark.parametrize("workers", [0, 2])
def test_shuffle_flip_and_partial_last_batch_match(workers):
    tensor, dataloader = _pair(workers, shuffle=True, hflip=True)
    assert dataloader.images.device == CPU and dataloader.num_workers == workers
    first, second = _same_epochs(tensor, dataloader)
    assert [b["image"].shape[0] for b in first] == [5] * 7 + [2]
    flips = torch.cat([b["flip"] for b in first])
    assert flips.any() and not flips.all()            # both kinds of sample are compared
    # the comparison can fail: two epochs differ, so equal batches are not a given
    assert not torch.equal(torch.cat([b["index"] for b in first]), torch.cat([b["index"] for b in second]))


@pytest.mark.parametrize("workers", [0, 2])
def test_random_crop_with_dense_targets_matches(workers):
    tensor, dataloader = _pair(workers, shuffle=True, hflip=True, crop_padding=4)
    first, _ = _same_epochs(tensor, dataloader)
    assert all("crop" in b for b in first)
    seg = torch.cat([b["targets"]["seg"] for b in first])
    assert (seg == 255).any() and (seg < 255).any()  # crops reached the padding and the map


@pytest.mark.parametrize("workers", [0, 2])
def test_stored_views_match(workers):
    views = ViewTable.draw(N, 3, hflip=True, crop_padding=2, seed=11)
    tensor, dataloader = _pair(workers, shuffle=True, crop_padding=2, views=views)
    first, _ = _same_epochs(tensor, dataloader)
    view = torch.cat([b["view"] for b in first])
    assert view.shape == (N,) and len(set(view.tolist())) == 3


@pytest.mark.parametrize("workers", [0, 2])
def test_limit_batches_and_unshuffled_eval_match(workers):
    tensor, dataloader = _pair(workers, shuffle=True, hflip=True, limit_batches=3)
    first, _ = _same_epochs(tensor, dataloader)
    assert len(first) == 3
    tensor, dataloader = _pair(workers, batch_size=16, drop_last=True)
    (first,) = _same_epochs(tensor, dataloader, epochs=(0,))
    assert torch.cat([b["index"] for b in first]).tolist() == list(range(32))


def test_abandoned_epoch_then_full_epoch_still_matches():
    """`next(iter(loader))` (as run.py does on the val loader), then whole epochs: the persistent
    workers' stale prefetches must not leak into the next epoch."""
    tensor, dataloader = _pair(2, shuffle=True, hflip=True, crop_padding=2)
    dataloader.set_epoch(5)
    next(iter(dataloader))
    _same_epochs(tensor, dataloader, epochs=(0, 1))


# ---------------------------------------------------------------- make_loader: choice of path
def _tasks(*names):
    specs = {"cls": ("classification", TargetSpec("classification", 10)),
             "seg": ("segmentation", TargetSpec("segmentation", 5))}
    return {n: Task(n, TASK_KINDS.get(specs[n][0])(), specs[n][1], n) for n in names}


def _bundle(split):
    return DataBundle("t", {}, {"train": split}, mean=[0.5] * 3, std=[0.25] * 3)


@pytest.fixture(scope="module")
def composed():
    """The shipped `train` config (Hydra compose API), validated: the real defaults of data.*."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from kdmtl_cli.schema import TrainConfig, validate

    def make(*overrides):
        GlobalHydra.instance().clear()
        with initialize_config_module(config_module="kdmtl_cli.conf", version_base="1.3"):
            cfg = compose("train", overrides=["data.batch_size=5", *overrides])
        GlobalHydra.instance().clear()
        return validate(cfg, TrainConfig)
    return make


def test_auto_picks_tensor_for_small_splits_and_dataloader_past_tensor_max_mb(composed):
    cfg = composed()
    assert (cfg.data.loader, cfg.data.num_workers, cfg.data.tensor_max_mb) == ("auto", 2, 4096)
    tasks, bundle = _tasks("cls", "seg"), _bundle(_split())
    resident = make_loader(bundle, "train", tasks, cfg, HW, train=True, limit=None)
    assert type(resident) is TensorLoader
    big = make_loader(bundle, "train", tasks, composed("data.tensor_max_mb=0", "data.num_workers=0"), HW,
                      train=True, limit=None)
    assert type(big) is DataLoaderPath and big.num_workers == 0
    # both paths from make_loader give the same batches
    _same_epochs(resident, big, epochs=(2,))
    # an explicit choice wins over the size rule
    forced = composed("data.loader=tensor", "data.tensor_max_mb=0")
    assert type(make_loader(bundle, "train", tasks, forced, HW, train=True, limit=None)) is TensorLoader
    chosen = make_loader(bundle, "train", tasks, composed("data.loader=dataloader"), HW, train=True, limit=None)
    assert type(chosen) is DataLoaderPath and chosen.num_workers == 2


def test_auto_counts_image_and_loaded_targets_bytes_against_the_limit():
    # exactly 1 MiB: images 1024*1008 bytes + seg 128*128 bytes
    split = {"image": torch.zeros(1, 1, 1024, 1008, dtype=torch.uint8),
             "seg": torch.zeros(1, 128, 128, dtype=torch.uint8), "cls": torch.zeros(1, dtype=torch.long)}
    cfg = OmegaConf.create({"data": {"batch_size": 1, "eval_batch_size": 1, "hflip": False, "tensor_max_mb": 1,
                                     "num_workers": 0}, "seed": 0})
    at_limit = make_loader(_bundle(split), "train", _tasks("seg"), cfg, HW, train=True, limit=None)
    assert type(at_limit) is TensorLoader
    # the 8 bytes of the cls target, loaded only when a task reads it, tip it over
    over = make_loader(_bundle(split), "train", _tasks("seg", "cls"), cfg, HW, train=True, limit=None)
    assert type(over) is DataLoaderPath


def test_auto_on_cuda_keeps_a_split_resident_only_within_a_quarter_of_free_memory(monkeypatch):
    split = {"image": torch.zeros(4, 3, 16, 16, dtype=torch.uint8)}  # 3072 bytes
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (4 * 3072, 10 ** 12))
    assert _fits_resident(split, {}, 1, cuda)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (4 * 3072 - 4, 10 ** 12))
    assert not _fits_resident(split, {}, 1, cuda)
    assert _fits_resident(split, {}, 1, CPU)                  # free GPU memory is not asked on the CPU


@pytest.mark.parametrize("data, words", [
    ({"loader": "gpu"}, ["data.loader=gpu", "auto, tensor, dataloader"]),
    ({"num_workers": -1}, ["data.num_workers", ">= 0"]),
    ({"tensor_max_mb": -5}, ["data.tensor_max_mb", ">= 0"]),
])
def test_bad_values_are_one_line_errors(data, words):
    cfg = OmegaConf.create({"data": {"batch_size": 5, "eval_batch_size": 5, "hflip": False, **data}, "seed": 0})
    with pytest.raises(KdmtlError) as err:
        make_loader(_bundle(_split()), "train", _tasks("cls"), cfg, HW, train=True, limit=None)
    message = str(err.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_views_pass_through_make_loader():
    cfg = OmegaConf.create({"data": {"batch_size": 5, "eval_batch_size": 5, "hflip": True, "crop_padding": 2,
                                     "loader": "dataloader", "num_workers": 0}, "seed": 0})
    views = ViewTable.draw(N, 2, hflip=True, crop_padding=2, seed=1)
    loader = make_loader(_bundle(_split()), "train", _tasks("seg"), cfg, HW, train=True, limit=None, views=views)
    assert loader.views is views and "view" in next(iter(loader))


# ---------------------------------------------------------------- the real CLI
@pytest.mark.slow  # ~18 s; the in-process tests compare the two data paths batch by batch; run with -m slow
def test_cli_dataloader_path_gives_the_tensor_paths_test_metrics(tmp_path, shared_cache):
    runs = {name: (["train", *FAST, "loss=none", f"data.loader={name}", "data.num_workers=0",
                    f"hydra.run.dir={tmp_path / name}"], tmp_path, shared_cache) for name in ("tensor", "dataloader")}
    with ThreadPoolExecutor(2) as pool:  # two processes at once: the imports overlap
        procs = dict(zip(runs, pool.map(lambda a: run_kdmtl(*a), runs.values())))
    results = {}
    for name, proc in procs.items():
        assert proc.returncode == 0, show(proc)
        final = json.loads((tmp_path / name / "results.json").read_text())["results"]
        results[name] = {k: v for k, v in final.items() if k.startswith("test/")}
    assert results["tensor"] and "test/seg/miou" in results["tensor"]
    assert results["dataloader"] == results["tensor"]


def test_resume_may_switch_the_data_path_but_not_the_data():
    """Both paths give identical batches, so a resume may change data.loader / num_workers;
    any other data setting stays an error."""
    from kdmtl_cli.resume import merge_for_resume

    saved = OmegaConf.create({"seed": 0, "data": {"name": "shapes", "batch_size": 64, "loader": "tensor",
                                                  "num_workers": 2, "tensor_max_mb": 4096}})
    new = OmegaConf.create({"seed": 0, "data": {"name": "shapes", "batch_size": 64, "loader": "dataloader",
                                                "num_workers": 0, "tensor_max_mb": 4096}})
    merged = merge_for_resume(new, saved, ["data.loader=dataloader", "data.num_workers=0"])
    assert merged.data.loader == "dataloader" and merged.data.num_workers == 0 and merged.data.batch_size == 64
    new.data.batch_size = 32
    with pytest.raises(KdmtlError, match="data.batch_size"):
        merge_for_resume(new, saved, ["data.loader=dataloader", "data.batch_size=32"])
