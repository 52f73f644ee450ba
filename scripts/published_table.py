"""The published top-1 stored in the shipped CIFAR-100 experiments, as a Markdown table.

Reads every conf/experiment/cifar100_<teacher>_<student>_<method>.yaml, takes the `published:` entry of
the student (and of the teacher), and prints one row per method and one column per pair, each cell the
paper's top-1 in percent with `*` where the paper reports its best test epoch (kdmtl compares its last
epoch with it); an empty cell is a method not shipped for that pair.

    python scripts/published_table.py          # the README's table
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
PAIRS = ["resnet56_resnet20", "resnet110_resnet32", "resnet32x4_resnet8x4", "vgg13_vgg8", "wrn_40_2_wrn_16_2"]


def main() -> None:
    cells, teachers, methods = defaultdict(dict), {}, []
    for path in sorted((REPO / "conf" / "experiment").glob("cifar100_*.yaml")):
        name = path.stem[len("cifar100_"):]
        pair = next(p for p in PAIRS if name.startswith(p + "_"))
        method = name[len(pair) + 1:]
        recipe = yaml.safe_load(path.read_text())
        for entry in recipe.get("published") or []:
            value = f"{100 * entry['value']:.2f}" + ("*" if entry.get("epoch") == "best" else "")
            if entry["model"] == "teacher":
                teachers[pair] = value
            elif entry["metric"] == "test/cls/accuracy":
                cells[pair][method] = value
                if method not in methods:
                    methods.append(method)
    first = ["vanilla", "kd", "dkd"]
    methods = first + sorted(m for m in methods if m not in first)
    short = {p: p.replace("_resnet", " → resnet").replace("_vgg8", " → vgg8").replace("_wrn_16", " → wrn_16")
             for p in PAIRS}
    print("| method | " + " | ".join(short[p] for p in PAIRS) + " |")
    print("|---|" + "---:|" * len(PAIRS))
    print("| teacher | " + " | ".join(teachers.get(p, "") for p in PAIRS) + " |")
    for method in methods:
        print(f"| `{method}` | " + " | ".join(cells[p].get(method, "") for p in PAIRS) + " |")

if __name__ == "__main__":
    main()
