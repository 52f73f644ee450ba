"""Feature pairs named in config by module path, checked at start."""

from __future__ import annotations

from typing import List, Tuple

from kdmtl_cli.distill import Method
from kdmtl_cli.errors import KdmtlError


def feature_pairs(cfg, key: str) -> List[Tuple[str, str]]:
    student, teacher = list(cfg.student), list(cfg.teacher)
    if not student or len(student) != len(teacher):
        raise KdmtlError(f"{key}.student and {key}.teacher must list the same number (>= 1) of module paths "
                         f"(got {len(student)} and {len(teacher)})")
    return list(zip(student, teacher))


def check_pair_shapes(key: str, student_feature, teacher_feature, need_same_size: bool = False) -> None:
    """Feature maps must be [N, C, H, W]; spatial sizes are bridged unless need_same_size."""
    if student_feature.dim() != 4 or teacher_feature.dim() != 4:
        raise KdmtlError(f"{key}: features must be [N, C, H, W] maps (got {tuple(student_feature.shape)} and "
                         f"{tuple(teacher_feature.shape)}); pick convolutional modules")
    if need_same_size and student_feature.shape[-2:] != teacher_feature.shape[-2:]:
        raise KdmtlError(f"{key}: spatial sizes differ ({tuple(student_feature.shape[-2:])} vs "
                         f"{tuple(teacher_feature.shape[-2:])})")


def require_feature(features, name: str, key: str, side: str):
    """The captured feature `name`, or a one-line error naming the config key and what exists."""
    if name in features:
        return features[name]
    per_task = sorted(k for k in features if k.endswith(":" + name))
    hint = (f"; with per-task teachers name one, e.g. {per_task[0]}" if per_task
            else f"; captured: {', '.join(sorted(features))}")
    raise KdmtlError(f"{key}: the {side} has no feature '{name}'{hint}")


class FeaturePairMethod(Method):
    """A method over (student, teacher) module-path pairs from `loss.<name>.student/teacher`,
    one term `<name>/<student path>` per pair, all with `loss.<name>.weight`."""

    def __init__(self, cfg, tasks, teacher_tasks):
        super().__init__(cfg, tasks, teacher_tasks)
        self.pairs = feature_pairs(cfg, f"loss.{self.name}")
        self.student_features = [s for s, _ in self.pairs]
        self.teacher_features = [t for _, t in self.pairs]
        self._weights = {f"{self.name}/{s}": float(cfg.weight) for s, _ in self.pairs}

    def checked_pairs(self, student_features, teacher_features) -> List[Tuple[str, str, object, object]]:
        """(student path, teacher path, student map, teacher map) for each pair, checked."""
        key = f"loss.{self.name}"
        out = []
        for s, t in self.pairs:
            student = require_feature(student_features, s, key, "student")
            teacher = require_feature(teacher_features, t, key, "teacher")
            check_pair_shapes(f"{key} pair {s} -> {t}", student, teacher)
            out.append((s, t, student, teacher))
        return out
