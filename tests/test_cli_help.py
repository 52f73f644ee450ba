"""`--help` of every subcommand, through the real CLI: report and export print their own usage
(exit 0), eval's lists only what eval reads (its keys and the hardware options, none of
train's groups), and the top-level usage names the completion commands."""

from __future__ import annotations

import re

import pytest
from conftest import REPO, run_kdmtl, show

from kdmtl_cli.commands import report

HARDWARE_OPTIONS = sorted(p.stem for p in (REPO / "conf" / "hardware").glob("*.yaml"))
TRAIN_ONLY_GROUPS = ("loss", "weighting", "student", "teacher", "data", "optim", "tasks", "experiment", "baselines")


def _help(args, workdir, cache) -> str:
    proc = run_kdmtl(args, workdir, cache)
    assert proc.returncode == 0, show(proc)
    assert proc.stderr.strip() == "", show(proc)
    return proc.stdout


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_report_help(flag, workdir, shared_cache):
    out = _help(["report", flag], workdir, shared_cache)
    assert out.startswith("usage: kdmtl report DIR"), out
    for option in report.OPTIONS:
        assert f"{option}=" in out, f"{option} not described:\n{out}"
    assert "examples:" in out and "kdmtl report multirun/" in out
    # a help flag after other arguments still only prints the help (nothing is read or written)
    assert _help(["report", "no/such/dir", "out=x.md", flag], workdir, shared_cache) == out
    assert not (workdir / "x.md").exists()


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_export_help(flag, workdir, shared_cache):
    from kdmtl_cli.commands import export

    out = _help(["export", flag], workdir, shared_cache)
    assert out.startswith("usage: kdmtl export run_dir=RUN"), out
    for option in export.OPTIONS:                         # whatever export.py accepts
        assert f"{option}=" in out, f"{option} not described:\n{out}"
    assert "format=torchscript|onnx" in out and "checkpoint=best|last" in out
    assert "examples:" in out and "kdmtl export run_dir=" in out


def test_eval_help_lists_only_what_eval_reads(workdir, shared_cache):
    out = _help(["eval", "--help"], workdir, shared_cache)
    for key in ("run_dir=", "checkpoint=best|last|PATH", "split=val|test", "hardware=OPTION", "log."):
        assert key in out, f"{key} missing:\n{out}"
    hardware_line = next(line for line in out.splitlines() if line.startswith("hardware=OPTION"))
    assert re.findall(r"\b(\w+)\b(?=,|\s\(default)", hardware_line) == HARDWARE_OPTIONS, hardware_line
    assert "Config groups" not in out
    for group in TRAIN_ONLY_GROUPS:                 # neither as a group listing nor as a key
        assert not re.search(rf"^\s*{group}\s*[:=]", out, re.MULTILINE), f"train's group {group} listed:\n{out}"
    assert "kd4mtl" not in out and "pcgrad" not in out        # options of train's loss / weighting groups
    assert "Examples:" in out and "kdmtl eval run_dir=" in out


def test_eval_help_lists_hardware_options_of_a_config_dir(workdir, shared_cache):
    (workdir / "confs" / "hardware").mkdir(parents=True)
    (workdir / "confs" / "hardware" / "mybox.yaml").write_text("defaults:\n  - auto\n  - _self_\ndevice: cpu\n")
    out = _help(["eval", "--help", "--config-dir", str(workdir / "confs")], workdir, shared_cache)
    hardware_line = next(line for line in out.splitlines() if line.startswith("hardware=OPTION"))
    assert "mybox" in hardware_line and all(option in hardware_line for option in HARDWARE_OPTIONS), hardware_line


def test_top_level_help_names_completion_and_subcommand_help(workdir, shared_cache):
    out = _help(["--help"], workdir, shared_cache)
    assert "kdmtl --install-completion [SHELL]" in out and "kdmtl --completion-script [SHELL]" in out
    assert "kdmtl report --help" in out and "kdmtl export --help" in out
