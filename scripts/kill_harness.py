#!/usr/bin/env python
"""Kill real runs and restart them: does a run ever lose work, or end differently?

  python scripts/kill_harness.py kill9 [--trials 20] [--seed 0] [--out /tmp/kill9]
      Each trial starts a small but complete run (a teacher trained from an empty cache, the
      teacher-output cache built, the student distilled) and SIGKILLs it at a random moment inside
      one of the three phases (chosen in turn; the moment is drawn within that phase's duration in
      an uninterrupted reference run, counted from the line that announces the phase). A third of
      the restarts are killed again. The same command line is then started until it finishes, and
      its final metrics and weights are compared with the uninterrupted reference: they must be
      bit-identical, and no temporary file of a killed write may be left.

  python scripts/kill_harness.py signal-latency [--out /tmp/latency]
      Seconds from SIGTERM to the process's exit (checkpoint written, exit status 75) while the
      teacher trains and while the student trains (0.5-1.2 s into its second epoch), on the default
      run (`kdmtl train`), three times each.

Every run uses one CPU thread (OMP_NUM_THREADS=1), so figures are comparable on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

# A complete run in ~20 s on one core: every phase that can be interrupted, at small size.
SMALL = ["debug=fast", "optim.epochs=3", "teacher.optim.epochs=3", "data.train_size=256", "data.batch_size=16",
         "limit_train_batches=8", "teacher.cache=views", "teacher.cache_views=2", "log.progress=plain",
         "log.efficiency=false", "log.tensorboard=false", "hardware.num_threads=1"]
# The line that announces each phase (kdmtl's own status lines).
PHASES = {"teacher": "training it", "cache": "teacher outputs: caching", "student": "[teacher outputs] epoch 2/2"}


def _env(cache: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env.update(KDMTL_CACHE=str(cache), OMP_NUM_THREADS="1")
    return env


class Run:
    """A kdmtl process whose stdout is read as it comes, with the time each phase line appeared."""

    def __init__(self, args, cwd: Path, cache: Path, markers=PHASES):
        self.markers = markers
        self.started = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, "-m", "kdmtl_cli", "train", *args], cwd=cwd, env=_env(cache),
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.seen = {}          # phase -> seconds after start when its line first appeared
        self.lines = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)
            for phase, marker in self.markers.items():
                if marker in line and phase not in self.seen:
                    self.seen[phase] = time.monotonic() - self.started

    def phase(self) -> str:
        return max(self.seen, key=self.seen.get) if self.seen else "start-up"

    def wait(self, timeout=900):
        code = self.proc.wait(timeout)
        self.reader.join(5)
        self.stderr = self.proc.stderr.read()
        return code


def _final(run_dir: Path) -> dict:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    final = next(r for r in records if r["type"] == "final")
    return {k: v for k, v in final.items() if k.startswith(("test/", "val/", "teacher/test/"))}


def _weights_equal(a: Path, b: Path) -> bool:
    import torch

    wa = torch.load(a / "checkpoints" / "last.pt", weights_only=True)["model"]
    wb = torch.load(b / "checkpoints" / "last.pt", weights_only=True)["model"]
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _leftovers(run_dir: Path, cache: Path) -> list:
    return [str(p) for p in [*run_dir.rglob(".*.tmp"), *cache.rglob(".*.tmp"), *cache.rglob(".*building*"),
                             *cache.glob("teachers/*/training")]]


def kill9(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data_root = out / "data"
    rng = random.Random(args.seed)
    common = [*SMALL, f"data.root={data_root}"]
    print("reference: an uninterrupted run (also generates the data)", flush=True)
    warm = Run([*common, f"hydra.run.dir={out / 'warm'}"], out, out / "cache-warm")
    assert warm.wait() == 0, warm.stderr
    ref = Run([*common, f"hydra.run.dir={out / 'reference'}"], out, out / "cache-reference")
    assert ref.wait() == 0, ref.stderr
    total = time.monotonic() - ref.started
    order = ["teacher", "cache", "student"]
    ends = {p: ([ref.seen[q] for q in order[i + 1:] if q in ref.seen] or [total])[0] for i, p in enumerate(order)}
    windows = {p: (ref.seen[p], ends[p]) for p in order}
    print(f"reference: {total:.1f} s; phases (s after start): "
          + ", ".join(f"{p} {a:.1f}-{b:.1f}" for p, (a, b) in windows.items()), flush=True)
    reference = _final(out / "reference")
    rows = []
    for trial in range(args.trials):
        run_dir, cache = out / f"trial{trial:02d}", out / f"cache{trial:02d}"
        command = [*common, f"hydra.run.dir={run_dir}", "resume=true"]   # the same line every time
        target = order[trial % 3]
        kills, starts = [], 0
        while True:
            starts += 1
            run = Run(command, out, cache)
            kill_now = starts == 1 or (len(kills) < 2 and rng.random() < 1 / 3)
            if kill_now:
                phase = target if starts == 1 else rng.choice(order)
                lo, hi = windows[phase]
                delay = rng.uniform(0, 0.8 * (hi - lo))   # inside the phase, not its last moments
                while phase not in run.seen and run.proc.poll() is None:
                    time.sleep(0.01)
                if run.proc.poll() is None:
                    time.sleep(max(0.0, run.seen[phase] + delay - (time.monotonic() - run.started)))
                    if run.proc.poll() is None:
                        run.proc.kill()
                        kills.append(f"{run.phase()}@{time.monotonic() - run.started:.1f}s")
            code = run.wait()
            if code == 0:
                break
            if code != -9:
                raise SystemExit(f"trial {trial}: exit {code}\n{run.stderr}")
        same = _final(run_dir) == reference and _weights_equal(out / "reference", run_dir)
        left = _leftovers(run_dir, cache)
        rows.append({"trial": trial, "kills": kills, "starts": starts, "identical": same, "leftovers": left})
        print(f"trial {trial:2d}: killed {', '.join(kills) or 'never (finished first)'}; {starts} starts; "
              f"final metrics and weights {'identical' if same else 'DIFFERENT'}"
              + (f"; leftovers {left}" if left else ""), flush=True)
    (out / "kill9.json").write_text(json.dumps(rows, indent=1))
    killed = [r for r in rows if r["kills"]]
    by_phase = {p: sum(1 for r in rows for k in r["kills"] if k.startswith(p)) for p in order}
    print(f"\n{len(rows)} trials, {sum(len(r['kills']) for r in rows)} kills (" +
          ", ".join(f"{p} {n}" for p, n in by_phase.items()) + f"); identical to the reference: "
          f"{sum(r['identical'] for r in rows)}/{len(rows)} ({sum(r['identical'] for r in killed)}/{len(killed)} "
          f"of those killed); leftover temporary files: {sum(len(r['leftovers']) for r in rows)}", flush=True)


def signal_latency(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common = ["log.progress=plain", "hardware.num_threads=1", f"data.root={out / 'data'}"]
    markers = {"teacher": "[teacher] epoch 1/", "student": "[student] epoch 1/"}
    shared = out / "cache-shared"         # its teacher is trained once, by the warm-up run
    warm = Run([*common, "optim.epochs=1", f"hydra.run.dir={out / 'warm'}"], out, shared)
    assert warm.wait() == 0, warm.stderr
    for phase in ("teacher", "student"):
        figures = []
        for i in range(3):
            # a teacher trains from an empty cache; the student reuses the warm-up's cached teacher
            cache = out / f"cache-{phase}{i}" if phase == "teacher" else shared
            run = Run([*common, f"hydra.run.dir={out / f'{phase}{i}'}"], out, cache, markers)
            while phase not in run.seen and run.proc.poll() is None:
                time.sleep(0.01)
            time.sleep(0.5 + 0.37 * i)           # inside the second epoch, somewhere in a step
            sent = time.monotonic()
            run.proc.send_signal(signal.SIGTERM)
            code = run.wait()
            figures.append(time.monotonic() - sent)
            assert code == 75, (code, run.stderr)
        print(f"SIGTERM while the {phase} trains: exit 75 after " + ", ".join(f"{s:.2f}" for s in figures)
              + f" s (max {max(figures):.2f} s)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    k = sub.add_parser("kill9")
    k.add_argument("--trials", type=int, default=20)
    k.add_argument("--seed", type=int, default=0)
    k.add_argument("--out", default="/tmp/kdmtl-kill9")
    s = sub.add_parser("signal-latency")
    s.add_argument("--out", default="/tmp/kdmtl-latency")
    args = parser.parse_args()
    kill9(args) if args.command == "kill9" else signal_latency(args)


if __name__ == "__main__":
    main()
