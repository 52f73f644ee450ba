"""Finding plug-ins: data sets, task kinds, trunks, distillation methods and weightings.

A plug-in is one Python file that registers itself in its registry (``DATASETS``,
``TASK_KINDS``, ``TRUNKS``, ``KD_METHODS``, ``WEIGHTINGS``) with the typed settings it reads,
plus one YAML in the matching config group. Nothing else lists it:

- built-in plug-ins: every module of the package folders in ``PLUGIN_PACKAGES`` is imported
  (``load_builtin``), so a new built-in is its file and its YAML;
- a user's plug-ins: every ``*.py`` file at the top of the directory given to ``--config-dir``
  is imported before the config is composed (``load_user``), with that directory on
  ``sys.path`` so its files can import each other and a config can name their classes
  (``student.trunk._target_: my_trunks.UNet``). The YAMLs sit in the group folders beside them
  (``DIR/loss/my_method.yaml``). A config directory holding Python files is code: kdmtl runs it,
  as ``python DIR/x.py`` would. YAML files, data files and checkpoints never make kdmtl import
  anything (see ``resolve_target``).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import pkgutil
import sys
from pathlib import Path
from typing import Dict, List, Optional

from kdmtl_cli.errors import KdmtlError

PLUGIN_PACKAGES = ("kdmtl_cli.data", "kdmtl_cli.tasks", "kdmtl_cli.models", "kdmtl_cli.distill",
                   "kdmtl_cli.weighting")

# Modules of a user's config directory that were imported, by module name -> file.
_USER_MODULES: Dict[str, Path] = {}
_USER_DIRS: List[Path] = []


@functools.lru_cache(maxsize=None)
def load_builtin() -> None:
    """Import every module of the plug-in packages (each registers what it defines)."""
    for package_name in PLUGIN_PACKAGES:
        package = importlib.import_module(package_name)
        for info in pkgutil.iter_modules(package.__path__):
            if not info.name.startswith("_"):
                importlib.import_module(f"{package_name}.{info.name}")


def user_files(directory: Path) -> List[Path]:
    """The plug-in files of a config directory: its top-level ``*.py`` files, sorted."""
    return sorted(p for p in Path(directory).glob("*.py") if p.is_file() and not p.name.startswith("."))


def load_user(directory) -> List[str]:
    """Import the plug-in files of the config directory `directory` (once per process) and
    return their module names. A file whose name is that of a module imported from elsewhere
    (``torch.py``) is refused: it would shadow that module."""
    if directory is None:
        return []
    directory = Path(directory).expanduser().resolve()
    if not directory.is_dir():
        return []   # Hydra reports a missing --config-dir itself
    load_builtin()
    names = []
    if directory not in _USER_DIRS:
        _USER_DIRS.append(directory)
        sys.path.insert(0, str(directory))
    for path in user_files(directory):
        name = path.stem
        names.append(name)
        if _USER_MODULES.get(name) == path:
            continue
        if not name.isidentifier():
            raise KdmtlError(f"plug-in file {path}: its name must be a Python identifier (it is imported as "
                             f"a module); rename it, e.g. {name.replace('-', '_')}.py")
        loaded = sys.modules.get(name)
        if loaded is not None and Path(getattr(loaded, "__file__", "") or "").resolve() == path:
            _USER_MODULES[name] = path     # imported already (a worker process unpickling a job)
            continue
        elsewhere = loaded if loaded is not None else _installed(name, directory)
        if elsewhere is not None:
            where = getattr(elsewhere, "__file__", None) or getattr(elsewhere, "origin", None) or "built in"
            raise KdmtlError(f"plug-in file {path} has the name of the module '{name}' ({where}); rename the file")
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        _USER_MODULES[name] = path
        try:
            spec.loader.exec_module(module)
        except KdmtlError:
            raise
        except Exception as err:   # noqa: BLE001 - the user's code: say which file failed, and how
            del sys.modules[name], _USER_MODULES[name]
            raise KdmtlError(f"plug-in file {path} failed to import: {type(err).__name__}: {err}") from err
    return names


def _installed(name: str, directory: Path):
    """The spec of a module `name` importable from elsewhere than `directory` (an installed or
    standard-library module a plug-in file of that name would shadow), or None."""
    from importlib.machinery import PathFinder

    if name in sys.builtin_module_names:
        return importlib.util.find_spec(name)
    others = [p for p in sys.path if Path(p or ".").resolve() != directory]
    return PathFinder.find_spec(name, others)


def config_dir_from_argv(argv: List[str]) -> Optional[str]:
    """The directory of Hydra's ``--config-dir DIR`` / ``--config-dir=DIR`` / ``-cd DIR``, if given."""
    for i, arg in enumerate(argv):
        if arg in ("--config-dir", "-cd") and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--config-dir="):
            return arg.split("=", 1)[1]
    return None


def user_modules() -> Dict[str, Path]:
    """The plug-in modules imported from config directories, by name."""
    return dict(_USER_MODULES)


# Packages whose modules a checkpoint may name by import path (importing them runs nothing a file
# chose), and whose model builder functions a config may call. A user's own classes are in plug-in files.
MODEL_PACKAGES = ("torchvision.models", "timm", "kdmtl_cli.models")
BUILDER_PACKAGES = ("torchvision.models", "timm")   # functions: model builders only (not kdmtl's helpers)


def _within(module_name: str, packages) -> bool:
    return any(module_name == p or module_name.startswith(p + ".") for p in packages)


def _trusted_module(module_name: str, *, from_checkpoint: bool) -> bool:
    if _within(module_name, MODEL_PACKAGES) or module_name.split(".")[0] in _USER_MODULES:
        return True
    return not from_checkpoint


def resolve_target(target: str, key: str, *, from_checkpoint: bool = False):
    """The class or builder function a ``_target_`` import path names, checked: a subclass of
    torch.nn.Module (from any importable module; from a checkpoint only from the model packages
    or a loaded plug-in file), or a function of a model package or a plug-in file. Anything
    else is refused with one line naming `key`: a file never makes kdmtl call arbitrary code."""
    import inspect

    import torch

    if not isinstance(target, str) or "." not in target:
        raise KdmtlError(f"{key}={target!r} must be an import path such as my_trunks.UNet "
                         "(a class in a plug-in file of your --config-dir, or torchvision.models.resnet50)")
    module_name, _, attr = target.rpartition(".")
    if not _trusted_module(module_name, from_checkpoint=from_checkpoint):
        raise KdmtlError(f"{key}={target} comes from a checkpoint; kdmtl imports no code a checkpoint names: pass "
                         f"--config-dir DIR holding the plug-in file that defines it")
    try:
        module = importlib.import_module(module_name)
        obj = getattr(module, attr)
    except (ImportError, AttributeError) as err:
        raise KdmtlError(f"{key}={target} cannot be imported ({err}); put the class in a .py file of your "
                         "--config-dir (it is imported as a module of that name), or fix the path") from None
    if inspect.isclass(obj) and issubclass(obj, torch.nn.Module):
        return obj
    defined_in = getattr(obj, "__module__", "") or ""
    if inspect.isfunction(obj) and (_within(defined_in, BUILDER_PACKAGES) or defined_in.split(".")[0] in _USER_MODULES):
        return obj
    raise KdmtlError(f"{key}={target} is not a torch.nn.Module class (nor a model builder of "
                     f"{', '.join(BUILDER_PACKAGES)} or of a plug-in file); kdmtl calls nothing else")
