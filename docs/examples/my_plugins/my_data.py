"""A data set of your own: `data=stripes`. Images of stripes; targets: the stripes' orientation
(classification), which pixels are stripe (segmentation) and the stripe period (regression).

A data set is a function `data node -> DataBundle` registered in DATASETS with the dataclass of
the `data.*` keys it reads besides the common ones (data.image_size, data.train_size...)."""

from dataclasses import dataclass

import torch

from kdmtl_cli.data import DATASETS, DataBundle, TargetSpec, fingerprint_splits
from kdmtl_cli.errors import KdmtlError


@dataclass
class StripesSettings:
    min_period: int = 4      # stripe period in pixels, drawn per image from [min_period, max_period]
    max_period: int = 8


def _split(n: int, size: int, settings, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    orient = torch.randint(0, 2, (n,), generator=g)                     # 0: horizontal, 1: vertical
    period = torch.randint(settings.min_period, settings.max_period + 1, (n,), generator=g)
    coords = torch.arange(size)
    stripe = (coords.view(1, -1) % period.view(-1, 1)) < (period.view(-1, 1) // 2)   # [n, size]
    mask = torch.where(orient.view(-1, 1, 1) == 0, stripe[:, :, None].expand(n, size, size),
                       stripe[:, None, :].expand(n, size, size)).long()
    image = (mask[:, None].float() * 180 + 40 + torch.rand(n, 3, size, size, generator=g) * 30).to(torch.uint8)
    return {"image": image, "orient": orient, "mask": mask, "period": period.float()}


@DATASETS.register("stripes", settings=StripesSettings)
def build_stripes(cfg) -> DataBundle:
    if not 2 <= cfg.min_period <= cfg.max_period:
        raise KdmtlError(f"need 2 <= data.min_period <= data.max_period (got {cfg.min_period}, {cfg.max_period})")
    sizes = {"train": cfg.train_size, "val": cfg.val_size, "test": cfg.test_size}
    splits = {name: _split(n, cfg.image_size, cfg, cfg.seed * 10 + i) for i, (name, n) in enumerate(sizes.items())}
    period = splits["train"]["period"]
    targets = {"orient": TargetSpec("classification", 2, ["horizontal", "vertical"]),
               "mask": TargetSpec("segmentation", 2, ["background", "stripe"]),
               "period": TargetSpec("regression", mean=float(period.mean()), std=float(period.std()) or 1.0)}
    return DataBundle(name="stripes", targets=targets, splits=splits, mean=list(cfg.mean), std=list(cfg.std),
                      fingerprint=fingerprint_splits(splits, "stripes"))
