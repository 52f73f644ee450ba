"""Every numeric setting has an allowed range, declared beside its field in schema.py and checked
before any work (kdmtl_cli/ranges.py); and `kdmtl report`, `eval` and `export` name any run file
they cannot read.

The range checker is tested in-process against the schema itself (every ranged default inside
its range, each boundary accepted and the value just past it refused, every numeric field ranged,
every shipped config passing). The CLI cases run concurrently in one module fixture, each with
its own empty KDMTL_CACHE, so a test can prove that nothing was generated or trained.
"""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import typing
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest
import yaml
from omegaconf import OmegaConf

from conftest import REPO, WORKERS, assert_one_line_error, run_kdmtl, show

from kdmtl_cli import schema
from kdmtl_cli.errors import KdmtlError
from kdmtl_cli.ranges import Range, check_ranges, field_range

CONF = REPO / "conf"
LOSS_METHODS = ("kd", "dkd", "fitnet", "at", "kd4mtl", "bam", "rkd", "dist", "pkt", "sp", "nst", "fsp", "cc", "cwd", "kdsvd", "reviewkd", "vid", "ctkd", "ofd", "ab", "ft", "crd", "pairwise")

# Numeric fields left without a range, and why (anything else numeric must declare one).
UNRANGED = {
    "DataConfig.mean": "a per-channel shift: any value is valid",
    "DataConfig.scale_crop": "data.check_scale_crop refuses scales < 1 with its own hint, before any work",
    "PublishedResult.value": "a published number as printed, any sign",
    "CTKDConfig.initial_parameter": "the learned temperature parameter's start: any real (T = t_start + t_span * sigmoid(p))",
    "CTKDConfig.lambda_start": "the gradient-reversal factor at the curriculum's start: any real (official 0)",
    "CTKDConfig.lambda_end": "the gradient-reversal factor at its end: any real (official -1)",
}


# ---- the schema, walked ---------------------------------------------------------------------------

def _strip_optional(hint) -> Tuple[Any, bool]:
    if typing.get_origin(hint) is typing.Union and type(None) in typing.get_args(hint):
        return next(a for a in typing.get_args(hint) if a is not type(None)), True
    return hint, False


def _schemas() -> List[type]:
    """Every dataclass reachable from the two command schemas."""
    seen, todo = [], [schema.TrainConfig, schema.EvalConfig]
    while todo:
        cls = todo.pop()
        if cls in seen:
            continue
        seen.append(cls)
        for hint in typing.get_type_hints(cls).values():
            for arg in (hint, *typing.get_args(hint), *[a for t in typing.get_args(hint) for a in typing.get_args(t)]):
                if isinstance(arg, type) and dataclasses.is_dataclass(arg):
                    todo.append(arg)
    return seen


def _full_config() -> dict:
    """The default train config with every optional section switched on (all loss methods, debug),
    as plain containers, so every ranged field is present and can be set to any value."""
    def plain(cls) -> dict:
        return OmegaConf.to_container(OmegaConf.structured(cls), resolve=False)

    cfg = plain(schema.TrainConfig)
    for name in LOSS_METHODS:
        cfg["loss"][name] = plain(typing.get_type_hints(schema.LossConfig)[name].__args__[0])
    cfg["debug"] = plain(schema.DebugConfig)
    cfg["tasks"] = {"cls": {"kind": "classification"}}
    cfg["published"] = [{"metric": "test/cls/accuracy", "value": 0.5}]
    return cfg


def _ranged_keys(node_schema: type, prefix: str = "") -> List[Tuple[str, Range, Any, bool]]:
    """(dotted key, range, scalar type, optional) of every ranged field under a schema."""
    out = []
    hints = typing.get_type_hints(node_schema)
    for f in dataclasses.fields(node_schema):
        hint, optional = _strip_optional(hints[f.name])
        rule = field_range(f)
        if rule is not None:
            scalar = typing.get_args(hint)[0] if typing.get_origin(hint) in (list, typing.List) else hint
            out.append((prefix + f.name, rule, scalar, optional))
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            out += _ranged_keys(hint, f"{prefix}{f.name}.")
    return out


RANGED = _ranged_keys(schema.TrainConfig)   # EvalConfig's ranged parts (hardware, log) are TrainConfig's too


def _get(cfg: dict, key: str):
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def _set(cfg: dict, key: str, value) -> dict:
    *parents, leaf = key.split(".")
    node = cfg
    for part in parents:
        node = node[part]
    node[leaf] = [value] if isinstance(node[leaf], list) else value
    return cfg


def _bound(cfg: dict, key: str, bound):
    """A bound's value: a number, or the sibling field it names."""
    return _get(cfg, key.rpartition(".")[0] + "." + bound if "." in key else bound) if isinstance(bound, str) else bound


# ---- the range checker against the schema ----------------------------------------------------------

def test_the_default_config_passes():
    check_ranges(OmegaConf.structured(schema.TrainConfig), schema.TrainConfig)
    check_ranges(_full_config(), schema.TrainConfig)
    check_ranges({"run_dir": "x", **OmegaConf.to_container(OmegaConf.structured(schema.EvalConfig))},
                 schema.EvalConfig)


@pytest.mark.parametrize("cls", _schemas(), ids=lambda c: c.__name__)
def test_every_ranged_default_is_inside_its_own_range(cls):
    hints = typing.get_type_hints(cls)
    instance = OmegaConf.to_container(OmegaConf.structured(cls))
    for f in dataclasses.fields(cls):
        rule = field_range(f)
        if rule is None:
            continue
        default = instance[f.name]
        if default is None:
            assert _strip_optional(hints[f.name])[1], f"{cls.__name__}.{f.name}: default null, but not Optional"
            continue
        for value in (default if isinstance(default, list) else [default]):
            assert rule.contains(value, instance), f"{cls.__name__}.{f.name}: default {value} outside its range"


@pytest.mark.parametrize("cls", _schemas(), ids=lambda c: c.__name__)
def test_every_numeric_setting_declares_a_range(cls):
    """Ints, floats (also Optional / in lists) and the number-or-{task: number} weights."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint, _ = _strip_optional(hints[f.name])
        inner = typing.get_args(hint)[0] if typing.get_origin(hint) in (list, typing.List) else hint
        inner = _strip_optional(inner)[0]
        numeric = inner in (int, float) or (hint is Any and f.name in ("weight", "weights", "task_weight"))
        name = f"{cls.__name__}.{f.name}"
        if numeric and name not in UNRANGED:
            assert field_range(f) is not None, f"{name} is numeric but declares no range (schema.py)"


@pytest.mark.parametrize("key,rule,scalar,optional", RANGED, ids=[k for k, *_ in RANGED])
def test_boundary_accepted_and_just_past_it_refused(key, rule, scalar, optional):
    cfg = _full_config()
    scalar = int if scalar is int else float      # weights typed Any hold floats
    for bound, is_open, step in ((rule.low, rule.low_open, -1), (rule.high, rule.high_open, +1)):
        if bound is None:
            continue
        edge = _bound(cfg, key, bound)
        past = edge if is_open else edge + step * (1 if scalar is int else 0.5)
        if not is_open:
            check_ranges(_set(_full_config(), key, scalar(edge)), schema.TrainConfig)   # the boundary itself
        else:
            inside = edge - step * (1 if scalar is int else 1e-3)
            check_ranges(_set(_full_config(), key, scalar(inside)), schema.TrainConfig)
        with pytest.raises(KdmtlError) as err:
            check_ranges(_set(_full_config(), key, scalar(past)), schema.TrainConfig)
        message = str(err.value)
        assert message.startswith(key), message
        assert ("or null" in message) == optional, message
    if optional:
        check_ranges(_set(_full_config(), key, None), schema.TrainConfig)


def test_messages_say_key_rule_and_value():
    def message(key, value) -> str:
        with pytest.raises(KdmtlError) as err:
            check_ranges(_set(_full_config(), key, value), schema.TrainConfig)
        return str(err.value)

    assert message("data.batch_size", 0) == "data.batch_size must be >= 1 (got 0)"
    assert message("stop_after_epoch", -1) == "stop_after_epoch must be >= 1 or null (got -1)"
    assert message("optim.lr", 0.0) == "optim.lr must be > 0 (got 0.0)"
    assert message("optim.momentum", 1.0) == "optim.momentum must be in [0, 1) (got 1.0)"
    assert message("data.max_objects", 1) == "data.max_objects must be >= data.min_objects (2) (got 1)"
    assert message("log.grad_norms_every_n_steps", -1) == \
        "log.grad_norms_every_n_steps must be >= 0 (got -1); 0 = off"
    assert message("teacher.optim.epochs", 0) == "teacher.optim.epochs must be >= 1 (got 0)"
    assert message("data.std", 0.0) == "data.std[0] must be > 0 (got 0.0)"


@pytest.mark.parametrize("key", ["loss.task_weight", "loss.kd.weight", "loss.dkd.weight", "loss.kd4mtl.weight",
                                 "loss.bam.weight", "weighting.weights"])
def test_per_task_weights_are_checked_value_by_value(key):
    check_ranges(_set(_full_config(), key, {"cls": 0.0, "seg": 2.0}), schema.TrainConfig)
    with pytest.raises(KdmtlError, match=rf"^{key}\.seg must be >= 0 \(got -1\.0\)$"):
        check_ranges(_set(_full_config(), key, {"cls": 1.0, "seg": -1.0}), schema.TrainConfig)
    with pytest.raises(KdmtlError, match=rf"^{key} must be a number >= 0 \(got 'heavy'\)$"):
        check_ranges(_set(_full_config(), key, "heavy"), schema.TrainConfig)
    with pytest.raises(KdmtlError, match=rf"^{key}.cls must be a number >= 0 \(got True\)$"):
        check_ranges(_set(_full_config(), key, {"cls": True}), schema.TrainConfig)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_values_are_refused(value):
    with pytest.raises(KdmtlError, match="loss.kd.temperature must be > 0"):
        check_ranges(_set(_full_config(), "loss.kd.temperature", value), schema.TrainConfig)


def test_only_and_source():
    cfg = _set(_set(_full_config(), "hardware.num_threads", 0), "data.eval_batch_size", 0)
    check_ranges(cfg, schema.TrainConfig, only=["student", "limit_eval_batches"])    # neither part is bad
    with pytest.raises(KdmtlError, match=r"^run/config.yaml: data.eval_batch_size must be >= 1 \(got 0\)$"):
        check_ranges(cfg, schema.TrainConfig, only=["data"], source="run/config.yaml")


def test_sections_that_are_off_are_not_checked():
    cfg = OmegaConf.to_container(OmegaConf.structured(schema.TrainConfig))
    assert cfg["loss"]["kd"] is None and cfg["debug"] is None
    check_ranges(cfg, schema.TrainConfig)


# ---- every shipped config passes ------------------------------------------------------------------

@pytest.fixture(scope="module")
def compose():
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="kdmtl_cli.conf", version_base="1.3"):
        yield hydra_compose
    GlobalHydra.instance().clear()


SHIPPED = [[f"+experiment={p.stem}"] for p in sorted((CONF / "experiment").glob("*.yaml"))] + \
    [[f"{group}={p.stem}"] for group in ("teacher", "student", "tasks", "loss", "weighting", "data", "hardware",
                                         "optim", "debug") for p in sorted((CONF / group).glob("*.yaml"))]
# The CIFAR-100 method variants (cifar100_<pair>_<method> beyond vanilla / kd / dkd) differ from their
# pair's kd experiment in loss settings only, each also checked as its loss option above: the slow run
# checks them as composed.
VARIANT = [o for o in SHIPPED if o[0].startswith("+experiment=cifar100_")
           and not o[0].endswith(("_vanilla", "_kd", "_dkd"))]


@pytest.mark.parametrize("shipped", [pytest.param([o for o in SHIPPED if o not in VARIANT], id="default"),
                                     pytest.param(VARIANT, id="cifar100_variants", marks=pytest.mark.slow)])
def test_every_shipped_config_passes_the_checks(shipped, compose):
    """Every experiment and group option, as composed, then with debug=fast applied: the range
    checks and the other protocol checks `kdmtl train` runs before any work."""
    from kdmtl_cli.commands.train import apply_debug, check_protocol

    fast = OmegaConf.merge(OmegaConf.structured(schema.DebugConfig), OmegaConf.load(CONF / "debug" / "fast.yaml"))
    failures = []
    for overrides in shipped:
        cfg = schema.validate(compose("train", overrides=overrides), schema.TrainConfig)
        shrunk = cfg.copy()                       # as with debug=fast (one composition is enough)
        shrunk.debug = fast
        for name, variant in ((" ".join(overrides), cfg), (" ".join(overrides) + " debug=fast", shrunk)):
            try:
                check_protocol(apply_debug(variant, []))
            except KdmtlError as err:
                failures.append(f"{name}: {err}")
    assert not failures, "\n".join(failures)


# ---- through the CLI: one line, exit 1, and no work done -----------------------------------------

# (overrides, words the one error line must hold: the key and its range). The checker itself is
# tested field by field above; these show it runs on the real command line before any work, for the
# settings users reported and each kind of value (number, null-able, per-task mapping, list, sibling bound).
BAD: Dict[str, Tuple[List[str], List[str]]] = {
    "batch_size_0": (["data.batch_size=0"], ["data.batch_size", ">= 1", "got 0"]),
    "batch_size_negative": (["data.batch_size=-4"], ["data.batch_size", ">= 1", "got -4"]),
    "val_size_negative": (["data.val_size=-1"], ["data.val_size", ">= 0", "no validation split"]),
    "std_0": (["data.std=[0.25,0,0.25]"], ["data.std[1]", "> 0"]),
    "max_objects_below_min": (["data.max_objects=1"], ["data.max_objects", ">= data.min_objects"]),
    "epochs_0": (["optim.epochs=0"], ["optim.epochs", ">= 1", "got 0"]),
    "teacher_epochs_0": (["teacher.optim.epochs=0"], ["teacher.optim.epochs", ">= 1"]),
    "momentum_1": (["optim.momentum=1"], ["optim.momentum", "[0, 1)"]),
    "kd_weight_negative": (["loss=kd", "loss.kd.weight=-0.5"], ["loss.kd.weight", ">= 0", "got -0.5"]),
    "kd_weight_nan": (["loss=kd", "loss.kd.weight=nan"], ["loss.kd.weight", ">= 0", "got nan"]),
    "task_weight_negative": (["loss.task_weight={cls:1,seg:-1,depth:1}"], ["loss.task_weight.seg", ">= 0"]),
    "dwa_temperature_0": (["weighting=dwa", "weighting.temperature=0"], ["weighting.temperature", "> 0"]),
    "stop_after_negative": (["stop_after_epoch=-1"], ["stop_after_epoch", ">= 1 or null", "got -1"]),
    "limit_train_0": (["limit_train_batches=0"], ["limit_train_batches", ">= 1 or null"]),
    "num_threads_negative": (["hardware.num_threads=-1"], ["hardware.num_threads", ">= 1 or null", "got -1"]),
    "nproc_0": (["hardware.nproc=0"], ["hardware.nproc", ">= 1"]),
    # debug=fast copies debug.epochs over optim.epochs: the key the user set is the one named
    "debug_epochs_0": (["debug.epochs=0"], ["debug.epochs", ">= 1"]),
}
EVAL_BAD_THREADS = "eval_num_threads_0"


def _write(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


BINARY = b"\xff\xfe\x00\x01 not text \x80\x81"


def _finished_run(run: Path, acc: float, seed: int) -> Path:
    """A run directory as kdmtl train leaves it, as far as `kdmtl report` reads it."""
    config = {"seed": seed, "tasks": {"cls": {"kind": "classification"}}, "loss": {"task_weight": 1.0}}
    _write(run / "config.yaml", yaml.safe_dump(config))
    _write(run / "metrics.jsonl", json.dumps({"type": "epoch", "epoch": 1, "train/loss/total": 1.0}) + "\n")
    results = {"test/cls/accuracy": acc, "student/params": 1e5, "student/latency_ms": 1.0}
    _write(run / "results.json", json.dumps({"config": config, "results": results, "best": {}, "last": {}}))
    return run


@pytest.fixture(scope="module")
def procs(tmp_path_factory) -> Dict[str, Tuple[subprocess.CompletedProcess, Path, Path]]:
    """Every CLI case at once: {name: (process, its cache dir, its working dir)}."""
    area = tmp_path_factory.mktemp("ranges")
    jobs: Dict[str, List[str]] = {name: ["train", "debug=fast", "log.progress=plain", *args]
                                  for name, (args, _) in BAD.items()}
    jobs[EVAL_BAD_THREADS] = ["eval", f"run_dir={area / 'nowhere'}", "hardware.num_threads=0"]

    # bad run files
    files = area / "files"
    sweep = files / "sweep"
    for seed in range(2):
        _finished_run(sweep / f"good{seed}", 0.5 + seed / 10, seed)
    _write(_finished_run(sweep / "bad", 0.4, 2) / "results.json", BINARY)
    jobs["report_binary_results"] = ["report", str(sweep)]
    not_json = _finished_run(files / "not_json", 0.5, 0)
    _write(not_json / "results.json", '{"config": {"seed": 0}, "results": ')
    jobs["report_not_json"] = ["report", str(not_json)]
    bad_log = _finished_run(files / "bad_log", 0.5, 0)
    _write(bad_log / "metrics.jsonl", json.dumps({"type": "epoch", "epoch": 1}) + "\n" + "{truncated\n")
    jobs["report_bad_metrics"] = ["report", str(bad_log), "plot=true"]
    binary_config = _write(files / "binary_config" / "config.yaml", BINARY).parent
    jobs["eval_binary_config"] = ["eval", f"run_dir={binary_config}"]
    jobs["export_binary_config"] = ["export", f"run_dir={binary_config}"]
    bad_yaml = _write(files / "bad_yaml" / "config.yaml", "data: {image_size: [\n").parent
    jobs["eval_bad_yaml"] = ["eval", f"run_dir={bad_yaml}"]
    out_of_range = _write(files / "out_of_range" / "config.yaml", "data:\n  eval_batch_size: 0\n").parent
    jobs["eval_saved_out_of_range"] = ["eval", f"run_dir={out_of_range}"]
    binary_results = files / "binary_results"
    _write(binary_results / "config.yaml", "data:\n  image_size: 32\n")
    _write(binary_results / "results.json", BINARY)
    jobs["export_binary_results"] = ["export", f"run_dir={binary_results}"]

    def one(name: str, args: List[str]):
        cache, cwd = area / name / "cache", area / name / "work"
        cwd.mkdir(parents=True)
        return run_kdmtl(args, cwd, cache, timeout=120), cache, cwd

    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        futures = {name: pool.submit(one, name, args) for name, args in jobs.items()}
        results = {name: future.result() for name, future in futures.items()}
    results["files"] = files
    return results


def _no_work_done(cache: Path, cwd: Path) -> None:
    """Nothing generated, trained or checkpointed: the cache (data, teachers) holds no file,
    and the working dir (run dirs) no tensor file."""
    made = sorted(str(p) for p in cache.rglob("*") if p.is_file()) if cache.exists() else []
    assert not made, f"the run did work before failing: {made}"
    tensors = [str(p) for p in cwd.rglob("*") if p.suffix in (".pt", ".safetensors", ".npz")]
    assert not tensors, f"the run wrote {tensors}"


@pytest.mark.parametrize("name", sorted(BAD))
def test_train_refuses_out_of_range_setting_before_any_work(procs, name):
    proc, cache, cwd = procs[name]
    assert proc.returncode == 1, show(proc)
    assert_one_line_error(proc, *BAD[name][1])
    _no_work_done(cache, cwd)


def test_eval_checks_hardware_ranges_first(procs):
    proc, cache, cwd = procs[EVAL_BAD_THREADS]
    assert proc.returncode == 1, show(proc)
    assert_one_line_error(proc, "hardware.num_threads", ">= 1 or null", "got 0")


def test_eval_checks_the_saved_config_it_uses(procs):
    proc, _, _ = procs["eval_saved_out_of_range"]
    assert proc.returncode == 1, show(proc)
    assert_one_line_error(proc, str(procs["files"] / "out_of_range" / "config.yaml"), "data.eval_batch_size", ">= 1")


@pytest.mark.parametrize("name,file,words", [
    ("report_binary_results", "sweep/bad/results.json", ["not utf-8", "delete it"]),
    ("report_not_json", "not_json/results.json", ["not valid json", "delete it"]),
    ("report_bad_metrics", "bad_log/metrics.jsonl", ["line 2", "plot=true"]),
    ("eval_binary_config", "binary_config/config.yaml", ["not utf-8", "run_dir"]),
    ("eval_bad_yaml", "bad_yaml/config.yaml", ["not valid yaml", "line 2", "run_dir"]),
    ("export_binary_config", "binary_config/config.yaml", ["not utf-8", "run_dir"]),
    ("export_binary_results", "binary_results/results.json", ["not utf-8", "delete it"]),
])
def test_unreadable_run_file_is_one_line_naming_it(procs, name, file, words):
    proc, _, _ = procs[name]
    assert proc.returncode == 1, show(proc)
    assert_one_line_error(proc, str(procs["files"] / file), *words)


def test_report_stops_at_one_bad_run_among_good_ones(procs):
    """Nothing silently dropped: a skipped run would change its group's mean and n unnoticed."""
    proc, _, _ = procs["report_binary_results"]
    assert not (procs["files"] / "sweep" / "report.md").exists(), show(proc)
