"""The classic data path: a `torch.utils.data.DataLoader` whose worker processes build each
sample, for splits too large to keep on the device (or on request: `data.loader=dataloader`).

It yields batches bitwise identical to `TensorLoader`'s for the same seed and epoch, so a run
can resume, and a teacher-output cache can be looked up, whichever path produced the data:

- the epoch's order, flips, crop offsets (or scale-crop scales and offsets, or resized-crop windows) and stored
  views come from the very same
  `TensorLoader.epoch_plan` / `batch_indices` (run in the main process);
- each sample is computed by `TensorLoader.make_batch` on a batch of one, on the CPU, and the
  collate function concatenates them: gather, crop, normalisation and flips are per-sample
  elementwise operations, so a batch of one gives exactly that sample's row of the batched
  computation;
- the main process moves the batch to the device and adds `view`, as `TensorLoader.__iter__`.

The split stays in host memory (`self.images`, `self.targets` on the CPU); with a CUDA device
the batches are pinned so the copy can overlap.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from kdmtl_cli.data.loader import DEFAULT_RATIO, FlipFn, TensorLoader, ViewTable

CPU = torch.device("cpu")


class _Samples(Dataset):
    """Item = (sample index, flip, (dy, dx) / (scale index, top, left) / (i, j, h, w) or None), as planned by the
    main process: the workers hold no randomness, so which worker builds a sample never changes it."""

    def __init__(self, loader: "DataLoaderPath"):
        self.loader = loader  # a copy of the DataLoaderPath: the split, the flips, the settings

    def __len__(self) -> int:
        return self.loader.num_samples

    def __getitem__(self, item) -> dict:
        i, flip, crop = item
        index = torch.tensor([i], dtype=torch.long)
        flip = torch.tensor([flip], dtype=torch.bool)
        crop = torch.tensor([crop], dtype=torch.long) if crop is not None else None
        # A one-sample batch is a few thousand elements: waking a second intra-op thread costs
        # more than the work (about 5x slower on 2 cores). Workers already run single-threaded;
        # this matters for num_workers=0, where the main process builds the samples.
        threads = torch.get_num_threads()
        if threads > 1:
            torch.set_num_threads(1)
        try:
            return self.loader.make_batch(index, flip, crop)
        finally:
            if threads > 1:
                torch.set_num_threads(threads)


def _concatenate(samples: list):
    """Collate one-sample batches (dicts of tensors, `targets` a dict too) along dim 0."""
    first = samples[0]
    if isinstance(first, dict):
        return {key: _concatenate([s[key] for s in samples]) for key in first}
    return torch.cat(samples, 0)


def _to_device(obj, device: torch.device, non_blocking: bool):
    if isinstance(obj, dict):
        return {key: _to_device(value, device, non_blocking) for key, value in obj.items()}
    return obj.to(device, non_blocking=non_blocking)


class _PlannedBatches(Sampler):
    """Yields the epoch's batches of items, as planned by the main process before each epoch.
    The DataLoader re-iterates this sampler every epoch (persistent workers included), so the
    workers never need to see the plan."""

    def __init__(self):
        self.batches: list = []

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)  # bound now: a later epoch's plan cannot leak into this one


class DataLoaderPath(TensorLoader):
    """TensorLoader's batches through a DataLoader (module docstring). `num_workers=0` builds the
    samples in the main process; more keep that many persistent worker processes."""

    def __init__(self, split: dict[str, torch.Tensor], target_flips: dict[str, FlipFn | str | None], *,
                 batch_size: int, mean, std, device: torch.device, shuffle: bool = False,
                 hflip: bool = False, seed: int = 0, limit_batches: int | None = None,
                 drop_last: bool = False, crop_padding: int = 0, pad_values: dict | None = None,
                 views: ViewTable | None = None, num_workers: int = 0, scale_crop=None,
                 target_kinds: dict | None = None, resized_crop_scale=None, resized_crop_ratio=DEFAULT_RATIO):
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0 (got {num_workers})")
        # Built on the CPU: the split and the normalisation constants stay in host memory, where
        # the workers compute; only finished batches go to `device`.
        super().__init__(split, target_flips, batch_size=batch_size, mean=mean, std=std, device=CPU,
                         shuffle=shuffle, hflip=hflip, seed=seed, limit_batches=limit_batches,
                         drop_last=drop_last, crop_padding=crop_padding, pad_values=pad_values, views=views,
                         scale_crop=scale_crop, target_kinds=target_kinds, resized_crop_scale=resized_crop_scale,
                         resized_crop_ratio=resized_crop_ratio)
        self.device = torch.device(device)
        self.num_workers = int(num_workers)
        self._sampler = _PlannedBatches()
        self._dataloader: DataLoader | None = None

    def __getstate__(self):
        # What a spawned worker receives: the split and settings, not the DataLoader itself.
        state = dict(self.__dict__)
        state["_sampler"], state["_dataloader"] = None, None
        return state

    def _loader(self) -> DataLoader:
        if self._dataloader is None:  # once: persistent workers then serve every epoch
            # The dataset gets a copy without the DataLoader: a reference back to `self` would make
            # a cycle, left to the cyclic garbage collector, whose shutdown of the worker processes
            # then waits out their 5 s status timeout per worker instead of returning at once.
            source = copy.copy(self)
            source._sampler, source._dataloader = None, None
            workers = self.num_workers
            self._dataloader = DataLoader(
                _Samples(source), batch_sampler=self._sampler, collate_fn=_concatenate, num_workers=workers,
                persistent_workers=workers > 0, pin_memory=self.device.type == "cuda")
        return self._dataloader

    def __iter__(self) -> Iterator[dict]:
        order, flips, crops, views = self.epoch_plan()
        flips = flips.tolist()
        crops = crops.tolist() if crops is not None else None
        # before iter(): the DataLoader starts prefetching at once
        self._sampler.batches = [[(i, flips[i], crops[i] if crops is not None else None) for i in index.tolist()]
                                 for index in self.batch_indices(order)]
        non_blocking = self.device.type == "cuda"  # pinned batches: the copy may overlap
        for batch in self._loader():
            index = batch["index"]
            batch = _to_device(batch, self.device, non_blocking)
            if views is not None:
                batch["view"] = views[index].to(self.device)
            yield batch
