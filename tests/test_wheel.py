"""The built wheel ships the configs: an installed (non-editable) kdmtl composes them
from any directory."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def test_wheel_contains_configs_and_runs_from_another_directory(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation",
                    "-w", str(dist), "-q"], check=True, capture_output=True, text=True)
    wheel = next(dist.glob("kdmtl-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {p.relative_to(REPO / "conf").as_posix() for p in (REPO / "conf").rglob("*.yaml")}
    assert shipped and {f"kdmtl_cli/conf/{name}" for name in shipped} <= names
    assert "kdmtl_cli/data/shapes_generator.py" in names
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target), str(wheel), "-q"],
                   check=True, capture_output=True, text=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target), "KDMTL_CACHE": str(tmp_path / "cache")}
    where = subprocess.run([sys.executable, "-c", "import kdmtl_cli; print(kdmtl_cli.__file__)"], cwd=elsewhere,
                           env=env, capture_output=True, text=True, check=True)
    assert where.stdout.strip().startswith(str(target))  # the wheel, not the source checkout
    result = subprocess.run([sys.executable, "-m", "kdmtl_cli", "train", "+experiment=shapes_seg_depth", "--cfg", "job"],
                            cwd=elsewhere, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    cfg = yaml.safe_load(result.stdout)
    assert set(cfg["tasks"]) == {"seg", "depth"} and cfg["teacher"]["arch"] == "convnet"
