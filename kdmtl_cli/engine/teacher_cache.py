"""Teachers trained once: a trained teacher is stored under
``<cache_dir>/teachers/<key>/teacher.safetensors`` (with teacher.json beside it), where the key hashes everything that
determines it (architecture, tasks and their classes, data, teacher optimiser, seed,
precision, batch limits, and `teacher.keep` when it is not the default `best`). Every later
run or sweep point with the same key reuses it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Dict

from omegaconf import OmegaConf

CACHE_FORMAT_VERSION = 1
# Fields of the teacher node that do not change the trained weights.
# (which tasks a teacher covers is in the key through the task signature, so a per-task
# teacher for `seg` and a multitask teacher with tasks=[seg] share one cache entry).
# The output-cache settings say how a trained teacher is used, not how it is trained.
# `keep` is added below only when it is not the default (keys of teachers kept at `best` are
# those of before the setting existed).
_NOT_IN_KEY = ("checkpoint", "checkpoints", "mode", "tasks", "cache", "cache_views", "cache_topk", "cache_dtype",
               "keep", "members", "balance")


def teacher_key(teacher_cfg, task_signature: Dict, data_cfg, data_fingerprint: str, seed: int,
                precision: str, limit_train_batches) -> str:
    teacher = {k: v for k, v in OmegaConf.to_container(teacher_cfg, resolve=True).items() if k not in _NOT_IN_KEY}
    data = {k: v for k, v in OmegaConf.to_container(data_cfg, resolve=True).items()
            if k not in ("root", "generate", "eval_batch_size", "loader", "num_workers", "tensor_max_mb")}
    content = {"version": CACHE_FORMAT_VERSION, "teacher": teacher, "tasks": task_signature,
               "data": data, "data_fingerprint": data_fingerprint, "seed": seed,
               "precision": str(precision), "limit_train_batches": limit_train_batches}
    # Which epoch is kept: without a validation split (data.val_size=0) `best` is the last epoch.
    keep = str(teacher_cfg.get("keep", "best"))
    if keep == "best" and int(content["data"].get("val_size", 1) or 0) == 0:
        keep = "last"
    if keep != "best":
        content["keep"] = keep
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:20]


def teacher_dir(cache_dir: str, key: str) -> Path:
    return Path(cache_dir).expanduser() / "teachers" / key


def describe(entry_dir: Path) -> Dict[str, Any]:
    info = entry_dir / "teacher.json"
    return json.loads(info.read_text()) if info.exists() else {}


# ---- the frozen teacher's test metrics -----------------------------------------------------
# A cached teacher never changes, so its test metrics are a function of its weights and of how
# it is tested; every run of a sweep used to re-evaluate it. They are stored under
# <cache_dir>/teacher_tests/<key>.json, the key hashing the weights (and buffers), the test data
# and every setting evaluation reads.
def test_metrics_key(weights_digest: str, evaluation: Dict[str, Any]) -> str:
    content = {"version": CACHE_FORMAT_VERSION, "weights": weights_digest, "evaluation": evaluation}
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:20]


def read_test_metrics(cache_dir: str, key: str):
    """The stored metrics, or None when absent or unreadable (then they are recomputed)."""
    path = Path(cache_dir).expanduser() / "teacher_tests" / f"{key}.json"
    try:
        metrics = json.loads(path.read_text())["metrics"]
        return {str(k): float(v) for k, v in metrics.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def write_test_metrics(cache_dir: str, key: str, metrics: Dict[str, float], evaluation: Dict[str, Any]) -> None:
    from kdmtl_cli.engine.checkpoint import atomic_write_text

    path = Path(cache_dir).expanduser() / "teacher_tests" / f"{key}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(json.dumps({"metrics": metrics, "evaluation": evaluation}, indent=1, default=str), path)
