"""torchvision ResNets as multi-task trunks. Built with weights=None (nothing is
downloaded); `weights=PATH` loads a local torchvision state dict (.pth/.pt via
weights_only, or .safetensors), ignoring the classifier."""

from __future__ import annotations

from pathlib import Path

import torch.nn as nn

from kdmtl_cli.engine.checkpoint import load_tensor_file
from kdmtl_cli.errors import KdmtlError
from kdmtl_cli.models import TRUNKS


class ResNetTrunk(nn.Module):
    def __init__(self, arch: str, weights: str | None, small_input: bool):
        super().__init__()
        import torchvision   # here, not at import: it pulls in torch._dynamo (~1 s), for these trunks only

        net = getattr(torchvision.models, arch)(weights=None)
        if weights:
            state = load_tensor_file(Path(weights), what=f"{arch} weights file")
            state = {k: v for k, v in state.items() if not k.startswith("fc.")}
            try:
                missing, unexpected = net.load_state_dict(state, strict=False)
            except RuntimeError as err:  # shapes differ (e.g. resnet50 weights for resnet18)
                raise KdmtlError(f"{weights} does not match torchvision {arch}: "
                                 f"{str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else err}") from None
            missing = [k for k in missing if not k.startswith("fc.")]
            if missing or unexpected:
                raise KdmtlError(f"{weights} does not match torchvision {arch}: "
                                 f"{len(missing)} missing keys (e.g. {missing[:2]}), "
                                 f"{len(unexpected)} unexpected (e.g. {unexpected[:2]})")
        if small_input:
            # 32-64 px images: a stride-32 ImageNet stem would leave 1-2 pixels.
            net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
            net.maxpool = nn.Identity()
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        expansion = 4 if arch in ("resnet50", "resnet101", "resnet152") else 1
        self.channels = [64 * expansion, 128 * expansion, 256 * expansion, 512 * expansion]
        first = 1 if small_input else 4
        self.reductions = [first, first * 2, first * 4, first * 8]

    def forward(self, x):
        x = self.stem(x)
        f1 = self.layer1(x)
        f2 = self.layer2(f1)
        f3 = self.layer3(f2)
        f4 = self.layer4(f3)
        return [f1, f2, f3, f4]


for _arch in ("resnet18", "resnet34", "resnet50"):
    TRUNKS.register(_arch)(lambda cfg, _arch=_arch: ResNetTrunk(_arch, cfg.weights, cfg.small_input))
