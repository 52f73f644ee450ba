"""No config file names code for Hydra to run: a check of each composed config's `hydra` node.

Hydra calls what a config's `hydra` node names: `hydra.callbacks.*._target_` (any callable, at
run start), the launcher and sweeper `_target_`s, and the logging dictConfigs
(`hydra.job_logging`, `hydra.hydra_logging`), whose `()` keys and `class` values are called too.
An experiment file loaded with `--config-dir DIR +experiment=X` could set
`hydra.callbacks.x._target_: builtins.open` and Hydra would call it. So every composed config is
checked as it leaves Hydra's config loader -- before Hydra instantiates callbacks, configures
logging, builds a launcher/sweeper, prints `--cfg`, or writes anything:

- `hydra.callbacks` may name only kdmtl's own callbacks (KDMTL_CALLBACKS, e.g. the sweep summary
  conf/train.yaml registers), with plain values as arguments, unless the command line says
  `--allow-hydra-callbacks` (a flag kdmtl removes before Hydra parses argv, so no config file can
  opt itself in);
- every other `_target_` under `hydra` must be one of the launcher/sweeper plugins kdmtl supports
  (ALLOWED_TARGETS);
- the logging configs have no `()` factory key, every `class` is a class of the `logging` or
  `logging.handlers` module, and an `ext://` value names only sys.stdout / sys.stderr (logging
  imports whatever module an `ext://` value names);
- a sweep a config file declares (`hydra.sweeper.params` / `search_space`) does not set Hydra's
  own settings: parallel launchers compose each job's config in the job's process, where this
  check does not run.

Values are checked as Hydra will use them (interpolations followed); one that cannot be resolved
yet is checked as written, so `_target_: ${...}` is refused rather than guessed.
"""

from __future__ import annotations

import functools
import logging
import logging.handlers
import os
from typing import Iterator, List, Set, Tuple

from omegaconf import DictConfig, ListConfig

from kdmtl_cli.errors import KdmtlError

OPT_IN = "--allow-hydra-callbacks"
# Ranks started by `hardware.nproc=N` inherit the opt-in through the environment (engine/distributed
# re-runs `kdmtl train` with the argv that reached Hydra, i.e. without the flag).
_OPT_IN_ENV = "KDMTL_ALLOW_HYDRA_CALLBACKS"

# The launcher and sweeper plugins kdmtl's configs and docs use, with the classes their ConfigStore
# entries name (hydra-core 1.3, hydra-submitit-launcher, hydra-joblib-launcher, hydra-optuna-sweeper).
ALLOWED_TARGETS = frozenset({
    "hydra._internal.core_plugins.basic_launcher.BasicLauncher",
    "hydra._internal.core_plugins.basic_sweeper.BasicSweeper",
    "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher",
    "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher",
    "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher",
    "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper",
    *(f"optuna.samplers.{name}" for name in ("TPESampler", "RandomSampler", "CmaEsSampler", "NSGAIISampler",
                                             "MOTPESampler", "QMCSampler", "GridSampler")),
    "optuna.pruners.HyperbandPruner",
})
# kdmtl's own Hydra callbacks, by their exact `_target_`: a config may name these without the opt-in.
KDMTL_CALLBACKS = frozenset({
    "kdmtl_cli.report.sweep.SweepSummary",     # the end of `kdmtl train -m` (conf/train.yaml)
    "kdmtl_cli.search.OptunaSearch",           # an Optuna search's record (conf/train.yaml)
})
_LOGGING_KEYS = ("job_logging", "hydra_logging")
_EXT_STREAMS = ("ext://sys.stdout", "ext://sys.stderr")
_SWEEP_KEYS = ("params", "search_space")
_DEPTH = 40   # deeper than any real config: an interpolation that refers to its own parent

_allow_callbacks = False


def strip_opt_in(argv: List[str]) -> Tuple[List[str], bool]:
    """argv without `--allow-hydra-callbacks`, and whether it was there (or, inside a data-parallel
    rank, whether the launching command had it)."""
    kept = [a for a in argv if a != OPT_IN]
    inherited = "RANK" in os.environ and os.environ.get(_OPT_IN_ENV) == "1"
    return kept, len(kept) != len(argv) or inherited


def install(allow_callbacks: bool) -> None:
    """Check every config Hydra composes in this process (run, -m and each of its jobs, --cfg,
    --help, --info) before Hydra uses it; an Optuna search's config also gets its objectives'
    directions there (kdmtl_cli/search.prepare). Calling it again only updates allow_callbacks."""
    global _allow_callbacks
    from hydra._internal.config_loader_impl import ConfigLoaderImpl

    _allow_callbacks = bool(allow_callbacks)
    if allow_callbacks:
        os.environ[_OPT_IN_ENV] = "1"
    original = ConfigLoaderImpl.load_configuration
    if getattr(original, "_kdmtl_guard", False):
        return

    @functools.wraps(original)
    def load_configuration(self, *args, **kwargs):
        cfg = original(self, *args, **kwargs)
        check(cfg, allow_callbacks=_allow_callbacks)
        from kdmtl_cli import search

        search.prepare(cfg)     # an Optuna search: objectives checked, directions set, before any job
        return cfg

    load_configuration._kdmtl_guard = True
    ConfigLoaderImpl.load_configuration = load_configuration


def check(cfg: DictConfig, allow_callbacks: bool = False) -> None:
    """Raise a one-line KdmtlError naming the first key of `cfg.hydra` that names code."""
    hydra = _child(cfg, "hydra")
    if not isinstance(hydra, DictConfig):
        return
    if not allow_callbacks:
        _check_callbacks(_child(hydra, "callbacks"))
    for key in hydra.keys():
        if key == "callbacks":
            continue
        for path, leaf_key, value in _leaves(_child(hydra, key), f"hydra.{key}", set()):
            if key in _LOGGING_KEYS:
                _check_logging(path, leaf_key, value)
            if leaf_key == "_target_" and value not in ALLOWED_TARGETS:
                raise KdmtlError(f"{path}: {value} is not one of the launcher/sweeper plugins kdmtl supports "
                                 "(Hydra's basic launcher and sweeper, submitit, joblib, optuna); remove it, or "
                                 "choose one of those, e.g. hydra/launcher=slurm")
            if path == "hydra.sweeper.custom_search_space" and value is not None:
                raise KdmtlError(f"{path}: names a function the optuna sweeper would call; remove it "
                                 "(declare the search space in hydra.sweeper.params)")
    _check_sweep(_child(hydra, "sweeper"))


def _check_callbacks(callbacks) -> None:
    """Every entry is one of kdmtl's own callbacks with plain arguments (a nested node could name
    more code: Hydra instantiates recursively); None and {} are empty."""
    if not callbacks:
        return
    names = list(callbacks.keys()) if isinstance(callbacks, DictConfig) else [None]
    for name in names:
        key = "hydra.callbacks" if name is None else f"hydra.callbacks.{name}"
        entry = _child(callbacks, name) if name is not None else None
        target = _child(entry, "_target_") if isinstance(entry, DictConfig) else None
        if _ours(entry, target):
            continue
        named = key if target is None else f"{key}._target_ ({target})"
        raise KdmtlError(f"{named}: a config names a Hydra callback, which Hydra would call; remove {key} from "
                         f"the config, or pass {OPT_IN} on the command line to run callbacks from configs you trust")


def _ours(entry, target) -> bool:
    """One of KDMTL_CALLBACKS, every argument a plain value (a node could name code to instantiate)."""
    if not isinstance(target, str) or target not in KDMTL_CALLBACKS:
        return False
    return all(not isinstance(_child(entry, k), (DictConfig, ListConfig)) for k in entry)


def _check_logging(path: str, key, value) -> None:
    if key == "()":
        raise KdmtlError(f"{path}: a '()' factory in a logging config is code that logging would call; remove "
                         "it (handlers and formatters take a 'class' of the logging module instead)")
    if key == "class" and not _logging_class(value):
        raise KdmtlError(f"{path}: {value} is not a class of the logging or logging.handlers module; use e.g. "
                         "logging.StreamHandler or logging.FileHandler")
    if isinstance(value, str) and value.startswith("ext://") and value not in _EXT_STREAMS:
        raise KdmtlError(f"{path}: {value} makes logging import that module; only {' and '.join(_EXT_STREAMS)} "
                         "are allowed in a config")


def _logging_class(value) -> bool:
    if not isinstance(value, str):
        return False
    module, _, name = value.rpartition(".")
    found = {"logging": logging, "logging.handlers": logging.handlers}.get(module)
    return found is not None and isinstance(getattr(found, name, None), type)


def _check_sweep(sweeper) -> None:
    if not isinstance(sweeper, DictConfig):
        return
    for field in _SWEEP_KEYS:
        params = _child(sweeper, field)
        if not isinstance(params, DictConfig):
            continue
        for name in params.keys():
            if str(name).lstrip("+~").startswith(("hydra.", "hydra/")):
                raise KdmtlError(f"hydra.sweeper.{field}.{name}: a config file may not sweep Hydra's own settings "
                                 "(parallel launchers compose them where kdmtl cannot check them); remove it, or "
                                 "sweep it on the command line")


def _child(node, key):
    """node[key] with interpolations followed; what is written when it cannot be resolved yet
    (e.g. `${hydra.runtime.output_dir}` before the run starts)."""
    try:
        return node[key]
    except Exception:  # noqa: BLE001 - unresolvable now: judge the text itself
        try:
            raw = node._get_node(key)
            return raw._value() if raw is not None else None
        except Exception:  # noqa: BLE001
            return None


def _leaves(node, path: str, seen: Set[int], depth: int = 0) -> Iterator[Tuple[str, object, object]]:
    """(dotted path, key, value) of every leaf under node, and of every key (a '()' key counts
    whatever its value). A sub-config reached again through an interpolation is walked once
    (`seen`): a cycle ends, and nodes that refer to each other twice per level stay linear."""
    if id(node) in seen:
        return
    seen.add(id(node))
    if depth > _DEPTH:
        raise KdmtlError(f"{path}: nested too deeply to check (an interpolation that refers to itself?); "
                         "simplify this part of the config")
    if not isinstance(node, (DictConfig, ListConfig)) or node._is_none() or node._is_missing():
        return
    keys = list(node.keys()) if isinstance(node, DictConfig) else list(range(len(node)))
    for key in keys:
        value = _child(node, key)
        where = f"{path}.{key}" if isinstance(node, DictConfig) else f"{path}[{key}]"
        if isinstance(value, (DictConfig, ListConfig)):
            if key == "()":
                yield where, key, value
            yield from _leaves(value, where, seen, depth + 1)
        else:
            yield where, key, value
