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

Random resized crop (`resized_crop_scale=[min, max]`, `resized_crop_ratio=[min, max]`: torchvision's
`RandomResizedCrop` on the stored H x W image, output size H x W): per sample, the window (i, j, h, w)
of torchvision's `RandomResizedCrop.get_params` (up to 10 attempts of an area uniform in
scale * H * W and an aspect ratio log-uniform in the ratio range, w = round(sqrt(area * r)),
h = round(sqrt(area / r)), taken when 0 < w <= W and 0 < h <= H with i, j uniform in [0, H - h],
[0, W - w]; else the centre crop clamped to the ratio range), drawn from the epoch's generator in
float64 (not torchvision's global RNG; `ResizedCrop.windows` says which draws), is cropped and
resized back to H x W as torchvision's tensor `resized_crop` does: the image (after the uint8 ->
[0, 1] conversion, before normalisation) bilinearly with align_corners=False and antialias=True
(torchvision's default, so the bits are torchvision's; a window is never larger than the image, so
this is an upsampling, where the antialias filter is bilinear up to float rounding, ~2e-7), `normals`
the same way (not renormalised), every other dense target (segmentation, depth) with nearest; depth
values are kept (no division: an anisotropic window has no single scale). A window of the whole
image is the identity, as in torchvision. It comes before the flip (RandomResizedCrop, then
RandomHorizontalFlip). The windows are drawn after the flips (so the setting off leaves every epoch
plan as before) and stored in the batch as `resized_crop` (int64 [N,4]: i, j, h, w); `crop_padding`,
`scale_crop` and `resized_crop_scale` are exclusive (`check_resized_crop`). The resize is the
scale-crop's code (`resize_window`). Stored views carry their own windows (`ViewTable.windows`).

Stored views (`views=ViewTable`, the teacher-output cache's FKD scheme): each sample has K
fixed augmentations (flip, crop offsets or resized-crop window); every epoch draws one of them per
sample, so the student sees exactly a view whose teacher outputs were stored. The batch then
carries `view` (int64 [N], which of the K) so the cache can be looked up by (index, view).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

FlipFn = Callable[[torch.Tensor], torch.Tensor]
ATTEMPTS = 10               # RandomResizedCrop.get_params: tries before the centre-crop fallback
DEFAULT_RATIO = (3 / 4, 4 / 3)


@dataclass(frozen=True)
class ResizedCrop:
    """Random resized crop of an `height` x `width` image (module docstring): area fraction
    `scale` = (min, max), aspect ratio `ratio` = (min, max)."""

    scale: tuple
    ratio: tuple
    height: int
    width: int

    @classmethod
    def make(cls, scale, ratio, height: int, width: int) -> "ResizedCrop":
        ratio = ratio if ratio is not None else DEFAULT_RATIO
        problem = resized_crop_problem(scale, ratio)
        if problem:
            raise ValueError(problem)
        return cls(tuple(float(x) for x in scale), tuple(float(x) for x in ratio), int(height), int(width))

    # uniforms per sample: ATTEMPTS areas, ATTEMPTS log-ratios, then the offsets (i, j)
    DRAWS = 2 * ATTEMPTS + 2

    def draw(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """n windows (int64 [n,4]: i, j, h, w) from `generator`: one float64 torch.rand of
        [n, DRAWS], always (a fixed number of draws, whatever the attempts taken)."""
        return self.windows(torch.rand(n, self.DRAWS, generator=generator, dtype=torch.float64))

    def windows(self, u: torch.Tensor) -> torch.Tensor:
        """`RandomResizedCrop.get_params` on uniforms u (float64 [n, DRAWS], in [0, 1)): attempt t
        takes area = H * W * (smin + (smax - smin) * u[:, t]) and ratio
        r = exp(log rmin + (log rmax - log rmin) * u[:, 10 + t]); the first attempt whose
        w = round(sqrt(area * r)), h = round(sqrt(area / r)) (half to even, as Python's round)
        fit is taken, with i = floor(u[:, 20] * (H - h + 1)), j = floor(u[:, 21] * (W - w + 1));
        none: the centre crop of the ratio clamped to [rmin, rmax]."""
        height, width = self.height, self.width
        (smin, smax), (rmin, rmax) = self.scale, self.ratio
        lo, hi = math.log(rmin), math.log(rmax)
        area = (u[:, :ATTEMPTS] * (smax - smin) + smin) * float(height * width)
        aspect = torch.exp(u[:, ATTEMPTS:2 * ATTEMPTS] * (hi - lo) + lo)
        w = torch.round(torch.sqrt(area * aspect))
        h = torch.round(torch.sqrt(area / aspect))
        fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
        first = fits.to(torch.uint8).argmax(1, keepdim=True)              # the first attempt that fits
        h = h.gather(1, first).squeeze(1).long()
        w = w.gather(1, first).squeeze(1).long()
        room_h, room_w = height - h + 1, width - w + 1
        i = torch.minimum((u[:, 2 * ATTEMPTS] * room_h).floor().long(), room_h - 1)
        j = torch.minimum((u[:, 2 * ATTEMPTS + 1] * room_w).floor().long(), room_w - 1)
        out = torch.stack([i, j, h, w], 1)
        fallback = ~fits.any(1)
        if bool(fallback.any()):
            out[fallback] = torch.tensor(self.fallback(), dtype=torch.long)
        return out

    def fallback(self) -> tuple[int, int, int, int]:
        """get_params' centre crop after 10 failed attempts."""
        height, width = self.height, self.width
        in_ratio = float(width) / float(height)
        if in_ratio < min(self.ratio):
            w = width
            h = int(round(w / min(self.ratio)))
        elif in_ratio > max(self.ratio):
            h = height
            w = int(round(h * max(self.ratio)))
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w


def resized_crop_problem(scale, ratio) -> str | None:
    """What is wrong with these resized-crop settings (None: nothing), naming the key."""
    def numbers(value):
        if value is None or isinstance(value, (str, bytes)):
            return None
        try:
            out = [float(x) for x in value]
        except (TypeError, ValueError):
            return None
        if len(out) != 2 or any(isinstance(x, bool) for x in value) or not all(math.isfinite(x) for x in out):
            return None
        return out

    if scale is not None:
        s = numbers(scale)
        if s is None or not 0 < s[0] <= s[1] <= 1:
            return (f"data.resized_crop_scale={_show(scale)}: expected null (off) or [min, max] area fractions "
                    "with 0 < min <= max <= 1, such as [0.08, 1.0]")
    r = numbers(ratio)
    if r is None or not 0 < r[0] <= r[1]:
        return (f"data.resized_crop_ratio={_show(ratio)}: expected [min, max] aspect ratios (width / height) with "
                "0 < min <= max, such as [0.75, 1.3333]")
    return None


def _show(value) -> str:
    try:
        return str(list(value)) if not isinstance(value, (str, bytes)) else repr(value)
    except TypeError:
        return repr(value)


def check_resized_crop(data_cfg) -> None:
    """`data.resized_crop_scale` / `data.resized_crop_ratio` (module docstring): valid values, and not
    combined with data.crop_padding or data.scale_crop. One line naming the keys."""
    from kdmtl_cli.errors import KdmtlError

    scale = data_cfg.get("resized_crop_scale", None)
    ratio = data_cfg.get("resized_crop_ratio", None)
    problem = resized_crop_problem(scale, ratio if ratio is not None else DEFAULT_RATIO)
    if problem:
        raise KdmtlError(problem)
    if scale is not None and (int(data_cfg.get("crop_padding", 0) or 0) > 0 or data_cfg.get("scale_crop", None)):
        raise KdmtlError("data.resized_crop_scale cannot be combined with data.crop_padding or data.scale_crop; "
                         "set data.resized_crop_scale=null, or data.crop_padding=0 and data.scale_crop=null")


class ViewTable:
    """K stored augmentations per sample: `flips` bool [N,K], `crops` int64 [N,K,2] or None,
    `windows` (resized-crop windows i, j, h, w) int64 [N,K,4] or None.
    `choose(seed, epoch)` picks, per sample, the view that epoch uses (uniform over K, a pure
    function of (seed, epoch), independent of the shuffle)."""

    def __init__(self, flips: torch.Tensor, crops: torch.Tensor | None, windows: torch.Tensor | None = None):
        self.flips, self.crops = flips.bool(), (crops.long() if crops is not None else None)
        self.windows = windows.long() if windows is not None else None
        if self.crops is not None and self.windows is not None:
            raise ValueError("a view has crop offsets or a resized-crop window, not both")
        self.num_views = int(flips.shape[1])

    @classmethod
    def draw(cls, num_samples: int, num_views: int, *, hflip: bool, crop_padding: int, seed: int,
             resized_crop: ResizedCrop | None = None) -> "ViewTable":
        """`resized_crop`: each view also gets a window (ResizedCrop.draw), drawn after the flips and
        crops from the same generator (row n * K + k of its draws is view k of sample n)."""
        generator = torch.Generator().manual_seed(seed * 100_003 + 7_777_777)
        flips = (torch.rand(num_samples, num_views, generator=generator) < 0.5) if hflip \
            else torch.zeros(num_samples, num_views, dtype=torch.bool)
        crops = torch.randint(0, 2 * crop_padding + 1, (num_samples, num_views, 2), generator=generator) \
            if crop_padding > 0 else None
        windows = resized_crop.draw(num_samples * num_views, generator).view(num_samples, num_views, 4) \
            if resized_crop is not None else None
        return cls(flips, crops, windows)

    def crop_plan(self, rows, view) -> torch.Tensor | None:
        """The `crop` argument of `TensorLoader.make_batch` for these (sample, view) pairs: the
        resized-crop windows, else the crop offsets, else None."""
        table = self.windows if self.windows is not None else self.crops
        return table[rows, view] if table is not None else None

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


def resize_window(t: torch.Tensor, top: int, left: int, size: tuple[int, int], mode: str, *,
                  align_corners: bool = True, antialias: bool = False) -> torch.Tensor:
    """One sample `t` [..., H, W]: the window of `size` at (top, left), resized back to H x W with
    `mode` ("bilinear", with `align_corners` and `antialias`; "nearest"), in at least float32,
    returned in t's dtype (integer targets are exact: float64 holds them). A window of the whole
    image is returned as it is (torchvision's resize does the same; interpolation at the same size
    is the identity anyway)."""
    height, width = t.shape[-2:]
    h, w = size
    if (h, w) == (height, width):
        return t
    work = torch.float64 if not t.is_floating_point() else torch.promote_types(t.dtype, torch.float32)
    window = t[..., top:top + h, left:left + w].to(work)
    lead = window.shape[:-2]
    window = window.reshape(1, -1, h, w)
    if mode == "bilinear":
        out = F.interpolate(window, size=(height, width), mode="bilinear", align_corners=align_corners,
                            antialias=antialias)
    else:
        out = F.interpolate(window, size=(height, width), mode="nearest")
    out = out.reshape(*lead, height, width)
    return out.to(t.dtype) if t.is_floating_point() else out.round().to(t.dtype)


def scale_crop_sample(t: torch.Tensor, scale: float, top: int, left: int, size: tuple[int, int], mode: str) -> torch.Tensor:
    """The scale-crop of one sample: `resize_window` with align_corners=True (the official code's).
    Depth's division by the scale is the caller's."""
    return resize_window(t, top, left, size, mode, align_corners=True)


class TensorLoader:
    def __init__(self, split: dict[str, torch.Tensor], target_flips: dict[str, FlipFn | str | None], *,
                 batch_size: int, mean, std, device: torch.device, shuffle: bool = False,
                 hflip: bool = False, seed: int = 0, limit_batches: int | None = None,
                 drop_last: bool = False, crop_padding: int = 0, pad_values: dict | None = None,
                 views: ViewTable | None = None, scale_crop=None, target_kinds: dict | None = None,
                 resized_crop_scale=None, resized_crop_ratio=DEFAULT_RATIO):
        """`target_flips`: the targets to load, each with its flip (a callable such as
        `kind.flip_target`, a task kind name, or None for a target a flip leaves alone).
        `crop_padding`, `pad_values`: random crop (module docstring); 0 = off.
        `scale_crop`, `target_kinds`: random scale-crop (module docstring); None = off.
        `resized_crop_scale`, `resized_crop_ratio`: random resized crop (module docstring); None = off."""
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
        self.resized_crop = ResizedCrop.make(resized_crop_scale, resized_crop_ratio, *self.images.shape[-2:]) \
            if resized_crop_scale is not None else None
        if self.resized_crop is not None and (self.crop_padding > 0 or self.scale_crop is not None):
            raise ValueError("resized_crop_scale cannot be combined with crop_padding or scale_crop")
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
        scale-crop, `crops` is int64 [N,3] (scale index, top, left); with the resized crop, int64
        [N,4] (i, j, h, w)."""
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.num_samples, generator=generator) if self.shuffle \
            else torch.arange(self.num_samples)
        if self.views is not None:
            view = self.views.choose(self.seed, self.epoch)
            rows = torch.arange(self.num_samples)
            return order, self.views.flips[rows, view], self.views.crop_plan(rows, view), view
        flips = (torch.rand(self.num_samples, generator=generator) < 0.5) if self.hflip \
            else torch.zeros(self.num_samples, dtype=torch.bool)
        crops = torch.randint(0, 2 * self.crop_padding + 1, (self.num_samples, 2), generator=generator) \
            if self.crop_padding > 0 else None
        if self.scale_crop is not None:
            crops = self._draw_scale_crops(generator)
        if self.resized_crop is not None:       # last: the setting off leaves the plan as before
            crops = self.resized_crop.draw(self.num_samples, generator)
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
        resized = crop is not None and crop.shape[-1] == 4      # the window says it all: no setting needed
        if scaled:
            image = self._scale_crop(image, targets, crop)
        if resized:
            image = self._resize_windows(image, targets, crop.tolist(), align_corners=False, antialias=True)
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
        if resized:
            batch["resized_crop"] = crop
        return batch

    def _scale_crop(self, image: torch.Tensor, targets: dict, plan: torch.Tensor) -> torch.Tensor:
        """Random scale-crop (module docstring): the (H/s, W/s) windows resized back with
        align_corners=True, depth divided by s; `targets` is updated in place."""
        height, width = image.shape[-2:]
        sizes = scale_crop_sizes(height, width, self.scale_crop)
        plan = plan.tolist()
        windows = [(top, left, *sizes[k]) for k, top, left in plan]
        return self._resize_windows(image, targets, windows, align_corners=True, antialias=False,
                                    depth_divisors=[self.scale_crop[k] for k, _, _ in plan])

    def _resize_windows(self, image: torch.Tensor, targets: dict, windows, *, align_corners: bool,
                        antialias: bool, depth_divisors=None) -> torch.Tensor:
        """Per sample b, the window windows[b] = (top, left, h, w) of the image and of every dense
        target resized back to H x W (`resize_window`): the image and `normals` bilinearly (with
        `align_corners`, `antialias`), the other targets with nearest; `depth` targets divided by
        depth_divisors[b] when given. Sample by sample, so a batch of one (the DataLoader path)
        gives exactly that sample's row; `targets` is updated in place."""
        dense = [name for name, t in targets.items() if t.dim() >= 3 and t.shape[-2:] == image.shape[-2:]]
        images, outs = [], {name: [] for name in dense}
        for b, (top, left, h, w) in enumerate(windows):
            images.append(resize_window(image[b], top, left, (h, w), "bilinear", align_corners=align_corners,
                                        antialias=antialias))
            for name in dense:
                kind = self.target_kinds.get(name)
                if kind == "normals":
                    out = resize_window(targets[name][b], top, left, (h, w), "bilinear", align_corners=align_corners,
                                        antialias=antialias)
                else:
                    out = resize_window(targets[name][b], top, left, (h, w), "nearest")
                outs[name].append(out / depth_divisors[b] if kind == "depth" and depth_divisors is not None else out)
        for name in dense:
            targets[name] = torch.stack(outs[name])
        return torch.stack(images)
