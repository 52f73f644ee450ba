"""Model cost for the final table: parameters, FLOPs of one forward (torch.utils.flop_counter)
and inference latency per image (batch of one, median of repeated timed forwards)."""

from __future__ import annotations

import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from kdmtl_cli.models import count_parameters


@torch.no_grad()
def measure(model, image: torch.Tensor, hardware, repeats: int = 20) -> dict:
    model.eval()
    one = hardware.to_input(image[:1])
    with FlopCounterMode(display=False) as counter:
        with hardware.autocast():
            model(one)
    times = []
    for i in range(repeats + 3):
        hardware.synchronize()
        start = time.perf_counter()
        with hardware.autocast():
            model(one)
        hardware.synchronize()
        if i >= 3:  # warm-up
            times.append(time.perf_counter() - start)
    return {"params": count_parameters(model), "flops": int(counter.get_total_flops()),
            "latency_ms": 1000 * statistics.median(times)}
