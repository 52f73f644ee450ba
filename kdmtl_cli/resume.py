"""Resuming a run in its own directory.

`resume=PATH` (or `resume=true`: the newest interrupted run under outputs/, or the
`hydra.run.dir` given) continues from PATH/checkpoints/last.pt with the run's saved config.
Overrides given again must agree with it, except those that cannot change the result's
meaning (hardware, logging, stop_after_epoch). `plan_run_dir` decides the directory before
Hydra runs; engine/run_dir.py makes sure only one process writes it.
"""

from __future__ import annotations

import hashlib
import re
from datetime import datetime
from pathlib import Path
from typing import List, Optional, Tuple

from omegaconf import DictConfig, OmegaConf

from kdmtl_cli.errors import KdmtlError, NothingToResume

MAY_CHANGE_ON_RESUME = ("resume", "stop_after_epoch", "hardware", "log")
# Nested settings that change how, not what, a run computes (both data paths give identical batches).
MAY_CHANGE_NESTED = ("data.loader", "data.num_workers", "data.tensor_max_mb")
RESUME_ARG = re.compile(r"^\+{0,2}resume=(.*)$")


def find_latest_interrupted(root: Path = Path("outputs")) -> Optional[Path]:
    """The newest run under `root` that stopped before finishing and whose process is gone."""
    from kdmtl_cli.engine import run_dir as run_dirs

    candidates = [p.parent.parent for p in root.glob("**/checkpoints/last.pt")
                  if run_dirs.state(p.parent.parent) == "interrupted" and (p.parent.parent / "config.yaml").exists()]
    candidates = [c for c in candidates if not run_dirs.is_alive(c)]
    return max(candidates, key=lambda p: (p / "checkpoints" / "last.pt").stat().st_mtime, default=None)


def _last_value(args: List[str], pattern: "re.Pattern") -> Optional[str]:
    values = [m.group(1) for m in map(pattern.match, args) if m]
    return values[-1] if values else None


RUN_DIR_ARG = re.compile(r"^\+{0,2}hydra\.run\.dir=(.*)$")
SWEEP_DIR_ARG = re.compile(r"^\+{0,2}hydra\.sweep\.dir=(.*)$")
OFF = ("null", "none", "false", "")


_VALUE_FLAGS = ("--config-dir", "-cd", "--config-name", "-cn", "--config-path", "-cp", "--experimental-rerun")


def task_overrides(args: List[str]) -> List[str]:
    """The overrides of a command line that Hydra records as the job's task overrides (not
    hydra.* settings, not options)."""
    out, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg in _VALUE_FLAGS:
            skip = True
        elif not arg.startswith("-") and "=" in arg:
            key = arg.split("=", 1)[0].lstrip("+~")
            if not (key == "hydra" or key.startswith(("hydra.", "hydra/"))):
                out.append(arg)
    return out


def _check_sweep_continues(sweep: Path, args: List[str], say) -> None:
    """An existing sweep directory is only written by the command that made it (restarted, it
    continues the sweep: finished jobs are kept, interrupted ones resume); anything else is
    refused before Hydra rewrites any of its files."""
    from kdmtl_cli.engine import run_dir as run_dirs

    try:
        record = OmegaConf.load(sweep / "multirun.yaml")
        made_by = list(record.hydra.overrides.task)
    except Exception:  # noqa: BLE001 - missing or unreadable: not a sweep this command made
        record, made_by = None, None
    from kdmtl_cli.search import is_search

    if record is not None and is_search(record.hydra):   # its sampler would give new trials the old jobs' numbers
        raise KdmtlError(f"hydra.sweep.dir={sweep} holds an Optuna search, which does not continue: choose "
                         "another hydra.sweep.dir (its finished trials stay there, `kdmtl report` reads them)")
    if made_by != task_overrides(args):
        raise KdmtlError(f"hydra.sweep.dir={sweep} already holds "
                         + ("a sweep made by another command line (" + " ".join(made_by or []) + ")"
                            if made_by is not None else "other files (no multirun.yaml)")
                         + "; choose another hydra.sweep.dir, or restart the exact command that made it")
    for job in sweep.iterdir():
        if job.is_dir():
            run_dirs.refuse_if_alive(job, f"it is a job of hydra.sweep.dir={sweep}: wait for it to end")
    say(f"continuing the sweep in {sweep}: finished jobs are kept, interrupted ones resume")


def plan_run_dir(args: List[str], say=print) -> List[str]:
    """Before Hydra runs: decide which directory this command writes, check it, and own it.

    - `resume=PATH`: continue PATH in PATH (another `hydra.run.dir` is refused).
    - `resume=true` with `hydra.run.dir=D`: D if interrupted; D started over in place if it was
      stopped before its first checkpoint; a new run in D if it does not exist.
    - `resume=true` alone: the newest interrupted run under outputs/ whose process is gone.
    - `hydra.run.dir=D` alone: a new run in D; D interrupted (stopped by a signal, killed,
      failed) is continued, so the same command restarted continues the same run; D finished
      is refused.
    The chosen directory is owned (engine/run_dir.py) before Hydra writes its `.hydra/` there.
    """
    from kdmtl_cli.engine import run_dir as run_dirs

    resume = _last_value(args, RESUME_ARG)
    resume = None if resume is None or resume.lower() in OFF else resume
    if any(a in ("-m", "--multirun") for a in args):
        if resume is not None:
            raise KdmtlError("resume cannot be combined with -m/--multirun; resume each run by its directory")
        sweep = _last_value(args, SWEEP_DIR_ARG)
        if sweep and Path(sweep).expanduser().is_dir() and any(Path(sweep).expanduser().iterdir()):
            _check_sweep_continues(Path(sweep).expanduser(), args, say)
        return args
    given = _last_value(args, RUN_DIR_ARG)
    given_dir = Path(given).expanduser().resolve() if given else None
    target: Optional[Path] = None        # a run to continue
    if resume is not None and resume.lower() != "true":
        target = Path(resume).expanduser().resolve()
        if given_dir is not None and given_dir != target:
            raise KdmtlError(f"resume={resume} continues that run in its own directory, but hydra.run.dir={given} "
                             "names another; drop hydra.run.dir (or resume that directory instead)")
        if run_dirs.owner_here():
            run_dirs.refuse_if_alive(target, "wait for it to end before resuming it")
        if run_dirs.state(target) not in ("interrupted", "finished"):
            raise KdmtlError(f"cannot resume from {target}: no checkpoints/last.pt there; "
                             "pass resume=PATH to a kdmtl train run directory")
    elif given_dir is not None:
        found = run_dirs.state(given_dir)
        if found in ("interrupted", "finished"):
            target = given_dir
        elif found == "started" and run_dirs.owner_here() and not run_dirs.is_alive(given_dir):
            say(f"{given_dir} was stopped before its first checkpoint: starting it over in place")
    elif resume is not None:             # resume=true, no directory given
        target = find_latest_interrupted()
        if target is None:
            raise KdmtlError("resume=true found no interrupted run under outputs/ (a run dir with "
                             "checkpoints/last.pt and no results.json, whose process has ended); pass "
                             "resume=PATH, or hydra.run.dir=PATH resume=true")
    if target is not None and run_dirs.state(target) == "finished":
        if resume is not None:
            raise NothingToResume(f"{target} has finished (results.json): nothing to resume; it is left as it is")
        raise KdmtlError(f"{target} holds a finished run (results.json); it is never overwritten: choose "
                         f"another hydra.run.dir (kdmtl eval run_dir={target} re-evaluates it)")
    own_dir = target or given_dir
    if own_dir is not None and run_dirs.owner_here():
        run_dirs.own(own_dir)            # refused here, before Hydra touches the directory, if alive
    if target is not None:
        check_config_unedited(target)
    if target is None:    # `+hydra.run.dir=` / `++...` written plainly, as the data-parallel launcher reads it
        return [f"hydra.run.dir={given}" if RUN_DIR_ARG.match(a) else a for a in args if not RESUME_ARG.match(a)]
    args = [a for a in args if not RESUME_ARG.match(a) and not RUN_DIR_ARG.match(a)]
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    return [*args, f"resume={target}", f"hydra.run.dir={target}", f"hydra.output_subdir=.hydra/resume-{stamp}"]


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


def _listed(changed: List[str]) -> str:
    """The first four changes of a refused resume, and '...' when there are more."""
    return "; ".join(changed[:4]) + (" ..." if len(changed) > 4 else "")


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
        raise KdmtlError("cannot resume: the config changed incompatibly (" + _listed(changed)
                         + "); resume with the run's own settings "
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


def recorded_config(config_text: str) -> dict:
    """What each checkpoint records of the run's config.yaml: its text and SHA-256."""
    if not config_text:
        return {}
    return {"config_yaml": config_text, "config_sha256": hashlib.sha256(config_text.encode()).hexdigest()}


def check_config_unedited(run_dir: Path) -> None:
    """Refuse to resume a run whose config.yaml differs from the one its checkpoint recorded
    (an edit would silently change the result, or be recorded but not used)."""
    from kdmtl_cli.engine.checkpoint import read_checkpoint_entries

    path = Path(run_dir) / "config.yaml"
    recorded = read_checkpoint_entries(Path(run_dir) / "checkpoints" / "last.pt", ("config_yaml", "config_sha256"))
    if not recorded.get("config_sha256"):
        return          # written before checkpoints recorded their config
    from kdmtl_cli.runfiles import read_text

    text = read_text(path, "the run's checkpoint records its config: restore the file")
    if hashlib.sha256(text.encode()).hexdigest() == recorded["config_sha256"]:
        return
    try:
        now = flatten_keys(OmegaConf.to_container(OmegaConf.create(text)))
    except Exception:  # noqa: BLE001 - any YAML damage: say it is not the recorded file
        now = {}
    was = flatten_keys(OmegaConf.to_container(OmegaConf.create(recorded["config_yaml"])))
    changed = [f"{k}: {was.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(was) | set(now)) if was.get(k) != now.get(k)]
    raise KdmtlError(f"cannot resume {run_dir}: its config.yaml was edited after the run started ("
                     + (_listed(changed) if changed else "formatting only")
                     + "); restore the file (its checkpoint records the original), and pass changes that are "
                     "allowed on resume (hardware, log, stop_after_epoch) on the command line")
