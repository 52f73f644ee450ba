"""A run directory's files as `kdmtl report`, `eval` and `export` read them.

A file that cannot be read — no permission, not UTF-8, not JSON / YAML, not the shape kdmtl
writes — is one KdmtlError naming the file and what to do (`fix`), never a decoder's traceback
that names no file. Checkpoints are read by engine/checkpoint.py, which names its file already.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, List

from kdmtl_cli.errors import KdmtlError


def read_text(path: Path, fix: str) -> str:
    try:
        return Path(path).read_bytes().decode("utf-8")
    except OSError as err:
        raise KdmtlError(f"cannot read {path} ({err.strerror or err}); {fix}") from None
    except UnicodeDecodeError as err:
        raise KdmtlError(f"{path} is not a text file written by kdmtl (not UTF-8: byte 0x{err.object[err.start]:02x} "
                         f"at offset {err.start}); {fix}") from None


def read_json(path: Path, fix: str, required: Iterable[str] = ()) -> dict:
    """A JSON object holding at least the `required` keys."""
    try:
        data = json.loads(read_text(path, fix))
    except json.JSONDecodeError as err:
        raise KdmtlError(f"{path} is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}); "
                         f"{fix}") from None
    if not isinstance(data, dict):
        raise KdmtlError(f"{path} holds a JSON {type(data).__name__}, not the object kdmtl writes; {fix}")
    missing = [key for key in required if key not in data]
    if missing:
        raise KdmtlError(f"{path} has no '{missing[0]}' entry, so kdmtl did not write it; {fix}")
    return data


def read_jsonl(path: Path, fix: str) -> List[dict]:
    """One JSON object per non-empty line (metrics.jsonl)."""
    records = []
    for number, line in enumerate(read_text(path, fix).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise KdmtlError(f"{path} line {number} is not valid JSON ({err.msg}); {fix}") from None
        if not isinstance(record, dict):
            raise KdmtlError(f"{path} line {number} is not a JSON object; {fix}")
        records.append(record)
    return records


def read_config(path: Path, fix: str):
    """A saved config (config.yaml) as a DictConfig."""
    import yaml
    from omegaconf import DictConfig, ListConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    text = read_text(path, fix)
    try:
        cfg = OmegaConf.create(text)
    except (yaml.YAMLError, OmegaConfBaseException, ValueError) as err:
        mark = getattr(err, "problem_mark", None)
        if mark is not None:
            problem = getattr(err, "problem", None) or "syntax error"
            detail = f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
        else:
            detail = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
        raise KdmtlError(f"{path} is not valid YAML ({detail}); {fix}") from None
    if not isinstance(cfg, DictConfig):
        kind = "list" if isinstance(cfg, ListConfig) else type(cfg).__name__
        raise KdmtlError(f"{path} holds a YAML {kind}, not the mapping kdmtl writes; {fix}")
    return cfg
