"""`ft`: factor transfer (Kim et al., "Paraphrasing Complex Network: Network Compression via Factor
Transfer", NeurIPS 2018) as RepDistiller's `FactorTransfer` (HobbitLong/RepDistiller b84f547,
distiller_zoo/FT.py L7-31) with its `Paraphraser` and `Translator` (models/util.py L7-62) and its
two-stage schedule (train_student.py L239-253, helper/pretrain.py, helper/loops.py L177-180).

Per (student, teacher) map pair (RepDistiller: feat[-2], the last stage's output after its ReLU, before
pooling = `trunk.stages.2` here):

- a paraphraser (models/util.py L7-41) on the teacher map: encoder conv3x3 C_t -> C_t, C_t -> k C_t,
  k C_t -> k C_t, decoder convtranspose3x3 k C_t -> k C_t, k C_t -> C_t, C_t -> C_t, each (with bias)
  followed by BN if `paraphraser_bn` (default false, L9) and LeakyReLU(0.1); rate k = 0.5 (L9);
- a translator (L44-62) on the student map: the encoder's three convs C_s -> C_s -> k C_t -> k C_t with
  BN (`translator_bn` default true, L45) and LeakyReLU(0.1);
- factor(f) = l2-normalise over positions of mean_c f^p1 (FT.py L30-31, p1 = 2, L9); the term is
  mean |factor(translator(s)) - factor(paraphraser.encoder(t))|^p2 (L25-28, p2 = 1: the abs), the
  larger map average-pooled to the smaller first (L18-24). One term per pair, `ft/<student feature>`
  (`@<task>` with per-task teachers), times `weight` = beta = 200 (scripts/run_cifar_distill.sh L23
  `--distill factor -a 0 -b 200`).

Schedule, as RepDistiller: an init stage of `init_epochs` = 30 (train_student.py L47) trains only the
paraphrasers, to reconstruct the teacher map (loss = MSE(decoder(encoder(t)), t), nn.MSELoss,
train_student.py L247, pretrain.py L68-71), with SGD at `init_lr` = 0.01 (pretrain.py L22-25: 0.01 for
`factor` with the CIFAR ResNet/WRN students); the init terms are logged as `init/ft/<student feature>`.
In the main stage the translators are trained with the student (train_student.py L253) and the
paraphrasers are frozen, in eval mode (L251-252 module_list only; loops.py L78-79).

Named differences from RepDistiller:

- Spatial sizes: RepDistiller compares heights only and pools to a square (t_H, t_H); here both maps
  go to (min H, min W) (the same for square maps).
- init_lr: RepDistiller uses 0.01 only for its CIFAR ResNet/WRN students and opt.learning_rate for the
  others (pretrain.py L22-27); kdmtl uses `init_lr` = 0.01 for every student (null: optim.lr).
- The teacher's factor is computed without gradient (the paraphraser is frozen there; RepDistiller
  builds the graph but its optimiser does not hold the paraphraser: the same values and steps).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from kdmtl_cli.distill import KD_METHODS
from kdmtl_cli.distill.functional import pooled_to_common_size
from kdmtl_cli.distill.logit import compute_dtype
from kdmtl_cli.distill.pairs import FeaturePairMethod, FeaturePairsConfig
from kdmtl_cli.errors import KdmtlError
from kdmtl_cli.ranges import above, at_least, between


@dataclass
class FTConfig(FeaturePairsConfig):
    """Factor transfer as RepDistiller (conf/loss/ft.yaml); weight is beta."""
    weight: float = at_least(0, default=200.0)
    p1: int = at_least(1, default=2)                   # FactorTransfer p1: factor = normalise(mean_c f^p1)
    p2: int = at_least(1, default=1)                   # FactorTransfer p2: mean |diff|^p2 (1: abs)
    rate: float = between(0, 1, default=0.5)   # Paraphraser / Translator k: factor channels = int(k C_t)
    paraphraser_bn: bool = False                       # Paraphraser use_bn
    translator_bn: bool = True                         # Translator use_bn
    init_epochs: int = at_least(0, default=30)         # epochs of the paraphrasers' init stage (0: none)
    init_lr: Optional[float] = above(0, default=0.01)  # the init stage's SGD lr; null: optim.lr
    student: List[str] = field(default_factory=lambda: ["trunk.stages.2"])
    teacher: List[str] = field(default_factory=lambda: ["trunk.stages.2"])


def _conv_stack(convs, use_bn: bool) -> nn.Sequential:
    """conv, BN (or an empty Sequential, as RepDistiller, so the state-dict keys match), LeakyReLU(0.1), ..."""
    layers = []
    for conv in convs:
        layers += [conv, nn.BatchNorm2d(conv.out_channels) if use_bn else nn.Sequential(), nn.LeakyReLU(0.1)]
    return nn.Sequential(*layers)


class Paraphraser(nn.Module):
    """RepDistiller's Paraphraser (its state dict loads there): an encoder to int(k C) factor channels
    and a decoder back to C, 3x3 convs with padding 1."""

    def __init__(self, channels: int, rate: float, use_bn: bool):
        super().__init__()
        factor = int(channels * rate)
        self.encoder = _conv_stack([nn.Conv2d(channels, channels, 3, 1, 1), nn.Conv2d(channels, factor, 3, 1, 1),
                                    nn.Conv2d(factor, factor, 3, 1, 1)], use_bn)
        self.decoder = _conv_stack([nn.ConvTranspose2d(factor, factor, 3, 1, 1),
                                    nn.ConvTranspose2d(factor, channels, 3, 1, 1),
                                    nn.ConvTranspose2d(channels, channels, 3, 1, 1)], use_bn)

    def forward(self, x: Tensor) -> Tensor:
        """The reconstruction decoder(encoder(x)); the factor is `self.encoder(x)`."""
        return self.decoder(self.encoder(x))


class Translator(nn.Module):
    """RepDistiller's Translator: the student map to int(k C_t) factor channels."""

    def __init__(self, student_channels: int, teacher_channels: int, rate: float, use_bn: bool):
        super().__init__()
        factor = int(teacher_channels * rate)
        self.encoder = _conv_stack([nn.Conv2d(student_channels, student_channels, 3, 1, 1),
                                    nn.Conv2d(student_channels, factor, 3, 1, 1),
                                    nn.Conv2d(factor, factor, 3, 1, 1)], use_bn)

    def forward(self, x: Tensor) -> Tensor:
        return self.encoder(x)


class FactorPair(nn.Module):
    def __init__(self, student_channels: int, teacher_channels: int, cfg):
        super().__init__()
        self.paraphraser = Paraphraser(teacher_channels, cfg.rate, cfg.paraphraser_bn)
        self.translator = Translator(student_channels, teacher_channels, cfg.rate, cfg.translator_bn)


def factor(f: Tensor, p1: int) -> Tensor:
    """[N, C, H, W] -> [N, H W]: mean over channels of f^p1, l2-normalised per sample (F.normalize)."""
    return F.normalize(f.pow(p1).mean(1).flatten(1))


def ft_loss(factor_s: Tensor, factor_t: Tensor, p1: int, p2: int) -> Tensor:
    """FactorTransfer.factor_loss: mean |factor(s) - factor(t)|^p2 (p2 = 1: abs; else the plain power, as
    RepDistiller), the larger map pooled to the smaller first; in ``compute_dtype`` of the student."""
    dtype = compute_dtype(factor_s)
    with torch.autocast(factor_s.device.type, enabled=False):
        s, t = pooled_to_common_size(factor_s.to(dtype), factor_t.to(dtype))
        diff = factor(s, p1) - factor(t, p1)
        return diff.abs().mean() if p2 == 1 else diff.pow(p2).mean()


@KD_METHODS.register("ft", settings=FTConfig)
class FactorTransfer(FeaturePairMethod):
    name = "ft"

    def setup(self, student_features, teacher_features):
        for term, student, teacher in self.checked_terms(student_features, teacher_features):
            if int(teacher.shape[1] * self.cfg.rate) < 1:
                raise KdmtlError(f"loss.ft.rate={self.cfg.rate}: int(rate x {teacher.shape[1]} teacher channels of "
                                 f"{term.teacher}) is 0 factor channels; raise the rate")
            self.modules[term.key] = FactorPair(student.shape[1], teacher.shape[1], self.cfg)

    # ---- init stage: the paraphrasers learn to reconstruct the teacher maps
    def init_modules(self, student):
        return [pair.paraphraser for pair in self.modules.values()]

    def init_terms(self, student_out, teacher_out, batch):
        t_feats = teacher_out["features"]
        terms = {}
        for term in self.terms:
            target = t_feats[term.teacher].detach()
            rec = self.modules[term.key].paraphraser(target)
            dtype = compute_dtype(rec)
            terms[term.name] = F.mse_loss(rec.to(dtype), target.to(dtype))   # nn.MSELoss: the mean
        return terms

    # ---- main stage: translators trained with the student, paraphrasers frozen
    def param_groups(self, base_lr):
        for pair in self.modules.values():
            for p in pair.paraphraser.parameters():
                p.requires_grad_(False)
        params = [p for pair in self.modules.values() for p in pair.translator.parameters()]
        return [{"params": params, "lr": base_lr}] if params else []

    def __call__(self, student_out, teacher_out, batch, progress):
        s_feats, t_feats = student_out["features"], teacher_out["features"]
        p1, p2 = int(self.cfg.p1), int(self.cfg.p2)
        terms = {}
        for term in self.terms:
            pair = self.modules[term.key]
            pair.paraphraser.eval()        # helper/loops.py L78-79
            with torch.no_grad():
                factor_t = pair.paraphraser.encoder(t_feats[term.teacher])
            terms[term.name] = ft_loss(pair.translator(s_feats[term.student]), factor_t, p1, p2)
        return terms
