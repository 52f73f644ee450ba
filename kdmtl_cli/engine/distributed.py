"""Data-parallel training over several processes: `kdmtl train hardware=ddp hardware.nproc=N`
(kdmtl starts the N ranks with torch.distributed.run) or `torchrun --nproc_per_node=N -m
kdmtl_cli train hydra.run.dir=DIR ...`.

`data.batch_size` stays the *global* batch: each step every rank takes its contiguous share of
the same global batch of the epoch's plan (a function of (seed, epoch), so no sampler state),
and after the backward pass the gradients are averaged across ranks weighted by each rank's
share, which gives the gradient of the global batch's mean loss. kdmtl averages the gradients
itself (one flat all-reduce per step) instead of wrapping the student in DistributedDataParallel,
because the weighting strategies differentiate per task with autograd.grad, which DDP's reducer
does not see. Frozen teachers are never wrapped. Backend: nccl on CUDA, gloo on CPU. Every rank
evaluates the whole validation and test split (identical results); only rank 0 writes files.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Dict, Iterable, List

import torch
import torch.distributed as dist

from kdmtl_cli.errors import KdmtlError


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def from_env() -> Ranks:
    """The ranks torch.distributed.run / torchrun set in the environment (one process: 0 of 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return Ranks(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))


def init(ranks: Ranks, device: torch.device) -> None:
    if ranks.active and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def barrier(ranks: Ranks) -> None:
    if ranks.active:
        dist.barrier()


def shutdown(ranks: Ranks) -> None:
    if ranks.active and dist.is_initialized():
        dist.destroy_process_group()


def average_gradients(params: Iterable[torch.nn.Parameter], share: float) -> None:
    """grad <- sum over ranks of share_r * grad_r (share_r = local samples / global samples),
    in one flat all-reduce. A parameter without a gradient on this rank contributes zeros."""
    params = [p for p in params if p.requires_grad]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads]) * share
    dist.all_reduce(flat)
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(g).clone()
        offset += n


def mean_across_ranks(values: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The mean over ranks of each tensor (epoch loss sums, losses a weighting adapts from)."""
    if not values:
        return values
    keys = sorted(values)
    flat = torch.stack([values[k].detach().float().reshape(()) for k in keys])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    return {k: flat[i] for i, k in enumerate(keys)}


def launch(args: List[str], nproc: int) -> int:
    """Start `nproc` ranks of `kdmtl train args` on this machine (the environment torchrun sets:
    RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT) and wait for them. SIGTERM / SIGUSR1 are
    passed on to every rank (they checkpoint and stop); when a rank fails the others are stopped,
    since they would wait for it in the next collective. Returns the ranks' exit status."""
    import signal
    import socket
    import time

    from kdmtl_cli.engine import run_dir

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    threads = str(max(1, (os.cpu_count() or 1) // nproc))
    procs = []
    for rank in range(nproc):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc),
                   LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        env[run_dir.PARENT_OWNS] = "1"                 # this process owns the run directory for them
        env.setdefault("OMP_NUM_THREADS", threads)     # the ranks share the cores
        procs.append(subprocess.Popen([sys.executable, "-m", "kdmtl_cli", "train", *args], env=env))

    def forward(signum, _frame):
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        while True:
            codes = [proc.poll() for proc in procs]
            failed = [c for c in codes if c not in (None, 0)]
            if failed or all(c == 0 for c in codes):
                break
            time.sleep(0.2)
        if failed:
            deadline = time.monotonic() + 30     # a stop signal's checkpoint, else a collective that hangs
            while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
                time.sleep(0.2)
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
            codes = [proc.wait() for proc in procs]
            # The first rank that exited with a status of its own (the rest may be ours, killed).
            rank = next((r for r, c in enumerate(codes) if c > 0), None)
            if rank != 0:       # rank 0 did not report it: say which rank failed, and how
                culprit = rank if rank is not None else next(r for r, c in enumerate(codes) if c != 0)
                print(f"kdmtl: error: data-parallel rank {culprit} failed (exit {codes[culprit]}); "
                      "run it with HYDRA_FULL_ERROR=1 to see why", file=sys.stderr)
            return codes[rank] if rank is not None else 1
        return 0
    except KeyboardInterrupt:
        for proc in procs:
            proc.kill()
        return 130
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def check_batch(batch_size: int, ranks: Ranks) -> None:
    if ranks.active and batch_size % ranks.world:
        raise KdmtlError(f"data.batch_size={batch_size} (the global batch) does not split over "
                         f"{ranks.world} processes; use a multiple of {ranks.world}")
