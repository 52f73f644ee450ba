"""Plug-ins through the real `kdmtl` CLI: the example plug-in directory docs/examples/my_plugins
(the user documentation: a data set, a task kind, a trunk registered by name, a trunk and a whole
model named by `_target_`, a distillation method, a weighting, and experiment/stripes.yaml using
them together) runs end to end from `--config-dir`; its runs are re-evaluated and its checkpoints
name their `_target_`; foreign keys, bad `_target_`s, broken or shadowing plug-in files and
checkpoints naming code are refused with one line; a local torchvision weights file serves as a
teacher (ImageNet input normalisation); a joblib sweep loads the plug-ins in its workers too.

The example directory is copied to a temporary directory first: no test writes into the repository.
CLI runs that share nothing are launched together (module fixtures); each test checks one part.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
import torch
import yaml

from conftest import FAST, REPO, WORKERS, assert_one_line_error, read_jsonl, run_kdmtl, show

EXAMPLES = REPO / "docs" / "examples" / "my_plugins"
IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
CONVNET_KEYS = {"width", "depth", "stages", "stem_stride"}      # the settings of student arch=convnet
# What a run refused once Hydra has made its run directory leaves there (and nothing else).
REFUSED_LEFTOVERS = {".hydra", ".kdmtl-owner.lock", "train.log"}


# ---- helpers -------------------------------------------------------------------------------------

def assert_ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, show(proc)
    assert "Traceback" not in proc.stderr, show(proc)
    return proc


def run_parallel(jobs: Dict[str, Tuple[List[str], Path]], cache: Path) -> Dict[str, subprocess.CompletedProcess]:
    """{name: (args, cwd)} -> {name: CompletedProcess}, several `kdmtl` processes at once."""
    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        futures = {name: pool.submit(run_kdmtl, args, cwd, cache) for name, (args, cwd) in jobs.items()}
        return {name: future.result() for name, future in futures.items()}


def stripes(config_dir: Path, run_dir: Path, *extra: str) -> List[str]:
    """`kdmtl train --config-dir DIR +experiment=stripes` at the fast debug sizes."""
    return ["train", "--config-dir", str(config_dir), "+experiment=stripes", *FAST, *extra, f"hydra.run.dir={run_dir}"]


def saved_config(run_dir: Path) -> dict:
    return yaml.safe_load((run_dir / "config.yaml").read_text())


def best_state(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "best.pt", map_location="cpu", weights_only=True)


def assert_nothing_trained(run_dir: Path) -> None:
    """A refused run: no checkpoints, metrics or results; only what a refused run leaves."""
    if not run_dir.exists():
        return
    names = {p.name for p in run_dir.iterdir()}
    assert not names & {"checkpoints", "metrics.jsonl", "results.json", "summary.md", "teacher"}, names
    assert names <= REFUSED_LEFTOVERS | {"config.yaml"}, names


def plugin_copy(area: Path, name: str, extra_files: Dict[str, str] = None) -> Path:
    """A copy of the example plug-in directory (plus `extra_files`: {file name: text})."""
    target = area / name
    shutil.copytree(EXAMPLES, target)
    for file_name, text in (extra_files or {}).items():
        (target / file_name).write_text(text)
    return target


# ---- module fixtures: the runs several tests share ----------------------------------------------------

@pytest.fixture(scope="module")
def area(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("plugins")


@pytest.fixture(scope="module")
def plugin_dir(area) -> Path:
    return plugin_copy(area, "my_plugins")


@pytest.fixture(scope="module")
def resnet18_weights(area) -> Path:
    """A torchvision resnet18 state dict as a user saves one (seeded; the test's RNG left alone)."""
    import torchvision

    path = area / "resnet18_weights.pt"
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = torchvision.models.resnet18()
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def trained(area, plugin_dir, resnet18_weights, shared_cache):
    """The training runs, started together: the stripes experiment (trunk tiny_cnn), the same with
    student=plain_trunk (a `_target_` trunk) and student=stripes_net (a whole model), and a
    shapes/cls run distilling from a resnet18 teacher initialised from a local weights file."""
    runs = {name: area / name for name in ("tiny_cnn", "plain_trunk", "stripes_net", "resnet18")}
    procs = run_parallel({
        "tiny_cnn": (stripes(plugin_dir, runs["tiny_cnn"]), area),
        "plain_trunk": (stripes(plugin_dir, runs["plain_trunk"], "student=plain_trunk"), area),
        "stripes_net": (stripes(plugin_dir, runs["stripes_net"], "student=stripes_net"), area),
        "resnet18": (["train", "data=shapes", "tasks=cls", "teacher.arch=resnet18", f"teacher.weights={resnet18_weights}",
                      "teacher.small_input=false", "loss=kd", *FAST, "teacher.optim.epochs=1",
                      f"hydra.run.dir={runs['resnet18']}"], area),
    }, shared_cache)
    return {"runs": runs, "procs": procs}


@pytest.fixture(scope="module")
def followups(area, plugin_dir, trained, shared_cache):
    """Runs on the finished runs, started together: `kdmtl eval` with and without --config-dir, and
    the stripes_net checkpoint as a teacher -- as it is, and with its model's `_target_` rewritten to
    code that is neither a plug-in nor torchvision/timm."""
    runs = trained["runs"]
    for name in ("plain_trunk", "stripes_net", "resnet18"):
        assert_ok(trained["procs"][name])
    files = area / "teacher_files"
    files.mkdir()
    teachers = {"as_saved": files / "stripes_net.pt"}
    shutil.copyfile(runs["stripes_net"] / "checkpoints" / "best.pt", teachers["as_saved"])
    for label, target in (("ordered_dict", "collections.OrderedDict"), ("os_system", "os.system")):
        state = best_state(runs["stripes_net"])
        assert state["model_meta"]["model"]["model"]["_target_"] == "my_trunk.StripesNet"
        state["model_meta"]["model"]["model"]["_target_"] = target
        teachers[label] = files / f"{label}.pt"
        torch.save(state, teachers[label])
    jobs = {}
    for name in ("plain_trunk", "stripes_net"):
        jobs[f"eval_{name}"] = (["eval", "--config-dir", str(plugin_dir), f"run_dir={runs[name]}",
                                 f"hydra.run.dir={area / ('eval_' + name)}"], area)
        jobs[f"eval_{name}_no_dir"] = (["eval", f"run_dir={runs[name]}",
                                        f"hydra.run.dir={area / ('eval_no_dir_' + name)}"], area)
    jobs["eval_resnet18"] = (["eval", f"run_dir={runs['resnet18']}", f"hydra.run.dir={area / 'eval_resnet18'}"], area)
    for label, path in teachers.items():
        jobs[f"teacher_{label}"] = (stripes(plugin_dir, area / f"teacher_{label}", f"teacher.checkpoint={path}"), area)
    return {"procs": run_parallel(jobs, shared_cache), "teachers": teachers}


@pytest.fixture(scope="module")
def refusals(area, plugin_dir):
    """Runs that must be refused, started together, with a cache of their own (nothing may be
    trained or generated for them... beyond what a refused run already does)."""
    cache = area / "refusal_cache"
    broken = plugin_copy(area, "broken_plugins", {"broken.py": 'raise RuntimeError("boom at import")\n'})
    shadowing = plugin_copy(area, "json_plugins", {"json.py": "VALUE = 1\n"})
    cases = {
        "foreign_key": (plugin_dir, ["student.width=3"]),
        "os_system": (plugin_dir, ["student.trunk={_target_: os.system}"]),
        "not_importable": (plugin_dir, ["student.trunk={_target_: nonexistent_mod.X}"]),
        "typo": (plugin_dir, ["data.min_periodd=3"]),
        "broken_file": (broken, []),
        "shadowing_file": (shadowing, []),
    }
    run_dirs = {name: area / "refused" / name for name in cases}
    procs = run_parallel({name: (stripes(config_dir, run_dirs[name], *extra), area)
                          for name, (config_dir, extra) in cases.items()}, cache)
    return {"procs": procs, "run_dirs": run_dirs, "cache": cache, "broken": broken, "shadowing": shadowing}


# ---- 1. the stripes experiment end to end --------------------------------------------------------------

def test_stripes_experiment_runs_every_plugin(trained):
    proc, run_dir = trained["procs"]["tiny_cnn"], trained["runs"]["tiny_cnn"]
    assert_ok(proc)
    for name in ("config.yaml", "results.json", "metrics.jsonl", "checkpoints/best.pt", "checkpoints/last.pt"):
        assert (run_dir / name).is_file(), name
    config = saved_config(run_dir)
    results = json.loads((run_dir / "results.json").read_text())
    assert results["config"] == config
    # data=stripes (my_data.py) with its own settings; the task kinds of tasks/stripes.yaml (huber: my_task.py)
    assert config["data"]["name"] == "stripes"
    assert (config["data"]["min_period"], config["data"]["max_period"]) == (4, 8)
    assert {t: spec["kind"] for t, spec in config["tasks"].items()} == {
        "orient": "classification", "mask": "segmentation", "period": "huber"}
    # student arch tiny_cnn (my_trunk.py): its `channels`, and none of convnet's keys (narrowed away)
    assert config["student"]["arch"] == "tiny_cnn" and config["student"]["channels"] == 8
    assert not CONVNET_KEYS & set(config["student"]), config["student"]
    # loss=[kd, logit_mse] (my_method.py) and weighting=first_loss (my_weighting.py)
    assert config["loss"]["logit_mse"] == {"weight": 1.0} and config["loss"]["kd"]["weight"] == 0.5
    assert config["weighting"] == {"name": "first_loss", "scale": 1.0}
    epoch = next(r for r in read_jsonl(run_dir / "metrics.jsonl") if r["type"] == "epoch")
    for term in ("train/logit_mse/orient", "train/logit_mse/mask", "train/kd/orient", "train/kd/mask",
                 "train/kd/period", "train/task/period", "val/period/mae", "val/mask/miou", "val/orient/accuracy"):
        assert term in epoch, (term, sorted(epoch))
    assert "train/logit_mse/period" not in epoch      # logit_mse: classification / segmentation tasks only
    state = best_state(run_dir)
    # first_loss: each task's weight is scale / its loss at the first step (a buffer in the checkpoint)
    first = state["weighting"]["first"]
    assert first.shape == (3,) and bool((first > 0).all())
    for i, task in enumerate(("orient", "mask", "period")):
        assert epoch[f"train/weight/{task}"] == pytest.approx(1.0 / float(first[i]), rel=1e-4)
    meta = state["model_meta"]
    assert meta["model"] == {"arch": "tiny_cnn", "decoder_width": 8, "trunk": None, "model": None, "channels": 8}
    assert meta["tasks"]["period"]["kind"] == "huber"
    assert {"test/period/mae", "test/mask/miou", "teacher/test/orient/accuracy"} <= set(results["results"])


# ---- 2. a `_target_` trunk and a whole model ---------------------------------------------------------------

@pytest.mark.parametrize("student, part, target", [("plain_trunk", "trunk", "my_trunk.PlainTrunk"),
                                                   ("stripes_net", "model", "my_trunk.StripesNet")])
def test_target_models_train_checkpoint_and_reevaluate(trained, followups, area, student, part, target):
    assert_ok(trained["procs"][student])
    run_dir = trained["runs"][student]
    config = saved_config(run_dir)["student"]
    assert config[part]["_target_"] == target and config[part]["width"] == 8
    assert config["trunk" if part == "model" else "model"] is None
    assert not CONVNET_KEYS & set(config), config      # arch's keys dropped for a `_target_` model
    meta = best_state(run_dir)["model_meta"]
    assert meta["model"][part] == {"_target_": target, "width": 8}
    assert meta["tasks"]["period"]["kind"] == "huber"
    # kdmtl eval with the plug-in directory rebuilds the model and gets the run's test metrics back
    assert_ok(followups["procs"][f"eval_{student}"])
    evaluated = json.loads((area / f"eval_{student}" / "eval.json").read_text())
    assert evaluated["split"] == "test" and evaluated["checkpoint"].endswith("best.pt")
    results = json.loads((run_dir / "results.json").read_text())["results"]
    assert evaluated["metrics"] and all(evaluated["metrics"][k] == pytest.approx(results[k], rel=1e-5, abs=1e-7)
                                        for k in evaluated["metrics"]), (evaluated["metrics"], results)


@pytest.mark.parametrize("student", ["plain_trunk", "stripes_net"])
def test_eval_without_the_plugin_directory_is_one_line(trained, followups, area, student):
    """Without --config-dir the run's saved config names a data set (and model) nothing defines:
    refused with one line naming the run's config.yaml; nothing evaluated."""
    line = assert_one_line_error(followups["procs"][f"eval_{student}_no_dir"], "config.yaml")
    assert str(trained["runs"][student]) in line
    assert not (area / f"eval_no_dir_{student}" / "eval.json").exists()


def test_eval_without_the_plugin_directory_says_to_pass_it(followups):
    line = assert_one_line_error(followups["procs"]["eval_stripes_net_no_dir"])
    assert "--config-dir" in line, line


# ---- 3. refusals ----------------------------------------------------------------------------------------

def test_foreign_key_of_another_trunk_is_refused(refusals):
    line = assert_one_line_error(refusals["procs"]["foreign_key"], "student.width", "tiny_cnn", "channels")
    assert "not a setting of student arch=tiny_cnn" in line
    assert_nothing_trained(refusals["run_dirs"]["foreign_key"])


def test_target_that_is_not_a_module_class_is_refused(refusals):
    assert_one_line_error(refusals["procs"]["os_system"], "student.trunk._target_=os.system",
                          "not a torch.nn.Module class")
    assert_nothing_trained(refusals["run_dirs"]["os_system"])


def test_target_that_cannot_be_imported_is_refused(refusals):
    assert_one_line_error(refusals["procs"]["not_importable"], "student.trunk._target_=nonexistent_mod.X",
                          "cannot be imported", "nonexistent_mod", "--config-dir")
    assert_nothing_trained(refusals["run_dirs"]["not_importable"])


def test_misspelt_plugin_setting_lists_the_valid_keys(refusals):
    line = assert_one_line_error(refusals["procs"]["typo"], "data.min_periodd", "did you mean 'min_period'")
    assert "valid keys in 'data':" in line and "max_period" in line
    assert not refusals["run_dirs"]["typo"].exists()     # refused before Hydra made a run directory


def test_plugin_file_failing_at_import_is_named(refusals):
    line = assert_one_line_error(refusals["procs"]["broken_file"], "plug-in file", "failed to import",
                                 "RuntimeError: boom at import")
    assert str(refusals["broken"] / "broken.py") in line
    assert not refusals["run_dirs"]["broken_file"].exists()


def test_plugin_file_named_like_an_imported_module_is_refused(refusals):
    line = assert_one_line_error(refusals["procs"]["shadowing_file"], "has the name of the module 'json'", "rename")
    assert str(refusals["shadowing"] / "json.py") in line
    assert not refusals["run_dirs"]["shadowing_file"].exists()


def test_refused_runs_trained_and_generated_nothing(refusals):
    for proc in refusals["procs"].values():
        assert proc.returncode != 0, show(proc)
    assert not (refusals["cache"] / "teachers").exists()


def test_plugin_file_named_like_an_installed_module_is_refused(area):
    pytest.importorskip("timm")
    shadowing = plugin_copy(area, "timm_plugins", {"timm.py": "VALUE = 1\n"})
    proc = run_kdmtl(["train", "--config-dir", str(shadowing), "+experiment=stripes", "--cfg", "job"], area,
                     area / "refusal_cache")
    assert_one_line_error(proc, "timm.py", "rename")


# ---- 4. checkpoints name no code -----------------------------------------------------------------------

def test_whole_model_checkpoint_loads_as_a_teacher(followups):
    proc = assert_ok(followups["procs"]["teacher_as_saved"])
    assert f"teacher: loaded {followups['teachers']['as_saved']}" in proc.stdout


@pytest.mark.parametrize("label, target", [("ordered_dict", "collections.OrderedDict"), ("os_system", "os.system")])
def test_checkpoint_naming_other_code_is_refused(followups, area, label, target):
    path = followups["teachers"][label]
    line = assert_one_line_error(followups["procs"][f"teacher_{label}"], f"model.model._target_={target}",
                                 "kdmtl imports no code a checkpoint names")
    assert str(path) in line
    assert_nothing_trained(area / f"teacher_{label}")


def _marker_module(tmp_path: Path, monkeypatch, name: str) -> Path:
    """An importable module `name` whose import creates the file returned (and defines an
    nn.Module class `Thing` and a builder function `build`)."""
    marker = tmp_path / f"{name}.imported"
    (tmp_path / f"{name}.py").write_text(
        f"import pathlib\nimport torch.nn as nn\npathlib.Path({str(marker)!r}).write_text('imported')\n"
        "class Thing(nn.Module):\n    def __init__(self, width=2):\n        super().__init__()\n"
        "        self.conv = nn.Conv2d(3, width, 1)\n    def forward(self, x):\n        return [self.conv(x)]\n"
        "def build(width=2):\n    return Thing(width)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)
    return marker


def test_resolve_target_accepts_module_classes_and_model_builders():
    import torchvision

    from kdmtl_cli.plugins import resolve_target

    assert resolve_target("torch.nn.Conv2d", "student.trunk._target_") is torch.nn.Conv2d
    assert resolve_target("torchvision.models.resnet18", "k") is torchvision.models.resnet18
    assert resolve_target("torchvision.models.resnet18", "k", from_checkpoint=True) is torchvision.models.resnet18
    assert resolve_target("torchvision.models.ResNet", "k", from_checkpoint=True) is torchvision.models.ResNet


@pytest.mark.parametrize("target, words", [
    ("os.system", ["k._target_=os.system", "not a torch.nn.Module class"]),
    ("json.loads", ["not a torch.nn.Module class"]),            # a function, but of no model package
    ("collections.OrderedDict", ["not a torch.nn.Module class"]),
    ("nonexistent_mod.X", ["cannot be imported"]),
    ("torch", ["must be an import path"]),
])
def test_resolve_target_refuses_everything_else(target, words):
    from kdmtl_cli.errors import KdmtlError
    from kdmtl_cli.plugins import resolve_target

    with pytest.raises(KdmtlError) as err:
        resolve_target(target, "k._target_")
    for word in words:
        assert word in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_resolve_target_from_a_checkpoint_imports_no_other_module(tmp_path, monkeypatch):
    from kdmtl_cli import plugins
    from kdmtl_cli.errors import KdmtlError

    marker = _marker_module(tmp_path, monkeypatch, "kdmtl_test_untrusted_mod")
    try:
        for target in ("kdmtl_test_untrusted_mod.Thing", "kdmtl_test_untrusted_mod.build", "torch.nn.Linear",
                       "os.system"):
            with pytest.raises(KdmtlError, match="kdmtl imports no code a checkpoint names"):
                plugins.resolve_target(target, "ckpt: model.model._target_", from_checkpoint=True)
        assert not marker.exists() and "kdmtl_test_untrusted_mod" not in sys.modules
        # named by a config (not a checkpoint), the same class is fine; its builder function is not
        assert plugins.resolve_target("kdmtl_test_untrusted_mod.Thing", "k").__name__ == "Thing"
        assert marker.exists()
        with pytest.raises(KdmtlError, match="not a torch.nn.Module class"):
            plugins.resolve_target("kdmtl_test_untrusted_mod.build", "k")
    finally:
        sys.modules.pop("kdmtl_test_untrusted_mod", None)


def test_resolve_target_from_a_checkpoint_trusts_loaded_plugin_files(tmp_path, monkeypatch):
    from kdmtl_cli import plugins

    name = "kdmtl_test_plugin_mod"
    _marker_module(tmp_path, monkeypatch, name)
    monkeypatch.setitem(plugins._USER_MODULES, name, tmp_path / f"{name}.py")   # as load_user records it
    try:
        assert plugins.resolve_target(f"{name}.Thing", "k", from_checkpoint=True).__name__ == "Thing"
        assert plugins.resolve_target(f"{name}.build", "k", from_checkpoint=True).__name__ == "build"
    finally:
        sys.modules.pop(name, None)


def test_checkpoint_cannot_reach_other_code_through_kdmtl_helpers(tmp_path, monkeypatch):
    from kdmtl_cli.errors import KdmtlError
    from kdmtl_cli.models import build_model, settings_from_checkpoint

    marker = _marker_module(tmp_path, monkeypatch, "kdmtl_test_smuggled_mod")
    remembered = {"arch": "convnet", "decoder_width": 8, "trunk": None,
                  "model": {"_target_": "kdmtl_cli.models.instantiate",
                            "node": [["_target_", "kdmtl_test_smuggled_mod.Thing"]], "key": "x"}}
    try:
        with pytest.raises(KdmtlError):
            build_model(settings_from_checkpoint(remembered), {}, from_checkpoint=True, key="ckpt: model")
        assert not marker.exists()
    finally:
        sys.modules.pop("kdmtl_test_smuggled_mod", None)


# ---- 5. a torchvision weights file as the teacher ------------------------------------------------------

def test_torchvision_weights_file_teacher_through_the_cli(trained, resnet18_weights):
    from safetensors import safe_open

    proc, run_dir = assert_ok(trained["procs"]["resnet18"]), trained["runs"]["resnet18"]
    assert (f"input normalisation: mean {IMAGENET['mean']}, std {IMAGENET['std']}, as the weights of the "
            f"teacher ({resnet18_weights}) expect") in proc.stdout, show(proc)
    config = saved_config(run_dir)
    assert config["teacher"]["arch"] == "resnet18" and config["teacher"]["weights"] == str(resnet18_weights)
    assert config["teacher"]["small_input"] is False and not CONVNET_KEYS & set(config["teacher"])
    # the student trained (and its checkpoint records) ImageNet's normalisation
    assert best_state(run_dir)["model_meta"]["input_norm"] == IMAGENET
    results = json.loads((run_dir / "results.json").read_text())
    assert "teacher/test/cls/accuracy" in results["results"]
    # the cached teacher records the same normalisation and its architecture, but not the weights file
    with safe_open(results["teacher"]["source"], framework="pt") as handle:
        teacher_meta = json.loads(handle.metadata()["kdmtl_model_meta"])
    assert teacher_meta["input_norm"] == IMAGENET
    assert teacher_meta["model"]["arch"] == "resnet18" and teacher_meta["model"]["small_input"] is False
    assert "weights" not in teacher_meta["model"]


def test_eval_of_a_weights_normalised_run_gets_its_metrics_back(trained, followups, area):
    assert_ok(followups["procs"]["eval_resnet18"])
    evaluated = json.loads((area / "eval_resnet18" / "eval.json").read_text())["metrics"]
    results = json.loads((trained["runs"]["resnet18"] / "results.json").read_text())["results"]
    assert all(evaluated[k] == pytest.approx(results[k], rel=1e-5, abs=1e-7) for k in evaluated), (evaluated, results)


def test_resnet18_teacher_trunk_is_torchvisions_network(resnet18_weights, one_thread):
    import torchvision
    from omegaconf import OmegaConf

    from kdmtl_cli.models import build_model

    node = OmegaConf.create({"teacher": {"arch": "resnet18", "decoder_width": 8, "weights": str(resnet18_weights),
                                         "small_input": False}}).teacher
    model = build_model(node, {}, key="teacher").eval()
    assert model.trunk.input_norm == IMAGENET and model.trunk.reductions == [4, 8, 16, 32]
    reference = torchvision.models.resnet18()
    reference.load_state_dict(torch.load(resnet18_weights, weights_only=True))
    reference.eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        maps = model.trunk(x)
        y = reference.maxpool(reference.relu(reference.bn1(reference.conv1(x))))
        expected = []
        for layer in (reference.layer1, reference.layer2, reference.layer3, reference.layer4):
            y = layer(y)
            expected.append(y)
    assert [list(m.shape) for m in maps] == [[2, 64, 16, 16], [2, 128, 8, 8], [2, 256, 4, 4], [2, 512, 2, 2]]
    for got, want in zip(maps, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


# ---- 6. a joblib sweep: the plug-ins load in its worker processes --------------------------------------

def test_joblib_sweep_loads_plugins_in_its_workers(area, plugin_dir, shared_cache):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    sweep = area / "sweep"
    proc = run_kdmtl(["train", "-m", "--config-dir", str(plugin_dir), "+experiment=stripes", "hydra/launcher=joblib",
                      "hydra.launcher.n_jobs=2", "student.channels=4,8", *FAST, f"hydra.sweep.dir={sweep}"],
                     area, shared_cache, timeout=600)
    assert_ok(proc)
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert len(jobs) == 2 and all((job / "results.json").is_file() for job in jobs), show(proc)
    students = [saved_config(job)["student"] for job in jobs]
    assert sorted(s["channels"] for s in students) == [4, 8]
    assert all(s["arch"] == "tiny_cnn" and not CONVNET_KEYS & set(s) for s in students)
    for job in jobs:
        config = saved_config(job)
        assert config["data"]["name"] == "stripes" and config["weighting"]["name"] == "first_loss"
        assert "train/logit_mse/mask" in read_jsonl(job / "metrics.jsonl")[0]
