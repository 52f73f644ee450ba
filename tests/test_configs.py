"""The shipped config tree and Hydra's features through `kdmtl`: every experiment and every group
option composes (and validates against the schema), help/info/version, a user's own config dir,
`debug=fast`, multirun, and concurrent runs.

Composition-only checks use `--cfg job` (no torch import) or Hydra's compose API in-process; the
few real runs are started together by the `heavy_runs` fixture.
"""

from __future__ import annotations

import re

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict

import pytest
import yaml
from omegaconf import OmegaConf

from conftest import FAST, REPO, read_jsonl, run_kdmtl, show

CONF = REPO / "conf"
GROUPS = ("teacher", "student", "tasks", "loss", "weighting", "data", "hardware", "optim", "debug")
TOP_LEVEL = ("seed", "cache_dir", "data", "tasks", "teacher", "student", "loss", "optim", "hardware",
             "checkpoint", "log")
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
GROUP_OPTIONS = [(group, p.stem) for group in GROUPS for p in sorted((CONF / group).glob("*.yaml"))]


def _ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, show(proc)
    assert "Traceback" not in proc.stderr, show(proc)
    return proc


def _cfg_job(args, cwd: Path, cache: Path) -> dict:
    proc = _ok(run_kdmtl(["train", *args, "--cfg", "job"], cwd, cache))
    cfg = yaml.safe_load(proc.stdout)
    assert isinstance(cfg, dict), show(proc)
    return cfg


def _leaves(node, prefix: str = "") -> Dict[str, object]:
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            out.update(_leaves(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node}


def _own_values(path: Path) -> dict:
    """The values a config file sets itself (its defaults list removed), typed as OmegaConf reads them."""
    node = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    node.pop("defaults", None)
    # `# @package loss.kd` puts the file's values under loss.kd: nest them the same way.
    header = re.search(r"^# @package (\S+)", path.read_text(), re.MULTILINE)
    if header and header.group(1).startswith(path.parent.name + "."):
        for part in reversed(header.group(1).split(".")[1:]):
            node = {part: node}
    return node


@pytest.fixture(scope="module")
def hydra_compose():
    """Hydra's compose API on the installed config package; importing the package registers
    the schemas and resolvers the configs refer to, so no CLI set-up is needed."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="kdmtl_cli.conf", version_base="1.3"):
        yield compose
    GlobalHydra.instance().clear()


# ---- every shipped config composes ------------------------------------------------------------------

def test_config_tree_is_found():
    assert EXPERIMENTS, "no experiments under conf/experiment"
    assert {g for g, _ in GROUP_OPTIONS} == set(GROUPS)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes(name, workdir, shared_cache, hydra_compose):
    """`--cfg job` prints parseable YAML with every group, and what the experiment file selects or
    sets is what was composed."""
    cfg = _cfg_job([f"+experiment={name}"], workdir, shared_cache)
    for key in TOP_LEVEL:
        assert key in cfg, f"{key} missing from the composed config of experiment {name}"
    assert cfg["tasks"], "no tasks"
    experiment = OmegaConf.to_container(OmegaConf.load(CONF / "experiment" / f"{name}.yaml"), resolve=False)
    entries = [entry for entry in experiment.get("defaults", []) if isinstance(entry, dict)]
    # Options placed at a package (`/optim@teacher.optim: x`) replace that part of another group.
    relocated = [key.partition("@")[2] + "." for entry in entries for key in entry if "@" in key]
    composed = _leaves(cfg)
    own = _leaves({k: v for k, v in experiment.items() if k != "defaults"})  # checked below
    for entry in entries:
        for entry_key, option in entry.items():
            group = entry_key.replace("override", "").strip().lstrip("/")
            group, _, package = group.partition("@")   # `/optim@teacher.optim: x` places option x there
            expected = OmegaConf.to_container(hydra_compose("train", overrides=[f"{group}={option}"])[group],
                                              resolve=False)
            for key, value in _leaves(expected, f"{package or group}.").items():
                replaced = not package and any(key.startswith(prefix) for prefix in relocated)
                set_here = key in own or any(k.startswith(key + ".") for k in own)  # e.g. a scalar made a mapping
                if not set_here and not replaced:
                    assert composed.get(key) == value, f"experiment {name}: {key} is not {group} option {option}'s"
    flat = _leaves(cfg)
    for key, value in _leaves({k: v for k, v in experiment.items() if k != "defaults"}).items():
        assert flat.get(key) == value, f"experiment {name}: {key} is {flat.get(key)!r}, file says {value!r}"


@pytest.mark.parametrize("group,option", GROUP_OPTIONS, ids=[f"{g}={o}" for g, o in GROUP_OPTIONS])
def test_group_option_composes_and_validates(group, option, hydra_compose):
    from kdmtl_cli.schema import TrainConfig, validate

    cfg = hydra_compose("train", overrides=[f"{group}={option}"])
    merged = validate(cfg, TrainConfig)  # raises KdmtlError on an unknown key or a bad value
    assert "hydra" not in merged
    composed = _leaves(OmegaConf.to_container(cfg[group], resolve=False))
    for key, value in _leaves(_own_values(CONF / group / f"{option}.yaml")).items():
        assert composed.get(key) == value, f"{group}={option}: {key} is {composed.get(key)!r}, not {value!r}"


PUBLISHING = [name for name in EXPERIMENTS if "published:" in (CONF / "experiment" / f"{name}.yaml").read_text()]


@pytest.mark.parametrize("name", PUBLISHING)
def test_published_numbers_name_real_metrics(name, hydra_compose):
    """Each stored published number names a test metric of one of the experiment's tasks, who
    it is for, which epoch the paper reports, and its source; the teacher follows the recipe."""
    from kdmtl_cli.schema import TrainConfig, validate
    from kdmtl_cli.tasks import TASK_KINDS, _load_kinds

    _load_kinds()
    cfg = validate(hydra_compose("train", overrides=[f"+experiment={name}"]), TrainConfig)
    assert cfg.published
    for entry in cfg.published:
        split, task, metric = entry.metric.split("/")
        assert split == "test" and task in cfg.tasks
        assert metric in TASK_KINDS.get(cfg.tasks[task].kind).higher_is_better
        assert entry.model in ("student", "teacher") and entry.epoch in ("last", "best") and entry.source
        fraction = metric in ("accuracy", "f1", "recall", "miou", "pixel_acc", "map") or metric.startswith("within_")
        assert (0 < entry.value < 1) if fraction else entry.value > 0  # accuracies are fractions in kdmtl
    if "/optim@teacher.optim" in (CONF / "experiment" / f"{name}.yaml").read_text():
        assert OmegaConf.to_container(cfg.teacher.optim, resolve=True)["lr"] == cfg.optim.lr


@pytest.mark.parametrize("option", sorted(p.stem for p in (CONF / "weighting").glob("*.yaml")))
def test_every_weighting_option_builds_its_strategy(option, hydra_compose):
    from kdmtl_cli.schema import TrainConfig, validate
    from kdmtl_cli.weighting import build_weighting

    cfg = validate(hydra_compose("train", overrides=[f"weighting={option}"]), TrainConfig)
    assert build_weighting(cfg.weighting, list(cfg.tasks)).name == option


@pytest.mark.parametrize("option", sorted(p.stem for p in (CONF / "tasks").glob("*.yaml")))
def test_every_tasks_option_builds_on_the_shapes_targets(option, hydra_compose, tmp_path):
    from kdmtl_cli.data import build_data
    from kdmtl_cli.schema import TrainConfig, validate
    from kdmtl_cli.tasks import build_tasks

    cfg = validate(hydra_compose("train", overrides=[f"tasks={option}", "data.train_size=4", "data.val_size=2",
                                                     "data.test_size=2", f"data.root={tmp_path}"]), TrainConfig)
    targets = build_data(cfg.data).targets
    if not all((task.target or name) in targets for name, task in cfg.tasks.items()):
        pytest.skip(f"tasks={option} is for another data set (run by its experiment's end-to-end test)")
    tasks = build_tasks(cfg.tasks, targets)
    assert list(tasks) == list(cfg.tasks)


# ---- help, info, version --------------------------------------------------------------------------------

def test_top_level_help(workdir, shared_cache):
    out = _ok(run_kdmtl(["--help"], workdir, shared_cache)).stdout
    assert "train" in out and "eval" in out


def test_no_command_prints_usage_and_fails(workdir, shared_cache):
    proc = run_kdmtl([], workdir, shared_cache)
    assert proc.returncode == 2
    assert "usage" in proc.stdout.lower() and "train" in proc.stdout


def test_train_help_lists_config_groups(workdir, shared_cache):
    out = _ok(run_kdmtl(["train", "--help"], workdir, shared_cache)).stdout
    lines = out.splitlines()
    for group in (*GROUPS, "experiment"):
        options = sorted(p.stem for p in (CONF / group).glob("*.yaml"))
        assert f"{group}: {', '.join(options)}" in lines, f"group {group} not listed:\n{out}"


def test_eval_help(workdir, shared_cache):
    out = _ok(run_kdmtl(["eval", "--help"], workdir, shared_cache)).stdout
    assert "kdmtl eval" in out and "run_dir" in out


def test_train_info(workdir, shared_cache):
    proc = _ok(run_kdmtl(["train", "--info"], workdir, shared_cache))
    assert "Hydra" in proc.stdout + proc.stderr


def test_version(workdir, shared_cache):
    from importlib.metadata import version

    import kdmtl_cli

    out = _ok(run_kdmtl(["--version"], workdir, shared_cache)).stdout.strip()
    assert out == f"kdmtl {kdmtl_cli.__version__}"
    assert kdmtl_cli.__version__ == version("kdmtl")


# ---- a user's own configs ---------------------------------------------------------------------------------

@pytest.fixture
def user_conf(tmp_path) -> Path:
    root = tmp_path / "myconf"
    (root / "experiment").mkdir(parents=True)
    (root / "experiment" / "mine.yaml").write_text(
        "# @package _global_\n"
        "defaults:\n"
        "  - override /student: tiny\n"
        "loss:\n"
        "  kd:\n"
        "    temperature: 7.0\n")
    return root


def test_user_config_dir(user_conf, workdir, shared_cache):
    cfg = _cfg_job(["--config-dir", str(user_conf), "+experiment=mine"], workdir, shared_cache)
    assert cfg["student"]["width"] == 8
    assert cfg["loss"]["kd"]["temperature"] == 7.0
    assert cfg["teacher"]["width"] == 32  # everything else still comes from the shipped tree


def test_user_config_searchpath(user_conf, workdir, shared_cache):
    cfg = _cfg_job([f"hydra.searchpath=[file://{user_conf}]", "+experiment=mine"], workdir, shared_cache)
    assert cfg["student"]["width"] == 8
    assert cfg["loss"]["kd"]["temperature"] == 7.0


# ---- debug=fast ----------------------------------------------------------------------------------------------

def test_debug_fast_composes_the_debug_node(workdir, shared_cache):
    cfg = _cfg_job(["debug=fast"], workdir, shared_cache)
    expected = OmegaConf.to_container(OmegaConf.load(CONF / "debug" / "fast.yaml"))
    assert cfg["debug"] == expected
    assert _cfg_job([], workdir, shared_cache).get("debug") is None  # debug: null by default


# ---- real runs: multirun, and two runs at once (all started together) ---------------------------------------

def _popen(args, cwd: Path, cache: Path, log: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env["KDMTL_CACHE"] = str(cache)
    with open(log.with_suffix(".out"), "w") as out, open(log.with_suffix(".err"), "w") as err:
        return subprocess.Popen([sys.executable, "-m", "kdmtl_cli", *args], cwd=cwd, env=env,
                                stdout=out, stderr=err)  # the child keeps its own copies of the files


@pytest.fixture(scope="module")
def heavy_runs(tmp_path_factory, shared_cache):
    """Started at the same moment: a 2x2 multirun (with a fresh cache, so teachers are trained here)
    and two plain debug runs sharing one cwd and the default hydra.run.dir."""
    base = tmp_path_factory.mktemp("configs_runs")
    sweep_cwd, pair_cwd, fresh_cache = base / "sweep", base / "pair", base / "fresh_cache"
    for d in (sweep_cwd, pair_cwd, fresh_cache):
        d.mkdir()
    logs = base / "logs"
    logs.mkdir()
    args = {
        "sweep": (["train", "-m", *FAST, "loss.kd.temperature=2,4", "seed=0,1"], sweep_cwd, fresh_cache),
        "default": (["train", *FAST, "loss=none"], pair_cwd, shared_cache),
        "explicit": (["train", *FAST, "loss=none", "optim.epochs=2"], pair_cwd, shared_cache),
    }
    procs = {name: _popen(a, cwd, cache, logs / name) for name, (a, cwd, cache) in args.items()}
    try:
        for proc in procs.values():
            proc.wait(timeout=300)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    results = {}
    for name, proc in procs.items():
        results[name] = subprocess.CompletedProcess(
            proc.args, proc.returncode, (logs / f"{name}.out").read_text(), (logs / f"{name}.err").read_text())
    return {"procs": results, "sweep_cwd": sweep_cwd, "pair_cwd": pair_cwd}


def test_multirun_runs_every_combination(heavy_runs):
    proc = _ok(heavy_runs["procs"]["sweep"])
    found = sorted((heavy_runs["sweep_cwd"] / "multirun").glob("*/*/*/results.json"))
    assert len(found) == 4, show(proc)
    assert len({p.parent for p in found}) == 4
    combos = set()
    for path in found:
        config = json.loads(path.read_text())["config"]
        combos.add((config["loss"]["kd"]["temperature"], config["seed"]))
        assert config["optim"]["epochs"] == 1  # debug=fast applies to every job
    assert combos == {(2.0, 0), (2.0, 1), (4.0, 0), (4.0, 1)}


def test_multirun_trains_each_teacher_once(heavy_runs):
    out = _ok(heavy_runs["procs"]["sweep"]).stdout
    lines = out.splitlines()
    assert sum("teacher: no cached teacher" in line for line in lines) == 2, out
    assert sum("teacher: reusing cached teacher" in line for line in lines) == 2, out


def _pair_run_dirs(heavy_runs) -> Dict[int, Path]:
    """The two concurrent runs' directories, keyed by their optim.epochs."""
    dirs = sorted(p.parent for p in (heavy_runs["pair_cwd"] / "outputs").glob("*/*/config.yaml"))
    return {yaml.safe_load((d / "config.yaml").read_text())["optim"]["epochs"]: d for d in dirs}


def test_two_runs_started_together_get_their_own_dirs(heavy_runs):
    for name in ("default", "explicit"):
        _ok(heavy_runs["procs"][name])
    dirs = sorted(p.parent for p in (heavy_runs["pair_cwd"] / "outputs").glob("*/*/config.yaml"))
    assert len(dirs) == 2 and dirs[0] != dirs[1], dirs
    for d in dirs:
        assert (d / "results.json").is_file()
        assert (d / "checkpoints" / "last.pt").is_file()
    assert sorted(_pair_run_dirs(heavy_runs)) == [1, 2]  # neither run wrote into the other's dir


def test_debug_fast_shrinks_a_real_run(heavy_runs):
    _ok(heavy_runs["procs"]["default"])
    run_dir = _pair_run_dirs(heavy_runs)[1]
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["optim"]["epochs"] == 1
    assert config["data"]["train_size"] == 128
    assert config["data"]["val_size"] == 64 and config["data"]["test_size"] == 64
    assert config["limit_train_batches"] == 2 and config["limit_eval_batches"] == 2
    epochs = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r.get("type") == "epoch"]
    assert [(r["epoch"], r["step"]) for r in epochs] == [(1, 2)]


def test_explicit_override_beats_debug(heavy_runs):
    _ok(heavy_runs["procs"]["explicit"])
    run_dir = _pair_run_dirs(heavy_runs)[2]
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["optim"]["epochs"] == 2
    assert config["data"]["train_size"] == 128  # the rest of debug=fast still applies
    epochs = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r.get("type") == "epoch"]
    assert [(r["epoch"], r["step"]) for r in epochs] == [(1, 2), (2, 4)]
