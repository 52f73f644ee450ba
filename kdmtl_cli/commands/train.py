"""`kdmtl train`: teacher(s) loaded, reused or trained -> student distilled -> evaluated.

The run directory (Hydra's output dir) receives .hydra/, config.yaml (the validated,
resolved config), checkpoints/{last,best}.pt, metrics.jsonl, tensorboard/, teacher/
(when a teacher was trained here), results.json and summary.md.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from kdmtl_cli import search
from kdmtl_cli.errors import JobErrors, KdmtlError
from kdmtl_cli.schema import train_schema, validate


def apply_debug(cfg: DictConfig, overrides=()) -> DictConfig:
    """`debug=fast`: one epoch of a few batches on small splits (init stages of at most that many epochs,
    CRD with at most a quarter of the small training split as negatives), for any experiment.
    Values the user set on the command line win over the debug values."""
    if cfg.debug is None:
        return cfg
    from kdmtl_cli.resume import touched_keys

    explicit, _ = touched_keys(list(overrides))
    d = cfg.debug
    shrink = {"optim.epochs": d.epochs, "teacher.optim.epochs": d.epochs,
              "limit_train_batches": d.max_batches, "limit_eval_batches": d.max_batches,
              "data.train_size": d.train_size, "data.val_size": d.val_size, "data.test_size": d.test_size}
    for name, node in (cfg.get("loss") or {}).items():   # an init stage (ab, ft, fsp) shrinks like the epochs,
        if not isinstance(node, DictConfig):               # CRD's negatives like the training split
            continue
        if int(node.get("init_epochs", 0) or 0) > d.epochs:
            shrink[f"loss.{name}.init_epochs"] = d.epochs
        if int(node.get("nce_k", 0) or 0) > d.train_size // 4:
            shrink[f"loss.{name}.nce_k"] = d.train_size // 4
    if cfg.data.val_size == 0:                     # no validation split stays none
        shrink.pop("data.val_size")
    if cfg.test.average_last_epochs:               # the mean over at most the epochs run
        shrink["test.average_last_epochs"] = min(int(cfg.test.average_last_epochs), d.epochs)
    for key, value in shrink.items():
        if key not in explicit:
            OmegaConf.update(cfg, key, value)
    return cfg


def check_protocol(cfg: DictConfig) -> None:
    """Settings of the evaluation protocol that cannot work together, refused before any work."""
    import re

    from kdmtl_cli.ranges import check_ranges

    # Every number in its declared range (schema.py), before the imports below pull in torch. The
    # debug node first: debug=fast copies its values over optim.epochs etc., so name the key set.
    check_ranges(cfg, train_schema(), only=["debug"])
    check_ranges(cfg, train_schema())

    from kdmtl_cli.data import check_val_size
    from kdmtl_cli.data.loader import check_resized_crop
    from kdmtl_cli.engine import teacher_outputs
    from kdmtl_cli.engine.trainer import DEFAULT_MONITOR
    from kdmtl_cli.tasks import check_metric_reduction

    check_val_size(cfg.data)
    from kdmtl_cli.plugins import resolve_target

    for who in ("student", "teacher"):      # a user's trunk / model: importable and a torch.nn.Module
        for part in ("trunk", "model"):
            node = cfg[who][part]
            if node is not None:
                if not isinstance(node, DictConfig) or "_target_" not in node:
                    raise KdmtlError(f"{who}.{part} must be a mapping with a _target_ (the import path of a "
                                     f"torch.nn.Module class) and its arguments; got {node!r}")
                resolve_target(node._target_, f"{who}.{part}._target_")
    check_resized_crop(cfg.data)                  # data.resized_crop_*: before the data is generated
    teacher_outputs.check_settings(cfg.teacher)   # teacher.cache: before the data is generated
    check_metric_reduction(cfg.test.metric_reduction)
    if cfg.search.objectives:     # named for a search: each one a run measures, never a test metric
        search.check(cfg)
    if cfg.teacher.keep not in ("best", "last", "train_loss"):
        raise KdmtlError(f"teacher.keep must be best, last or train_loss (got '{cfg.teacher.keep}')")
    n = cfg.test.average_last_epochs
    if n < 0 or n > cfg.optim.epochs:
        raise KdmtlError(f"test.average_last_epochs must be between 0 (off) and optim.epochs={cfg.optim.epochs} "
                         f"(got {n})")
    monitor = cfg.checkpoint.monitor
    if cfg.data.val_size == 0 and monitor.startswith("val/") and monitor != DEFAULT_MONITOR:
        raise KdmtlError(f"checkpoint.monitor={monitor} selects on the validation split, but data.val_size=0 "
                         "leaves none; set checkpoint.monitor=last (or train/loss/task), or data.val_size >= 1")
    for i, pub in enumerate(cfg.published):
        if not re.fullmatch(r"last|best|mean_last[1-9][0-9]*", str(pub.epoch)):
            raise KdmtlError(f"published[{i}].epoch must be last, best or mean_lastN (the mean of the last N "
                             f"epochs' tests, with test.average_last_epochs=N); got '{pub.epoch}'")


def effective_config(raw: DictConfig, overrides) -> DictConfig:
    from kdmtl_cli.resume import touched_keys

    explicit, _ = touched_keys(list(overrides))
    cfg = apply_debug(validate(raw, train_schema(), explicit), overrides)
    if cfg.resume not in (None, False):
        from kdmtl_cli.resume import merge_for_resume

        saved_path = Path(str(cfg.resume)) / "config.yaml"
        if not saved_path.is_file():
            raise KdmtlError(f"cannot resume: {saved_path} is missing; was this directory made by kdmtl train?")
        from kdmtl_cli.runfiles import read_config

        saved = validate(read_config(saved_path, "it is the config this run started with: restore it, "
                                                 "or start a new run"), train_schema())
        cfg = validate(merge_for_resume(cfg, saved, overrides), train_schema(), explicit)
    check_protocol(cfg)
    return cfg


def _load_user_plugins(hydra_cfg) -> None:
    """The plug-in files of --config-dir, in this process too: a launcher's worker process (joblib)
    starts without them (the CLI loaded them in its own process before composing)."""
    from kdmtl_cli.plugins import load_user

    for source in hydra_cfg.runtime.config_sources:
        if source.provider == "command-line" and source.schema == "file":
            load_user(source.path)


@hydra.main(version_base="1.3", config_path="pkg://kdmtl_cli.conf", config_name="train")
@JobErrors.guard
def _train(raw: DictConfig) -> Optional[float]:
    from kdmtl_cli.engine import run_dir as run_dirs

    hydra_cfg = HydraConfig.get()
    logging.captureWarnings(True)    # Python warnings join the run's log (engine/logging.py)
    _load_user_plugins(hydra_cfg)
    run_dir = Path(hydra_cfg.runtime.output_dir)
    # Owned already when the command line named the directory (resume.plan_run_dir); a default
    # (fresh) directory or a sweep job's is owned here, for the job's whole life.
    owner = run_dirs.owner_here()
    if owner:
        run_dirs.own(run_dir)
    try:
        if hydra_cfg.mode == RunMode.MULTIRUN:   # a restarted sweep (resume.plan_run_dir) continues its jobs
            found = run_dirs.state(run_dir)
            if found == "finished":
                # the terminal only: the finished job's log stays as it was
                print(f"{run_dir}: this job finished before; kept as it is", flush=True)
                return _job_return(hydra_cfg, run_dir, None)
            if found == "interrupted":
                from kdmtl_cli.resume import check_config_unedited

                check_config_unedited(run_dir)
                raw.resume = str(run_dir)
        try:
            cfg = effective_config(raw, list(hydra_cfg.overrides.task))
        except KdmtlError:
            subdir = str(hydra_cfg.output_subdir or "")
            if subdir.startswith(".hydra/resume-"):   # a refused resume leaves no trace in the run it refused
                shutil.rmtree(run_dir / subdir, ignore_errors=True)
            raise
        from kdmtl_cli.run import run_training

        best_value = run_training(cfg, run_dir, resume=cfg.resume not in (None, False))
        return _job_return(hydra_cfg, run_dir, best_value)
    finally:
        if owner:
            run_dirs.release(run_dir)


def _job_return(hydra_cfg, run_dir: Path, otherwise):
    """What the job returns to Hydra: an Optuna search's trial its objectives (kdmtl_cli/search.py),
    any other job `otherwise`."""
    return search.trial_value(run_dir) if search.is_search(hydra_cfg) else otherwise


def train_main() -> None:
    _train()
