"""`fitnet`: hints (Romero et al., 2015): MSE between a learned 1x1 regressor of each named
student feature and the paired teacher feature (channel and size mismatches are bridged by
the regressor). Terms `fitnet/<student module path>`."""

from __future__ import annotations

from kdmtl_cli.distill import KD_METHODS
from kdmtl_cli.distill.functional import HintRegressor, hint_loss
from kdmtl_cli.distill.pairs import FeaturePairMethod


def _key(path: str) -> str:
    return path.replace(".", "__")  # ModuleDict keys cannot hold dots


@KD_METHODS.register("fitnet")
class FitNet(FeaturePairMethod):
    name = "fitnet"

    def setup(self, student_features, teacher_features):
        for s, _, student, teacher in self.checked_pairs(student_features, teacher_features):
            self.modules[_key(s)] = HintRegressor(student.shape[1], teacher.shape[1])

    def __call__(self, student_out, teacher_out, batch, progress):
        terms = {}
        for s, t in self.pairs:
            target = teacher_out["features"][t]
            regressed = self.modules[_key(s)](student_out["features"][s], target.shape[-2:])
            terms[f"fitnet/{s}"] = hint_loss(regressed, target)
        return terms
