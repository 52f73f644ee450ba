"""`at`: attention transfer (Zagoruyko & Komodakis, 2017) on named (student, teacher) feature
pairs: the weight is the paper's beta; one term per pair, `at/<student module path>`."""

from __future__ import annotations

from kdmtl_cli.distill import KD_METHODS, Method
from kdmtl_cli.distill.functional import at_loss
from kdmtl_cli.distill.pairs import check_pair_shapes, feature_pairs, require_feature


@KD_METHODS.register("at")
class AttentionTransfer(Method):
    name = "at"

    def __init__(self, cfg, tasks, teacher_tasks):
        super().__init__(cfg, tasks, teacher_tasks)
        self.pairs = feature_pairs(cfg, "loss.at")
        self.student_features = [s for s, _ in self.pairs]
        self.teacher_features = [t for _, t in self.pairs]
        self._weights = {f"at/{s}": float(cfg.weight) for s, _ in self.pairs}

    def setup(self, student_features, teacher_features):
        for s, t in self.pairs:
            check_pair_shapes(f"loss.at pair {s} -> {t}", require_feature(student_features, s, "loss.at", "student"),
                              require_feature(teacher_features, t, "loss.at", "teacher"))

    def __call__(self, student_out, teacher_out, batch, progress):
        return {f"at/{s}": at_loss(student_out["features"][s], teacher_out["features"][t], float(self.cfg.p))
                for s, t in self.pairs}
