"""`at`: attention transfer (Zagoruyko & Komodakis, ICLR 2017) as RepDistiller's `Attention`
(distiller_zoo/AT.py; helper/loops.py sums it over feat[1:-1], every stage output after the
stem): one term per (student, teacher) feature pair, `at/<student feature>`, each weighted by
`loss.at.weight` = beta (RepDistiller scripts/run_cifar_distill.sh `-b 1000`, mdistiller
AT.LOSS.FEAT_WEIGHT 1000). Maps of different sizes: the larger is average-pooled to the smaller."""

from __future__ import annotations

from kdmtl_cli.distill import KD_METHODS
from kdmtl_cli.distill.functional import at_loss
from kdmtl_cli.distill.pairs import FeaturePairMethod


@KD_METHODS.register("at")
class AttentionTransfer(FeaturePairMethod):
    name = "at"

    def setup(self, student_features, teacher_features):
        self.checked_terms(student_features, teacher_features)  # attention maps need no learned part

    def __call__(self, student_out, teacher_out, batch, progress):
        s_feats, t_feats = student_out["features"], teacher_out["features"]
        return {term.name: at_loss(s_feats[term.student], t_feats[term.teacher], float(self.cfg.p))
                for term in self.terms}
