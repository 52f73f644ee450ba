"""Data-parallel training (kdmtl_cli/engine/distributed.py): the gradient averaging equals the
full global batch's gradient exactly in arithmetic terms (2 gloo processes, uneven shares), and
`kdmtl train hardware=ddp` runs 2 CPU ranks through the CLI with one run directory written by
rank 0. Against 1 process on the same global batch the final metrics differ by BatchNorm only:
each rank normalises with its own half-batch statistics (SyncBatchNorm is GPU-only in torch)."""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import FAST, assert_one_line_error, read_jsonl, run_kdmtl, show
from kdmtl_cli.data.loader import TensorLoader
from kdmtl_cli.engine.distributed import average_gradients, mean_across_ranks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank, world, port, x, y, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    part = torch.tensor_split(torch.arange(len(x)), world)[rank]      # the loader's contiguous shares
    loss = torch.nn.functional.mse_loss(model(x[part]), y[part])
    loss.backward()
    average_gradients(list(model.parameters()), len(part) / len(x))
    means = mean_across_ranks({"a": torch.tensor(float(rank + 1))})
    out[rank] = ([p.grad.clone() for p in model.parameters()], float(means["a"]))
    dist.destroy_process_group()


def test_gradient_average_equals_the_global_batch_gradient():
    torch.manual_seed(1)
    x, y = torch.randn(5, 4), torch.randn(5, 2)                       # 5 samples: shares 3 and 2
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    torch.nn.functional.mse_loss(model(x), y).backward()
    expected = [p.grad for p in model.parameters()]
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_rank, args=(2, _free_port(), x, y, out), nprocs=2, join=True)
        results = dict(out)
    for rank in (0, 1):
        grads, mean = results[rank]
        assert mean == 1.5                                            # (1 + 2) / 2
        for g, e in zip(grads, expected):
            assert torch.allclose(g, e, atol=1e-6, rtol=1e-5)


def test_loader_shards_each_global_batch_contiguously():
    split = {"image": torch.zeros(10, 1, 2, 2, dtype=torch.uint8), "cls": torch.arange(10)}
    shards = []
    for rank in (0, 1):
        loader = TensorLoader(split, {"cls": None}, batch_size=4, mean=[0.0], std=[1.0], device=torch.device("cpu"),
                              shuffle=True, seed=3)
        loader.shard = (rank, 2)
        loader.set_epoch(1)
        shards.append([b["targets"]["cls"].tolist() for b in loader])
    full = TensorLoader(split, {"cls": None}, batch_size=4, mean=[0.0], std=[1.0], device=torch.device("cpu"),
                        shuffle=True, seed=3)
    full.set_epoch(1)
    for b, batch in enumerate(full):
        assert shards[0][b] + shards[1][b] == batch["targets"]["cls"].tolist()
    assert [full.global_batch_size(s) for s in range(3)] == [4, 4, 2]


@pytest.mark.skipif(not dist.is_gloo_available(), reason="needs gloo")
@pytest.mark.slow  # ~40 s: two ranks on two cores; run with -m slow
def test_ddp_two_cpu_ranks_through_the_cli(workdir, shared_cache):
    common = ["train", *FAST, "loss=none", "optim.epochs=2", "data.batch_size=16", "limit_train_batches=4",
              "hardware.device=cpu"]
    one, two = workdir / "one", workdir / "two"
    assert run_kdmtl([*common, f"hydra.run.dir={one}"], workdir, shared_cache).returncode == 0
    proc = run_kdmtl([*common, "hardware=ddp", "hardware.nproc=2", f"hydra.run.dir={two}"], workdir, shared_cache)
    assert proc.returncode == 0, show(proc)
    assert proc.stdout.count("run dir:") == 1                          # rank 0 speaks, once
    assert [p.name for p in (two / ".hydra").iterdir() if p.is_dir()] == []   # one .hydra record, no rank copies
    epochs = [r for r in read_jsonl(two / "metrics.jsonl") if r["type"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2]                      # written once, by rank 0
    a = json.loads((one / "results.json").read_text())["results"]
    b = json.loads((two / "results.json").read_text())["results"]
    for key in ("test/loss/task", "val/loss/task"):
        # the same global batch; the gap is BatchNorm's per-rank batch statistics (module docstring)
        assert abs(a[key] - b[key]) < 0.05 * abs(a[key]), (key, a[key], b[key])
    bad = run_kdmtl([*common, "hardware=ddp", "hardware.nproc=2", "data.batch_size=15",
                     f"hydra.run.dir={workdir / 'bad'}"], workdir, shared_cache)
    assert_one_line_error(bad, "does not split over 2 processes")

    # preempted (every rank gets SIGTERM after step 3), then the same command resumes: identical
    # to the uninterrupted 2-rank run
    command = [*common, "hardware=ddp", "hardware.nproc=2", f"hydra.run.dir={workdir / 'stopped'}"]
    stopped = run_kdmtl(command, workdir, shared_cache, faults={"signal_at_step": 3})
    assert stopped.returncode == 75 and "SIGTERM" in stopped.stderr, show(stopped)
    resumed = run_kdmtl(command, workdir, shared_cache)
    assert resumed.returncode == 0 and "after epoch 0 + 3 steps" in resumed.stdout, show(resumed)
    c = json.loads((workdir / "stopped" / "results.json").read_text())["results"]
    keys = [k for k in b if k.startswith(("test/", "val/"))]
    assert keys and all(b[k] == c[k] for k in keys)
