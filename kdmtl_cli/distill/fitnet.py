"""`fitnet`: hints (Romero et al., 2015): MSE between a learned 1x1 regressor of each named
student feature and the paired teacher feature (channel and size mismatches are bridged by
the regressor). Terms `fitnet/<student module path>`."""

from __future__ import annotations

from kdmtl_cli.distill import KD_METHODS, Method
from kdmtl_cli.distill.functional import HintRegressor, hint_loss
from kdmtl_cli.distill.pairs import check_pair_shapes, feature_pairs, require_feature


def _key(path: str) -> str:
    return path.replace(".", "__")  # ModuleDict keys cannot hold dots


@KD_METHODS.register("fitnet")
class FitNet(Method):
    name = "fitnet"

    def __init__(self, cfg, tasks, teacher_tasks):
        super().__init__(cfg, tasks, teacher_tasks)
        self.pairs = feature_pairs(cfg, "loss.fitnet")
        self.student_features = [s for s, _ in self.pairs]
        self.teacher_features = [t for _, t in self.pairs]
        self._weights = {f"fitnet/{s}": float(cfg.weight) for s, _ in self.pairs}

    def setup(self, student_features, teacher_features):
        for s, t in self.pairs:
            student = require_feature(student_features, s, "loss.fitnet", "student")
            teacher = require_feature(teacher_features, t, "loss.fitnet", "teacher")
            check_pair_shapes(f"loss.fitnet pair {s} -> {t}", student, teacher)
            self.modules[_key(s)] = HintRegressor(student.shape[1], teacher.shape[1])

    def __call__(self, student_out, teacher_out, batch, progress):
        terms = {}
        for s, t in self.pairs:
            target = teacher_out["features"][t]
            regressed = self.modules[_key(s)](student_out["features"][s], target.shape[-2:])
            terms[f"fitnet/{s}"] = hint_loss(regressed, target)
        return terms
