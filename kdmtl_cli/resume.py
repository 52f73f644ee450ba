"""Resuming a run in its own directory.

`resume=PATH` (or `resume=true`: the newest interrupted run under outputs/) continues
from PATH/checkpoints/last.pt with the run's saved config. Overrides given again
must agree with it, except those that cannot change the result's meaning
(hardware, logging, stop_after_epoch).
"""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path
from typing import List, Optional, Tuple

from omegaconf import DictConfig, OmegaConf

from kdmtl_cli.errors import KdmtlError

MAY_CHANGE_ON_RESUME = ("resume", "stop_after_epoch", "hardware", "log")
# Nested settings that change how, not what, a run computes (both data paths give identical batches).
MAY_CHANGE_NESTED = ("data.loader", "data.num_workers", "data.tensor_max_mb")
RESUME_ARG = re.compile(r"^\+{0,2}resume=(.*)$")


def find_latest_interrupted(root: Path = Path("outputs")) -> Optional[Path]:
    candidates = [p.parent.parent for p in root.glob("**/checkpoints/last.pt")
                  if (p.parent.parent / "config.yaml").exists() and not (p.parent.parent / "results.json").exists()]
    return max(candidates, key=lambda p: (p / "checkpoints" / "last.pt").stat().st_mtime, default=None)


def rewrite_argv_for_resume(args: List[str]) -> List[str]:
    """Before Hydra runs: point hydra.run.dir at the resumed run, keep its .hydra/ intact."""
    values = [m.group(1) for m in map(RESUME_ARG.match, args) if m]
    if not values or values[-1].lower() in ("null", "none", "false", ""):
        # Refuse before Hydra runs: Hydra would first overwrite the old run's .hydra/ record.
        run_dirs = [a.split("=", 1)[1] for a in args if a.startswith("hydra.run.dir=")]
        multirun = any(a in ("-m", "--multirun") for a in args)
        if run_dirs and not multirun and (Path(run_dirs[-1]).expanduser() / "checkpoints" / "last.pt").exists():
            if not (Path(run_dirs[-1]).expanduser() / "PREEMPTED").exists():
                raise KdmtlError(f"{run_dirs[-1]} already holds a run's checkpoints; pass resume={run_dirs[-1]} "
                                 "to continue it, or choose another hydra.run.dir")
            # Stopped by a signal (kdmtl_cli/run.py): the requeued, identical command resumes it.
            values = [run_dirs[-1]]
            args = [a for a in args if not RESUME_ARG.match(a)]
        else:
            return args
    if any(a in ("-m", "--multirun") for a in args):
        raise KdmtlError("resume cannot be combined with -m/--multirun; resume each run by its directory")
    value = values[-1]
    if value.lower() == "true":
        found = find_latest_interrupted()
        if found is None:
            raise KdmtlError("resume=true found no interrupted run under outputs/ (a run dir with "
                             "checkpoints/last.pt and no results.json); pass resume=PATH to a run dir")
        value = str(found)
    run_dir = Path(value).expanduser()
    if not (run_dir / "checkpoints" / "last.pt").is_file():
        raise KdmtlError(f"cannot resume from {run_dir}: no checkpoints/last.pt there; "
                         "pass resume=PATH to a kdmtl train run directory")
    args = [a for a in args if not RESUME_ARG.match(a)]
    args.append(f"resume={run_dir.resolve()}")
    if not any(a.startswith("hydra.run.dir=") for a in args):
        args.append(f"hydra.run.dir={run_dir.resolve()}")
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    args.append(f"hydra.output_subdir=.hydra/resume-{stamp}")
    return args


def flatten_keys(node, prefix: str = "") -> dict:
    """A nested config container as {dotted.key: leaf value} (lists are leaves)."""
    out = {}
    if isinstance(node, dict):
        for key, value in node.items():
            out.update(flatten_keys(value, f"{prefix}{key}."))
    else:
        out[prefix[:-1]] = node
    return out


def touched_keys(overrides: List[str]) -> Tuple[List[str], bool]:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    keys, everything = [], False
    for override in parsed:
        key = override.key_or_group
        if key.startswith("hydra"):
            continue
        if key.split("/")[0] == "experiment":
            everything = True  # an experiment may set anything
        keys.append(key.replace("/", "."))
    return keys, everything


def merge_for_resume(new_cfg: DictConfig, saved_cfg: DictConfig, overrides: List[str]) -> DictConfig:
    """The saved config, with only the allowed overrides applied; anything else that changed is an error."""
    keys, everything = touched_keys(overrides)
    new_flat = flatten_keys(OmegaConf.to_container(new_cfg, resolve=True))
    old_flat = flatten_keys(OmegaConf.to_container(saved_cfg, resolve=True))
    changed = []
    for key in sorted(set(new_flat) | set(old_flat)):
        if key.split(".")[0] in MAY_CHANGE_ON_RESUME or key in MAY_CHANGE_NESTED:
            continue
        if not everything and not any(key == k or key.startswith(k + ".") for k in keys):
            continue
        if new_flat.get(key) != old_flat.get(key):
            changed.append(f"{key}: {old_flat.get(key)!r} -> {new_flat.get(key)!r}")
    if changed:
        raise KdmtlError("cannot resume: the config changed incompatibly (" + "; ".join(changed[:4])
                         + (" ..." if len(changed) > 4 else "") + "); resume with the run's own settings "
                         "or start a new run")
    merged = OmegaConf.to_container(saved_cfg, resolve=True)
    fresh = OmegaConf.to_container(new_cfg, resolve=True)
    for key in MAY_CHANGE_ON_RESUME:
        merged[key] = fresh.get(key)
    for key in MAY_CHANGE_NESTED:
        group, name = key.split(".")
        if name in (fresh.get(group) or {}):
            merged.setdefault(group, {})[name] = fresh[group][name]
    return OmegaConf.create(merged)
