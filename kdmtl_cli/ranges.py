"""Allowed ranges of numeric settings, declared beside each field in schema.py, checked before any work.

A field says its range where it is declared::

    batch_size: int = at_least(1, default=64)
    momentum: float = between(0, 1, default=0.9, high_open=True)
    max_objects: int = at_least("min_objects", default=4)     # a bound may name a sibling field

and ``check_ranges(cfg, TrainConfig)`` walks the validated config beside its schema and raises one
KdmtlError line naming the first value outside its range, e.g.
``data.batch_size must be >= 1 (got 0)``. A field typed ``Optional[...]`` also accepts null; a
per-task setting (a number or {task: number}) has each of its values checked; a list of numbers
has each element checked. Types are not checked here: ``schema.validate`` already did that.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Real
from pathlib import Path
from typing import Any, Iterable, Optional, Union

from kdmtl_cli.errors import KdmtlError

Bound = Union[int, float, str, None]    # a number, the name of a sibling field, or no bound
_KEY = "range"                          # the dataclass field metadata key


@dataclass(frozen=True)
class Range:
    low: Bound = None
    high: Bound = None
    low_open: bool = False               # > low instead of >= low
    high_open: bool = False              # < high instead of <= high
    note: str = ""                       # what a boundary value means, e.g. "0 = off"

    def _value(self, bound: Bound, siblings) -> Optional[float]:
        return siblings[bound] if isinstance(bound, str) else bound

    def contains(self, value: float, siblings) -> bool:
        # written as "not outside" so that nan, which compares false to everything, is refused
        if not math.isfinite(value):
            return False
        low, high = self._value(self.low, siblings), self._value(self.high, siblings)
        if low is not None and (value <= low if self.low_open else value < low):
            return False
        if high is not None and (value >= high if self.high_open else value > high):
            return False
        return True

    def describe(self, prefix: str, siblings) -> str:
        """`>= 1`, `> 0`, `in [0, 1)`, `>= data.min_objects (2)`; `prefix` is the parent's dotted key."""
        def show(bound: Bound) -> str:
            if isinstance(bound, str):
                return f"{prefix}{bound} ({siblings[bound]})"
            return str(bound) if isinstance(bound, int) else f"{bound:g}"

        if self.low is not None and self.high is not None:
            return (f"in {'(' if self.low_open else '['}{show(self.low)}, "
                    f"{show(self.high)}{')' if self.high_open else ']'}")
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {show(self.low)}"
        return f"{'<' if self.high_open else '<='} {show(self.high)}"


def _field(rule: Range, default: Any, factory: Any) -> Any:
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata={_KEY: rule})
    return dataclasses.field(default=default, metadata={_KEY: rule})


def at_least(low: Bound, default: Any = None, *, note: str = "", factory: Any = None) -> Any:
    """A field whose values must be >= low (a number or a sibling field's name)."""
    return _field(Range(low=low, note=note), default, factory)


def above(low: Bound, default: Any = None, *, note: str = "", factory: Any = None) -> Any:
    """A field whose values must be > low."""
    return _field(Range(low=low, low_open=True, note=note), default, factory)


def between(low: Bound, high: Bound, default: Any = None, *, high_open: bool = False, note: str = "",
            factory: Any = None) -> Any:
    """A field whose values must lie in [low, high] (or [low, high) with high_open)."""
    return _field(Range(low=low, high=high, high_open=high_open, note=note), default, factory)


def field_range(f: dataclasses.Field) -> Optional[Range]:
    return f.metadata.get(_KEY)


# -- the walk ----------------------------------------------------------------------------------

def _is_number(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def _strip_optional(hint: Any) -> tuple:
    """(the type inside Optional[...], whether None is allowed)."""
    if typing.get_origin(hint) is Union and type(None) in typing.get_args(hint):
        rest = [a for a in typing.get_args(hint) if a is not type(None)]
        return (rest[0] if len(rest) == 1 else Union[tuple(rest)]), True
    return hint, False


def _is_schema(hint: Any) -> bool:
    return isinstance(hint, type) and dataclasses.is_dataclass(hint)


def _fail(key: str, value: Any, rule: Range, optional: bool, prefix: str, siblings, source: str) -> None:
    shown = value if _is_number(value) else repr(value)
    kind = "" if _is_number(value) else "a number "
    text = f"{key} must be {kind}{rule.describe(prefix, siblings)}{' or null' if optional else ''} (got {shown})"
    if rule.note:
        text += f"; {rule.note}"
    raise KdmtlError(f"{source}: {text}" if source else text)


def _check_value(key: str, value: Any, rule: Range, optional: bool, prefix: str, siblings, source: str) -> None:
    if value is None and optional:
        return
    if hasattr(value, "items"):        # a per-task setting given as {task: number}: each value
        for name, item in value.items():
            _check_value(f"{key}.{name}", item, rule, False, prefix, siblings, source)
        return
    if isinstance(value, Sequence) and not isinstance(value, str):
        for i, item in enumerate(value):  # a list of numbers (data.std, optim.milestones): each element
            _check_value(f"{key}[{i}]", item, rule, False, prefix, siblings, source)
        return
    if not _is_number(value) or not rule.contains(value, siblings):
        _fail(key, value, rule, optional, prefix, siblings, source)


def _wanted(key: str, only: Optional[Iterable[str]]) -> bool:
    """Is `key` one of `only`, inside one, or on the way to one?"""
    return only is None or any(key == k or key.startswith(k + ".") or k.startswith(key + ".") for k in only)


def check_ranges(cfg: Any, schema: type, *, only: Optional[Iterable[str]] = None,
                 source: Union[str, Path, None] = None, _prefix: str = "") -> None:
    """Raise a one-line KdmtlError for the first value of `cfg` (a validated config, or any
    mapping) outside the range its `schema` field declares. `only`: dotted keys to check (with
    everything under them), e.g. the parts of a saved config a command uses; `source`: the file
    the config came from, named in the message."""
    only = list(only) if only is not None else None
    source = str(source) if source else ""
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        key = _prefix + f.name
        if not _wanted(key, only) or f.name not in cfg:
            continue
        value = cfg[f.name]
        hint, optional = _strip_optional(hints[f.name])
        rule = field_range(f)
        if rule is not None:
            _check_value(key, value, rule, optional, _prefix, cfg, source)
        if value is None:
            continue
        origin, args = typing.get_origin(hint), typing.get_args(hint)
        if _is_schema(hint):
            check_ranges(value, hint, only=only, source=source, _prefix=key + ".")
        elif origin in (dict, typing.Dict) and args and _is_schema(args[-1]):
            for name in value:
                check_ranges(value[name], args[-1], only=only, source=source, _prefix=f"{key}.{name}.")
        elif origin in (list, typing.List) and args and _is_schema(args[0]):
            for i, item in enumerate(value):
                check_ranges(item, args[0], only=only, source=source, _prefix=f"{key}[{i}].")
