"""One row per group of a `kdmtl report` CSV: the student's test mean ± std of the chosen metrics,
each marked against the report's reference group as the terminal marks it (▲ better, ▼ worse: Holm
p < 0.05; = no evidence), for a compact Markdown table.

    kdmtl report runs/... group_by=[loss] reference=loss:none out=docs/report/zoo/report.md
    python scripts/report_rows.py docs/report/zoo/report.csv --metrics cls/accuracy,seg/miou,depth/abs_err
"""

from __future__ import annotations

import argparse
import csv
from collections import defaultdict

MARK = {"better": " ▲", "worse": " ▼", "no evidence": " =", "": ""}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("csv")
    parser.add_argument("--metrics", default="cls/accuracy,seg/miou,depth/abs_err")
    args = parser.parse_args()
    metrics = args.metrics.split(",")
    rows, seeds, order = defaultdict(dict), {}, []
    arrows = {}
    for row in csv.DictReader(open(args.csv, newline="")):
        name, arrow = row["metric"].rsplit(" ", 1) if " " in row["metric"] else (row["metric"], "")
        if not name.startswith("test/") or name[len("test/"):] not in metrics:
            continue
        group = row["group"]
        if group not in rows:
            order.append(group)
        arrows[name[len("test/"):]] = arrow
        cell = f"{float(row['test mean']):.4f} ± {float(row['test std'] or 0):.4f}"
        rows[group][name[len("test/"):]] = cell + MARK.get(row.get("evidence", "") or "", "")
        seeds[group] = row["seeds"]
    print("| group | seeds | " + " | ".join(f"{m} {arrows.get(m, '')}" for m in metrics) + " |")
    print("|---|---|" + "---:|" * len(metrics))
    for group in order:
        print(f"| {group} | {seeds[group]} | " + " | ".join(rows[group].get(m, "") for m in metrics) + " |")


if __name__ == "__main__":
    main()
