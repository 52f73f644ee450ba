"""Run directories -> groups of runs that differ only by seed, with mean ± std per metric.

A finished run has `results.json` (kdmtl train writes it last): its config, the test metrics of
the checkpoint selected on validation (`results`), the validation metrics of that epoch (`best`)
and of the last epoch (`last`). Directories with a `config.yaml` but no `results.json` are
unfinished: preempted (a PREEMPTED marker), stopped or crashed after a checkpoint, or crashed
before one; a Hydra job directory without `config.yaml` never started (a stopped sweep's later
jobs). They are listed, never silently dropped.
"""

from __future__ import annotations

import json
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from kdmtl_cli.errors import KdmtlError
from kdmtl_cli.resume import flatten_keys
from kdmtl_cli.runfiles import read_json

# Config keys that say where or how a run ran, not what it computed: never a grouping difference.
NOT_A_SETTING = ("seed", "resume", "stop_after_epoch", "cache_dir", "log.", "hardware.", "data.root",
                 "data.download", "data.generate", "data.loader", "data.num_workers", "data.tensor_max_mb",
                 "published", "delta_m.record")

# A results.json that cannot be read stops the report (naming it) rather than being skipped:
# a skipped run would silently change a group's mean ± std and its n.
RESULTS_FIX = "delete it (that run is then listed as unfinished) or move that run out of the reported directories"


@dataclass
class Run:
    path: Path
    config: dict
    results: dict
    best: dict
    last: dict
    overrides: List[str] = field(default_factory=list)   # the job's command-line overrides, as typed
    teacher: dict = field(default_factory=dict)          # where its teacher came from (`source`)
    provenance: dict = field(default_factory=dict)       # its code, environment and data (kdmtl_cli/provenance.py)


@dataclass
class Group:
    label: str
    runs: List[Run] = field(default_factory=list)
    short_label: str = ""     # for the terminal: what tells the groups apart, as the user typed it
    apart: str = ""           # other code / data than runs of the same settings (split_by_provenance)

    @property
    def seeds(self) -> List[int]:
        return sorted(int(r.config.get("seed", 0)) for r in self.runs)

    @property
    def published(self) -> List[dict]:
        return list(self.runs[0].config.get("published") or [])


def _flatten(config: dict) -> Dict[str, object]:
    """Dotted keys; list values as JSON text, so settings compare and hash as plain values."""
    return {k: json.dumps(v, sort_keys=True) if isinstance(v, list) else v for k, v in flatten_keys(config).items()}


def _is_setting(key: str) -> bool:
    return not any(key == k or (k.endswith(".") and key.startswith(k)) for k in NOT_A_SETTING)


def find_runs(dirs: Sequence[Path]) -> Tuple[List[Run], List[Tuple[Path, str]]]:
    """Every run directory under `dirs` (a run dir itself, a multirun dir, or nested ones)."""
    runs, unfinished = [], []
    seen = set()
    for root in dirs:
        root = Path(root).expanduser()
        if not root.exists():
            raise KdmtlError(f"no such run directory: {root}; pass a kdmtl train run or multirun directory")
        for config in sorted(root.rglob("config.yaml")):
            run_dir = config.parent
            if ".hydra" in run_dir.parts or run_dir in seen:
                continue
            seen.add(run_dir)
            results = run_dir / "results.json"
            if results.is_file():
                saved = read_json(results, RESULTS_FIX, required=("config", "results"))
                if not all(isinstance(saved.get(k) or {}, dict) for k in ("config", "results", "best", "last")):
                    raise KdmtlError(f"{results}: config, results, best and last must be JSON objects; {RESULTS_FIX}")
                runs.append(Run(run_dir, saved["config"], saved["results"], saved.get("best") or {},
                                saved.get("last") or {}, _strings(saved.get("overrides")),
                                saved.get("teacher") if isinstance(saved.get("teacher"), dict) else {},
                                saved.get("provenance") if isinstance(saved.get("provenance"), dict) else {}))
            elif (run_dir / "PREEMPTED").exists():
                unfinished.append((run_dir, "preempted (resume with the same command)"))
            elif (run_dir / "checkpoints" / "last.pt").exists():
                unfinished.append((run_dir, "stopped or crashed after a checkpoint (resume=<dir>)"))
            else:
                unfinished.append((run_dir, "crashed before its first checkpoint"))
        for record in sorted(root.rglob(".hydra")):     # a Hydra job directory where no run began
            run_dir = record.parent
            if ".hydra" in run_dir.parts or run_dir in seen or (run_dir / "config.yaml").exists():
                continue
            seen.add(run_dir)
            unfinished.append((run_dir, "never started (its sweep was stopped first: the same command continues "
                                        "it; or its settings were refused)"))
    if not runs and not unfinished:
        raise KdmtlError(f"no kdmtl runs (config.yaml) under {', '.join(map(str, dirs))}")
    return runs, unfinished


def group_runs(runs: List[Run], group_by: Optional[Sequence[str]] = None) -> List[Group]:
    """Runs whose settings differ only by seed form one group; its label names the settings that
    differ between groups (or the `group_by` keys; `loss` means the distillation methods)."""
    flat = [{k: v for k, v in _flatten(r.config).items() if _is_setting(k)} for r in runs]
    if group_by:
        def key_of(i):
            return tuple((k, _setting(runs[i].config, flat[i], k)) for k in group_by)
    else:
        varying = sorted({k for f in flat for k in f if len({json.dumps(g.get(k), default=str) for g in flat}) > 1})

        def key_of(i):
            return tuple((k, flat[i].get(k)) for k in varying)
    groups: Dict[tuple, Group] = {}
    for i, run in enumerate(runs):
        key = key_of(i)
        label = ", ".join(f"{k}={v}" if k != "loss" else str(v) for k, v in key) or "all runs"
        groups.setdefault(key, Group(label)).runs.append(run)
    found = list(groups.values())
    shorter = None if group_by else _override_labels(found)
    for group, short in zip(found, shorter or [g.label for g in found], strict=True):
        group.short_label = short
    return [part for group in found for part in split_by_provenance(group)]


def split_by_provenance(group: Group) -> List[Group]:
    """A group's runs made by other code (another commit, or other uncommitted changes) or on other
    data are not pooled: one group each, labelled by what differs (`[code 1a2b3c4]`, `[data 9f8e]`).
    Runs without a provenance record (older kdmtl) join the first part."""
    from kdmtl_cli.provenance import identity

    parts: Dict[tuple, List[Run]] = {}
    for run in group.runs:
        key = identity(run.provenance) if run.provenance else None
        if key is None and parts:
            key = next(iter(parts))
        parts.setdefault(key, []).append(run)
    if len(parts) == 1:
        return [group]
    code_differs = len({k[0] for k in parts if k}) > 1
    data_differs = len({k[1] for k in parts if k}) > 1
    out = []
    for key, runs in parts.items():
        what = []
        if key and code_differs:
            commit, patch = key[0]
            what.append(f"code {(commit or 'unknown')[:7]}" + (f"+{patch[:6]}" if patch else ""))
        if key and data_differs:
            what.append(f"data {key[1]}")
        apart = ", ".join(what)
        out.append(Group(f"{group.label} [{apart}]", runs, f"{group.short_label or group.label} [{apart}]", apart))
    return out


def provenance_notes(groups: List[Group]) -> List[str]:
    """What the report says when runs of the same settings came from other code or data."""
    apart = [g for g in groups if g.apart]
    if not apart:
        return []
    return ["runs of the same settings but other code or data are not pooled (results.json `provenance`):",
            *(f"  {g.label}: {', '.join(str(r.path) for r in g.runs)}" for g in apart)]


def _strings(value) -> List[str]:
    return [str(v) for v in value] if isinstance(value, list) else []


def override_items(run: Run) -> Dict[str, str]:
    """The run's command-line overrides that are settings (not seed, paths, logging...), key -> value."""
    items = {}
    for text in run.overrides:
        key, sep, value = text.partition("=")
        key = key.lstrip("+~")
        if sep and _is_setting(key):
            items[key] = value
    return items


def _override_labels(groups: List[Group]) -> Optional[List[str]]:
    """Labels made of the overrides that tell the groups apart, as typed (`loss=[kd,fitnet]`,
    `weighting=pcgrad`) rather than every config key they changed (`loss.kd.weight=0.5, ...`);
    None when the overrides do not tell every group apart (runs of different experiments)."""
    if len(groups) < 2:
        return None
    shared = []
    for group in groups:           # the overrides every run of the group has
        items = [override_items(r) for r in group.runs]
        shared.append({k: v for k, v in items[0].items() if all(i.get(k) == v for i in items[1:])})
    keys = list(dict.fromkeys(k for s in shared for k in s))   # in command-line order
    varying = [k for k in keys if len({s.get(k) for s in shared}) > 1]
    for default in (None, "(default)"):     # a group without an override of a key: unnamed, if that is clear
        labels = [", ".join(f"{k}={s.get(k, default)}" for k in varying if k in s or default) for s in shared]
        if all(labels) and len(set(labels)) == len(labels):
            return labels
    return None


def _setting(config: dict, flat: dict, key: str):
    if key == "loss":   # the distillation methods, as the user chose them
        methods = [name for name, node in config.get("loss", {}).items() if name != "task_weight" and node]
        return "+".join(sorted(methods)) or "none"
    for name in (key, f"{key}.name", f"{key}.arch"):    # a group node stands for its name / arch
        if name in flat:
            return flat[name]
    raise KdmtlError(f"group_by key '{key}' is not a config key of the runs; e.g. group_by=[loss,weighting.name]")


def groups_with_setting(groups: Sequence[Group], key: str, value: str) -> List[Group]:
    """The groups whose every run has `key` set to `value`, compared the way group_runs labels
    groups: `loss` by its distillation methods joined with `+` in sorted order (so `fitnet+kd`,
    `kd+fitnet` and `[kd,fitnet]` all name the same group; `none` without one), a group node such as
    `weighting` by its name or arch, any other key by its value as typed (true / false / null)."""
    def canonical(text) -> str:
        if key == "loss":
            return "+".join(sorted(m for m in re.split(r"[+,\[\]\s]+", str(text)) if m)) or "none"
        if isinstance(text, bool) or text is None:
            return json.dumps(text)
        return re.sub(r"[\s\"']", "", str(text))

    def matches(run: Run) -> bool:
        flat = {k: v for k, v in _flatten(run.config).items() if _is_setting(k)}
        try:
            return canonical(_setting(run.config, flat, key)) == canonical(value)
        except KdmtlError:          # a key these runs do not have
            return False

    return [g for g in groups if g.runs and all(matches(r) for r in g.runs)]


def mean_std(values: List[float]) -> Tuple[float, float, int]:
    """Mean, sample standard deviation (n - 1; 0 for one run) and n."""
    if not values:
        return float("nan"), float("nan"), 0
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values)
