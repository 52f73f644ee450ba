"""Tensor-resident batches: the whole split lives on the device as uint8; a batch is an
index gather plus normalisation, with no worker processes.

The shuffle order of epoch e is a pure function of (seed, e) and each sample's flip
is stored in the batch, so an epoch can be replayed exactly (resume, teacher caches).

Which targets a flip changes, and how, is the task kinds' business: the loader is given,
per target, the function mapping a batch of targets to those of the mirrored images
(`TaskKind.flip_target`; kdmtl_cli/build.py passes them in).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

FlipFn = Callable[[torch.Tensor], torch.Tensor]


def _flip_function(spec: FlipFn | str | None) -> FlipFn | None:
    """A flip callable as is; a task kind name (the older form of the argument) as that kind's
    `flip_target`; None: the target never changes with a flip."""
    if spec is None or callable(spec):
        return spec
    from kdmtl_cli.tasks import TASK_KINDS, _load_kinds

    _load_kinds()
    return TASK_KINDS.get(spec)().flip_target


class TensorLoader:
    def __init__(self, split: dict[str, torch.Tensor], target_flips: dict[str, FlipFn | str | None], *,
                 batch_size: int, mean, std, device: torch.device, shuffle: bool = False,
                 hflip: bool = False, seed: int = 0, limit_batches: int | None = None,
                 drop_last: bool = False):
        """`target_flips`: the targets to load, each with its flip (a callable such as
        `kind.flip_target`, a task kind name, or None for a target a flip leaves alone)."""
        self.device = device
        self.images = split["image"].to(device)
        self.targets = {name: split[name].to(device) for name in target_flips}
        self.flip_fns = {name: _flip_function(spec) for name, spec in target_flips.items()}
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
            for name, flip_fn in self.flip_fns.items():
                t = targets[name]
                flipped = flip_fn(t) if flip_fn is not None else t
                if flipped is not t:  # image-level targets come back as they are
                    targets[name] = torch.where(flip.view(-1, *([1] * (t.dim() - 1))), flipped, t)
        return {"image": image, "targets": targets, "index": index, "flip": flip}
