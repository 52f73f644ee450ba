"""MTAN's task attention (Liu, Johns & Davison, "End-to-End Multi-Task Learning with Attention",
CVPR 2019) on the SegNet trunk (`student.arch=segnet_mtan`, kdmtl_cli/models/segnet.py).

With the channel plan c = [c0..c4] of the trunk, every task has
- an encoder branch: at stage i a soft mask a_i = att(cat(u_i, e_{i-1})) (u_i: the stage's first
  conv output; no concatenation at stage 0), applied to the stage output, a_i * p_i, then a
  task-shared conv (c_i -> c_{i+1}, c4 -> c4 at the last stage) and a 2x2 max-pool: e_i;
- a decoder branch (dense tasks only): at decoder stage j, reading level k = 4 - j, the previous
  branch output is upsampled bilinearly to the stage's size, passed through a task-shared conv
  (c_k -> c_{k-1}; c4 -> c4 and c0 -> c0 at the ends), concatenated with the stage's unpooled
  input and turned into a mask on the stage's output;
- MTAN's prediction layer (3x3 conv c0 -> c0, 1x1 conv c0 -> outputs) on the last decoder
  branch output. Image-level tasks (not in the paper) pool the last encoder branch output into
  a linear layer instead, so they carry no decoder branch.
`att` is MTAN's attention layer: 1x1 conv, BN, ReLU, 1x1 conv, BN, sigmoid.

The task-shared convs live in the trunk (`trunk.attention`): they are trained by every task,
so gradient-based weightings treat them as shared parameters. With width 64 and NYUv2's three
tasks the whole network has MTAN's 44,229,073 parameters (their script prints 44,229,076 with
its three uncertainty log-variances, which kdmtl keeps in the weighting instead).
Everything, attention branches and prediction layers included, is initialised as MTAN does
(Xavier-normal convs / linears with bias 0, BN 1 / 0; `xavier_init` in segnet.py).
"""

from __future__ import annotations

from typing import List

import torch
import torch.nn as nn
import torch.nn.functional as F


def attention_layer(c_in: int, c_mid: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_mid, 1), nn.BatchNorm2d(c_mid), nn.ReLU(inplace=True),
                         nn.Conv2d(c_mid, c_out, 1), nn.BatchNorm2d(c_out), nn.Sigmoid())


def _conv(c_in: int, c_out: int) -> nn.Sequential:
    from kdmtl_cli.models.segnet import conv_layer  # one definition of the 3x3 conv + BN + ReLU
    return conv_layer(c_in, c_out)


def prediction_layer(c0: int, out_channels: int) -> nn.Sequential:
    """MTAN's dense prediction layer (``conv_layer(..., pred=True)``, im2im_pred/model_segnet_*.py):
    3x3 conv c0 -> c0, then 1x1 conv c0 -> outputs, both with bias, no BN / activation."""
    return nn.Sequential(nn.Conv2d(c0, c0, 3, 1, 1), nn.Conv2d(c0, out_channels, 1))


class PredictionHead(nn.Module):
    """`head: mtan` on plain SegNet: MTAN's prediction layer on the trunk's finest feature (the
    last decoder output), as in MTAN's single-task / split SegNet and KD4MTL's SegNet."""

    def __init__(self, c0: int, out_channels: int):
        super().__init__()
        self.predict = prediction_layer(c0, out_channels)

    def forward(self, features, image_size):
        x = self.predict(features[0])
        if tuple(x.shape[-2:]) != tuple(image_size):
            x = F.interpolate(x, size=image_size, mode="bilinear", align_corners=False)
        return x


class SharedAttentionBlocks(nn.Module):
    """The convs every task's attention branch passes through (MTAN's encoder_block_att and
    decoder_block_att); `decoder[k]` serves the decoder stage at level k."""

    def __init__(self, c: List[int]):
        super().__init__()
        self.encoder = nn.ModuleList([_conv(c[i], c[i + 1]) for i in range(4)] + [_conv(c[4], c[4])])
        self.decoder = nn.ModuleList([_conv(c[0], c[0])] + [_conv(c[k], c[k - 1]) for k in range(1, 4)]
                                     + [_conv(c[4], c[4])])


class AttentionHead(nn.Module):
    """One task's attention branch over the trunk's taps, ending in its prediction layer."""

    def __init__(self, c: List[int], out_channels: int, dense: bool):
        super().__init__()
        self.dense = dense
        self.encoder = nn.ModuleList([attention_layer(c[0], c[0], c[0])]
                                     + [attention_layer(2 * c[i], c[i], c[i]) for i in range(1, 5)])
        if dense:
            # decoder[k] masks the decoder stage at level k, whose output has c[k-1] (c0 at k = 0) channels
            self.decoder = nn.ModuleList([attention_layer(2 * c[0], c[0], c[0])]
                                         + [attention_layer(c[k] + c[k - 1], c[k - 1], c[k - 1])
                                            for k in range(1, 5)])
            self.predict = prediction_layer(c[0], out_channels)
        else:
            self.predict = nn.Linear(c[4], out_channels)

    def forward(self, features, image_size):
        taps, shared = features.taps, features.attention
        e = None
        for i, (first, out) in enumerate(zip(taps["enc_first"], taps["enc_out"])):
            mask = self.encoder[i](first if e is None else torch.cat((first, e), 1))
            e = F.max_pool2d(shared.encoder[i](mask * out), 2, 2)
        if not self.dense:
            return self.predict(e.mean((2, 3)))
        d = e
        for j, (unpooled, out) in enumerate(zip(taps["dec_in"], taps["dec_out"])):
            k = 4 - j
            d = F.interpolate(d, size=unpooled.shape[-2:], mode="bilinear", align_corners=True)
            d = shared.decoder[k](d)
            d = self.decoder[k](torch.cat((unpooled, d), 1)) * out
        x = self.predict(d)
        if tuple(x.shape[-2:]) != tuple(image_size):
            x = F.interpolate(x, size=image_size, mode="bilinear", align_corners=False)
        return x
