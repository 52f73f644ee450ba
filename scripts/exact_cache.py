#!/usr/bin/env python
"""`teacher.cache=exact` against `teacher.cache=off` on the shipped resnet56 -> resnet20 KD recipe.

  python scripts/exact_cache.py [--epochs 20] [--train 2048] [--test 512] [--runs off,exact,exact]

Writes CIFAR-100-shaped stand-in data in the real on-disk format (scripts/fake_cifar.py), trains
the recipe's teacher for one epoch (its weights do not matter here), then runs the real CLI,
`kdmtl train +experiment=cifar100_resnet56_resnet20_kd optim.epochs=E teacher.cache=MODE`, once
per entry of --runs, one after the other on one cache directory (a second `exact` run reads the
views the first one stored). Prints per epoch each run's training samples/s and the exact
cache's hit rate (the fraction of the teacher's forward work skipped), the whole training time
of each run, and checks that every run's final test metrics and weights are bit-identical.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def kdmtl(args, cache: Path, cwd: Path) -> None:
    env = {**os.environ, "KDMTL_CACHE": str(cache)}
    proc = subprocess.run([sys.executable, "-m", "kdmtl_cli", *args], cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"kdmtl failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    for line in proc.stdout.splitlines():
        if line.startswith("teacher outputs"):
            print("   ", line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--train", type=int, default=2048, help="training images")
    parser.add_argument("--test", type=int, default=512, help="test images")
    parser.add_argument("--runs", default="off,exact,exact", help="teacher.cache of each run, in order")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kdmtl-exact-"))
    root, cache = work / "data", work / "cache"
    subprocess.run([sys.executable, str(REPO / "scripts" / "fake_cifar.py"), str(root), "--classes", "100",
                    "--train", str(args.train), "--test", str(args.test)], check=True, capture_output=True)
    common = ["train", "+experiment=cifar100_resnet56_resnet20_kd", f"data.root={root}", "data.download=false",
              f"optim.epochs={args.epochs}", "teacher.optim.epochs=1", "log.progress=none",
              "log.tensorboard=false", "log.efficiency=false"]
    print(f"{torch.get_num_threads()} threads; {args.train} CIFAR-sized training images, {args.epochs} epochs, "
          f"runs: {args.runs}", flush=True)
    records = {}
    for i, mode in enumerate(args.runs.split(",")):
        name = f"{i + 1}-{mode}"
        print(f"run {name} ...", flush=True)
        kdmtl([*common, f"teacher.cache={mode}", f"hydra.run.dir={work / name}"], cache, work)
        records[name] = [json.loads(line) for line in (work / name / "metrics.jsonl").read_text().splitlines()]
    names = list(records)
    print("\n| epoch | " + " | ".join(f"{n} samples/s" for n in names) + " | "
          + " | ".join(f"{n} hit rate" for n in names if "exact" in n) + " |")
    print("|---:|" + "---:|" * (len(names) + sum("exact" in n for n in names)))
    epochs = {n: [r for r in rs if r["type"] == "epoch"] for n, rs in records.items()}
    for e in range(args.epochs):
        speeds = " | ".join(f"{epochs[n][e]['train/samples_per_s']:.0f}" for n in names)
        rates = " | ".join(f"{100 * epochs[n][e]['train/teacher_cache/hit_rate']:.1f}%" for n in names if "exact" in n)
        print(f"| {e + 1} | {speeds} | {rates} |")
    totals = {n: sum(r["train/epoch_time_s"] for r in epochs[n]) for n in names}
    base = totals[names[0]]
    print("\ntraining time (sum of epochs): " + ", ".join(
        f"{n} {t:.1f} s ({base / t:.2f}x {names[0]})" for n, t in totals.items()))
    for n in names:
        if "exact" in n:
            rates = [r["train/teacher_cache/hit_rate"] for r in epochs[n]]
            print(f"{n}: hit rate mean {100 * sum(rates) / len(rates):.1f}%, last epoch {100 * rates[-1]:.1f}%, "
                  f"teacher batches {sum(r['train/teacher_cache/teacher_batches'] for r in epochs[n]):.0f}")
    finals = {n: rs[-1] for n, rs in records.items()}
    keys = [k for k in finals[names[0]] if k.startswith("test/")]
    weights = {n: torch.load(work / n / "checkpoints" / "last.pt", weights_only=True)["model"] for n in names}
    same = all(finals[n][k] == finals[names[0]][k] for n in names for k in keys) and all(
        torch.equal(weights[n][k], weights[names[0]][k]) for n in names for k in weights[names[0]])
    print(f"final test metrics ({len(keys)}) and weights bit-identical across runs: {same}")
    print(f"(runs in {work})")


if __name__ == "__main__":
    main()
