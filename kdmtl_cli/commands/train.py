"""`kdmtl train`: teacher(s) loaded, reused or trained -> student distilled -> evaluated.

The run directory (Hydra's output dir) receives .hydra/, config.yaml (the validated,
resolved config), checkpoints/{last,best}.pt, metrics.jsonl, tensorboard/, teacher/
(when a teacher was trained here), results.json and summary.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from kdmtl_cli.errors import JobErrors, KdmtlError
from kdmtl_cli.schema import TrainConfig, validate


def apply_debug(cfg: DictConfig, overrides=()) -> DictConfig:
    """`debug=fast`: one epoch of a few batches on small splits, for any experiment.
    Values the user set on the command line win over the debug values."""
    if cfg.debug is None:
        return cfg
    from kdmtl_cli.resume import touched_keys

    explicit, _ = touched_keys(list(overrides))
    d = cfg.debug
    shrink = {"optim.epochs": d.epochs, "teacher.optim.epochs": d.epochs,
              "limit_train_batches": d.max_batches, "limit_eval_batches": d.max_batches,
              "data.train_size": d.train_size, "data.val_size": d.val_size, "data.test_size": d.test_size}
    for key, value in shrink.items():
        if key not in explicit:
            OmegaConf.update(cfg, key, value)
    return cfg


def effective_config(raw: DictConfig, overrides) -> DictConfig:
    cfg = apply_debug(validate(raw, TrainConfig), overrides)
    if cfg.resume not in (None, False):
        from kdmtl_cli.resume import merge_for_resume

        saved_path = Path(str(cfg.resume)) / "config.yaml"
        if not saved_path.is_file():
            raise KdmtlError(f"cannot resume: {saved_path} is missing; was this directory made by kdmtl train?")
        saved = validate(OmegaConf.load(saved_path), TrainConfig)
        cfg = validate(merge_for_resume(cfg, saved, overrides), TrainConfig)
    return cfg


@hydra.main(version_base="1.3", config_path="pkg://kdmtl_cli.conf", config_name="train")
@JobErrors.guard
def _train(raw: DictConfig) -> Optional[float]:
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    cfg = effective_config(raw, list(hydra_cfg.overrides.task))
    from kdmtl_cli.run import run_training

    return run_training(cfg, run_dir, resume=cfg.resume not in (None, False))


def train_main() -> None:
    _train()
