#!/usr/bin/env python
"""Aggregate a sweep into a markdown table: mean ± std over seeds of every test metric,
one row per setting (the loss methods, plus any other swept key you name).

  python scripts/sweep_table.py multirun/DATE/TIME-ID [--by loss] [--split test]

Reads each job's results.json (written by `kdmtl train` at the end of a run); jobs that did
not finish are listed and skipped. Best value per column in bold (direction from the task
kind; Δm columns, present when the runs had a baseline, are higher-is-better).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from kdmtl_cli.report.table import higher_is_better



def setting_of(config: dict, by: str) -> str:
    if by == "loss":
        methods = [name for name, node in config["loss"].items() if name != "task_weight" and node is not None]
        return "+".join(methods) or "none (vanilla)"
    node = config
    for part in by.split("."):
        node = node[part]
    return f"{by}={node}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--by", default="loss", help="group by the loss methods (default) or a dotted config key")
    parser.add_argument("--split", default="test", choices=("val", "test"))
    args = parser.parse_args()
    groups = defaultdict(list)
    configs = {}
    unfinished = []
    for job in sorted(p for p in args.sweep_dir.rglob("config.yaml") if p.parent.name != ".hydra"):
        results = job.parent / "results.json"
        if not results.exists():
            unfinished.append(str(job.parent))
            continue
        data = json.loads(results.read_text())
        groups[setting_of(data["config"], args.by)].append((data["config"]["seed"], data["results"]))
        configs[setting_of(data["config"], args.by)] = data["config"]
    if not groups:
        sys.exit(f"no finished runs (results.json) under {args.sweep_dir}")
    metrics = sorted({k for runs in groups.values() for _, r in runs for k in r
                      if k.startswith(f"{args.split}/") and "/task/" not in k})
    stats = {}
    for setting, runs in groups.items():
        for metric in metrics:
            values = [r[metric] for _, r in runs if metric in r]
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            stats[setting, metric] = (statistics.mean(values), std, len(values))
    config = next(iter(configs.values()))
    higher = {metric: higher_is_better(metric, config) for metric in metrics}
    best = {}
    for metric in metrics:
        pick = max if higher[metric] else min
        best[metric] = pick(stats[s, m][0] for s in groups for m in [metric])
    names = [m.split("/", 1)[1].replace("delta_m/", "Δm% ") + (" ↑" if higher[m] else " ↓") for m in metrics]
    print("| setting | seeds | " + " | ".join(names) + " |")
    print("|---|---:|" + "---:|" * len(metrics))
    for setting in sorted(groups, key=lambda s: (not s.startswith("none"), s)):
        seeds = sorted(seed for seed, _ in groups[setting])
        cells = []
        for metric in metrics:
            mean, std, _ = stats[setting, metric]
            text = f"{mean:+.2f} ± {std:.2f}" if "/delta_m/" in metric else f"{mean:.4f} ± {std:.4f}"
            cells.append(f"**{text}**" if mean == best[metric] else text)
        print(f"| {setting} | {','.join(map(str, seeds))} | " + " | ".join(cells) + " |")
    if unfinished:
        print(f"\n{len(unfinished)} unfinished job(s) skipped: " + ", ".join(unfinished), file=sys.stderr)


if __name__ == "__main__":
    main()
