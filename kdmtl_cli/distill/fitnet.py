"""`fitnet`: hints (Romero et al., ICLR 2015) as RepDistiller (`--distill hint`): the student
feature goes through a learned regressor, RepDistiller's `ConvReg` (models/util.py: a conv
chosen by the two spatial sizes, with bias, + BN + ReLU), and the loss is `HintLoss` = MSE to
the teacher feature. Terms `fitnet/<student feature>`, weight `loss.fitnet.weight` (RepDistiller
`-b 100`, mdistiller FITNET.LOSS.FEAT_WEIGHT 100). `loss.fitnet.regressor=conv1x1` (not
official) bridges size ratios that ConvReg cannot: a 1x1 conv + BN, then a bilinear resize."""

from __future__ import annotations

from dataclasses import dataclass

from kdmtl_cli.ranges import at_least

from kdmtl_cli.distill import KD_METHODS
from kdmtl_cli.distill.functional import REGRESSORS, HintRegressor, hint_loss
from kdmtl_cli.distill.pairs import FeaturePairMethod, FeaturePairsConfig
from kdmtl_cli.errors import KdmtlError


@dataclass
class FitNetConfig(FeaturePairsConfig):
    """FitNet hints as RepDistiller (conf/loss/fitnet.yaml)."""
    weight: float = at_least(0, default=100.0)
    regressor: str = "convreg"            # convreg: RepDistiller's ConvReg | conv1x1: 1x1 conv + BN + resize (any sizes)


@KD_METHODS.register("fitnet", settings=FitNetConfig)
class FitNet(FeaturePairMethod):
    name = "fitnet"

    def __init__(self, cfg, tasks, teacher_tasks):
        super().__init__(cfg, tasks, teacher_tasks)
        if cfg.regressor not in REGRESSORS:
            raise KdmtlError(f"loss.fitnet.regressor must be one of {', '.join(REGRESSORS)} (got '{cfg.regressor}')")

    def setup(self, student_features, teacher_features):
        for term, student, teacher in self.checked_terms(student_features, teacher_features):
            try:
                self.modules[term.key] = HintRegressor(tuple(student.shape), tuple(teacher.shape), self.cfg.regressor)
            except ValueError as err:
                raise KdmtlError(f"loss.fitnet pair {term.student} -> {term.teacher}: {err}; pick features whose "
                                 "sizes ConvReg supports or set loss.fitnet.regressor=conv1x1 (not RepDistiller's)") from None

    def __call__(self, student_out, teacher_out, batch, progress):
        s_feats, t_feats = student_out["features"], teacher_out["features"]
        return {term.name: hint_loss(self.modules[term.key](s_feats[term.student]), t_feats[term.teacher])
                for term in self.terms}
