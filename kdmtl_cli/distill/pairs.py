"""Features named in config, and (student, teacher) feature pairs, checked at start.

A feature name is ``[<task>:]<module path>[/<i>]``:

- ``trunk.stages.2``: the output of that module (a forward hook);
- ``trunk/1``: element ``i`` of a module whose output is a list or tuple (``trunk/-1`` the last),
  e.g. a trunk's returned features, finest first (SegNet: ``trunk/0`` the decoder output,
  ``trunk/1`` the pooled bottleneck);
- ``seg:trunk.stages.2``: with `teacher=per_task`, that module of the `seg` task's teacher.

On the teacher side a name WITHOUT a task prefix means, with per-task teachers, the same
module in every task's teacher: a pair then gives one term per teacher task
(``<method>/<student name>@<task>``); with one multi-task teacher it gives one term
(``<method>/<student name>``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch

from kdmtl_cli.distill import Method
from kdmtl_cli.errors import KdmtlError
from kdmtl_cli.ranges import at_least


def split_name(name: str) -> Tuple[Optional[str], str, Optional[int]]:
    """``[task:]path[/i]`` -> (task or None, module path, index or None)."""
    task, _, rest = name.rpartition(":") if ":" in name else (None, "", name)
    path, slash, index = rest.partition("/")
    if slash:
        try:
            return task or None, path, int(index)
        except ValueError:
            raise KdmtlError(f"feature name '{name}': after '/' comes an output index (e.g. trunk/1)") from None
    return task or None, path, None


def module_path(name: str) -> str:
    """The module a feature name hooks (task prefix kept, output index dropped)."""
    task, path, _ = split_name(name)
    return f"{task}:{path}" if task else path


def as_list(value) -> List[str]:
    """A config value naming one feature (a string) or several (a list) as a list of names."""
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value]


def feature_pairs(cfg, key: str) -> List[Tuple[str, str]]:
    student, teacher = as_list(cfg.student), as_list(cfg.teacher)
    if not student or len(student) != len(teacher):
        raise KdmtlError(f"{key}.student and {key}.teacher must list the same number (>= 1) of module paths "
                         f"(got {len(student)} and {len(teacher)})")
    for name in student:
        if split_name(name)[0] is not None:
            raise KdmtlError(f"{key}.student: '{name}' has a task prefix; student features are plain module paths")
    return list(zip(student, teacher))


def check_pair_shapes(key: str, student_feature, teacher_feature, need_same_size: bool = False) -> None:
    """Feature maps must be [N, C, H, W]; spatial sizes are bridged unless need_same_size."""
    for feature in (student_feature, teacher_feature):
        if not isinstance(feature, torch.Tensor):
            raise KdmtlError(f"{key}: a feature is a {type(feature).__name__}, not a tensor; "
                             "pick one element of it with /<i> (e.g. trunk/0)")
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


def teacher_names(name: str, teacher_features: Dict[str, object], teacher_tasks: List[str]) -> List[Tuple[Optional[str], str]]:
    """[(teacher task or None, captured key)] that a teacher-side name stands for: itself (one
    multi-task teacher, or an explicit `task:` prefix), or `<task>:<name>` for every teacher task
    when the teachers are per task and the name has no prefix."""
    task = split_name(name)[0]
    if task is not None:
        return [(task, name)]
    if name in teacher_features:
        return [(None, name)]
    expanded = [(t, f"{t}:{name}") for t in teacher_tasks if f"{t}:{name}" in teacher_features]
    return expanded or [(None, name)]


@dataclass
class FeaturePairsConfig:
    """Student/teacher features (forward hooks; `[task:]path[/i]`), paired by position."""
    weight: float = at_least(0, default=1.0)
    student: List[str] = field(default_factory=lambda: ["trunk.stages.1"])
    teacher: List[str] = field(default_factory=lambda: ["trunk.stages.1"])


class Term(NamedTuple):
    name: str          # the logged term, e.g. at/trunk.stages.1 or at/trunk.stages.1@seg
    student: str       # captured student feature
    teacher: str       # captured teacher feature
    key: str           # ModuleDict key of the term's learned part


class FeaturePairMethod(Method):
    """A method over (student, teacher) feature pairs from `loss.<name>.student/teacher`,
    one term per pair (per pair and teacher task with per-task teachers and an unprefixed
    teacher name), all weighted `loss.<name>.weight`, none tied to a task."""

    def __init__(self, cfg, tasks, teacher_tasks):
        super().__init__(cfg, tasks, teacher_tasks)
        self.pairs = feature_pairs(cfg, f"loss.{self.name}")
        self.student_features = [s for s, _ in self.pairs]
        self.teacher_features = [t for _, t in self.pairs]
        self.terms: List[Term] = []

    def checked_terms(self, student_features, teacher_features) -> List[Tuple[Term, object, object]]:
        """The method's terms for these captured features, each with its (student, teacher) map, checked."""
        key = f"loss.{self.name}"
        terms, seen = [], set()
        for s, t in self.pairs:
            student = require_feature(student_features, s, key, "student")
            for task, captured in teacher_names(t, teacher_features, self.teacher_tasks):
                teacher = require_feature(teacher_features, captured, key, "teacher")
                check_pair_shapes(f"{key} pair {s} -> {captured}", student, teacher)
                name = f"{self.name}/{s}" + (f"@{task}" if task else "")
                if name in seen:
                    raise KdmtlError(f"{key}: the pair {s} -> {captured} repeats term {name}; list each pair once")
                seen.add(name)
                module_key = name.partition("/")[2].replace(".", "__")   # ModuleDict keys cannot hold dots
                terms.append((Term(name, s, captured, module_key), student, teacher))
        self.terms = [term for term, _, _ in terms]
        self._weights = {term.name: float(self.cfg.weight) for term in self.terms}
        return terms
