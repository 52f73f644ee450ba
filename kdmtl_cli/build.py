"""From a validated config to the objects of a run: data loaders, tasks, models, optimiser."""

from __future__ import annotations

from typing import Dict, Optional

import torch

from kdmtl_cli.data import DataBundle
from kdmtl_cli.data.dataloader_path import DataLoaderPath
from kdmtl_cli.data.loader import TensorLoader
from kdmtl_cli.engine.hardware import Hardware, device_memory_budget
from kdmtl_cli.errors import KdmtlError

LOADERS = ("auto", "tensor", "dataloader")


def make_loader(data: DataBundle, split: str, tasks, cfg, hardware: Hardware, *, train: bool,
                limit: Optional[int], views=None) -> TensorLoader:
    """The split's loader: tensor-resident (TensorLoader) or a DataLoader with workers
    (DataLoaderPath), per `data.loader`; both yield bitwise-identical batches. `views`: stored
    augmentations (loader.ViewTable) for the teacher-output cache."""
    # Per target, how a left-right flip changes it (tasks sharing a target share its kind).
    flips = {t.target: t.kind.flip_target for t in tasks.values()}
    # Random crop (train only): dense targets are padded with their kind's `pad_value`
    # (segmentation 255 = ignored; depth and normals 0 = invalid).
    pad_values = {t.target: t.kind.pad_value for t in tasks.values()}
    crop_padding = int(cfg.data.get("crop_padding", 0) or 0) if train else 0
    scale_crop = cfg.data.get("scale_crop", None) if train else None   # checked by data.check_scale_crop
    # Random resized crop (train only; torchvision's RandomResizedCrop back to the stored size)
    from kdmtl_cli.data.loader import DEFAULT_RATIO, check_resized_crop

    check_resized_crop(cfg.data)
    resized_crop_scale = cfg.data.get("resized_crop_scale", None) if train else None
    resized_crop_ratio = cfg.data.get("resized_crop_ratio", None)
    tensors = data.splits[split]
    # .get: configs built by hand (tests, scripts) may predate these fields
    choice = str(cfg.data.get("loader", "auto"))
    num_workers = int(cfg.data.get("num_workers", 2))
    tensor_max_mb = int(cfg.data.get("tensor_max_mb", 4096))
    if choice not in LOADERS:
        raise KdmtlError(f"unknown data.loader={choice}; choose one of {', '.join(LOADERS)}")
    if num_workers < 0:
        raise KdmtlError(f"data.num_workers must be >= 0 (got {num_workers}); 0 builds batches in the main process")
    if tensor_max_mb < 0:
        raise KdmtlError(f"data.tensor_max_mb must be >= 0 (got {tensor_max_mb})")
    if choice == "auto":
        choice = "tensor" if _fits_resident(tensors, flips, tensor_max_mb, hardware.device) else "dataloader"
    common = dict(batch_size=cfg.data.batch_size if train else cfg.data.eval_batch_size,
                  mean=data.mean, std=data.std, device=hardware.device, shuffle=train,
                  hflip=train and cfg.data.hflip, seed=cfg.seed, limit_batches=limit,
                  crop_padding=crop_padding, pad_values=pad_values, views=views,
                  scale_crop=list(scale_crop) if scale_crop else None,
                  target_kinds={t.target: t.kind.name for t in tasks.values()},
                  resized_crop_scale=list(resized_crop_scale) if resized_crop_scale is not None else None,
                  resized_crop_ratio=list(resized_crop_ratio) if resized_crop_ratio is not None else DEFAULT_RATIO)
    if choice == "dataloader":
        return DataLoaderPath(tensors, flips, num_workers=num_workers, **common)
    return TensorLoader(tensors, flips, **common)


def _fits_resident(tensors: Dict[str, torch.Tensor], flips: Dict, tensor_max_mb: int, device: torch.device) -> bool:
    """`data.loader=auto`: keep the split resident when its bytes (images + the targets loaded)
    are at most data.tensor_max_mb MiB and, on a CUDA device, at most a quarter of the free
    memory there (the rest is for the model, its activations and the optimiser)."""
    size = sum(tensors[name].numel() * tensors[name].element_size() for name in ("image", *flips))
    if size > tensor_max_mb * 2 ** 20:
        return False
    return device.type != "cuda" or size <= device_memory_budget(device)


def model_meta(model_cfg, tasks_signature: Dict, data: DataBundle) -> Dict:
    """What rebuilds a model from its weights and feeds it correctly: the architecture's
    remembered settings (models.remembered_settings), task heads, and the input normalisation
    it was trained with."""
    from kdmtl_cli.models import remembered_settings

    return {"model": remembered_settings(model_cfg), "tasks": tasks_signature,
            "input_norm": {"mean": list(data.mean), "std": list(data.std)}}
