#!/usr/bin/env python
"""Does the default run demonstrate distillation? A benchmark (never a timed test).

  python scripts/default_run.py [--seeds 0,1,2] [--out docs/default_run.md] [-- OVERRIDE ...]

For every seed it runs, through the real CLI and each in a fresh empty cache
(KDMTL_CACHE), the default command `kdmtl train seed=S` (data generated, teacher trained,
student distilled, test once) and then the vanilla student `kdmtl train loss=none seed=S`
(same data, model, optimiser and seed; it reuses the KD run's cached data). Overrides after
`--` go to both commands (used to choose the default recipe; see the README).

It prints (and with --out writes as Markdown) one table of the headline test metric of each
task (cls accuracy, seg mIoU, depth abs err) for KD student, vanilla student and teacher at
every seed, and checks the goals of the default run:

- the KD student beats the vanilla student on every headline metric at every seed;
- on each, the mean KD gain over seeds is at least twice the seed-to-seed standard deviation
  (sample std) of the vanilla student;
- the teacher beats both students on every headline metric at every seed;
- `kdmtl train` finishes in <= 90 s from an empty cache (wall clock of the whole command).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# (task/metric, +1 when higher is better): the headline metric of each default task
HEADLINE = (("cls/accuracy", +1), ("seg/miou", +1), ("depth/abs_err", -1))
GOAL_SECONDS = 90.0
GOAL_GAIN_OVER_STD = 2.0


def run(args: list, cache: Path, run_dir: Path) -> tuple:
    """Run `kdmtl train ARGS` in its own directory; (wall seconds, the final results)."""
    env = {**os.environ, "KDMTL_CACHE": str(cache)}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "kdmtl_cli", "train", f"hydra.run.dir={run_dir}",
                           "log.progress=plain", *args], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"kdmtl train {' '.join(args)} failed:\n{done.stdout[-3000:]}")
    return seconds, json.loads((run_dir / "results.json").read_text())["results"]


def measure(seeds: list, overrides: list, work: Path) -> dict:
    results = {}
    for seed in seeds:
        cache = work / f"cache-{seed}"  # empty: data generated and teacher trained by the KD run
        seed_arg = [f"seed={seed}"]
        results["kd", seed] = run([*seed_arg, *overrides], cache, work / f"kd-{seed}")
        results["vanilla", seed] = run([*seed_arg, "loss=none", *overrides], cache, work / f"vanilla-{seed}")
        print(f"seed {seed}: kdmtl train {results['kd', seed][0]:.1f} s, loss=none {results['vanilla', seed][0]:.1f} s",
              flush=True)
    return results


def report(seeds: list, overrides: list, results: dict) -> tuple:
    """Markdown lines and whether every goal holds."""
    lines = ["| seed | metric | KD student | vanilla student | teacher | KD − vanilla (better > 0) | KD wins | teacher beats both |",
             "|---:|---|---:|---:|---:|---:|:---:|:---:|"]
    ok = True
    gains = {m: [] for m, _ in HEADLINE}
    for seed in seeds:
        kd, vanilla = results["kd", seed][1], results["vanilla", seed][1]
        for metric, sign in HEADLINE:
            k, v, t = kd[f"test/{metric}"], vanilla[f"test/{metric}"], kd[f"teacher/test/{metric}"]
            gain = sign * (k - v)
            teacher_best = sign * (t - k) > 0 and sign * (t - v) > 0
            gains[metric].append(gain)
            ok &= gain > 0 and teacher_best
            arrow = "↑" if sign > 0 else "↓"
            lines.append(f"| {seed} | {metric} {arrow} | {k:.4f} | {v:.4f} | {t:.4f} | {gain:+.4f} | "
                         f"{'yes' if gain > 0 else '**no**'} | {'yes' if teacher_best else '**no**'} |")
    lines += ["", "| metric | KD mean ± std | vanilla mean ± std | teacher mean | mean gain | gain / vanilla std (goal ≥ 2) | wins |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for metric, sign in HEADLINE:
        k = [results["kd", s][1][f"test/{metric}"] for s in seeds]
        v = [results["vanilla", s][1][f"test/{metric}"] for s in seeds]
        t = [results["kd", s][1][f"teacher/test/{metric}"] for s in seeds]
        std = statistics.stdev(v) if len(v) > 1 else float("nan")
        ratio = statistics.mean(gains[metric]) / std if len(v) > 1 and std > 0 else float("nan")
        ok &= len(v) < 2 or ratio >= GOAL_GAIN_OVER_STD
        sd = (lambda xs: statistics.stdev(xs) if len(xs) > 1 else 0.0)
        lines.append(f"| {metric} {'↑' if sign > 0 else '↓'} | {statistics.mean(k):.4f} ± {sd(k):.4f} | "
                     f"{statistics.mean(v):.4f} ± {sd(v):.4f} | {statistics.mean(t):.4f} | "
                     f"{statistics.mean(gains[metric]):+.4f} | {ratio:.2f} | "
                     f"{sum(g > 0 for g in gains[metric])}/{len(seeds)} |")
    walls = [results["kd", s][0] for s in seeds]
    vanilla_walls = ", ".join(f"{results['vanilla', s][0]:.1f} s" for s in seeds)
    ok &= max(walls) <= GOAL_SECONDS
    lines += ["", f"Wall time of `kdmtl train` from an empty cache (data generated, teacher trained, student, "
                  f"test): {', '.join(f'{w:.1f} s' for w in walls)} for seeds {', '.join(map(str, seeds))} "
                  f"(goal ≤ {GOAL_SECONDS:.0f} s); `loss=none`: "
                  f"{vanilla_walls}.",
              f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}; "
              f"overrides: {' '.join(overrides) or '(none: the shipped default)'}.",
              "", f"All goals met: **{'yes' if ok else 'no'}**."]
    return lines, ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument("--out", type=Path, default=None, help="also write the tables as Markdown here")
    parser.add_argument("--keep", type=Path, default=None, help="keep the run directories here (default: a temp dir)")
    parser.add_argument("overrides", nargs="*", help="after --: overrides for both commands")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=False)  # never write into an existing directory
        results = measure(seeds, args.overrides, args.keep)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            results = measure(seeds, args.overrides, Path(tmp))
    lines, ok = report(seeds, args.overrides, results)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out is not None:
        header = ("# The default run: KD student vs vanilla student vs teacher\n\n"
                  f"Produced by `python scripts/default_run.py --seeds {args.seeds} --out {args.out}`"
                  f"{' -- ' + ' '.join(args.overrides) if args.overrides else ''}.\n\n")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(header + text)


if __name__ == "__main__":
    main()
