"""Tensor-resident batches: the whole split lives on the device as uint8; a batch is an
index gather plus normalisation, with no worker processes.

The shuffle order of epoch e is a pure function of (seed, e) and each sample's flip
is stored in the batch, so an epoch can be replayed exactly (resume, teacher caches).
"""

from __future__ import annotations

from typing import Dict, Iterator, Optional

import torch

DENSE_KINDS = ("segmentation", "depth")


class TensorLoader:
    def __init__(self, split: Dict[str, torch.Tensor], target_kinds: Dict[str, str], *,
                 batch_size: int, mean, std, device: torch.device, shuffle: bool = False,
                 hflip: bool = False, seed: int = 0, limit_batches: Optional[int] = None,
                 drop_last: bool = False):
        self.device = device
        self.images = split["image"].to(device)
        self.targets = {name: split[name].to(device) for name in target_kinds}
        self.target_kinds = target_kinds
        self.batch_size = batch_size
        self.shuffle, self.hflip, self.seed = shuffle, hflip, seed
        self.limit_batches, self.drop_last = limit_batches, drop_last
        self.mean = torch.tensor(mean, device=device, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, device=device, dtype=torch.float32).view(1, -1, 1, 1)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def num_samples(self) -> int:
        return int(self.images.shape[0])

    def __len__(self) -> int:
        full, rest = divmod(self.num_samples, self.batch_size)
        batches = full if (self.drop_last or rest == 0) else full + 1
        return min(batches, self.limit_batches) if self.limit_batches else batches

    def _epoch_plan(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.num_samples, generator=generator) if self.shuffle \
            else torch.arange(self.num_samples)
        flips = (torch.rand(self.num_samples, generator=generator) < 0.5) if self.hflip \
            else torch.zeros(self.num_samples, dtype=torch.bool)
        return order, flips

    def __iter__(self) -> Iterator[dict]:
        order, flips = self._epoch_plan()
        for b in range(len(self)):
            index = order[b * self.batch_size:(b + 1) * self.batch_size]
            yield self.make_batch(index.to(self.device), flips[index].to(self.device))

    def make_batch(self, index: torch.Tensor, flip: torch.Tensor) -> dict:
        image = self.images.index_select(0, index).float().div_(255.0)
        image = (image - self.mean) / self.std
        targets = {name: t.index_select(0, index) for name, t in self.targets.items()}
        if bool(flip.any()):
            image = torch.where(flip.view(-1, 1, 1, 1), image.flip(-1), image)
            for name, kind in self.target_kinds.items():
                if kind in DENSE_KINDS:
                    t = targets[name]
                    targets[name] = torch.where(flip.view(-1, *([1] * (t.dim() - 1))), t.flip(-1), t)
        return {"image": image, "targets": targets, "index": index, "flip": flip}
