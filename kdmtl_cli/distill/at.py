"""`at`: attention transfer (Zagoruyko & Komodakis, 2017) on named (student, teacher) feature
pairs: the weight is the paper's beta; one term per pair, `at/<student module path>`."""

from __future__ import annotations

from kdmtl_cli.distill import KD_METHODS
from kdmtl_cli.distill.functional import at_loss
from kdmtl_cli.distill.pairs import FeaturePairMethod


@KD_METHODS.register("at")
class AttentionTransfer(FeaturePairMethod):
    name = "at"

    def setup(self, student_features, teacher_features):
        self.checked_pairs(student_features, teacher_features)  # attention maps need no learned part

    def __call__(self, student_out, teacher_out, batch, progress):
        return {f"at/{s}": at_loss(student_out["features"][s], teacher_out["features"][t], float(self.cfg.p))
                for s, t in self.pairs}
