"""`ab`: activation-boundary distillation (Heo et al., "Knowledge Transfer via Distillation of Activation
Boundaries Formed by Hidden Neurons", AAAI 2019) as RepDistiller's `ABLoss` (HobbitLong/RepDistiller
b84f547, distiller_zoo/AB.py L7-29, "code: https://github.com/bhheo/AB_distillation") with its
`Connector` (models/util.py L65-90 + `ConvReg` L131-154) and its two-stage schedule.

Per (student, teacher) pair of pre-ReLU maps (RepDistiller's `preact=True` features feat[1:-1], the
sum before the last ReLU of every stage: helper/pretrain.py L57-65 = `trunk.stages.<i>.<last block>.preact`
here), the student map goes through a connector (Connector._make_conenctors L75-83: none when channels
and height agree, else `ConvReg(s, t, use_relu=False)`: a conv chosen by the size ratio, then BN, with
PyTorch's default initialisation) and the alternative L2 of the activation boundary
(criterion_alternative_l2 L26-29), with margin m = 1.0 (L11), is summed over all elements:

    l_i = sum[(s + m)^2 * 1(s > -m and t <= 0) + (s - m)^2 * 1(s <= m and t > 0)]
    term_i = w_i * l_i / N * 3 / 1000,    w_i = 2^(i - n + 1) for the i-th of n pairs (L13, L17-24)

so the last stage weighs 1, the one before 1/2, ... One term per pair, `ab/<student feature>`
(`@<task>` with per-task teachers: each teacher's chain has its own layer weights).

The schedule is RepDistiller's (train_student.py L227-238, helper/pretrain.py, helper/loops.py L171-173):
an init stage of `init_epochs` = 30 epochs (train_student.py L47 `--init_epochs 30`) trains the connectors
and the student's trunk (`model_s.get_feat_modules()`: here `trunk`, not the heads) on the plain sum of the
terms (pretrain.py L63-67), with SGD at optim.lr (`init_lr: null`; pretrain.py L22-31); then the main
training runs on the task loss alone (loops.py L171-173 `loss_kd = 0`, so `-b 1` multiplies zero): here
`main_stage: false` adds no `ab` term there. The connectors are not trained in the main stage (RepDistiller
appends the connector to module_list only, L238, and puts it in eval mode, loops.py L76-77); they are
saved in checkpoints with the method's other parts.

Named differences from RepDistiller:

- `main_stage: true` (an option, off by default): the terms are also added in the main training, each
  times `weight` (beta; RepDistiller's script has `-b 1`, scripts/run_cifar_distill.sh L21), through the
  frozen connectors in eval mode.
- The init stage's student: RepDistiller sets model_s.eval() and then trains its feature modules in
  train mode (pretrain.py L13-14); kdmtl does the same with the trunk (engine/init_stage.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, NamedTuple, Optional

import torch
import torch.nn as nn
from torch import Tensor

from kdmtl_cli.distill import KD_METHODS
from kdmtl_cli.distill.functional import ConvReg
from kdmtl_cli.distill.logit import compute_dtype
from kdmtl_cli.distill.pairs import FeaturePairMethod, FeaturePairsConfig
from kdmtl_cli.errors import KdmtlError
from kdmtl_cli.ranges import above, at_least

# The pre-ReLU sums of every stage: the default student (conf/student/small.yaml: convnet depth 1, last
# block 0) and teacher (conf/teacher/multitask.yaml: convnet depth 2, last block 1).
STUDENT_PREACTS = [f"trunk.stages.{i}.0.preact" for i in range(3)]
TEACHER_PREACTS = [f"trunk.stages.{i}.1.preact" for i in range(3)]
SCALE = 3 / 1000       # RepDistiller AB.py L23: `l / 1000 * 3`


@dataclass
class ABConfig(FeaturePairsConfig):
    """Activation-boundary distillation as RepDistiller (conf/loss/ab.yaml); weight is beta (main stage only)."""
    weight: float = at_least(0, default=1.0)
    margin: float = at_least(0, default=1.0)          # ABLoss margin m
    init_epochs: int = at_least(0, default=30)        # epochs of the init stage (0: none)
    init_lr: Optional[float] = above(0, default=None)  # the init stage's SGD lr; null: optim.lr
    main_stage: bool = False                          # also add the terms (times weight) in the main training
    student: List[str] = field(default_factory=lambda: list(STUDENT_PREACTS))
    teacher: List[str] = field(default_factory=lambda: list(TEACHER_PREACTS))


def layer_weights(n: int) -> List[float]:
    """ABLoss.w: 2^(i - n + 1) for i = 0..n-1 (the deepest pair weighs 1)."""
    return [2.0 ** (i - n + 1) for i in range(n)]


def ab_loss(source: Tensor, target: Tensor, margin: float) -> Tensor:
    """The alternative L2 of the activation boundary summed over all elements, divided by the batch
    size N (criterion_alternative_l2 / bsz), in ``compute_dtype`` of the student map."""
    if source.shape != target.shape:
        raise ValueError(f"ab_loss: connected student and teacher maps differ in shape "
                         f"({tuple(source.shape)} vs {tuple(target.shape)})")
    dtype = compute_dtype(source)
    with torch.autocast(source.device.type, enabled=False):
        s, t = source.to(dtype), target.to(dtype)
        off = (s > -margin) & (t <= 0)          # teacher neuron inactive, student not below -m
        on = (s <= margin) & (t > 0)            # teacher neuron active, student not above m
        loss = (s + margin).pow(2) * off + (s - margin).pow(2) * on
        return loss.sum() / s.shape[0]


def connector(student_shape, teacher_shape) -> nn.Module:
    """RepDistiller Connector's part for one pair: nothing when channels and heights agree, else
    ConvReg(use_relu=False) (a conv by size ratio, then BN)."""
    if student_shape[1] == teacher_shape[1] and student_shape[2] == teacher_shape[2]:
        return nn.Identity()
    return ConvReg(student_shape, teacher_shape, use_relu=False)


class ABTerm(NamedTuple):
    name: str          # ab/<student feature>[@task]
    student: str
    teacher: str
    key: str           # the connector's ModuleDict key
    layer_weight: float


@KD_METHODS.register("ab", settings=ABConfig)
class ActivationBoundaries(FeaturePairMethod):
    name = "ab"

    def setup(self, student_features, teacher_features):
        chains: Dict[Optional[str], list] = {}
        for term, student, teacher in self.checked_terms(student_features, teacher_features):
            try:
                self.modules[term.key] = connector(tuple(student.shape), tuple(teacher.shape))
            except ValueError as err:
                raise KdmtlError(f"loss.ab pair {term.student} -> {term.teacher}: {err}") from None
            chains.setdefault(term.name.partition("@")[2] or None, []).append(term)
        self.ab_terms: List[ABTerm] = []
        for chain in chains.values():
            for term, w in zip(chain, layer_weights(len(chain))):
                self.ab_terms.append(ABTerm(term.name, term.student, term.teacher, term.key, w))

    def _terms(self, student_out, teacher_out) -> Dict[str, Tensor]:
        s_feats, t_feats = student_out["features"], teacher_out["features"]
        margin = float(self.cfg.margin)
        return {term.name: term.layer_weight * SCALE * ab_loss(self.modules[term.key](s_feats[term.student]),
                                                               t_feats[term.teacher], margin)
                for term in self.ab_terms}

    # ---- init stage: connectors + student trunk on the plain sum of the terms
    def init_modules(self, student):
        return [self.modules, self.student_trunk(student)]

    def init_terms(self, student_out, teacher_out, batch):
        return self._terms(student_out, teacher_out)

    # ---- main stage: the connectors are frozen (RepDistiller trains them in the init stage only)
    def param_groups(self, base_lr):
        for p in self.modules.parameters():
            p.requires_grad_(False)
        return []

    def adds_main_terms(self) -> bool:
        return bool(self.cfg.main_stage)

    def __call__(self, student_out, teacher_out, batch, progress):
        if not self.cfg.main_stage:
            return {}                      # RepDistiller helper/loops.py L171-173: loss_kd = 0
        self.modules.eval()                # helper/loops.py L76-77: the connector in eval mode
        return self._terms(student_out, teacher_out)
