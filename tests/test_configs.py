"""The shipped config tree and Hydra's features through `kdmtl`: every experiment and every group
option composes (and validates against the schema), help/info/version, a user's own config dir,
`debug=fast`, multirun, and concurrent runs.

Composition-only checks use `--cfg job` (no torch import) or Hydra's compose API in-process; the
few real runs are started together by the `heavy_runs` fixture.
"""

from __future__ import annotations

import re

import json
import subprocess
from concurrent.futures import ThreadPoolExecutor
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


# Through the CLI (a process each): every experiment but the CIFAR-100 method variants, which are
# composed in-process by test_cifar100_experiment_is_the_official_recipe; those go through the CLI
# in the slow run (`-m slow`).
CLI_COMPOSED = [name if not name.startswith("cifar100_") or name.endswith(("_vanilla", "_kd", "_dkd"))
                else pytest.param(name, marks=pytest.mark.slow) for name in EXPERIMENTS]


@pytest.mark.parametrize("name", CLI_COMPOSED)
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
        assert entry.model in ("student", "teacher") and entry.source
        assert entry.epoch in ("last", "best") or re.fullmatch(r"mean_last[1-9][0-9]*", entry.epoch)
        if entry.epoch.startswith("mean_last"):     # compared with test_mean_lastN/...: the run must record it
            assert cfg.test.average_last_epochs == int(entry.epoch[len("mean_last"):])
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

@pytest.fixture(scope="module")
def heavy_runs(tmp_path_factory, shared_cache):
    """Started at the same moment: a 2x2 multirun (with a fresh cache, so teachers are trained here)
    and two plain debug runs sharing one cwd and the default hydra.run.dir."""
    base = tmp_path_factory.mktemp("configs_runs")
    sweep_cwd, pair_cwd, fresh_cache = base / "sweep", base / "pair", base / "fresh_cache"
    for d in (sweep_cwd, pair_cwd, fresh_cache):
        d.mkdir()
    args = {
        "sweep": (["train", "-m", *FAST, "loss.kd.temperature=2,4", "seed=0,1"], sweep_cwd, fresh_cache),
        "default": (["train", *FAST, "loss=none"], pair_cwd, shared_cache),
        "explicit": (["train", *FAST, "loss=none", "optim.epochs=2"], pair_cwd, shared_cache),
    }
    with ThreadPoolExecutor(len(args)) as pool:     # one thread per run: all three start at once
        futures = {name: pool.submit(run_kdmtl, *a) for name, a in args.items()}
        results = {name: future.result() for name, future in futures.items()}
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


# ---- paper experiments: the composed recipe equals the official code's --------------------------
# Each table below is typed in from the official code (commit, file, line/config name in the
# comments; the recipe cards in docs/recipes/ list the same sources). Composition only (in-process,
# no CLI, no data), so these are fast; they fail when an experiment, a group or a default they
# compose from drifts from the paper's value.

# RepDistiller (HobbitLong/RepDistiller@b84f547) train_student.py L44-54 = train_teacher.py L31-40,
# and mdistiller (megvii-research/mdistiller@a08d46f) configs/cifar100/{vanilla,kd}.yaml,
# configs/cifar100/dkd/<pair>.yaml SOLVER L9-17: the same recipe for student and teacher.
CIFAR100_SOLVER = {"name": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": False, "weight_decay": 5e-4,
                   "epochs": 240, "scheduler": "multistep", "milestones": [150, 180, 210], "gamma": 0.1,
                   "warmup_epochs": 0.0, "grad_clip_norm": None}
# RepDistiller dataset/cifar100.py L53-62 (= mdistiller dataset/cifar100.py L117-134); batch
# train_student.py L44 / SOLVER.BATCH_SIZE 64.
CIFAR100_DATA = {"name": "cifar100", "batch_size": 64, "hflip": True, "crop_padding": 4,
                 "mean": [0.5071, 0.4867, 0.4408], "std": [0.2675, 0.2565, 0.2761],
                 "val_size": 0}   # the whole training set: the papers have no validation split
# The protocol (docs/recipes/README.md): RepDistiller distils from the teacher's last epoch
# (ckpt_epoch_240.pth) and CRD reports the student's last epoch (RepDistiller issue #16); DKD's
# best TEST epoch is refused (selection on test): kdmtl tests the last epoch.
CIFAR100_PROTOCOL = {"checkpoint.monitor": "last", "teacher.keep": "last", "test.average_last_epochs": 0}
# (teacher, student, DKD beta): beta from mdistiller configs/cifar100/dkd/<file> DKD.BETA, or
# engine/cfg.py L165 (8.0) where the file has no DKD block.
CIFAR100_PAIRS = {
    "resnet56_resnet20": ("resnet56", "resnet20", 2.0),       # dkd/res56_res20.yaml L18-19
    "resnet110_resnet32": ("resnet110", "resnet32", 2.0),     # dkd/res110_res32.yaml L18-19
    "resnet32x4_resnet8x4": ("resnet32x4", "resnet8x4", 8.0), # dkd/res32x4_res8x4.yaml (cfg.py default)
    "wrn_40_2_wrn_16_2": ("wrn_40_2", "wrn_16_2", 6.0),       # dkd/wrn40_2_wrn_16_2.yaml L18-19
    "vgg13_vgg8": ("vgg13", "vgg8", 6.0),                     # dkd/vgg13_vgg8.yaml L18-19
}
# KD: RepDistiller scripts/run_cifar_distill.sh L5 (-r 0.1 -a 0.9), train_student.py L78 (kd_T 4);
# mdistiller engine/cfg.py L61-64. DKD: mdistiller engine/cfg.py L163-167 (CE 1, alpha 1, T 4,
# warm-up 20 epochs), distillers/DKD.py L72 (min(epoch / warmup, 1), per 1-based epoch).
CIFAR100_LOSS = {
    "vanilla": {"task_weight": 1.0},
    "kd": {"task_weight": 0.1, "kd.weight": 0.9, "kd.temperature": 4.0, "kd.standardize": False},
    "dkd": {"task_weight": 1.0, "dkd.weight": 1.0, "dkd.alpha": 1.0, "dkd.temperature": 4.0,
            "dkd.warmup_epochs": 20.0, "dkd.warmup_schedule": "epoch", "dkd.standardize": False},
}
# The CRD Table 1 feature methods (RepDistiller@b84f547 scripts/run_cifar_distill.sh, written for
# resnet32x4 -> resnet8x4; RepDistiller has no per-pair flags, so every pair uses them): -a 0 -b beta, -r left
# at 1 (train_student.py L73 `-r/--gamma default=1`): FitNet L7 -b 100, AT L9 -b 1000, SP L11 -b 3000,
# CC L13 -b 0.02, VID L15 -b 1, RKD L17 -b 1, PKT L19 -b 30000, FSP L25 -b 50, NST L27 -b 50.
_CRD = {"crd.feat_dim": 128, "crd.negatives": "other_class", "crd.nce_k": 16384, "crd.nce_t": 0.07, "crd.nce_m": 0.5}
CIFAR100_FEATURE_LOSS = {
    "fitnet": {"task_weight": 1.0, "fitnet.weight": 100.0},
    "at": {"task_weight": 1.0, "at.weight": 1000.0, "at.p": 2.0},                     # AT.py Attention(p=2)
    "sp": {"task_weight": 1.0, "sp.weight": 3000.0},
    "cc": {"task_weight": 1.0, "cc.weight": 0.02, "cc.feat_dim": 128},               # train_student.py --feat_dim 128
    "vid": {"task_weight": 1.0, "vid.weight": 1.0},
    "rkd": {"task_weight": 1.0, "rkd.weight": 1.0, "rkd.distance_weight": 25.0, "rkd.angle_weight": 50.0},
    "pkt": {"task_weight": 1.0, "pkt.weight": 30000.0},
    "fsp": {"task_weight": 1.0, "fsp.weight": 50.0},
    "nst": {"task_weight": 1.0, "nst.weight": 50.0},
    # CRD L29 -a 0 -b 0.8; train_student.py L81-85 (feat_dim 128, mode exact, nce_k 16384, nce_t 0.07, nce_m 0.5).
    "crd": {"task_weight": 1.0, "crd.weight": 0.8, **_CRD},
    # AB L21 -a 0 -b 1 (AB.py L11 margin 1.0); its loss only in the init stage: helper/loops.py L171-173 `loss_kd = 0`,
    # train_student.py L47 init_epochs 30, helper/pretrain.py L26-27 lr = opt.learning_rate.
    "ab": {"task_weight": 1.0, "ab.weight": 1.0, "ab.margin": 1.0, "ab.main_stage": False, "ab.init_epochs": 30,
           "ab.init_lr": None},
    # FT L23 -a 0 -b 200 (FT.py L9 p1 2, p2 1; models/util.py L9, L45 k 0.5); init stage train_student.py L47
    # init_epochs 30, helper/pretrain.py L22-25 lr 0.01 for CIFAR ResNet / WRN students (vgg8: L26-27, optim.lr).
    "ft": {"task_weight": 1.0, "ft.weight": 200.0, "ft.p1": 2, "ft.p2": 1, "ft.rate": 0.5, "ft.init_epochs": 30,
           "ft.init_lr": 0.01},
    # CRD+KD L32 -a 1 -b 0.8 (-r 1): helper/loops.py L184 gamma CE + alpha KL(kd_T 4, train_student.py L78) + beta CRD.
    "crd_kd": {"task_weight": 1.0, "kd.weight": 1.0, "kd.temperature": 4.0, "kd.standardize": False, "crd.weight": 0.8,
               **_CRD},
}
# The init-stage lr RepDistiller gives students outside its ResNet / WRN list (helper/pretrain.py L22-27).
CIFAR100_PAIR_LOSS = {("vgg13_vgg8", "ft"): {"ft.init_lr": None}}
# Logit standardisation's per-pair runs: sunshangquan/logit-standardization-KD@f6e5aa5 README.md L90 (KD+Ours) / L94
# (DKD+Ours) link one log per pair, named KD_TYPE,TEACHER,STUDENT,BASE_TEMPERATURE,KD_WEIGHT[,BETA] (L83); tools/train.py
# L113-114 (KD: weight, T), L116-118 (DKD: alpha = 1 x weight, beta = BETA x weight, T). KD+Ours: only vgg13 -> vgg8
# differs from the resnet32x4 recipe (logs/KD/kd,vgg13,vgg8,3,9.txt: T 3). DKD+Ours: logs/DKD/dkd,resnet56,resnet20,3,18,2.0,
# dkd,resnet110,resnet32,2,15,2.0, dkd,wrn_40_2,wrn_16_2,2,12,2.0, dkd,vgg13,vgg8,2,15,2.0.
CIFAR100_PAIR_LOSS.update({
    ("vgg13_vgg8", "kd_ls"): {"kd.temperature": 3.0},
    ("resnet56_resnet20", "dkd_ls"): {"dkd.alpha": 18.0, "dkd.beta": 36.0, "dkd.temperature": 3.0},
    ("resnet110_resnet32", "dkd_ls"): {"dkd.alpha": 15.0, "dkd.beta": 30.0, "dkd.temperature": 2.0},
    ("wrn_40_2_wrn_16_2", "dkd_ls"): {"dkd.alpha": 12.0, "dkd.beta": 24.0, "dkd.temperature": 2.0},
    ("vgg13_vgg8", "dkd_ls"): {"dkd.alpha": 15.0, "dkd.beta": 30.0, "dkd.temperature": 2.0},
})
# Where each method reads its features (RepDistiller helper/loops.py L125-170: hint feat[2] (train_student.py
# L88 --hint_layer 2), AT / NST / VID feat[1:-1], SP feat[-2], CC / RKD / PKT feat[-1] (pooled), FSP feat[:-1]
# (train_student.py L255)) in kdmtl's trunks: ResNet (models/resnet.py) f0 = stem, f1..f3 = trunk.stages.0..2;
# WRN (models/wrn.py L103-122) f1, f2 = trunk.stages.0, .1, f3 (before the final BN + ReLU) = trunk.stages.2.0,
# f4 = pooled trunk.stages.2; VGG (models/vgg.py L64-98) f0..f4 = trunk.stages.0..4, f5 = pooled trunk.stages.4.
# CRD feat[-1] (pooled; loops.py L131-132) as CC; FT feat[-2] (loops.py L178-179) as SP; AB feat[1:-1] with preact=True
# (pretrain.py L57-65, models/resnet.py L184-198, models/vgg.py L69-96): the ResNets' `preact` of each stage's last
# block (per (student, teacher) arch below), VGG's last BN of each block 1..4 (block.<len - 2>). No AB for WRN: its
# f1 / f2 preact (models/wrn.py L119-120, the next group's first bn1) has no intact hook point in kdmtl's wrn trunk
# (WideBasicBlock.relu1 is in place and overwrites the bn1 output), so no wrn_40_2_wrn_16_2_ab is shipped.
_S = [f"trunk.stages.{i}" for i in range(5)]
CIFAR100_FEATURES = {
    "resnet": {"fitnet": _S[1:2], "at": _S[:3], "nst": _S[:3], "vid": _S[:3], "sp": _S[2:3], "cc": _S[2:3],
               "rkd": _S[2:3], "pkt": _S[2:3], "fsp": ["trunk.stem", *_S[:3]], "crd": _S[2:3], "ft": _S[2:3]},
    "wrn": {"fitnet": _S[1:2], "at": [*_S[:2], "trunk.stages.2.0"], "nst": [*_S[:2], "trunk.stages.2.0"],
            "vid": [*_S[:2], "trunk.stages.2.0"], "sp": ["trunk.stages.2.0"], "cc": _S[2:3], "rkd": _S[2:3],
            "pkt": _S[2:3], "fsp": ["trunk.stem", *_S[:2], "trunk.stages.2.0"], "crd": _S[2:3],
            "ft": ["trunk.stages.2.0"]},
    "vgg": {"fitnet": _S[2:3], "at": _S[1:], "nst": _S[1:], "vid": _S[1:], "sp": _S[4:], "cc": _S[4:], "rkd": _S[4:],
            "pkt": _S[4:], "fsp": _S, "crd": _S[4:], "ft": _S[4:]},
}
_LAST_BLOCK = {"resnet20": 2, "resnet56": 8, "resnet32": 4, "resnet110": 17, "resnet8x4": 0, "resnet32x4": 4}  # (depth-2)/6 - 1
_VGG_PREACT = {"vgg8": 1, "vgg13": 4}   # index of the last BN in each VGG block (one / two convs per block)


def _ab_features(arch: str) -> list:
    if arch in _VGG_PREACT:
        return [f"trunk.stages.{i}.block.{_VGG_PREACT[arch]}" for i in range(1, 5)]
    return [f"trunk.stages.{i}.{_LAST_BLOCK[arch]}.preact" for i in range(3)]


CIFAR100_FEATURE_METHOD = {"crd_kd": "crd"}   # the feature loss of a combined experiment
CIFAR100_UNSHIPPED = {("wrn_40_2_wrn_16_2", "ab")}
# Methods from later papers, with their recipes for resnet32x4 -> resnet8x4 (the other pairs: CIFAR100_EXTRA_PAIRS below,
# their per-pair settings CIFAR100_PAIR_LOSS above):
# kd_ls / dkd_ls: sunshangquan/logit-standardization-KD@f6e5aa5 README.md L57 / L66 (--logit-stand --base-temp 2
#   --kd-weight 9), tools/train.py L102-104, L110-118, their engine/cfg.py L64 (KD CE 0.1), L164-168 (DKD CE 1,
#   alpha 1, beta 8, warm-up 20: alpha and beta times 9);
# ctkd: zhengli97/CTKD@7d52522 scripts/run_cifar_distill.sh L17-22 (-r 0.1 -a 0.9, global T, cosine decay 0 -> -1
#   over 10 epochs), train_student.py L89-90 (t_start 1, t_end 20);
# dist: hunto/image_classification_sota@6f7a70a configs/strategies/distill/dist_cifar.yaml L34-36
#   (ori_loss_weight 1, kd_loss_weight 2, dist_t4), lib/models/losses/kd_loss.py L69-71 (beta = gamma = 1, tau 4);
# reviewkd: megvii-research/mdistiller@a08d46f configs/cifar100/reviewkd.yaml L10 (REVIEWKD_WEIGHT 5.0),
#   engine/cfg.py L151 (CE 1.0), L153 (warm-up 20); = ReviewKD CIFAR-100/script/reviewKD.sh L7.
CIFAR100_EXTRA_LOSS = {
    "kd_ls": {"task_weight": 0.1, "kd.weight": 9.0, "kd.temperature": 2.0, "kd.standardize": True},
    "dkd_ls": {"task_weight": 1.0, "dkd.weight": 1.0, "dkd.alpha": 9.0, "dkd.beta": 72.0, "dkd.temperature": 2.0,
               "dkd.warmup_epochs": 20.0, "dkd.warmup_schedule": "epoch", "dkd.standardize": True},
    "ctkd": {"task_weight": 0.1, "ctkd.weight": 0.9, "ctkd.t_start": 1.0, "ctkd.t_span": 20.0,
             "ctkd.lambda_start": 0.0, "ctkd.lambda_end": -1.0, "ctkd.lambda_epochs": 10.0},
    "dist": {"task_weight": 1.0, "dist.weight": 2.0, "dist.beta": 1.0, "dist.gamma": 1.0, "dist.tau": 4.0},
    "reviewkd": {"task_weight": 1.0, "reviewkd.weight": 5.0, "reviewkd.warmup_epochs": 20.0},
}
# the loss options an experiment's method uses
CIFAR100_LOSS_GROUP = {"kd_ls": ["kd"], "dkd_ls": ["dkd"], "crd_kd": ["crd", "kd"]}
CIFAR100_LOSS.update(CIFAR100_FEATURE_LOSS)
CIFAR100_LOSS.update(CIFAR100_EXTRA_LOSS)
# The pairs each of those methods' authors publish a CIFAR-100 number for (README tables / logs): logit
# standardisation README.md L87-94 (every pair); CTKD README.md L40-43 (all but resnet32x4 -> resnet8x4, which
# logit-standardization-KD README.md L91 adds); DIST_KD README.md L93-100 (resnet56 -> resnet20 and
# resnet32x4 -> resnet8x4 only); ReviewKD: no README or log of ReviewKD / mdistiller gives one (resnet32x4 only).
CIFAR100_EXTRA_PAIRS = {"kd_ls": set(CIFAR100_PAIRS), "dkd_ls": set(CIFAR100_PAIRS), "ctkd": set(CIFAR100_PAIRS),
                        "dist": {"resnet32x4_resnet8x4", "resnet56_resnet20"}, "reviewkd": {"resnet32x4_resnet8x4"}}
CIFAR100_EXPERIMENTS = [f"cifar100_{pair}_{method}" for pair in CIFAR100_PAIRS for method in CIFAR100_LOSS
                        if pair in CIFAR100_EXTRA_PAIRS.get(method, CIFAR100_PAIRS)
                        and (pair, method) not in CIFAR100_UNSHIPPED]

# Published top-1 (fractions) and the epoch each paper reports, typed in from the sources:
# CRD Table 1 = HobbitLong/RepDistiller README.md L79 (teacher / student), L80 (KD), L81 FitNet, L82 AT, L83 SP,
# L84 CC, L85 VID, L86 RKD, L87 PKT, L88 AB, L89 FT, L90 FSP, L91 NST, L92 CRD (last epoch: train_teacher.py L162,
# issue #16); CRD+KD: CRD Table 1, a row RepDistiller's README lacks, = alldbi/SuperMix@d63d25a README.md L129;
# DKD: megvii-research/mdistiller README.md L52-55 (best test epoch, issue #30); logit standardisation and
# CTKD: sunshangquan/logit-standardization-KD README.md L90 (KD+Ours), L91 (CTKD), L94 (DKD+Ours);
# DIST: hunto/DIST_KD README.md L97; ReviewKD: Chen et al. CVPR 2021 (via paperswithcode; no README lists it).
# The other pairs: logit-standardization-KD README.md L90 (KD+Ours), L94 (DKD+Ours); CTKD: zhengli97/CTKD@7d52522
# README.md L40 (columns RN-56/RN-20, RN-110/RN-32, RN-110/RN-20, WRN-40-2/WRN-16-2, WRN-40-1, VGG-13/VGG-8), L43 (+CTKD);
# DIST: DIST_KD README.md L96 (ResNet-20 from ResNet-56).
_CRD_COLUMNS = ("wrn_40_2_wrn_16_2", "resnet56_resnet20", "resnet110_resnet32", "resnet32x4_resnet8x4", "vgg13_vgg8")
_CRD_ROWS = {   # README table 1 columns wrn-40-2/wrn-16-2, resnet56/20, resnet110/32, resnet32x4/8x4, vgg13/vgg8
    "teacher": (75.61, 72.34, 74.31, 79.42, 74.64), "vanilla": (73.26, 69.06, 71.14, 72.50, 70.36),
    "kd": (74.92, 70.66, 73.08, 73.33, 72.98), "fitnet": (73.58, 69.21, 71.06, 73.50, 71.02),
    "at": (74.08, 70.55, 72.31, 73.44, 71.43), "sp": (73.83, 69.67, 72.69, 72.94, 72.68),
    "cc": (73.56, 69.63, 71.48, 72.97, 70.71), "vid": (74.11, 70.38, 72.61, 73.09, 71.23),
    "rkd": (73.35, 69.61, 71.82, 71.90, 71.48), "pkt": (74.54, 70.34, 72.61, 73.64, 72.88),
    "fsp": (72.91, 69.95, 71.89, 72.62, 70.23), "nst": (73.68, 69.60, 71.96, 73.30, 71.53),
    "ab": (72.50, 69.47, 70.98, 73.17, 70.94), "ft": (73.25, 69.84, 72.37, 72.86, 70.58),
    "crd": (75.48, 71.16, 73.48, 75.51, 73.94), "crd_kd": (75.64, 71.63, 73.75, 75.46, 74.29),
}
_BEST = {   # papers that report the best test epoch
    "dkd": dict(zip(_CRD_COLUMNS, (76.23, 71.97, 74.11, 76.32, 74.68))),
    "kd_ls": dict(zip(_CRD_COLUMNS, (76.11, 71.43, 74.17, 76.62, 74.36))),
    "dkd_ls": dict(zip(_CRD_COLUMNS, (76.39, 72.32, 74.29, 77.01, 74.81))),
    "ctkd": dict(zip(_CRD_COLUMNS, (75.45, 71.19, 73.52, 73.39, 73.52))),
    "dist": {"resnet32x4_resnet8x4": 76.31, "resnet56_resnet20": 71.75},
    "reviewkd": {"resnet32x4_resnet8x4": 75.63},
}
CIFAR100_PUBLISHED = {(pair, method): (round(values[i] / 100, 4), "last")
                      for method, values in _CRD_ROWS.items() for i, pair in enumerate(_CRD_COLUMNS)}
CIFAR100_PUBLISHED.update({(pair, method): (round(value / 100, 4), "best")
                           for method, by_pair in _BEST.items() for pair, value in by_pair.items()})


def _pair_method(name: str):
    pair = next(p for p in CIFAR100_PAIRS if name.startswith(f"cifar100_{p}_"))
    return pair, name[len(f"cifar100_{pair}_"):]


def _composed(hydra_compose, name: str) -> dict:
    from kdmtl_cli.schema import TrainConfig, validate

    return OmegaConf.to_container(validate(hydra_compose("train", overrides=[f"+experiment={name}"]),
                                           TrainConfig), resolve=True)


def _differences(actual: dict, expected: dict) -> list:
    flat = _leaves(actual)
    return [f"{key}: {flat.get(key, actual.get(key))!r} != official {value!r}" for key, value in expected.items()
            if (flat[key] if key in flat else actual.get(key)) != value]


def test_every_cifar100_experiment_is_in_the_recipe_table():
    assert sorted(CIFAR100_EXPERIMENTS) == sorted(n for n in EXPERIMENTS if n.startswith("cifar100_"))


@pytest.mark.parametrize("name", CIFAR100_EXPERIMENTS)
def test_cifar100_experiment_is_the_official_recipe(name, hydra_compose):
    cfg = _composed(hydra_compose, name)
    pair, method = _pair_method(name)
    teacher, student, beta = CIFAR100_PAIRS[pair]
    wrong = [f"optim.{m}" for m in _differences(cfg["optim"], CIFAR100_SOLVER)]
    wrong += [f"teacher.optim.{m}" for m in _differences(cfg["teacher"]["optim"], CIFAR100_SOLVER)]
    wrong += [f"data.{m}" for m in _differences(cfg["data"], CIFAR100_DATA)]
    wrong += _differences(cfg, CIFAR100_PROTOCOL)
    expected_loss = dict(CIFAR100_LOSS[method], **({"dkd.beta": beta} if method == "dkd" else {}))
    expected_loss.update(CIFAR100_PAIR_LOSS.get((pair, method), {}))
    if method in CIFAR100_FEATURE_LOSS:
        family = "wrn" if teacher.startswith("wrn") else "vgg" if teacher.startswith("vgg") else "resnet"
        feature = CIFAR100_FEATURE_METHOD.get(method, method)
        if feature == "ab":
            expected_loss.update({"ab.student": _ab_features(student), "ab.teacher": _ab_features(teacher)})
        else:
            positions = CIFAR100_FEATURES[family][feature]
            expected_loss.update({f"{feature}.student": positions, f"{feature}.teacher": positions})
    wrong += [f"loss.{m}" for m in _differences(cfg["loss"], expected_loss)]
    groups = sorted(CIFAR100_LOSS_GROUP.get(method, [method]))
    methods = sorted(k for k, v in cfg["loss"].items() if k != "task_weight" and v is not None)
    wrong += [] if methods == ([] if method == "vanilla" else groups) else [f"loss methods {methods}"]
    if (cfg["teacher"]["arch"], cfg["student"]["arch"]) != (teacher, student):
        wrong.append(f"pair {cfg['teacher']['arch']} -> {cfg['student']['arch']}")
    assert not wrong, f"{name} differs from the official recipe: " + "; ".join(wrong)


@pytest.mark.parametrize("name", CIFAR100_EXPERIMENTS)
def test_cifar100_published_numbers_are_the_papers(name):
    """The stored published top-1 of the student (and the teacher, where stored) is the paper's,
    with the epoch the paper reports: CRD the last epoch, DKD / logit standardisation / CTKD / DIST /
    ReviewKD their best test epoch (compared with kdmtl's last epoch)."""
    pair, method = _pair_method(name)
    published = OmegaConf.to_container(OmegaConf.load(CONF / "experiment" / f"{name}.yaml"))["published"]
    entries = {p["model"]: p for p in published}
    value, epoch = CIFAR100_PUBLISHED[(pair, method)]
    assert (entries["student"]["value"], entries["student"]["epoch"]) == (value, epoch), entries["student"]
    assert entries["student"]["metric"] == "test/cls/accuracy"
    assert method == "vanilla" or "teacher" in entries
    if "teacher" in entries:
        assert (entries["teacher"]["value"], entries["teacher"]["epoch"]) == (CIFAR100_PUBLISHED[(pair, "teacher")][0], "last")


# MTAN (lorenmt/mtan@c36c30b im2im_pred/model_segnet_mtan.py L185-186, L203, L215-222), Nash-MTL
# (AvivNavon/nash-mtl@cce1840 experiments/nyuv2/trainer.py L87-93, L247-261), KD4MTL
# (VICO-UoE/KD4MTL@1d7528e model_segnet_kdmtl.py L82-83, L87, L104, L117, L168), CAGrad Cityscapes
# (Cranial-XIX/CAGrad@dc3d481 cityscapes/model_segnet_mtan.py L187-188, L205, L224): Adam 1e-4,
# no weight decay, StepLR(100, 0.5), 200 epochs; no input normalisation in any of them.
MTAN_SOLVER = {"name": "adam", "lr": 1e-4, "weight_decay": 0.0, "epochs": 200, "scheduler": "step",
               "step_epochs": 100, "gamma": 0.5, "warmup_epochs": 0.0, "grad_clip_norm": None}
# RandomScaleCrop scales: nash-mtl@cce1840 experiments/nyuv2/data.py, CAGrad@dc3d481
# cityscapes/create_dataset.py (their --apply_augmentation runs); KD4MTL uses no augmentation.
SCALE_CROP = [1.0, 1.2, 1.5]
NO_NORMALISATION = {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0], "crop_padding": 0,
                    "val_size": 0}   # the whole training set: the papers have no validation split
# Nash-MTL experiments/nyuv2/README.md L11-12, MTAN README.md L53 (CAGrad the same): the mean of the
# last 10 epochs' test metrics, no selection. KD4MTL model_segnet_kdmtl.py L203-204, L243-245, L252-258:
# the student's epoch of lowest training task loss; model_segnet_single.py L154-160, L216-223: the same
# for each teacher.
# Depth/normal metrics per test batch, averaged over the batches, at the official test batch size
# (nash-mtl experiments/nyuv2/utils.py L26-59, trainer.py L76-78, L166-191; KD4MTL
# model_segnet_kdmtl.py L110-113, L210-226; CAGrad cityscapes/utils.py L117-125, L199-213,
# model_segnet_mtan.py L211-214).
MEAN_LAST_10 = {"checkpoint.monitor": "last", "test.average_last_epochs": 10, "test.metric_reduction": "batch_mean"}
KD4MTL_SELECTION = {"checkpoint.monitor": "train/loss/task", "teacher.keep": "train_loss",
                    "test.average_last_epochs": 0, "test.metric_reduction": "batch_mean"}
OFFICIAL_EVAL_BATCH = {"nyuv2": 2, "cityscapes": 8}
DENSE_RECIPES = {
    # Nash-MTL trainer.py L251 (batch 2), L260-261 (augmentation on: kdmtl's part of it is the flip).
    "nyuv2_segnet": {"data": {"name": "nyuv2", "batch_size": 2, "hflip": True, "scale_crop": SCALE_CROP}, "student": "segnet",
                     "tasks": ["depth", "normal", "seg"], "loss": {"task_weight": 1.0}, "protocol": MEAN_LAST_10},
    "nyuv2_mtan": {"data": {"name": "nyuv2", "batch_size": 2, "hflip": True, "scale_crop": SCALE_CROP}, "student": "segnet_mtan",
                   "tasks": ["depth", "normal", "seg"], "loss": {"task_weight": 1.0}, "protocol": MEAN_LAST_10},
    # KD4MTL model_segnet_kdmtl.py L100-108 (batch 2, no augmentation), L149-150 (task weights 1),
    # L168 (lambda 1, 1, 2), L87 + README --alr 1e-1 (adaptor Adam lr 0.1, wd 5e-4), L155-165 with
    # model/segnet.py L102, L113 (pooled bottleneck + last decoder stage).
    "nyuv2_segnet_kd4mtl": {"data": {"name": "nyuv2", "batch_size": 2, "hflip": False, "scale_crop": None}, "student": "segnet",
                            "tasks": ["depth", "normal", "seg"],
                            "loss": {"task_weight": 1.0, "kd4mtl.weight.seg": 1.0, "kd4mtl.weight.depth": 1.0,
                                     "kd4mtl.weight.normal": 2.0, "kd4mtl.adaptor_lr": 0.1,
                                     "kd4mtl.adaptor_weight_decay": 5e-4, "kd4mtl.adaptor_scheduled": False,
                                     "kd4mtl.student": ["trunk/-1", "trunk/0"],
                                     "kd4mtl.teacher": ["trunk/-1", "trunk/0"]}, "protocol": KD4MTL_SELECTION},
    # CAGrad cityscapes/model_segnet_mtan.py L205 (batch 8), run.sh (--apply_augmentation).
    "cityscapes_segnet": {"data": {"name": "cityscapes", "batch_size": 8, "hflip": True, "scale_crop": SCALE_CROP}, "student": "segnet",
                          "tasks": ["depth", "seg"], "loss": {"task_weight": 1.0}, "protocol": MEAN_LAST_10},
    "cityscapes_mtan": {"data": {"name": "cityscapes", "batch_size": 8, "hflip": True, "scale_crop": SCALE_CROP}, "student": "segnet_mtan",
                        "tasks": ["depth", "seg"], "loss": {"task_weight": 1.0}, "protocol": MEAN_LAST_10},
}


@pytest.mark.parametrize("name", sorted(DENSE_RECIPES))
def test_dense_experiment_is_the_official_recipe(name, hydra_compose):
    recipe = DENSE_RECIPES[name]
    cfg = _composed(hydra_compose, name)
    wrong = [f"optim.{m}" for m in _differences(cfg["optim"], MTAN_SOLVER)]
    wrong += [f"data.{m}" for m in _differences(cfg["data"], dict(NO_NORMALISATION, **recipe["data"]))]
    loss = {k: v for k, v in cfg["loss"].items() if v is not None}
    wrong += [f"loss.{m}" for m in _differences(loss, recipe["loss"])]
    wrong += _differences(cfg, recipe["protocol"])
    wrong += _differences(cfg, {"data.eval_batch_size": OFFICIAL_EVAL_BATCH[recipe["data"]["name"]]})
    if name.endswith("kd4mtl"):   # per-task teachers trained with the same recipe (model_segnet_single.py L48-49, L72, L86)
        wrong += [f"teacher.optim.{m}" for m in _differences(cfg["teacher"]["optim"], MTAN_SOLVER)]
        wrong += [] if cfg["teacher"]["mode"] == "per_task" and cfg["teacher"]["arch"] == "segnet" else ["teacher"]
        wrong += [] if sorted(k for k in loss if k != "task_weight") == ["kd4mtl"] else [f"loss {sorted(loss)}"]
    else:
        wrong += [] if sorted(loss) == ["task_weight"] else [f"loss methods {sorted(loss)}"]
    wrong += [] if cfg["weighting"]["name"] == "equal" else [f"weighting {cfg['weighting']['name']}"]
    wrong += [] if (cfg["student"]["arch"], cfg["student"]["width"]) == (recipe["student"], 64) else ["student"]
    wrong += [] if sorted(cfg["tasks"]) == recipe["tasks"] else [f"tasks {sorted(cfg['tasks'])}"]
    assert not wrong, f"{name} differs from the official recipe: " + "; ".join(wrong)


def test_nyuv2_stl_baseline_is_nash_mtl_base():
    """conf/baselines/nyuv2_stl_navon2022.yaml = nash-mtl experiments/nyuv2/utils.py L74-76 (BASE,
    "base results from CAGrad"): mIoU, pix acc, abs, rel, mean, median, <11.25, <22.5, <30."""
    base = [0.3830, 0.6376, 0.6754, 0.2780, 25.01, 19.21, 0.3014, 0.5720, 0.6915]
    tasks = yaml.safe_load((CONF / "baselines" / "nyuv2_stl_navon2022.yaml").read_text())["tasks"]
    stored = [tasks["seg"]["metrics"][k] for k in ("miou", "pixel_acc")] \
        + [tasks["depth"]["metrics"][k] for k in ("abs_err", "rel_err")] \
        + [tasks["normal"]["metrics"][k] for k in ("mean_angle", "median_angle", "within_11_25", "within_22_5",
                                                    "within_30")]
    assert stored == base


@pytest.mark.parametrize("name", CIFAR100_EXPERIMENTS + sorted(DENSE_RECIPES))
def test_paper_experiment_points_to_its_recipe_card(name):
    text = (CONF / "experiment" / f"{name}.yaml").read_text()
    cards = re.findall(r"docs/recipes/(\S+\.md)", text)
    assert cards, f"{name}.yaml names no recipe card"
    for card in cards:
        assert (REPO / "docs" / "recipes" / card).is_file(), f"{name}.yaml points to a missing card {card}"
        assert card in (REPO / "docs" / "recipes" / "README.md").read_text(), f"{card} not in the index"
