#!/usr/bin/env bash
# The README's set-up table: each step from a fresh clone, its wall time and the disk it adds.
#   bash scripts/measure_setup.sh [WORKDIR]      (default: a new temporary directory; needs ~7 GB)
# Downloads torch from the package registry without pip's cache, as a fresh machine would.
set -euo pipefail
source_repo="$(cd "$(dirname "$0")/.." && pwd)"
work="${1:-$(mktemp -d)}"
mkdir -p "$work"
cd "$work"

step() {   # step NAME DISK_PATH COMMAND...: prints NAME, seconds, and the size of DISK_PATH after it
  local name="$1" path="$2"
  shift 2
  local start end
  start=$(date +%s.%N)
  "$@" > "$work/$name.out" 2>&1 || { echo "$name failed: see $work/$name.out" >&2; exit 1; }
  end=$(date +%s.%N)
  printf '%-12s %8.1f s  %s\n' "$name" "$(echo "$end - $start" | bc)" "$(du -sh "$path" 2>/dev/null | cut -f1)"
}

step clone kdmtl git clone -q "$source_repo" kdmtl
cd kdmtl
step venv .venv python3 -m venv .venv
step torch .venv .venv/bin/pip install --no-cache-dir torch==2.14.1 torchvision==0.29.1
site=$(.venv/bin/python -c "import site; print(site.getsitepackages()[0])")
du -sh "$site/torch" "$site/nvidia" "$site/triton" 2>/dev/null | sed 's/^/    of which /'
step kdmtl .venv .venv/bin/pip install --no-cache-dir -e ".[test]"
export KDMTL_CACHE="$work/cache"
step train "$work/cache" .venv/bin/kdmtl train hydra.run.dir="$work/run"
echo "    run directory: $(du -sh "$work/run" | cut -f1)"
step tests . .venv/bin/python -m pytest -q -p no:cacheprovider
tail -1 "$work/tests.out"
