"""`kdmtl eval run_dir=...`: rebuild a run's data and student from its saved config and
evaluate a checkpoint (best by default) on a split. Writes eval.json in its own dir."""

from __future__ import annotations

import json
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from kdmtl_cli.errors import JobErrors, KdmtlError
from kdmtl_cli.ranges import check_ranges
from kdmtl_cli.runfiles import read_config
from kdmtl_cli.schema import EvalConfig, train_schema, validate


# The parts of the saved train config eval rebuilds (data, student) or reads (the eval batch limit):
# their ranges are checked; the rest (its hardware, optim...) may predate a range and is unused here.
USED_TRAIN_KEYS = ("data", "student", "limit_eval_batches")


def saved_train_config(path: Path) -> DictConfig:
    """The run's config.yaml, validated; a bad one is one line naming it."""
    fix = "it is the config kdmtl train saved there: restore it, or pass another run_dir"
    try:
        train_cfg = validate(read_config(path, fix), train_schema())
        check_ranges(train_cfg, train_schema(), only=USED_TRAIN_KEYS)
    except KdmtlError as err:
        message = str(err)
        if "unknown config key" in message or "unknown " in message and "choose one of" in message:
            fix = ("a run that used plug-ins of your own needs them again: pass the --config-dir DIR it was "
                   "trained with; " + fix)
        raise KdmtlError(message if str(path) in message else f"{path}: {message}; {fix}") from None
    return train_cfg


@hydra.main(version_base="1.3", config_path="pkg://kdmtl_cli.conf", config_name="eval")
@JobErrors.guard
def _eval(raw: DictConfig) -> float:
    cfg = validate(raw, EvalConfig)
    check_ranges(cfg, EvalConfig)      # hardware.num_threads etc., before torch sees them
    run_dir = Path(cfg.run_dir).expanduser()
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        raise KdmtlError(f"{run_dir} is not a kdmtl train run directory (no config.yaml); "
                         "pass run_dir=outputs/DATE/TIME-ID")
    if cfg.split not in ("val", "test"):
        raise KdmtlError(f"split must be val or test (got '{cfg.split}')")
    train_cfg = saved_train_config(saved)

    from kdmtl_cli.build import make_loader
    from kdmtl_cli.data import build_data
    from kdmtl_cli.engine.checkpoint import atomic_write_text, load_checkpoint
    from kdmtl_cli.engine.hardware import setup_hardware
    from kdmtl_cli.engine.logging import show_table
    from kdmtl_cli.engine.trainer import evaluate
    from kdmtl_cli.models import build_model
    from kdmtl_cli.tasks import build_tasks
    from rich.table import Table

    checkpoint = Path(cfg.checkpoint) if cfg.checkpoint not in ("best", "last") \
        else run_dir / "checkpoints" / f"{cfg.checkpoint}.pt"
    state = load_checkpoint(checkpoint)
    if "model" not in state:
        raise KdmtlError(f"{checkpoint} holds no model weights; pass checkpoint=best, last or another kdmtl checkpoint")
    hardware = setup_hardware(cfg.hardware)
    if cfg.split == "val" and train_cfg.data.val_size == 0:
        raise KdmtlError(f"{run_dir} was trained without a validation split (data.val_size=0); use split=test")
    data = build_data(train_cfg.data)
    tasks = build_tasks(train_cfg.tasks, data.targets)
    model = build_model(train_cfg.student, tasks)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        raise KdmtlError(f"{checkpoint} does not match the run's student ({str(err).splitlines()[0]})") from None
    model = hardware.prepare_model(model)
    loader = make_loader(data, cfg.split, tasks, train_cfg, hardware, train=False,
                         limit=train_cfg.limit_eval_batches)
    metrics = evaluate(model, loader, tasks, hardware, cfg.split)
    if train_cfg.delta_m.baseline and cfg.split == "test":   # baselines hold test metrics
        from kdmtl_cli.report.baselines import load_baseline
        from kdmtl_cli.report.delta_m import delta_m_of_run

        extra = delta_m_of_run(load_baseline(train_cfg.delta_m.baseline), data, tasks, metrics, "test")
        metrics.update({k: v for k, v in extra.items() if isinstance(v, float)})
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    atomic_write_text(json.dumps({"checkpoint": str(checkpoint), "epoch": state.get("epoch"),
                                  "split": cfg.split, "metrics": metrics}, indent=2), out_dir / "eval.json")
    title = f"kdmtl eval: {checkpoint} (epoch {state.get('epoch')}) on {cfg.split}"
    table = Table()
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        table.add_row(key, f"{value:.4f}")
    show_table(title, table, cfg.log.progress)     # eval.log holds it too
    return metrics.get(f"{cfg.split}/loss/task", 0.0)


def eval_main() -> None:
    _eval()
