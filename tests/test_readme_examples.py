"""The README's "Your own data, model and method" examples are real: its plug-in blocks are the
files of docs/examples/my_plugins (which tests/test_plugins.py runs through the CLI), and its
`data=folder` example runs as written; `+experiment=coco_cls_seg` runs through the CLI on a
fabricated COCO directory (scripts/fake_coco.py) with the teacher-output cache of stored views."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import run_kdmtl, show

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
EXAMPLES = REPO / "docs" / "examples" / "my_plugins"


def _section(title: str, end: str) -> str:
    start = README.index(title)
    return README[start:README.index(end, start)]


def _blocks(text: str):
    """(language, first-line path, body) of each fenced block whose first line is `# <path>`."""
    for lang, body in re.findall(r"```(\w+)\n(.*?)```", text, re.S):
        first = body.splitlines()[0] if body else ""
        yield lang, (first[2:].strip() if first.startswith("# ") else None), body


def test_readme_plugin_blocks_are_the_example_files():
    text = _section("## Your own data, model and method", "## COCO: a pretrained ResNet-50 teacher")
    shown = {path: body for lang, path, body in _blocks(text) if path and (EXAMPLES / path).exists()}
    files = sorted(str(p.relative_to(EXAMPLES)) for p in EXAMPLES.rglob("*") if p.is_file())
    assert sorted(shown) == files          # every file of the directory is shown, once
    for path, body in shown.items():
        assert body.split("\n", 1)[1] == (EXAMPLES / path).read_text(), path


def test_readme_folder_example_runs(tmp_path):
    text = _section("### Your own data", "With code: a data set is")
    commands = []
    for lang, path, body in _blocks(text):
        if lang in ("python", "yaml") and path:
            (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / path).write_text(body)
    commands = [line for lang, body in re.findall(r"```(\w+)\n(.*?)```", text, re.S) if lang == "bash"
                for line in body.splitlines() if line.strip()]
    assert commands[0] == "python make_pets.py" and commands[1].startswith("kdmtl train ")
    subprocess.run([sys.executable, "make_pets.py"], cwd=tmp_path, check=True)
    proc = run_kdmtl([*commands[1].split()[1:], "debug=fast", "log.efficiency=false", "log.progress=plain",
                      f"hydra.run.dir={tmp_path / 'run'}"], tmp_path, tmp_path / "cache")
    assert proc.returncode == 0, show(proc)
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["config"]["data"]["name"] == "folder"
    assert {"test/breed/accuracy", "test/mask/miou"} <= set(saved["results"])


def test_coco_experiment_runs_on_fabricated_files_with_cached_views(tmp_path):
    pytest.importorskip("pycocotools")
    import torchvision

    subprocess.run([sys.executable, str(REPO / "scripts" / "fake_coco.py"), str(tmp_path / "coco"),
                    "--train", "20", "--val", "6"], check=True, capture_output=True)
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet50().state_dict(), tmp_path / "resnet50.pth")
    args = ["train", "+experiment=coco_cls_seg", f"data.root={tmp_path / 'coco'}", "data.image_size=64",
            "data.val_size=4", "data.batch_size=4", "data.eval_batch_size=8", f"teacher.weights={tmp_path / 'resnet50.pth'}",
            "teacher.cache=views", "teacher.cache_views=2", "debug=fast", "log.efficiency=false", "log.progress=plain",
            f"hydra.run.dir={tmp_path / 'run'}"]
    proc = run_kdmtl(args, tmp_path, tmp_path / "cache", timeout=600)
    assert proc.returncode == 0, show(proc)
    assert "teacher outputs: caching" in proc.stdout
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    config, results = saved["config"], saved["results"]
    assert config["teacher"]["arch"] == "resnet50" and config["student"]["arch"] == "resnet18"
    assert config["data"]["resized_crop_scale"] == [0.08, 1.0] and config["optim"]["lr"] == 1e-3
    for key in ("test/labels/map", "test/labels/f1", "test/seg/miou", "test/seg/pixel_acc"):
        assert key in results
    terms = set()
    for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines():
        terms |= set(json.loads(line))
    assert any("kd/labels" in t for t in terms) and any("kd/seg" in t for t in terms), sorted(terms)[:40]
