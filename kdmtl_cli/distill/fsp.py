"""`fsp`: flow of solution procedure matrices (Yim et al., "A Gift from Knowledge Distillation:
Fast Optimization, Network Minimization and Transfer Learning", CVPR 2017) as RepDistiller's `FSP`
(HobbitLong/RepDistiller b84f547, distiller_zoo/FSP.py).

For two consecutive feature maps of one network, bottom [N, C_b, H, W] and top [N, C_t, H, W], the
FSP matrix is G = top_flat bot_flat^T / (H W), [N, C_t, C_b] (FSP.compute_fsp L30-48: the larger
map adaptive-average-pooled to the smaller first). The loss of one consecutive pair is
mean((G_s - G_t)^2) (FSP.compute_loss L26-27), so the student's and the teacher's maps must have
the same channel counts, feature by feature (FSP.__init__ L14-17 raises otherwise).

RepDistiller takes feat[:-1] (train_student.py L254-256 and helper/pretrain.py L72-74): the stem
output and every stage output (f0, f1, f2, f3 of the CIFAR ResNets) = `trunk.stem`,
`trunk.stages.0..2` here. `loss.fsp.student` / `.teacher` list the features in network order, paired
by position; term i, `fsp/<student i>+<student i+1>` (with `@<task>` for per-task teachers), compares
the matrices between listed features i and i+1. No learned part.

The schedule is RepDistiller's two stages (train_student.py L254-263, helper/pretrain.py,
helper/loops.py L174-176): an init stage of `init_epochs` = 30 epochs (train_student.py L47
`--init_epochs 30`) trains only the student's trunk (`model_s.get_feat_modules()`: stem and
layer1..3 = `trunk` here, not the heads) on the plain sum of the FSP terms (pretrain.py L72-74, no
beta), with SGD at optim.lr (`init_lr: null`: pretrain.py L26-27 `lr = opt.learning_rate`; momentum
and weight decay from optim, L28-31) (engine/init_stage.py); the main training then runs on the task
loss alone (loops.py L174-176: `loss_kd = 0` for fsp, so `-b 50` multiplies zero there): here
`main_stage: false` adds no `fsp` term there.

Named differences from RepDistiller:

- `main_stage: true` (an option, off by default): the FSP terms are also added to the task loss in
  the main training, each weighted by `loss.fsp.weight` = beta = 50 (scripts/run_cifar_distill.sh L25
  `--distill fsp -a 0 -b 50`).
- Spatial sizes: RepDistiller compares heights only and pools to a square (t_H, t_H); here both maps
  go to (min H, min W) (the same for square maps).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, NamedTuple, Optional

import torch
from torch import Tensor

from kdmtl_cli.distill import KD_METHODS
from kdmtl_cli.distill.logit import compute_dtype
from kdmtl_cli.distill.functional import pooled_to_common_size
from kdmtl_cli.distill.pairs import FeaturePairMethod, FeaturePairsConfig
from kdmtl_cli.errors import KdmtlError
from kdmtl_cli.ranges import above, at_least

STEM_AND_STAGES = ["trunk.stem", "trunk.stages.0", "trunk.stages.1", "trunk.stages.2"]


@dataclass
class FSPConfig(FeaturePairsConfig):
    """FSP matrices as RepDistiller (conf/loss/fsp.yaml); weight is beta (main stage only); features in network order."""
    weight: float = at_least(0, default=50.0)
    init_epochs: int = at_least(0, default=30)          # epochs of the init stage (0: none)
    init_lr: Optional[float] = above(0, default=None)    # the init stage's SGD lr; null: optim.lr
    main_stage: bool = False                            # also add the terms (times weight) in the main training
    student: List[str] = field(default_factory=lambda: list(STEM_AND_STAGES))
    teacher: List[str] = field(default_factory=lambda: list(STEM_AND_STAGES))


def fsp_matrix(bottom: Tensor, top: Tensor) -> Tensor:
    """[N, C_b, H, W], [N, C_t, H', W'] -> [N, C_t, C_b]: mean over positions of top_c * bottom_c'
    (official compute_fsp: (bot.unsqueeze(1) * top.unsqueeze(2)).mean(-1); bmm avoids the
    [N, C_t, C_b, H*W] product)."""
    bottom, top = pooled_to_common_size(bottom, top)
    bottom, top = bottom.flatten(2), top.flatten(2)
    return torch.bmm(top, bottom.transpose(1, 2)) / bottom.shape[-1]


def fsp_loss(student_bottom: Tensor, student_top: Tensor, teacher_bottom: Tensor, teacher_top: Tensor) -> Tensor:
    """mean((G_s - G_t)^2) of one consecutive pair, in ``compute_dtype`` of the student."""
    dtype = compute_dtype(student_bottom)
    # Autocast would run the matmul in float16/bfloat16 again: keep it in `dtype`.
    with torch.autocast(student_bottom.device.type, enabled=False):
        g_s = fsp_matrix(student_bottom.to(dtype), student_top.to(dtype))
        g_t = fsp_matrix(teacher_bottom.to(dtype), teacher_top.to(dtype))
        if g_s.shape != g_t.shape:
            raise ValueError(f"fsp_loss: student and teacher FSP matrices differ in shape "
                             f"({tuple(g_s.shape)} vs {tuple(g_t.shape)})")
        return (g_s - g_t).pow(2).mean()


class FSPTerm(NamedTuple):
    name: str            # fsp/<student bottom>+<student top>[@task]
    student_bottom: str
    student_top: str
    teacher_bottom: str
    teacher_top: str


@KD_METHODS.register("fsp", settings=FSPConfig)
class FlowOfSolutionProcedure(FeaturePairMethod):
    name = "fsp"

    def setup(self, student_features, teacher_features):
        key = "loss.fsp"
        if len(self.pairs) < 2:
            raise KdmtlError(f"{key}.student/teacher: list at least two features in network order "
                             "(an FSP matrix joins consecutive ones)")
        chains = {}                  # teacher task (or None) -> [(pair term, student map, teacher map)]
        for term, student, teacher in self.checked_terms(student_features, teacher_features):
            task = term.name.partition("@")[2] or None
            chains.setdefault(task, []).append((term, student, teacher))
            if student.shape[1] != teacher.shape[1]:
                # RepDistiller FSP.__init__: 'num of channels not equal (error in FSP)'
                raise KdmtlError(f"{key} pair {term.student} -> {term.teacher}: FSP needs equal channel counts "
                                 f"(student {student.shape[1]}, teacher {teacher.shape[1]}); pick features "
                                 "or a student width whose channels match the teacher's")
        self.fsp_terms: List[FSPTerm] = []
        for task, chain in chains.items():
            if len(chain) != len(self.pairs):
                raise KdmtlError(f"{key}.teacher: the features of one chain must come from one teacher "
                                 "(use task prefixes on all of them or on none)")
            for (bottom, _, _), (top, _, _) in zip(chain[:-1], chain[1:]):
                name = f"fsp/{bottom.student}+{top.student}" + (f"@{task}" if task else "")
                self.fsp_terms.append(FSPTerm(name, bottom.student, top.student, bottom.teacher, top.teacher))
        self._weights = {term.name: float(self.cfg.weight) for term in self.fsp_terms}

    def _terms(self, student_out, teacher_out):
        s_feats, t_feats = student_out["features"], teacher_out["features"]
        return {term.name: fsp_loss(s_feats[term.student_bottom], s_feats[term.student_top],
                                    t_feats[term.teacher_bottom], t_feats[term.teacher_top])
                for term in self.fsp_terms}

    # ---- init stage: the student's trunk on the plain sum of the FSP terms
    def init_modules(self, student):
        return [self.student_trunk(student)]

    def init_terms(self, student_out, teacher_out, batch):
        return self._terms(student_out, teacher_out)

    def adds_main_terms(self) -> bool:
        return bool(self.cfg.main_stage)

    def __call__(self, student_out, teacher_out, batch, progress):
        if not self.cfg.main_stage:
            return {}                  # RepDistiller helper/loops.py L174-176: loss_kd = 0
        return self._terms(student_out, teacher_out)
