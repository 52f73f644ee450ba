"""`hardware.keep_freed_memory`: the host's allocator keeps the memory a training step frees.

torch's CPU tensors come from the C library's malloc. With glibc's defaults a block over its
(dynamic) mmap threshold is mapped for the tensor and unmapped when it is freed, and freed
memory at the top of the heap beyond the trim threshold is handed back to the kernel; either
way the next step's activations land on fresh pages, and every page is a page fault the kernel
zero-fills. A KD step frees and re-allocates hundreds of MB of activations: on the
resnet56 -> resnet20 step that is tens of thousands of page faults per step and a large share of
its time on this project's CPU (`scripts/bench_torchdistill.py` prints both, with and without
this setting; README "Benchmarks").

What it sets (glibc only, once per process; elsewhere nothing): M_MMAP_THRESHOLD at its largest
value (32 MiB on 64-bit: blocks below it come from the heap and return to it) and
M_TRIM_THRESHOLD at 2 GiB (free memory at the heap's top is kept up to that). The process keeps
its peak heap as resident memory instead of returning it between steps; no result changes
(allocation addresses are not inputs of any kernel: tests/test_train_e2e.py compares a run with
it off bit for bit; tests/test_hardware_knobs.py counts the page faults). `hardware.keep_freed_memory=false` leaves glibc's defaults -- in a process where
nothing set them before: mallopt's settings cannot be undone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import platform

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3      # glibc's malloc.h
MMAP_THRESHOLD = 32 * 1024 * 1024                # DEFAULT_MMAP_THRESHOLD_MAX on 64-bit
TRIM_THRESHOLD = 2 ** 31 - 1                     # mallopt takes an int


@functools.lru_cache(1)
def _glibc():
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        return libc
    except (OSError, AttributeError):
        return None


@functools.lru_cache(1)
def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse (see the module's doc); True where it did.
    Idempotent: the settings are made once per process."""
    libc = _glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
