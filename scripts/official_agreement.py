"""The float64 agreement of every distillation method with its official code, per method.

Runs the tests that transcribe each method's official code (tests/test_official_distill.py,
tests/test_distill_*.py, tests/test_logit_standardization.py, tests/test_init_stage.py; CLI runs
left out) with `pytest -s`, reads every `official-diff <what>: <value>` line they print, and
prints, per method (the first word of <what>), how many comparisons ran and the largest
absolute difference. A failing comparison fails its test: the figures are only printed when the
tests pass.

    python scripts/official_agreement.py            # the README's table
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# labels whose first word is a part of a method rather than its name
PART_OF = {"connector": "ofd", "margin": "ofd", "ofd_loss": "ofd", "hcl_loss": "reviewkd",
           "normalize": "kd/dkd standardize"}
LINE = re.compile(r"official-diff(?:-max)? (?P<what>[^:]+): (?P<value>[-+0-9.eEinfa]+)")


def main() -> int:
    sys.path.insert(0, str(REPO))
    from kdmtl_cli.distill import KD_METHODS
    from kdmtl_cli.plugins import load_builtin

    load_builtin()
    methods = set(KD_METHODS.names())
    files = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_distill_*.py"))
    files += ["tests/test_official_distill.py", "tests/test_logit_standardization.py", "tests/test_init_stage.py"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}   # one thread: the same reduction order, the same figures
    proc = subprocess.run([sys.executable, "-m", "pytest", "-s", "-q", "-p", "no:cacheprovider", "-n", "0",
                           "-m", "not slow", "-k", "not cli and not CLI", *files],
                          cwd=REPO, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        print(proc.stdout[-4000:], proc.stderr[-2000:], sep="\n")
        print("the agreement tests failed: no figures", file=sys.stderr)
        return 1
    worst, count = defaultdict(float), defaultdict(int)
    for match in LINE.finditer(proc.stdout):
        first = re.split(r"[\s(/,:\[]", match["what"].strip(), maxsplit=1)[0].lower()
        method = PART_OF.get(first, first)
        worst[method] = max(worst[method], abs(float(match["value"])))
        count[method] += 1
    summary = proc.stdout.strip().splitlines()[-1]
    print(f"| method | comparisons | max abs difference (float64) |\n|---|---:|---:|")
    for method in sorted(worst, key=lambda m: (m not in methods, m)):
        print(f"| {method} | {count[method]} | {worst[method]:.1e} |")
    print(f"\n{summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
