"""Feature pairs named in config by module path, checked at start."""

from __future__ import annotations

from typing import List, Tuple

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
