"""`reviewkd`: Distilling Knowledge via Knowledge Review (Chen et al., CVPR 2021) as mdistiller's
`ReviewKD` (megvii-research/mdistiller a08d46f, mdistiller/distillers/ReviewKD.py), which is the
authors' dvlab-research/ReviewKD cede6ea CIFAR-100/model/reviewkd.py (`ABF`, `ReviewKD`, `hcl`).

The student's listed features, finest first, plus (`pooled: true`, the official wiring) the global
average of the last one as a [N, C, 1, 1] map, go coarsest first through a chain of ABF
(attention-based fusion) modules (ReviewKD.py `ABF` L106-144, wiring `forward_train` L80-88):

    ABF_i(x_i, r):  x = BN(conv1x1(x_i)) to mid channels;
                    (all but the coarsest) r = nearest-resize(r to x's size),
                    a = sigmoid(conv1x1_bias([x, r])) (2 maps), x = x * a_0 + r * a_1;
                    x = nearest-resize(x to the teacher's size) when sizes differ;
                    out_i = BN(conv3x3(x)) to the teacher's channels; r = x goes to the next, finer level.

mid channels = min(`max_mid_channel` 512, channels of the coarsest student level) (ReviewKD.py L45:
`mid_channel = min(512, in_channels[-1])`; mdistiller reads cfg.REVIEWKD.MAX_MID_CHANNEL (L42, engine/
cfg.py L158: 512) but the 512 is hard-coded, so here the setting is what the rule uses). conv1 and
conv2 are initialised kaiming_uniform_(a=1) (L126-127), the rest as PyTorch's defaults. The ABFs are
built in `setup` from the feature shapes (in channels: the student's; out channels and out sizes: the
teacher's) and live in `self.modules`, so the optimiser trains them and checkpoints keep them; their
state_dict keys are the official `abfs.<i>....` (i = 0 the coarsest level, as the official `abfs[::-1]`).

The loss is `hcl_loss` (ReviewKD.py L11-28): for each level, (MSE(out, t) + sum over l in [4, 2, 1]
with l < H of 2^-k MSE(avgpool_l(out), avgpool_l(t))) / (1 + sum of the 2^-k), k = 1, 2, 3 for the
pools actually taken; summed over the levels. One term `reviewkd/hcl` (`reviewkd/hcl@<task>` with
per-task teachers: one ABF chain per teacher task), weighted `loss.reviewkd.weight` (REVIEWKD_WEIGHT
1.0, cfg.py L152) times the warm-up min(e / `warmup_epochs`, 1) (ReviewKD.py L94-98, WARMUP_EPOCHS 20
cfg.py L153) with e mdistiller's 1-based epoch number (`warmup_schedule: epoch`, as `dkd`; `linear`
ramps continuously from 0). The authors' CIFAR-100/train.py L210/L225 counts epochs from 0, so
their factor is 0 in the first epoch and reaches 1 one epoch later.

Mapping to kdmtl: mdistiller takes the student's `feats` (post-activation, STU_PREACT False) of the
three residual stages plus `pooled_feat` (its `feats[0]`, the stem, is dropped by the zip with the
4 ABFs) and the teacher's `preact_feats[1:]` + `pooled_feat` (L89-91). Here the default is
`trunk.stages.0..2` on both sides plus the pooled last stage: forward hooks give the teacher's stage
OUTPUTS (after the block's final ReLU for convnet and the CIFAR ResNets), not the pre-activations; that
is the one departure. Non-square maps are resized to (H, W) (the official code assumes square ones).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from kdmtl_cli.distill import KD_METHODS
from kdmtl_cli.distill.dkd import WARMUP_SCHEDULES, dkd_warmup
from kdmtl_cli.distill.logit import compute_dtype
from kdmtl_cli.distill.pairs import FeaturePairMethod, FeaturePairsConfig
from kdmtl_cli.errors import KdmtlError
from kdmtl_cli.ranges import at_least

STAGES = ["trunk.stages.0", "trunk.stages.1", "trunk.stages.2"]
HCL_POOL_SIZES = (4, 2, 1)     # hcl_loss L18: the pyramid levels, each weighted half the previous one


@dataclass
class ReviewKDConfig(FeaturePairsConfig):
    """Knowledge review as mdistiller (conf/loss/reviewkd.yaml); features finest first."""
    weight: float = at_least(0, default=1.0)
    warmup_epochs: float = at_least(0, default=20.0, note="0 = no warm-up")
    warmup_schedule: str = "epoch"   # epoch: mdistiller's (1-based epoch, per epoch) | linear: continuous from 0
    max_mid_channel: int = at_least(1, default=512)   # ABF mid channels = min(this, coarsest student channels)
    pooled: bool = True              # add the pooled last feature as the coarsest level (official)
    student: List[str] = field(default_factory=lambda: list(STAGES))
    teacher: List[str] = field(default_factory=lambda: list(STAGES))


class ABF(nn.Module):
    """One attention-based fusion module (mdistiller ReviewKD.py `ABF`, same submodule names)."""

    def __init__(self, in_channel: int, mid_channel: int, out_channel: int, fuse: bool):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_channel, mid_channel, kernel_size=1, bias=False),
                                   nn.BatchNorm2d(mid_channel))
        self.conv2 = nn.Sequential(nn.Conv2d(mid_channel, out_channel, kernel_size=3, stride=1, padding=1, bias=False),
                                   nn.BatchNorm2d(out_channel))
        self.att_conv = nn.Sequential(nn.Conv2d(mid_channel * 2, 2, kernel_size=1), nn.Sigmoid()) if fuse else None
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, x: Tensor, residual: Optional[Tensor], out_size: Sequence[int]) -> Tuple[Tensor, Tensor]:
        """(output at the teacher's size and channels, residual for the next finer level)."""
        x = self.conv1(x)
        if self.att_conv is not None:
            # the official resizes to (shape, shape), which its config sets to x's own size
            residual = F.interpolate(residual, tuple(x.shape[-2:]), mode="nearest")
            attention = self.att_conv(torch.cat([x, residual], dim=1))
            x = x * attention[:, 0:1] + residual * attention[:, 1:2]
        if tuple(x.shape[-2:]) != tuple(out_size):
            x = F.interpolate(x, tuple(out_size), mode="nearest")
        return self.conv2(x), x


class ReviewChain(nn.Module):
    """The ABFs of one (student, teacher) chain, `abfs[0]` the coarsest level (official order)."""

    def __init__(self, in_channels: Sequence[int], out_channels: Sequence[int], max_mid_channel: int):
        super().__init__()
        mid_channel = min(max_mid_channel, in_channels[-1])
        last = len(in_channels) - 1
        finest_first = [ABF(c_in, mid_channel, c_out, i < last)
                        for i, (c_in, c_out) in enumerate(zip(in_channels, out_channels))]
        self.abfs = nn.ModuleList(finest_first[::-1])

    def forward(self, student_maps: Sequence[Tensor], teacher_sizes: Sequence[Sequence[int]]) -> List[Tensor]:
        """Student maps and teacher sizes finest first -> ABF outputs finest first."""
        maps, sizes = list(student_maps)[::-1], list(teacher_sizes)[::-1]
        out, residual = self.abfs[0](maps[0], None, sizes[0])
        results = [out]
        for x, abf, size in zip(maps[1:], self.abfs[1:], sizes[1:]):
            out, residual = abf(x, residual, size)
            results.insert(0, out)
        return results


def hcl_loss(student_maps: Sequence[Tensor], teacher_maps: Sequence[Tensor]) -> Tensor:
    """Hierarchical context loss (mdistiller `hcl_loss`), in ``compute_dtype`` of the student."""
    dtype = compute_dtype(student_maps[0])
    with torch.autocast(student_maps[0].device.type, enabled=False):
        total = 0.0
        for fs, ft in zip(student_maps, teacher_maps):
            fs, ft = fs.to(dtype), ft.to(dtype)
            loss, weight, weights = F.mse_loss(fs, ft), 1.0, 1.0
            for size in HCL_POOL_SIZES:
                if size >= fs.shape[2]:
                    continue
                weight /= 2.0
                loss = loss + F.mse_loss(F.adaptive_avg_pool2d(fs, size), F.adaptive_avg_pool2d(ft, size)) * weight
                weights += weight
            total = total + loss / weights
        return total


def with_pooled(maps: List[Tensor], pooled: bool) -> List[Tensor]:
    """The maps, plus (official `pooled_feat.unsqueeze(-1).unsqueeze(-1)`) the last one's global average."""
    return maps + [maps[-1].mean((2, 3), keepdim=True)] if pooled else maps


@KD_METHODS.register("reviewkd", settings=ReviewKDConfig)
class ReviewKD(FeaturePairMethod):
    name = "reviewkd"

    def __init__(self, cfg, tasks, teacher_tasks):
        super().__init__(cfg, tasks, teacher_tasks)
        if cfg.warmup_schedule not in WARMUP_SCHEDULES:
            raise KdmtlError(f"loss.reviewkd.warmup_schedule must be one of {', '.join(WARMUP_SCHEDULES)} "
                             f"(got '{cfg.warmup_schedule}')")
        self.chains: List[Tuple[str, str, List[str], List[str]]] = []   # (term, module key, student, teacher names)

    def setup(self, student_features, teacher_features):
        chains = {}          # teacher task (or None) -> [(student name, teacher name, student map, teacher map)]
        for term, student, teacher in self.checked_terms(student_features, teacher_features):
            task = term.name.partition("@")[2] or None
            chains.setdefault(task, []).append((term.student, term.teacher, student, teacher))
        self.chains = []
        for task, chain in chains.items():
            if len(chain) != len(self.pairs):
                raise KdmtlError("loss.reviewkd.teacher: the features of one chain must come from one teacher "
                                 "(use task prefixes on all of them or on none)")
            pooled = bool(self.cfg.pooled)
            s_maps = with_pooled([s for _, _, s, _ in chain], pooled)
            t_maps = with_pooled([t for _, _, _, t in chain], pooled)
            key = "hcl" + (f"_at_{task}" if task else "")
            self.modules[key] = ReviewChain([s.shape[1] for s in s_maps], [t.shape[1] for t in t_maps],
                                            int(self.cfg.max_mid_channel))
            term = "reviewkd/hcl" + (f"@{task}" if task else "")
            self.chains.append((term, key, [s for s, _, _, _ in chain], [t for _, t, _, _ in chain]))
        self._weights = {term: float(self.cfg.weight) for term, _, _, _ in self.chains}

    def weight(self, term, progress):
        ramp = dkd_warmup(progress["epoch"], float(self.cfg.warmup_epochs), self.cfg.warmup_schedule)
        return self._weights[term] * ramp

    def __call__(self, student_out, teacher_out, batch, progress):
        s_feats, t_feats = student_out["features"], teacher_out["features"]
        terms = {}
        for term, key, student, teacher in self.chains:
            s_maps = with_pooled([s_feats[name] for name in student], bool(self.cfg.pooled))
            t_maps = with_pooled([t_feats[name] for name in teacher], bool(self.cfg.pooled))
            outputs = self.modules[key](s_maps, [t.shape[-2:] for t in t_maps])
            terms[term] = hcl_loss(outputs, t_maps)
        return terms
