"""Registries by name: a new data set, task kind, model or KD method is one file
that registers itself here, plus one YAML in the matching conf/ group."""

from __future__ import annotations

from typing import Callable, Dict, Generic, List, TypeVar

from kdmtl_cli.errors import KdmtlError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, config_key: str):
        self.kind = kind              # what is registered ("data set", "task kind"...)
        self.config_key = config_key  # the config key that names an entry, for error messages
        self._entries: Dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(entry: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} '{name}' registered twice")
            self._entries[name] = entry
            return entry

        return add

    def get(self, name: str) -> T:
        if name not in self._entries:
            raise KdmtlError(f"unknown {self.kind} '{name}' in {self.config_key}; "
                             f"choose one of: {', '.join(self.names())}")
        return self._entries[name]

    def names(self) -> List[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries
