"""`at`: attention transfer (Zagoruyko & Komodakis, ICLR 2017) as RepDistiller's `Attention`
(distiller_zoo/AT.py; helper/loops.py sums it over feat[1:-1], every stage output after the
stem): one term per (student, teacher) feature pair, `at/<student feature>`, each weighted by
`loss.at.weight` = beta (RepDistiller scripts/run_cifar_distill.sh `-b 1000`, mdistiller
AT.LOSS.FEAT_WEIGHT 1000). Maps of different sizes: the larger is average-pooled to the smaller."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

from kdmtl_cli.ranges import above, at_least

from kdmtl_cli.distill import KD_METHODS
from kdmtl_cli.distill.functional import at_loss
from kdmtl_cli.distill.pairs import FeaturePairMethod, FeaturePairsConfig


@dataclass
class ATConfig(FeaturePairsConfig):
    """Attention transfer as RepDistiller (conf/loss/at.yaml); weight is the paper's beta."""
    weight: float = at_least(0, default=1000.0)
    p: float = above(0, default=2.0)        # attention map mean_c F^p
    student: List[str] = field(default_factory=lambda: ["trunk.stages.0", "trunk.stages.1", "trunk.stages.2"])
    teacher: List[str] = field(default_factory=lambda: ["trunk.stages.0", "trunk.stages.1", "trunk.stages.2"])


@KD_METHODS.register("at", settings=ATConfig)
class AttentionTransfer(FeaturePairMethod):
    name = "at"

    def setup(self, student_features, teacher_features):
        self.checked_terms(student_features, teacher_features)  # attention maps need no learned part

    def __call__(self, student_out, teacher_out, batch, progress):
        s_feats, t_feats = student_out["features"], teacher_out["features"]
        return {term.name: at_loss(s_feats[term.student], t_feats[term.teacher], float(self.cfg.p))
                for term in self.terms}
