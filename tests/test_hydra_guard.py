"""No config file names code for Hydra to run (kdmtl_cli/hydra_guard.py).

Through the real CLI with a user `--config-dir` whose experiment would make Hydra call
builtins.open / shutil.copyfile (callbacks), a foreign launcher, or a logging `()` factory: one
`kdmtl: error:` line naming the key, exit 1, the marker file never created, nothing written
(no outputs/, multirun/ or .hydra/) -- for a run, -m and --cfg job, for train and eval. With
`--allow-hydra-callbacks` on the command line a harmless callback does run. kdmtl's own callbacks
(hydra_guard.KDMTL_CALLBACKS: the sweep summary conf/train.yaml registers) pass without it; a
config that points their key at other code is refused. Then the check itself on small configs:
Hydra's and kdmtl's own settings pass, each kind of code is refused.
These refusals happen while composing, before torch is imported: well under a second each.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import FAST, assert_one_line_error, run_kdmtl, show

from kdmtl_cli import hydra_guard
from kdmtl_cli.errors import KdmtlError


def _experiments(root: Path, marker: Path) -> Path:
    """A user config dir: experiment/<name>.yaml and hydra/job_logging/evil.yaml."""
    hydra_nodes = {
        "evil_open": {"callbacks": {"evil": {"_target_": "builtins.open", "file": str(marker), "mode": "w"}}},
        "evil_copy": {"callbacks": {"evil": {"_target_": "shutil.copyfile", "src": __file__, "dst": str(marker)}}},
        "evil_launcher": {"launcher": {"_target_": "shutil.copyfile"}},
        "evil_logging": {"job_logging": {"handlers": {"evil": {"()": "builtins.open", "file": str(marker),
                                                               "mode": "w"}}}},
        "evil_ours": {"callbacks": {"kdmtl_sweep_summary": {"_target_": "builtins.open", "file": str(marker),
                                                            "mode": "w"}}},
        "log_return": {"callbacks": {"done": {
            "_target_": "hydra.experimental.callbacks.LogJobReturnCallback"}}},
    }
    conf = root / "conf"
    (conf / "experiment").mkdir(parents=True)
    for name, node in hydra_nodes.items():
        text = "# @package _global_\n" + OmegaConf.to_yaml({"hydra": node})
        (conf / "experiment" / f"{name}.yaml").write_text(text)
    (conf / "hydra" / "job_logging").mkdir(parents=True)
    (conf / "hydra" / "job_logging" / "evil.yaml").write_text(OmegaConf.to_yaml(
        {"version": 1, "handlers": {"evil": {"()": "builtins.open", "file": str(marker), "mode": "w"}},
         "root": {"handlers": ["evil"]}}))
    return conf


@pytest.fixture
def area(tmp_path):
    marker = tmp_path / "marker"
    conf = _experiments(tmp_path, marker)
    work = tmp_path / "work"
    work.mkdir()
    return {"conf": conf, "marker": marker, "work": work, "cache": tmp_path / "cache"}


def _refused(area, args, *words):
    proc = run_kdmtl(args, area["work"], area["cache"])
    line = assert_one_line_error(proc, *words, rc=1)
    assert not area["marker"].exists(), "Hydra ran code a config named"
    assert list(area["work"].iterdir()) == [], f"something was written: {list(area['work'].rglob('*'))}"
    assert proc.stdout == "", show(proc)
    return line


@pytest.mark.parametrize("experiment, target", [("evil_open", "builtins.open"), ("evil_copy", "shutil.copyfile")])
def test_callbacks_from_a_config_are_refused(area, experiment, target):
    line = _refused(area, ["train", "--config-dir", str(area["conf"]), f"+experiment={experiment}", *FAST],
                    "hydra.callbacks.evil", target, "--allow-hydra-callbacks")
    assert "remove hydra.callbacks.evil" in line


def test_our_callback_key_pointed_at_other_code_is_refused(area):
    conf = ["--config-dir", str(area["conf"]), "+experiment=evil_ours"]
    line = _refused(area, ["train", "-m", *conf, "seed=0,1", *FAST],
                    "hydra.callbacks.kdmtl_sweep_summary._target_ (builtins.open)", "--allow-hydra-callbacks")
    assert "remove hydra.callbacks.kdmtl_sweep_summary" in line
    _refused(area, ["train", *conf, "--cfg", "job"], "hydra.callbacks.kdmtl_sweep_summary._target_")


def test_callbacks_refused_in_multirun_and_cfg(area):
    conf = ["--config-dir", str(area["conf"]), "+experiment=evil_open"]
    _refused(area, ["train", "-m", *conf, "seed=0,1", *FAST], "hydra.callbacks.evil")
    _refused(area, ["train", *conf, "--cfg", "job"], "hydra.callbacks.evil")
    _refused(area, ["train", *conf, "--cfg", "hydra"], "hydra.callbacks.evil")


def test_foreign_launcher_and_logging_factory_are_refused(area):
    conf = ["--config-dir", str(area["conf"])]
    _refused(area, ["train", "-m", *conf, "+experiment=evil_launcher", "seed=0,1", *FAST],
             "hydra.launcher._target_", "shutil.copyfile", "launcher")
    _refused(area, ["train", *conf, "+experiment=evil_logging", *FAST], "hydra.job_logging.handlers.evil.()")
    # the opt-in is for callbacks only
    _refused(area, ["train", "--allow-hydra-callbacks", *conf, "+experiment=evil_logging", *FAST],
             "hydra.job_logging.handlers.evil.()")
    # eval composes through the same guard
    _refused(area, ["eval", *conf, "hydra/job_logging=evil", "run_dir=nowhere"], "hydra.job_logging.handlers.evil.()")


def test_opt_in_flag_runs_a_callback(area):
    proc = run_kdmtl(["train", "--allow-hydra-callbacks", "--config-dir", str(area["conf"]),
                      "+experiment=log_return", *FAST, "loss=none"], area["work"], area["cache"])
    assert proc.returncode == 0, show(proc)
    assert "Succeeded with return value" in proc.stdout, show(proc)
    # without the flag the same experiment is refused
    area["work"] = area["work"].parent / "work2"
    area["work"].mkdir()
    _refused(area, ["train", "--config-dir", str(area["conf"]), "+experiment=log_return", *FAST],
             "hydra.callbacks.done._target_ (hydra.experimental.callbacks.LogJobReturnCallback)")


# ------------------------------------------------------------------ the check on small configs
def _check(hydra: dict, allow_callbacks=False, **top):
    hydra_guard.check(OmegaConf.create({"hydra": hydra, **top}), allow_callbacks=allow_callbacks)


def _refuses(words, hydra, **kw):
    with pytest.raises(KdmtlError) as err:
        _check(hydra, **kw)
    msg = str(err.value)
    assert "\n" not in msg
    for word in words:
        assert word in msg, msg
    return msg


def test_hydra_and_kdmtl_defaults_pass():
    from hydra import compose, initialize_config_module

    from kdmtl_cli.cli import register_resolvers
    from kdmtl_cli.schema import register_schemas

    register_resolvers()
    register_schemas()
    overrides = {"train": [[], ["hydra/launcher=slurm"], ["hydra/launcher=submitit_local"],
                           ["hydra/launcher=joblib"], ["hydra/job_logging=stdout"], ["hydra/job_logging=none"],
                           ["hydra/job_logging=disabled", "hydra/hydra_logging=disabled"],
                           ["hydra/hydra_logging=hydra_debug"]],
                 "eval": [[]]}
    with initialize_config_module(config_module="kdmtl_cli.conf", version_base="1.3"):
        for name, sets in overrides.items():
            for extra in sets:
                cfg = compose(config_name=name, overrides=extra, return_hydra_config=True)
                hydra_guard.check(cfg)


def test_check_refuses_each_kind_of_code():
    _refuses(["hydra.callbacks.x._target_ (os.system)", "--allow-hydra-callbacks"],
             {"callbacks": {"x": {"_target_": "os.system"}}})
    _check({"callbacks": {"x": {"_target_": "os.system"}}}, allow_callbacks=True)    # opted in
    _refuses(["hydra.callbacks"], {"callbacks": "${evil}"}, evil={"x": 1})
    _refuses(["hydra.sweeper._target_", "builtins.eval"], {"sweeper": {"_target_": "builtins.eval"}})
    _refuses(["hydra.sweeper.sampler._target_", "os.system"],
             {"sweeper": {"_target_": "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper",
                          "sampler": {"_target_": "os.system"}}})
    _check({"sweeper": {"_target_": "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper",
                        "sampler": {"_target_": "optuna.samplers.TPESampler", "seed": 1}}})
    _refuses(["hydra.sweeper.custom_search_space"], {"sweeper": {"custom_search_space": "os.system"}})
    _refuses(["hydra.sweeper.params.hydra.job_logging.root.level", "command line"],
             {"sweeper": {"params": {"hydra.job_logging.root.level": "INFO,DEBUG"}}})
    _check({"sweeper": {"params": {"seed": "0,1", "loss": "kd,dkd"}}})
    # anywhere under hydra, and through interpolations (checked as Hydra will read them)
    _refuses(["hydra.job.env_set.x._target_"], {"job": {"env_set": {"x": {"_target_": "os.system"}}}})
    _refuses(["hydra.launcher._target_", "os.system"], {"launcher": {"_target_": "${t}"}}, t="os.system")
    _refuses(["hydra.launcher._target_", "${hydra.runtime.nope}"], {"launcher": {"_target_": "${hydra.runtime.nope}"}})


def test_only_kdmtl_callbacks_pass_without_the_opt_in():
    import importlib

    from hydra.experimental.callback import Callback

    ours = {"_target_": "kdmtl_cli.report.sweep.SweepSummary"}
    for target in hydra_guard.KDMTL_CALLBACKS:       # each names a real callback class
        module, name = target.rsplit(".", 1)
        assert issubclass(getattr(importlib.import_module(module), name), Callback)
    _check({"callbacks": {"kdmtl_sweep_summary": ours}})
    _check({"callbacks": {"renamed": {**ours, "_convert_": "all"}}})          # by target, with plain values
    _check({"callbacks": {"kdmtl_sweep_summary": {"_target_": "${t}"}}}, t=ours["_target_"])
    _refuses(["hydra.callbacks.x._target_ (os.system)"], {"callbacks": {"kdmtl_sweep_summary": ours,
                                                                         "x": {"_target_": "os.system"}}})
    _refuses(["hydra.callbacks.kdmtl_sweep_summary._target_ (os.system)"],
             {"callbacks": {"kdmtl_sweep_summary": {"_target_": "os.system"}}})
    _refuses(["hydra.callbacks.kdmtl_sweep_summary._target_ (os.system)"],
             {"callbacks": {"kdmtl_sweep_summary": {"_target_": "${t}"}}}, t="os.system")
    for near in ("kdmtl_cli.report.sweep.summarize", "kdmtl_cli.report.sweep.SweepSummary.on_multirun_end",
                 "kdmtl_cli.report.sweep.SweepSummaryX"):
        _refuses([f"({near})"], {"callbacks": {"kdmtl_sweep_summary": {"_target_": near}}})
    # Hydra instantiates nested nodes too: an argument that names code is code
    _refuses(["hydra.callbacks.kdmtl_sweep_summary._target_"],
             {"callbacks": {"kdmtl_sweep_summary": {**ours, "x": {"_target_": "os.system"}}}})
    _refuses(["hydra.callbacks.kdmtl_sweep_summary._target_"],
             {"callbacks": {"kdmtl_sweep_summary": {**ours, "_args_": [{"_target_": "os.system"}]}}})
    _refuses(["hydra.callbacks"], {"callbacks": [ours]})


def test_train_config_registers_kdmtls_callbacks():
    from hydra import compose, initialize_config_module

    from kdmtl_cli.cli import register_resolvers
    from kdmtl_cli.schema import register_schemas

    register_resolvers()
    register_schemas()
    with initialize_config_module(config_module="kdmtl_cli.conf", version_base="1.3"):
        cfg = compose(config_name="train", overrides=[], return_hydra_config=True)
    assert set(cfg.hydra.callbacks) == {"kdmtl_sweep_summary", "kdmtl_optuna_search"}
    assert {c._target_ for c in cfg.hydra.callbacks.values()} == set(hydra_guard.KDMTL_CALLBACKS)


def test_check_refuses_logging_factories_and_foreign_classes():
    for section in ("job_logging", "hydra_logging"):
        _refuses([f"hydra.{section}.handlers.h.()", "factory"], {section: {"handlers": {"h": {"()": "x.y"}}}})
        _refuses([f"hydra.{section}.formatters.f.()"], {section: {"formatters": {"f": {"()": {"a": 1}}}}})
        _refuses([f"hydra.{section}.filters.f.()"], {section: {"filters": {"f": {"()": "x"}}}})
        _refuses([f"hydra.{section}.handlers.h.class", "subprocess.Popen"],
                 {section: {"handlers": {"h": {"class": "subprocess.Popen"}}}})
        _refuses([f"hydra.{section}.handlers.h.class", "logging.basicConfig"],      # a function, not a class
                 {section: {"handlers": {"h": {"class": "logging.basicConfig"}}}})
        _refuses([f"hydra.{section}.handlers.h.stream", "ext://antigravity"],
                 {section: {"handlers": {"h": {"class": "logging.StreamHandler", "stream": "ext://antigravity"}}}})
        # a handler that is an interpolation of a node elsewhere in the config
        _refuses([f"hydra.{section}.handlers.h.()"], {section: {"handlers": {"h": "${evil}"}}},
                 evil={"()": "os.system"})
    _check({"job_logging": {"version": 1,
                            "formatters": {"simple": {"format": "%(message)s", "class": "logging.Formatter"}},
                            "handlers": {"a": {"class": "logging.handlers.RotatingFileHandler", "filename": "x.log"},
                                         "b": {"class": "logging.StreamHandler", "stream": "ext://sys.stderr"},
                                         "c": {"class": "logging.FileHandler",
                                               "filename": "${hydra.runtime.output_dir}/x.log"}},
                            "root": {"handlers": ["a", "b", "c"]}},
            "runtime": {"output_dir": "???"}})



def test_check_walks_shared_and_cyclic_interpolations_once():
    """Nodes that refer to the next level twice, 30 levels deep (2^30 paths), and a node that
    refers to its parent: checked in milliseconds, and the factory at the bottom is still found."""
    levels = {f"l{i}": {"x": f"${{hydra.job_logging.l{i + 1}}}", "y": f"${{hydra.job_logging.l{i + 1}}}"}
              for i in range(30)}
    levels["l30"] = {"()": "os.system"}
    _refuses(["()"], {"job_logging": levels})
    levels["l30"] = {"class": "logging.StreamHandler"}
    _check({"job_logging": levels, "launcher": {"self": "${hydra.launcher}", "y": {"up": "${hydra.launcher}"}}})

def test_strip_opt_in_and_install_are_idempotent(monkeypatch):
    from hydra._internal.config_loader_impl import ConfigLoaderImpl

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setenv("KDMTL_ALLOW_HYDRA_CALLBACKS", "0")     # restored after the test
    assert hydra_guard.strip_opt_in(["a=1", "--allow-hydra-callbacks", "-m"]) == (["a=1", "-m"], True)
    assert hydra_guard.strip_opt_in(["a=1", "x=--allow-hydra-callbacks"]) == (["a=1", "x=--allow-hydra-callbacks"],
                                                                               False)
    original = ConfigLoaderImpl.load_configuration
    monkeypatch.setattr(ConfigLoaderImpl, "load_configuration", original)   # restored after the test
    monkeypatch.setattr(hydra_guard, "_allow_callbacks", False)
    hydra_guard.install(False)
    wrapped = ConfigLoaderImpl.load_configuration
    hydra_guard.install(False)
    assert ConfigLoaderImpl.load_configuration is wrapped and wrapped is not original
    # data-parallel ranks inherit the opt-in of the command that started them
    hydra_guard.install(True)
    monkeypatch.setenv("RANK", "1")
    assert hydra_guard.strip_opt_in(["a=1"]) == (["a=1"], True)
