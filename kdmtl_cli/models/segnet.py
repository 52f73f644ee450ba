"""`segnet`: the SegNet encoder-decoder of MTAN (Liu et al., 2019) and KD4MTL (Li & Bilen, 2020)
for NYUv2 / Cityscapes, written for the trunk contract (kdmtl_cli/models/trunk.py).

Channel plan c = [w, 2w, 4w, 8w, 8w] with w = ``cfg.width``; ``width: 64`` is the papers'
[64, 128, 256, 512, 512] (conf/student/segnet.yaml, conf/teacher/segnet.yaml). Note that
`width` defaults to 16, which gives a 16x smaller SegNet: set ``student.width=64``
for the paper's size.

Every conv is a 3x3 conv (with bias) + BatchNorm + ReLU, as in MTAN's ``conv_layer``.
- encoder stage i (i = 0..4): 2, 2, 3, 3, 3 convs c[i-1] -> c[i], then a 2x2 max-pool
  (indices kept);
- decoder stage j (j = 0..4): 2x2 max-unpool with the indices of encoder stage 4 - j, then
  3, 3, 3, 2, 2 convs: the first c[4-j] -> c[3-j] (c[4] -> c[4] for j = 0, c[0] -> c[0] for
  j = 4), the others keep the channels. The last decoder stage ends at w channels at the
  input resolution (MTAN's shared representation, which its task heads read).

Initialisation as MTAN's and KD4MTL's SegNet (lorenmt/mtan im2im_pred/model_segnet_*.py, e.g.
model_segnet_mtan.py l. 77-86; VICO-UoE/KD4MTL model/segnet.py): every Conv2d weight
``nn.init.xavier_normal_``, bias 0; BatchNorm weight 1, bias 0; Linear weight xavier-normal,
bias 0 -- on the trunk and, through ``init_head``, on every task head (the references initialise
their whole model, prediction layers included). ``SegNetTrunk(..., init="pytorch")`` keeps
PyTorch's default instead.

Module paths for feature KD: ``trunk.stages.0`` .. ``trunk.stages.4`` are the encoder stages
(outputs before pooling, at 1, 1/2, 1/4, 1/8, 1/16 of the input; pooling and unpooling are
functional, so every stage returns one tensor), ``trunk.stages.5`` .. ``trunk.stages.9`` the
decoder stages (outputs at 1/16, 1/8, 1/4, 1/2, 1). ``stem`` is an identity.

Returned features (finest first): [decoder output (w ch, 1/1), pooled bottleneck (8w ch, 1/32)].
Dense heads (DenseDecoder) fuse the two top-down, so they read the full-resolution decoder
output plus a projection of the bottleneck; image-level heads pool the bottleneck. With
``head: mtan`` (student.head / teacher.head) dense tasks instead get MTAN's prediction layer
(3x3 conv w -> w, 1x1 conv w -> outputs; ``prediction_layer`` in mtan.py) on the decoder output
alone, as MTAN's single-task / split SegNet and KD4MTL's SegNet do. Any input
size works (unpooling restores each pre-pool size, odd ones included) as long as every side is
at least 32 px; the papers' 288x384 and 128x256 divide by 32 exactly.

``segnet_mtan`` is the same network with MTAN's attention (kdmtl_cli/models/mtan.py): the trunk
then also owns the attention's task-shared conv blocks and hands its heads the taps MTAN reads
(each encoder stage's first-conv and final outputs, each decoder stage's unpooled input and
output); every task's head is its own attention branch plus MTAN's prediction layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List

import torch.nn as nn
import torch.nn.functional as F

from kdmtl_cli.models import TRUNKS
from kdmtl_cli.models.heads import TrunkFeatures
from kdmtl_cli.models.trunk import ReferenceInit, StagedTrunk
from kdmtl_cli.errors import KdmtlError
from kdmtl_cli.ranges import at_least

ENCODER_CONVS = (2, 2, 3, 3, 3)
DECODER_CONVS = (3, 3, 3, 2, 2)


def xavier_init(module: nn.Module) -> None:
    """MTAN's / KD4MTL's init loop over `module`'s modules (model_segnet_mtan.py l. 77-86)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.xavier_normal_(m.weight)
            if m.bias is not None:   # every reference conv has one; kdmtl's DenseDecoder laterals do not
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.Linear):
            nn.init.xavier_normal_(m.weight)
            nn.init.constant_(m.bias, 0)


def conv_layer(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, 1, 1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class TappedBlock(nn.Sequential):
    """A stage of convs that keeps its first conv's output in `first` until the trunk takes it
    (MTAN's encoder attention reads it). Stage forward hooks still see the stage's one output."""

    first = None

    def forward(self, x):
        x = self.first = self[0](x)
        for layer in self[1:]:
            x = layer(x)
        return x


def _block(c_in: int, c_out: int, n: int) -> nn.Sequential:
    return TappedBlock(*[conv_layer(c_in if k == 0 else c_out, c_out) for k in range(n)])


class SegNetTrunk(ReferenceInit, StagedTrunk):
    def __init__(self, width: int = 64, in_channels: int = 3, attention: bool = False, init: str = "official",
                 head: str = "auto"):
        super().__init__()
        if width < 1:
            raise ValueError(f"segnet width must be positive (got {width})")
        if head not in ("auto", "mtan"):
            raise ValueError(f"segnet head must be 'auto' or 'mtan' (got {head!r})")
        self.head = head
        c = [width, 2 * width, 4 * width, 8 * width, 8 * width]
        self.stem = nn.Identity()
        stages = [_block(in_channels if i == 0 else c[i - 1], c[i], n) for i, n in enumerate(ENCODER_CONVS)]
        for j, n in enumerate(DECODER_CONVS):
            level = 4 - j                      # the encoder level whose resolution this stage restores
            c_out = c[level - 1] if level > 0 else c[0]
            if j == 0:
                stages.append(_block(c[4], c[4], n))
            else:
                first = conv_layer(c[level], c_out)
                stages.append(TappedBlock(first, *[conv_layer(c_out, c_out) for _ in range(n - 1)]))
        self.stages = nn.ModuleList(stages)
        self.channels: List[int] = [c[0], c[4]]
        self.reductions: List[int] = [1, 32]
        self.plan: List[int] = c
        self.attention = None
        if attention:
            from kdmtl_cli.models.mtan import SharedAttentionBlocks
            self.attention = SharedAttentionBlocks(c)
        self.init_reference(init, xavier_init, xavier_init)

    def build_head(self, task) -> nn.Module | None:
        """MTAN: each task gets its own attention branch. Plain SegNet uses the standard heads, or
        with ``head: mtan`` MTAN's prediction layer for dense tasks (image-level tasks keep the
        pooled linear head)."""
        if self.attention is None:
            if self.head == "mtan" and task.kind.dense:
                from kdmtl_cli.models.mtan import PredictionHead
                return PredictionHead(self.plan[0], task.out_channels)
            return None
        from kdmtl_cli.models.mtan import AttentionHead
        return AttentionHead(self.plan, task.out_channels, dense=task.kind.dense)

    def forward(self, x):
        x = self.stem(x)
        indices, sizes = [], []
        taps = {"enc_first": [], "enc_out": [], "dec_in": [], "dec_out": []}
        for stage in self.stages[:5]:
            x = stage(x)
            taps["enc_first"].append(stage.first)
            stage.first = None               # do not keep the activation alive past this forward
            taps["enc_out"].append(x)
            sizes.append(x.shape[-2:])
            x, idx = F.max_pool2d(x, 2, 2, return_indices=True)
            indices.append(idx)
        bottleneck = x
        for j, stage in enumerate(self.stages[5:]):
            x = F.max_unpool2d(x, indices[4 - j], 2, 2, output_size=sizes[4 - j])
            taps["dec_in"].append(x)
            x = stage(x)
            stage.first = None
            taps["dec_out"].append(x)
        features = TrunkFeatures([x, bottleneck])
        if self.attention is not None:
            features.taps, features.attention = taps, self.attention
        return features


@dataclass
class SegNetSettings:
    """`student.*` / `teacher.*` keys of segnet and segnet_mtan (remembered in checkpoints)."""
    width: int = at_least(1, default=16)          # w of the channel plan [w, 2w, 4w, 8w, 8w]; the papers': 64
    # dense-task heads: auto (kdmtl's DenseDecoder; segnet_mtan: MTAN's attention heads) | mtan (segnet:
    # MTAN's prediction layer, 3x3 conv + 1x1 conv on the decoder output)
    head: str = "auto"


def _checked_head(cfg) -> str:
    """`head`, one of auto | mtan, or a one-line KdmtlError (SegNetTrunk's ValueError is for code)."""
    if cfg.head not in ("auto", "mtan"):
        raise KdmtlError(f"head must be 'auto' or 'mtan' (got {cfg.head!r})")
    return str(cfg.head)


@TRUNKS.register("segnet", settings=SegNetSettings)
def build_segnet(cfg) -> SegNetTrunk:
    return SegNetTrunk(int(cfg.width), head=_checked_head(cfg))


@TRUNKS.register("segnet_mtan", settings=SegNetSettings)
def build_segnet_mtan(cfg) -> SegNetTrunk:
    _checked_head(cfg)   # segnet_mtan's heads are MTAN's attention heads whatever it says; still a valid value
    return SegNetTrunk(int(cfg.width), attention=True)
