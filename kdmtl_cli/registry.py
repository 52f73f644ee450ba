"""Registries by name: a new data set, task kind, trunk, distillation method or weighting is one
file that registers itself here (with the typed settings it reads, if any), plus one YAML in the
matching conf/ group. kdmtl_cli/plugins.py finds the files: every module of the package's plug-in
folders, and the Python files of a user's config directory."""

from __future__ import annotations

from typing import Callable, Dict, Generic, List, Optional, TypeVar

from kdmtl_cli.errors import KdmtlError

T = TypeVar("T")


class Registry(Generic[T]):
    generation = 0   # counts registrations in any registry: derived schemas are rebuilt after one

    def __init__(self, kind: str, config_key: str):
        self.kind = kind              # what is registered ("data set", "task kind"...)
        self.config_key = config_key  # the config key that names an entry, for error messages
        self._entries: Dict[str, T] = {}
        self._settings: Dict[str, Optional[type]] = {}
        self._traits: Dict[str, dict] = {}

    def register(self, name: str, settings: Optional[type] = None, **traits) -> Callable[[T], T]:
        """Decorator: register `entry` as `name`. `settings`: a dataclass of the config keys this
        entry reads besides the group's common ones; the config schema is derived from them
        (kdmtl_cli/schema.py), so a typo'd or foreign key is refused before any work. `traits`:
        what the rest of the program asks of this entry by name (`registry.trait`)."""
        def add(entry: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} '{name}' registered twice")
            self._entries[name] = entry
            self._settings[name] = settings if settings is not None else getattr(entry, "Settings", None)
            self._traits[name] = dict(traits)
            Registry.generation += 1
            return entry

        return add

    def settings(self, name: str) -> Optional[type]:
        """The settings dataclass `name` registered with (None: it reads only the common keys)."""
        return self._settings.get(name)

    def get(self, name: str) -> T:
        if name not in self._entries:
            raise KdmtlError(f"unknown {self.kind} '{name}' in {self.config_key}; "
                             f"choose one of: {', '.join(self.names())} (one of your own plug-ins: pass the "
                             "directory holding its .py file, --config-dir DIR; kdmtl export: config_dir=DIR)")
        return self._entries[name]

    def trait(self, name: str, key: str, default=False):
        """A trait `name` was registered with (`register(name, key=value)`), else `default`."""
        return self._traits.get(name, {}).get(key, default)

    def names(self) -> List[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries
