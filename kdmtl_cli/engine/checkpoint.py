"""Checkpoints: written atomically, read without unpickling code.

A write goes to a temporary file in the same directory, is flushed to disk, then
renamed over the target, so a crash leaves either the old file or the new one,
never half of one (the directory is fsynced after the rename, so the new name survives a
power loss too). Reads use ``torch.load(weights_only=True)`` (tensors, numbers,
strings, lists, dicts only) or safetensors; a file carrying pickled objects is refused.
"""

from __future__ import annotations

import os
import re
import pickle
import tempfile
from pathlib import Path
from typing import Any, Dict

import torch

from kdmtl_cli.errors import KdmtlError

CHECKPOINT_FORMAT = "kdmtl-checkpoint"
CHECKPOINT_VERSION = 1
_UMASK = os.umask(0)
os.umask(_UMASK)


def _atomic_write(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; keep shared caches readable
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)     # the rename itself reaches the disk, not only the file's bytes
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def fsync_dir(directory: Path) -> None:
    """Flush a directory entry (a rename or a new file) to disk; a no-op where not supported."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def discard_partial_writes(directory: Path) -> None:
    """Delete the temporary files `_atomic_write` leaves in `directory` when its process is
    killed halfway (`.<name>.<random>.tmp`); call it only where no other process is writing."""
    for partial in Path(directory).glob(".*.tmp"):
        partial.unlink(missing_ok=True)


def atomic_torch_save(obj: Any, path: Path) -> None:
    _atomic_write(Path(path), lambda handle: torch.save(obj, handle))


def atomic_write_text(text: str, path: Path) -> None:
    _atomic_write(Path(path), lambda handle: handle.write(text.encode()))


def load_tensor_file(path: Path, what: str = "checkpoint") -> Dict[str, Any]:
    """Load a .pt (weights_only) or .safetensors file; one-line errors for missing/corrupt/unsafe."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise KdmtlError(f"{what} not found: {path}; check the path")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as err:  # safetensors raises its own error types
            raise KdmtlError(f"{what} {path} is not a readable safetensors file ({err})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if re.search(r"unsupported global|GLOBAL .* blocked", str(err), re.IGNORECASE):
            raise KdmtlError(f"refusing to load {what} {path}: it carries pickled Python objects, "
                             "not just tensors (only plain-tensor checkpoints are loaded)") from None
        raise KdmtlError(f"{what} {path} is corrupt or not a torch checkpoint (unpickling failed); "
                         "delete it or point at another file") from None
    except Exception as err:  # torch's safe unpickler raises many types on non-torch bytes
        raise KdmtlError(f"{what} {path} is corrupt or not a torch file ({one_line_err(err)}); "
                         "delete it or point at another file") from None
    if not isinstance(obj, dict):
        raise KdmtlError(f"{what} {path} does not hold a dictionary of tensors")
    return obj


def one_line_err(err: BaseException) -> str:
    return str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__


def save_checkpoint(state: Dict[str, Any], path: Path) -> None:
    atomic_torch_save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **state}, path)


def load_checkpoint(path: Path) -> Dict[str, Any]:
    state = load_tensor_file(path)
    if state.get("format") != CHECKPOINT_FORMAT:
        raise KdmtlError(f"{path} is not a kdmtl checkpoint (no '{CHECKPOINT_FORMAT}' marker); "
                         "for bare weights use a .safetensors file")
    return state


def read_checkpoint_entries(path: Path, keys) -> Dict[str, Any]:
    """A few small entries of a kdmtl checkpoint without reading its tensors (memory-mapped)."""
    try:
        state = torch.load(Path(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - read it fully, which raises load_tensor_file's one-line error
        state = load_tensor_file(path)
    return {key: state.get(key) for key in keys} if isinstance(state, dict) else {}


def save_weights(state_dict: Dict[str, torch.Tensor], path: Path, metadata: Dict[str, str]) -> None:
    """Bare model weights as safetensors (shareable, loadable by any framework)."""
    from safetensors.torch import save

    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    _atomic_write(Path(path), lambda handle: handle.write(save(tensors, metadata=metadata)))


def read_safetensors_metadata(path: Path) -> Dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except Exception as err:
        raise KdmtlError(f"{path} is not a readable safetensors file ({err})") from None
