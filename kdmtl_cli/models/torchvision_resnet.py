"""torchvision classification backbones as multi-task trunks. Every model is built with
weights=None: nothing is ever downloaded. Each trunk returns one feature map per resolution,
finest first, and keeps torchvision's module names, so feature distillation addresses them
(`trunk.layer3`, `trunk.features.6`, `trunk.trunk_output.block3`).

Families (arch = the torchvision function name):
- ResNets: resnet18/34/50/101/152, resnext50_32x4d, resnext101_32x8d, resnext101_64x4d,
  wide_resnet50_2, wide_resnet101_2. Modules `stem` (conv1, bn1, relu, maxpool) and
  `layer1`..`layer4`; maps: the four layers' outputs, strides 4/8/16/32.
- `features` families: mobilenet_v2, mobilenet_v3_small/large, efficientnet_b0..b7,
  efficientnet_v2_s/m/l, convnext_tiny/small/base/large. torchvision's `features` Sequential is
  kept as `trunk.features`; maps: the output of the last block of `features` at each resolution of
  stride >= 4 (found by a dry forward at build time), the deepest being `features`' own output
  (e.g. mobilenet_v3_large: features.3/6/12/16, efficientnet_b0: features.2/3/5/8, convnext_tiny:
  features.1/3/5/7); strides 4/8/16/32.
- RegNets: regnet_y_400mf/800mf/1_6gf/3_2gf/8gf/16gf/32gf/128gf, regnet_x_400mf/800mf/1_6gf/3_2gf/
  8gf/16gf/32gf. Modules `stem` and `trunk_output.block1`..`block4`; maps: the four blocks' outputs,
  strides 4/8/16/32.

`small_input` (default true; for 32-64 px images, where a stride-32 network leaves 1-2 pixels):
the stem stops downsampling. ResNets: conv1 is replaced by a (randomly initialised) 3x3 stride-1
conv and the max-pool is removed (strides 1/2/4/8; a weights file's conv1 is not used). Other
families: the stem's first conv (`features.0.0`, `stem.0`) runs at stride 1 with its weights kept
(from the weights file, if any); ConvNeXt's 4x4 patchify conv gets "same" zero padding. Strides
become 2/4/8/16 (MobileNets, EfficientNets, RegNets) or 1/2/4/8 (ConvNeXt).

`weights=PATH`: a local file holding the torchvision model's state dict (`torch.save(model.
state_dict())`, read with weights_only, or .safetensors; a checkpoint dict wrapping it under
`state_dict` / `model`, and DDP `module.` prefixes, are accepted). Classifier keys (`fc.`,
`classifier.`, `head.`, `heads.`) are ignored; any other missing, unexpected or mis-shaped key is a
one-line KdmtlError naming the file and the first keys. With weights, the trunk's `input_norm` is
ImageNet's mean/std (what torchvision's weights expect); without, `input_norm` is None.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdmtl_cli.engine.checkpoint import load_tensor_file
from kdmtl_cli.errors import KdmtlError
from kdmtl_cli.models import TRUNKS, init_only

CLASSIFIER_PREFIXES = ("fc.", "classifier.", "head.", "heads.")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_DRY_SIZE = 64      # input side of the build-time dry forward (a multiple of every family's stride, 32)

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
           "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2")
FEATURE_NETS = ("mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large",
                *(f"efficientnet_b{i}" for i in range(8)),
                "efficientnet_v2_s", "efficientnet_v2_m", "efficientnet_v2_l",
                "convnext_tiny", "convnext_small", "convnext_base", "convnext_large")
REGNETS = tuple(f"regnet_y_{size}" for size in ("400mf", "800mf", "1_6gf", "3_2gf", "8gf", "16gf", "32gf", "128gf")) \
    + tuple(f"regnet_x_{size}" for size in ("400mf", "800mf", "1_6gf", "3_2gf", "8gf", "16gf", "32gf"))


@dataclass
class TorchvisionSettings:
    """The `student.*` / `teacher.*` keys the torchvision trunks read (besides arch, decoder_width, head)."""
    # local weights file (.pth/.pt state dict, or .safetensors); nothing is downloaded. init_only: not
    # remembered in checkpoints (they hold the weights)
    weights: Optional[str] = init_only(None)
    small_input: bool = True           # the stem does not downsample (ResNets: 3x3 stride-1 conv, no max-pool), for 32-64 px images


def imagenet_norm() -> Dict[str, List[float]]:
    return {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}


# ---- local weights files ----------------------------------------------------------------------------

_WRAPPERS = ("state_dict_ema", "model_ema", "state_dict", "model")   # timm's order (EMA weights first)
_PREFIXES = ("_orig_mod.", "module.", "_orig_mod.")                   # torch.compile / DDP wrappers


def unwrap_state_dict(obj: Mapping) -> Dict[str, object]:
    """The state dict in a loaded file: itself, or the one a training checkpoint wraps (`state_dict`,
    `model`...), with DDP / torch.compile key prefixes removed."""
    if not any(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in _WRAPPERS:
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    state = {}
    for key, value in obj.items():
        key = str(key)
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
        state[key] = value
    return state


def check_state_dict(state: Mapping[str, object], expected: Mapping[str, torch.Tensor], path,
                     what: str, ignore: Sequence[str], source: str = "that model") -> None:
    """One-line KdmtlError unless `state` has exactly `expected`'s keys and shapes, keys starting
    with an `ignore` prefix (the classifier) aside (`source`: the model the file should come from,
    for the message). BatchNorm's `num_batches_tracked` may be missing
    (older files lack it; BatchNorm then keeps its own)."""
    ignore = tuple(ignore)
    kept = {k: v for k, v in state.items() if not k.startswith(ignore)}
    wanted = {k: v for k, v in expected.items() if not k.startswith(ignore)}
    missing = [k for k in wanted if k not in kept and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in kept if k not in wanted]
    shapes = [f"{k} {_shape(kept[k])} vs {list(wanted[k].shape)}" for k in wanted
              if k in kept and _shape(kept[k]) != list(wanted[k].shape)]
    if missing or unexpected or shapes:
        parts = [f"{len(keys)} {label} (e.g. {', '.join(keys[:3])})"
                 for label, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                     ("keys of another shape (file vs model)", shapes)) if keys]
        raise KdmtlError(f"{path} does not match {what}: {'; '.join(parts)}; expected the state dict "
                         f"of {source}, as saved by torch.save(model.state_dict())")


def _shape(value) -> Optional[List[int]]:
    return list(value.shape) if isinstance(value, torch.Tensor) else None


def load_torchvision_weights(net: nn.Module, weights: str, arch: str) -> None:
    """Load a local torchvision state dict into `net` (the full classification model), classifier
    ignored; anything else that does not fit is a one-line KdmtlError."""
    path = Path(weights).expanduser()
    state = unwrap_state_dict(load_tensor_file(path, what=f"{arch} weights file"))
    check_state_dict(state, net.state_dict(), path, f"torchvision {arch}", CLASSIFIER_PREFIXES,
                     source=f"torchvision.models.{arch}()")
    net.load_state_dict({k: v for k, v in state.items() if not k.startswith(CLASSIFIER_PREFIXES)},
                        strict=False)


def _torchvision_model(arch: str) -> nn.Module:
    import torchvision   # here, not at import: it pulls in torch._dynamo (~1 s), for these trunks only

    return getattr(torchvision.models, arch)(weights=None)


# ---- ResNets ------------------------------------------------------------------------------------------

class ResNetTrunk(nn.Module):
    def __init__(self, arch: str, weights: str | None, small_input: bool):
        super().__init__()
        net = _torchvision_model(arch)
        if weights:
            load_torchvision_weights(net, weights, arch)
        if small_input:
            # 32-64 px images: a stride-32 ImageNet stem would leave 1-2 pixels.
            net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
            net.maxpool = nn.Identity()
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        expansion = type(net.layer1[0]).expansion      # 1 (BasicBlock) or 4 (Bottleneck)
        self.channels = [64 * expansion, 128 * expansion, 256 * expansion, 512 * expansion]
        first = 1 if small_input else 4
        self.reductions = [first, first * 2, first * 4, first * 8]
        self.input_norm = imagenet_norm() if weights else None

    def forward(self, x):
        x = self.stem(x)
        f1 = self.layer1(x)
        f2 = self.layer2(f1)
        f3 = self.layer3(f2)
        f4 = self.layer4(f3)
        return [f1, f2, f3, f4]


# ---- MobileNets, EfficientNets, ConvNeXts, RegNets ----------------------------------------------------

class _SamePadConv2d(nn.Conv2d):
    """A stride-1 conv with "same" zero padding for any kernel size (torch's padding='same' warns on
    even kernels): extra pixel at the bottom/right, as torch does."""

    def forward(self, x):
        pads = []
        for k in reversed(self.kernel_size):
            total = k - 1
            pads += [total // 2, total - total // 2]
        return F.conv2d(F.pad(x, pads), self.weight, self.bias, 1, 0, self.dilation, self.groups)


def _stem_at_stride_1(parent: nn.Sequential) -> int:
    """Make the first conv of `parent` stride 1 (weights kept, output size = input size); returns
    its former stride."""
    index, conv = next((i, m) for i, m in enumerate(parent) if isinstance(m, nn.Conv2d))
    stride = conv.stride[0]
    if stride == 1:
        return 1
    keeps_size = all(2 * p == d * (k - 1) for p, k, d in zip(conv.padding, conv.kernel_size, conv.dilation))
    if keeps_size:
        conv.stride = (1, 1)
    else:   # ConvNeXt's 4x4 stride-4 patchify conv
        new = _SamePadConv2d(conv.in_channels, conv.out_channels, conv.kernel_size, 1, 0,
                             conv.dilation, conv.groups, bias=conv.bias is not None)
        new.weight = conv.weight
        if conv.bias is not None:
            new.bias = conv.bias
        parent[index] = new
    return stride


class _SteppedTrunk(nn.Module):
    """A torchvision model's feature steps, run in order; returns the outputs of the steps in `_keep`.
    A subclass takes its parts from the model (`_adopt`, returning the part whose first conv is the
    stem's) and lists its steps (`_steps`)."""

    def __init__(self, arch: str, weights: str | None, small_input: bool):
        super().__init__()
        net = _torchvision_model(arch)
        if weights:
            load_torchvision_weights(net, weights, arch)
        stem = self._adopt(net)
        self._select_maps()
        if small_input:
            stride = _stem_at_stride_1(stem)
            self.reductions = [r // stride for r in self.reductions]
        self.input_norm = imagenet_norm() if weights else None

    def _adopt(self, net: nn.Module) -> nn.Sequential:
        raise NotImplementedError

    def _steps(self) -> Iterable[nn.Module]:
        raise NotImplementedError

    def _select_maps(self) -> None:
        """Dry forward (eval mode, no grad, zeros) on a _DRY_SIZE image: keep the last step at each
        resolution of stride >= 4; sets `_keep`, `channels`, `reductions`."""
        shapes: List[Tuple[int, int]] = []   # (channels, stride) of each step
        was_training = self.training
        self.eval()
        with torch.no_grad():
            x = torch.zeros(1, 3, _DRY_SIZE, _DRY_SIZE)
            for step in self._steps():
                x = step(x)
                shapes.append((x.shape[1], _DRY_SIZE // x.shape[-1]))
        self.train(was_training)
        keep = [i for i, (_, stride) in enumerate(shapes)
                if stride >= 4 and (i + 1 == len(shapes) or shapes[i + 1][1] != stride)]
        self._keep = tuple(keep)
        self._last = keep[-1]
        self.channels = [shapes[i][0] for i in keep]
        self.reductions = [shapes[i][1] for i in keep]

    def forward(self, x):
        features = []
        for i, step in enumerate(self._steps()):
            x = step(x)
            if i in self._keep:
                features.append(x)
                if i == self._last:
                    break
        return features


class FeaturesTrunk(_SteppedTrunk):
    """MobileNet / EfficientNet / ConvNeXt: torchvision's `features` Sequential as `self.features`."""

    def _adopt(self, net):
        self.features = net.features
        return self.features[0]

    def _steps(self):
        return self.features


class RegNetTrunk(_SteppedTrunk):
    """RegNet: torchvision's `stem` and `trunk_output` (block1..block4)."""

    def _adopt(self, net):
        self.stem, self.trunk_output = net.stem, net.trunk_output
        return self.stem

    def _steps(self):
        return [self.stem, *self.trunk_output]


def _register(arch: str, trunk_cls) -> None:
    def build(cfg, arch=arch):
        return trunk_cls(arch, getattr(cfg, "weights", None), bool(getattr(cfg, "small_input", True)))

    # the input normalisation a run takes from this trunk's weights (kdmtl_cli/run.py), without building it
    TRUNKS.register(arch, settings=TorchvisionSettings,
                    input_norm=lambda cfg: imagenet_norm() if getattr(cfg, "weights", None) else None)(build)


for _arch in RESNETS:
    _register(_arch, ResNetTrunk)
for _arch in FEATURE_NETS:
    _register(_arch, FeaturesTrunk)
for _arch in REGNETS:
    _register(_arch, RegNetTrunk)
