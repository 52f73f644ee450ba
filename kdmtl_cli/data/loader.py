"""Tensor-resident batches: the whole split lives on the device as uint8; a batch is an
index gather plus normalisation, with no worker processes.

The shuffle order of epoch e is a pure function of (seed, e) and each sample's flip
is stored in the batch, so an epoch can be replayed exactly (resume, teacher caches).

Which targets a flip changes, and how, is the task kinds' business: the loader is given,
per target, the function mapping a batch of targets to those of the mirrored images
(`TaskKind.flip_target`; kdmtl_cli/build.py passes them in).

Random crop (`crop_padding=p > 0`, the standard CIFAR augmentation): each image is padded
with p zero (black) pixels per side, in uint8 before normalisation, then cropped back to its
size at a per-sample offset (dy, dx) in [0, 2p]; the crop comes before the flip. The offsets
are drawn from the epoch's generator after the flips (so p = 0 leaves every epoch plan as
before) and stored in the batch as `crop` (int64 [N,2]). Dense targets (whose last two dims
are the image's H, W) get the same crop, padded with `pad_values[name]` (default 0; build.py
passes 255 = ignore for segmentation, 0 = invalid for depth and normals).

Random scale-crop (`scale_crop=[s...]`, the NYUv2 / Cityscapes augmentation of MTAN issue #34 as
used by CAGrad and Nash-MTL: `RandomScaleCrop`, scales [1.0, 1.2, 1.5]): per sample a scale s is
drawn uniformly from the list and a window of h, w = int(H / s), int(W / s) pixels at a random
offset (i, j), i in [0, H - h], j in [0, W - w], is cropped and resized back to H x W: the image
(after the uint8 -> [0, 1] conversion, before normalisation) and `normals` targets bilinearly with
align_corners=True (normals are not renormalised), every other dense target (segmentation, depth)
with nearest; `depth` targets are divided by s. It comes before the flip, as in the official code.
Which rule a target gets is its task kind (`target_kinds[name]`; build.py passes them). The scale
index and offsets are drawn from the epoch's generator after the flips and crops (so the setting
off leaves every epoch plan as before) and stored in the batch as `scale_crop` (int64 [N,3]:
scale index, i, j); `crop_padding` and `scale_crop` are exclusive.

Stored views (`views=ViewTable`, the teacher-output cache's FKD scheme): each sample has K
fixed augmentations (flip, crop offsets); every epoch draws one of them per sample, so the
student sees exactly a view whose teacher outputs were stored. The batch then carries `view`
(int64 [N], which of the K) so the cache can be looked up by (index, view).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

FlipFn = Callable[[torch.Tensor], torch.Tensor]


class ViewTable:
    """K stored augmentations per sample: `flips` bool [N,K], `crops` int64 [N,K,2] or None.
    `choose(seed, epoch)` picks, per sample, the view that epoch uses (uniform over K, a pure
    function of (seed, epoch), independent of the shuffle)."""

    def __init__(self, flips: torch.Tensor, crops: torch.Tensor | None):
        self.flips, self.crops = flips.bool(), (crops.long() if crops is not None else None)
        self.num_views = int(flips.shape[1])

    @classmethod
    def draw(cls, num_samples: int, num_views: int, *, hflip: bool, crop_padding: int, seed: int) -> "ViewTable":
        generator = torch.Generator().manual_seed(seed * 100_003 + 7_777_777)
        flips = (torch.rand(num_samples, num_views, generator=generator) < 0.5) if hflip \
            else torch.zeros(num_samples, num_views, dtype=torch.bool)
        crops = torch.randint(0, 2 * crop_padding + 1, (num_samples, num_views, 2), generator=generator) \
            if crop_padding > 0 else None
        return cls(flips, crops)

    def choose(self, seed: int, epoch: int) -> torch.Tensor:
        n = self.flips.shape[0]
        if self.num_views == 1:
            return torch.zeros(n, dtype=torch.long)
        generator = torch.Generator().manual_seed(seed * 100_003 + epoch + 3_333_333)
        return torch.randint(0, self.num_views, (n,), generator=generator)


def _flip_function(spec: FlipFn | str | None) -> FlipFn | None:
    """A flip callable as is; a task kind name (the older form of the argument) as that kind's
    `flip_target`; None: the target never changes with a flip."""
    if spec is None or callable(spec):
        return spec
    from kdmtl_cli.tasks import TASK_KINDS, _load_kinds

    _load_kinds()
    return TASK_KINDS.get(spec)().flip_target


def crop_batch(t: torch.Tensor, offsets: torch.Tensor, padding: int, fill=0) -> torch.Tensor:
    """Pad the last two dims of `t` [B,...,H,W] by `padding` with `fill`, then take, per sample,
    the HxW window starting at `offsets[b] = (dy, dx)` of the padded tensor."""
    b, h, w = t.shape[0], t.shape[-2], t.shape[-1]
    flat = t.reshape(b, -1, h, w)
    padded = F.pad(flat, (padding, padding, padding, padding), value=fill)
    offsets = offsets.to(t.device)
    ys = offsets[:, 0:1] + torch.arange(h, device=t.device)          # [B,H]
    xs = offsets[:, 1:2] + torch.arange(w, device=t.device)          # [B,W]
    rows = torch.arange(b, device=t.device).view(b, 1, 1)
    out = padded.permute(0, 2, 3, 1)[rows, ys[:, :, None], xs[:, None, :]]  # [B,H,W,C]
    return out.permute(0, 3, 1, 2).reshape(t.shape).contiguous()


def scale_crop_sizes(height: int, width: int, scales) -> list[tuple[int, int]]:
    """The crop size (h, w) of each scale, as the official RandomScaleCrop computes it."""
    return [(int(height / s), int(width / s)) for s in scales]


def scale_crop_sample(t: torch.Tensor, scale: float, top: int, left: int, size: tuple[int, int], mode: str) -> torch.Tensor:
    """One sample `t` [..., H, W]: the window of `size` at (top, left), resized back to H x W with
    `mode` ("bilinear": align_corners=True; "nearest"), in at least float32, returned in t's dtype
    (integer targets are exact: float64 holds them). Depth's division by the scale is the caller's."""
    height, width = t.shape[-2:]
    h, w = size
    work = torch.float64 if not t.is_floating_point() else torch.promote_types(t.dtype, torch.float32)
    window = t[..., top:top + h, left:left + w].to(work)
    lead = window.shape[:-2]
    window = window.reshape(1, -1, h, w)
    if mode == "bilinear":
        out = F.interpolate(window, size=(height, width), mode="bilinear", align_corners=True)
    else:
        out = F.interpolate(window, size=(height, width), mode="nearest")
    out = out.reshape(*lead, height, width)
    return out.to(t.dtype) if t.is_floating_point() else out.round().to(t.dtype)


class TensorLoader:
    def __init__(self, split: dict[str, torch.Tensor], target_flips: dict[str, FlipFn | str | None], *,
                 batch_size: int, mean, std, device: torch.device, shuffle: bool = False,
                 hflip: bool = False, seed: int = 0, limit_batches: int | None = None,
                 drop_last: bool = False, crop_padding: int = 0, pad_values: dict | None = None,
                 views: ViewTable | None = None, scale_crop=None, target_kinds: dict | None = None):
        """`target_flips`: the targets to load, each with its flip (a callable such as
        `kind.flip_target`, a task kind name, or None for a target a flip leaves alone).
        `crop_padding`, `pad_values`: random crop (module docstring); 0 = off.
        `scale_crop`, `target_kinds`: random scale-crop (module docstring); None = off."""
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
        if crop_padding < 0:
            raise ValueError(f"crop_padding must be >= 0 (got {crop_padding})")
        self.crop_padding = int(crop_padding)
        self.pad_values = dict(pad_values or {})
        self.views = views
        self.scale_crop = [float(x) for x in scale_crop] if scale_crop else None
        if self.scale_crop is not None and (self.crop_padding > 0 or any(x < 1.0 for x in self.scale_crop)):
            raise ValueError(f"scale_crop needs scales >= 1 and crop_padding=0 (got {scale_crop}, {crop_padding})")
        self.target_kinds = {name: (spec if isinstance(spec, str) else None) for name, spec in target_flips.items()}
        self.target_kinds.update(target_kinds or {})
        self.skip_batches = 0
        self.shard = (0, 1)             # (rank, world) under data-parallel training
        if views is not None and views.flips.shape[0] != self.num_samples:
            raise ValueError(f"the view table has {views.flips.shape[0]} samples, the split {self.num_samples}")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def num_samples(self) -> int:
        return int(self.images.shape[0])

    def __len__(self) -> int:
        full, rest = divmod(self.num_samples, self.batch_size)
        batches = full if (self.drop_last or rest == 0) else full + 1
        return min(batches, self.limit_batches) if self.limit_batches else batches

    def epoch_plan(self):
        """(order, flips, crops or None, views or None) of the current epoch, per sample; with
        scale-crop, `crops` is int64 [N,3] (scale index, top, left)."""
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.num_samples, generator=generator) if self.shuffle \
            else torch.arange(self.num_samples)
        if self.views is not None:
            view = self.views.choose(self.seed, self.epoch)
            rows = torch.arange(self.num_samples)
            crops = self.views.crops[rows, view] if self.views.crops is not None else None
            return order, self.views.flips[rows, view], crops, view
        flips = (torch.rand(self.num_samples, generator=generator) < 0.5) if self.hflip \
            else torch.zeros(self.num_samples, dtype=torch.bool)
        crops = torch.randint(0, 2 * self.crop_padding + 1, (self.num_samples, 2), generator=generator) \
            if self.crop_padding > 0 else None
        if self.scale_crop is not None:
            crops = self._draw_scale_crops(generator)
        return order, flips, crops, None

    def _draw_scale_crops(self, generator: torch.Generator) -> torch.Tensor:
        n = self.num_samples
        height, width = self.images.shape[-2:]
        sizes = torch.tensor(scale_crop_sizes(height, width, self.scale_crop), dtype=torch.long)
        which = torch.randint(0, len(self.scale_crop), (n,), generator=generator)
        # offsets uniform in [0, H - h] x [0, W - w] for each sample's own window size
        room = torch.tensor([height, width], dtype=torch.long) - sizes[which] + 1      # [N,2], >= 1
        u = torch.rand(n, 2, generator=generator, dtype=torch.float64)
        offsets = torch.minimum((u * room).floor().long(), room - 1)
        return torch.cat([which[:, None], offsets], 1)

    def batch_indices(self, order: torch.Tensor) -> Iterator[torch.Tensor]:
        # `skip_batches` (set when resuming mid-epoch) skips the batches already trained, once.
        start, self.skip_batches = self.skip_batches, 0
        rank, world = self.shard
        for b in range(start, len(self)):
            index = order[b * self.batch_size:(b + 1) * self.batch_size]
            # data-parallel ranks: each takes its contiguous share of the same global batch
            yield torch.tensor_split(index, world)[rank] if world > 1 else index

    def global_batch_size(self, step: int) -> int:
        """Samples in the global batch of this step (all ranks together)."""
        return min(self.batch_size, self.num_samples - step * self.batch_size)

    def __iter__(self) -> Iterator[dict]:
        order, flips, crops, views = self.epoch_plan()
        for index in self.batch_indices(order):
            crop = crops[index].to(self.device) if crops is not None else None
            batch = self.make_batch(index.to(self.device), flips[index].to(self.device), crop)
            if views is not None:
                batch["view"] = views[index].to(self.device)
            yield batch

    def make_batch(self, index: torch.Tensor, flip: torch.Tensor, crop: torch.Tensor | None = None) -> dict:
        raw = self.images.index_select(0, index)
        targets = {name: t.index_select(0, index) for name, t in self.targets.items()}
        if crop is not None and self.crop_padding > 0:
            size = raw.shape[-2:]
            raw = crop_batch(raw, crop, self.crop_padding, 0)
            for name, t in targets.items():
                if t.dim() >= 3 and t.shape[-2:] == size:  # dense target: same window
                    targets[name] = crop_batch(t, crop, self.crop_padding, self.pad_values.get(name, 0))
        image = raw.float().div_(255.0)
        scaled = crop is not None and self.scale_crop is not None and crop.shape[-1] == 3
        if scaled:
            image = self._scale_crop(image, targets, crop)
        image = (image - self.mean) / self.std
        if bool(flip.any()):
            image = torch.where(flip.view(-1, 1, 1, 1), image.flip(-1), image)
            for name, flip_fn in self.flip_fns.items():
                t = targets[name]
                flipped = flip_fn(t) if flip_fn is not None else t
                if flipped is not t:  # image-level targets come back as they are
                    targets[name] = torch.where(flip.view(-1, *([1] * (t.dim() - 1))), flipped, t)
        batch = {"image": image, "targets": targets, "index": index, "flip": flip}
        if crop is not None and self.crop_padding > 0:
            batch["crop"] = crop
        if scaled:
            batch["scale_crop"] = crop
        return batch

    def _scale_crop(self, image: torch.Tensor, targets: dict, plan: torch.Tensor) -> torch.Tensor:
        """Random scale-crop (module docstring), sample by sample, so a batch of one (the
        DataLoader path) gives exactly that sample's row; `targets` is updated in place."""
        height, width = image.shape[-2:]
        sizes = scale_crop_sizes(height, width, self.scale_crop)
        dense = [name for name, t in targets.items() if t.dim() >= 3 and t.shape[-2:] == image.shape[-2:]]
        images, outs = [], {name: [] for name in dense}
        for b, (k, top, left) in enumerate(plan.tolist()):
            scale, size = self.scale_crop[k], sizes[k]
            images.append(scale_crop_sample(image[b], scale, top, left, size, "bilinear"))
            for name in dense:
                kind = self.target_kinds.get(name)
                out = scale_crop_sample(targets[name][b], scale, top, left, size,
                                        "bilinear" if kind == "normals" else "nearest")
                outs[name].append(out / scale if kind == "depth" else out)
        for name in dense:
            targets[name] = torch.stack(outs[name])
        return torch.stack(images)
