"""From a validated config to the objects of a run: data loaders, tasks, models, optimiser."""

from __future__ import annotations

from typing import Dict, Optional

from omegaconf import OmegaConf

from kdmtl_cli.data import DataBundle
from kdmtl_cli.data.loader import TensorLoader
from kdmtl_cli.engine.hardware import Hardware


def make_loader(data: DataBundle, split: str, tasks, cfg, hardware: Hardware, *, train: bool,
                limit: Optional[int]) -> TensorLoader:
    # Per target, how a left-right flip changes it (tasks sharing a target share its kind).
    flips = {t.target: t.kind.flip_target for t in tasks.values()}
    # Random crop (train only): dense targets are padded with their kind's fill value
    # (segmentation 255 = ignored; depth and normals 0 = invalid; others 0).
    pad_values = {t.target: 255 if t.kind.name == "segmentation" else 0 for t in tasks.values()}
    crop_padding = int(cfg.data.get("crop_padding", 0) or 0) if train else 0
    return TensorLoader(data.splits[split], flips,
                        batch_size=cfg.data.batch_size if train else cfg.data.eval_batch_size,
                        mean=data.mean, std=data.std, device=hardware.device, shuffle=train,
                        hflip=train and cfg.data.hflip, seed=cfg.seed, limit_batches=limit,
                        crop_padding=crop_padding, pad_values=pad_values)


def model_meta(model_cfg, tasks_signature: Dict, data: DataBundle) -> Dict:
    """What rebuilds a model from its weights and feeds it correctly: architecture fields,
    task heads, and the input normalisation it was trained with."""
    arch_keys = ("arch", "width", "depth", "stages", "stem_stride", "decoder_width", "small_input")
    container = OmegaConf.to_container(model_cfg, resolve=True)
    return {"model": {k: container[k] for k in arch_keys}, "tasks": tasks_signature,
            "input_norm": {"mean": list(data.mean), "std": list(data.std)}}
