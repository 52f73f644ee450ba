#!/usr/bin/env python
"""Seconds from the command to the first training step, with cached data and teacher.

  python scripts/startup.py [--repeats 5] [--cache DIR] [--profile] [-- OVERRIDES...]

Fills a cache first (one `kdmtl train` run: data generated, teacher trained) unless --cache
names one that has them, then starts `kdmtl train optim.epochs=1 OVERRIDES` --repeats times in
fresh processes and prints, per phase, the median seconds since the command was started:
imports done, data loaded, teacher loaded, objective set up (first validation batch), the
student's first training step begins (its first epoch is entered), and with --full the end
of the run (which includes the test); without it each start-up stops there. The phases are read from
timestamps the child process prints from wrappers around those functions (the wrappers are
in this script, not in kdmtl). --profile also prints the 25 slowest functions (cumulative) of
one start-up under cProfile, from the end of the imports to the first training step.

Default OVERRIDES: none (the default run: shapes data, the default teacher and student).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The child: wrap the phase functions, then run the real CLI entry point.
CHILD = r"""
import os, sys, time
PROFILE = os.environ.get("STARTUP_PROFILE")
def mark(name):
    print(f"@@phase {name} {time.time():.6f}", file=sys.stderr, flush=True)
    if PROFILE and name == "first_step":
        profiler.disable()
        profiler.dump_stats(PROFILE)
    if name == "first_step" and not os.environ.get("STARTUP_FULL"):
        os._exit(0)            # what is measured is done; the run's directory is a temporary one
import kdmtl_cli.run as run
from kdmtl_cli.distill.objective import Objective
mark("imports")
if PROFILE:    # from the end of the imports to the first training step
    import cProfile
    profiler = cProfile.Profile()
    profiler.enable()
def after(name, fn):
    def wrapped(*a, **k):
        out = fn(*a, **k)
        mark(name)
        return out
    return wrapped
run.build_data = after("data", run.build_data)
run.prepare_teacher = after("teacher", run.prepare_teacher)
Objective.setup = after("objective", Objective.setup)
from kdmtl_cli.engine.trainer import Trainer
train_epoch = Trainer._train_epoch
def first_epoch(self, *a, **k):
    if self.label == "student" and not getattr(Trainer, "_marked", False):
        Trainer._marked = True
        mark("first_step")
    return train_epoch(self, *a, **k)
Trainer._train_epoch = first_epoch
from kdmtl_cli.cli import main
sys.argv = ["kdmtl"] + sys.argv[1:]
try:
    main()
finally:
    mark("end")
"""
PHASES = ("imports", "data", "teacher", "objective", "first_step", "end")   # end: with --full only


def run_once(args, overrides, cache: str, run_dir: Path, profile: bool = False, full: bool = False):
    env = {**os.environ, "KDMTL_CACHE": cache}
    if full or args.full:
        env["STARTUP_FULL"] = "1"
    env.pop("HYDRA_FULL_ERROR", None)
    cmd = [sys.executable, "-c", CHILD, "train", "optim.epochs=1", "log.progress=none", f"hydra.run.dir={run_dir}",
           *overrides]
    if profile:
        out = run_dir.parent / "startup.prof"
        env["STARTUP_PROFILE"] = str(out)
    start = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"kdmtl failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    if profile:
        import pstats

        pstats.Stats(str(out)).sort_stats("cumulative").print_stats(25)
        return {}
    phases = {}
    for line in proc.stderr.splitlines():
        if line.startswith("@@phase "):
            _, name, stamp = line.split()
            phases.setdefault(name, float(stamp) - start)
    return phases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cache", default=None, help="a kdmtl cache that already holds the data and teacher")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--full", action="store_true", help="run each start-up to its end (the test included)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kdmtl-startup-"))
    cache = args.cache or str(work / "cache")
    print(f"cache {cache}; filling it (data, teacher) with one run ...", flush=True)
    run_once(args, args.overrides, cache, work / "fill", full=True)
    runs = [run_once(args, args.overrides, cache, work / f"run{i}") for i in range(args.repeats)]
    print(f"\nseconds since the command, median of {args.repeats} (each run), "
          f"overrides: {' '.join(args.overrides) or 'none'}")
    for name in PHASES:
        values = [r[name] for r in runs if name in r]
        if values:
            print(f"  {name:<11} {statistics.median(values):6.2f}   ({', '.join(f'{v:.2f}' for v in values)})")
    if args.profile:
        run_once(args, args.overrides, cache, work / "profiled", profile=True)


if __name__ == "__main__":
    main()
