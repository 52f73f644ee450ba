"""`kdmtl` console script: pick the subcommand, hand the rest of argv to its Hydra main.

Each subcommand is one ``@hydra.main`` (kdmtl_cli/commands/) with its own primary
config (conf/<command>.yaml), so each keeps Hydra's --help, --cfg, --info, -m and
--config-dir. Errors the user can fix are printed as one line (exit 1); the
traceback appears only with HYDRA_FULL_ERROR=1.
"""

from __future__ import annotations

import os
import secrets
from datetime import datetime
import sys
from typing import Callable, Dict, List, Optional

from omegaconf import OmegaConf

from kdmtl_cli import completion
from kdmtl_cli.errors import JobErrors, KdmtlError, one_line

USAGE = """usage: kdmtl <command> [overrides...] [hydra options]

Knowledge distillation into multi-task students, driven by Hydra configs.

commands:
  train   train (or load) the teacher(s), distil into the student, evaluate, checkpoint
  eval    re-evaluate a finished run's checkpoint: kdmtl eval run_dir=outputs/...
  report  one table over runs: kdmtl report multirun/DATE/TIME [group_by=[loss,weighting]]
  export  a run's student (and teacher) to TorchScript/ONNX: kdmtl export run_dir=outputs/...

train and eval take Hydra's options: --help, --cfg job, --info, -m/--multirun,
--config-dir DIR (your own configs and experiments), --hydra-help.
report and export take their own arguments: kdmtl report --help, kdmtl export --help.
A config may not name code for Hydra to run (hydra.callbacks other than kdmtl's own, other
launchers/sweepers, logging factories); --allow-hydra-callbacks (command line only) lets
hydra.callbacks from trusted configs run.
Examples:
  kdmtl train
  kdmtl train +experiment=shapes_cls_seg_depth student=tiny loss.kd.weight=0.5
  kdmtl train -m loss.kd.temperature=2,4,8 seed=0,1,2
  kdmtl train --help

Shell completion (bash, zsh or fish; default: the shell of $SHELL):
  kdmtl --install-completion [SHELL]   write the completion script where that shell loads it
  kdmtl --completion-script [SHELL]    print it, e.g. eval "$(kdmtl --completion-script bash)"
"""

# One id per process: two runs started in the same second never share a directory,
# and every rank/job of one process resolves the same value.
_RUN_ID = f"{os.getpid() % 100000:05d}{secrets.token_hex(2)}"


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("kdmtl_run_id"):
        OmegaConf.register_new_resolver("kdmtl_run_id", lambda: _RUN_ID, use_cache=True)
    if not OmegaConf.has_resolver("kdmtl_group_options"):
        OmegaConf.register_new_resolver("kdmtl_group_options", _group_options)


def _group_options(group: str) -> str:
    """`${kdmtl_group_options:hardware}` (conf/eval.yaml's help): the options of a config group on
    this command's config search path, so a help text listing them cannot go stale."""
    from hydra.core.global_hydra import GlobalHydra

    return ", ".join(sorted(GlobalHydra.instance().config_loader().get_group_options(group)))


def _commands() -> Dict[str, Callable[[], None]]:
    from kdmtl_cli.commands.eval import eval_main
    from kdmtl_cli.commands.train import train_main

    return {"train": train_main, "eval": eval_main}


def _format_error(err: BaseException, schema: type) -> str:
    import re

    from hydra.errors import MissingConfigException

    from omegaconf.errors import ConfigKeyError, ValidationError

    from kdmtl_cli.schema import unknown_key_message

    text = re.sub(r"^\w+(Exception|Error): ", "", str(err))
    cause = err.__cause__
    struct = re.search(r"Could not override '([^']+)'", text)
    if struct and re.search(r"not in struct|Key '[^']+' not in '", f"{text} {cause}"):
        return unknown_key_message(struct.group(1), schema)
    if isinstance(cause, ConfigKeyError) and getattr(cause, "full_key", None):
        return unknown_key_message(cause.full_key, schema)
    if isinstance(err, AssertionError) and "Unexpected type for root" in text:
        from kdmtl_cli.schema import optional_parent

        found = optional_parent(sys.argv[1:], schema)
        if found:
            section, key = found.split("|")
            group, name = section.split(".")[0], section.split(".")[-1]
            combined = f" or {group}=[kd,{name}]" if name != "kd" else ""
            return (f"{key} sets a value in '{section}', which this run does not use; choose it first, "
                    f"e.g. {group}={name}{combined}")
    missing = re.search(r"Missing mandatory value: ([\w.]+)", f"{text} {cause}")
    if missing:
        return f"missing required setting '{missing.group(1)}'; pass {missing.group(1)}=... on the command line"
    if isinstance(cause, ValidationError) and getattr(cause, "full_key", None):
        return f"bad value for config key '{cause.full_key}': {str(cause).splitlines()[0]}"
    if isinstance(err, MissingConfigException) or "Could not find" in text:
        text = text.split("Config search path:")[0]
        plugin = re.search(r"'hydra/(sweeper|launcher)/(\w+)'", text)
        extra = {"optuna": "optuna", "joblib": "joblib", "submitit_local": "slurm", "submitit_slurm": "slurm"}
        if plugin and plugin.group(2) in extra:      # a Hydra plug-in kdmtl supports, not installed
            text += f"\n(it is an optional extra: pip install 'kdmtl[{extra[plugin.group(2)]}]')"
        else:
            text += "\n(choose one of the available options, or add a config with --config-dir)"
        return one_line(text)
    if isinstance(err, KdmtlError):
        return one_line(text)
    if isinstance(err, (FileNotFoundError, PermissionError, NotADirectoryError, IsADirectoryError, FileExistsError)):
        return f"cannot use path {err.filename!r}: {err.strerror}; choose a readable/writable location"
    if isinstance(err, OSError):
        return f"{type(err).__name__}: {one_line(text)}"
    if cause is not None and str(cause) and str(cause) not in text:
        text = f"{text}\n{cause}"
    return one_line(text)


def _run(command: Callable[[], None], schema: type) -> int:
    """Run a Hydra main with Hydra's own error printing off, so every error reaches us."""
    user_wants_traceback = os.environ.get("HYDRA_FULL_ERROR") == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"
    JobErrors.cli_pid = os.getpid()
    try:
        command()
        if JobErrors.errors:   # a stop signal first: its exit status (75) asks a launcher to requeue
            raise next((e for e in JobErrors.errors if getattr(e, "exit_code", 1) == 75), JobErrors.errors[0])
    except SystemExit as exit_:
        return int(exit_.code) if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except KeyboardInterrupt:
        print("kdmtl: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the CLI boundary: turn anything into one line
        if user_wants_traceback:
            raise
        if JobErrors.errors and not isinstance(err, KdmtlError):
            # a sweeper that stops on a failed job (Optuna: "Return value must be float-castable")
            # says less than the job's own error
            err = JobErrors.errors[0]
        code = getattr(err, "exit_code", 1)
        sweep = sys.modules.get("kdmtl_cli.report.sweep")
        if sweep is not None:    # a parallel launcher's failed job stops Hydra before the sweep's summary
            sweep.summarize_pending()
        if os.environ.get("RANK", "0") == "0":   # data-parallel ranks > 0 fail alike: rank 0 says it once
            print(f"kdmtl: {'stopped' if code == 75 else 'error'}: {_format_error(err, schema)}", file=sys.stderr)
        return code
    finally:
        if not user_wants_traceback:
            os.environ.pop("HYDRA_FULL_ERROR", None)
    return 0


def _data_parallel_argv(args: List[str]) -> List[str]:
    """`hardware.nproc=N > 1` (or `hardware=ddp`): start N ranks of this very command with
    torch.distributed.run and exit with their status. Inside a rank: all ranks share one run
    directory (given explicitly), and only rank 0 lets Hydra write .hydra/ and the log file."""
    multirun = any(a in ("-m", "--multirun") for a in args)
    if "RANK" in os.environ:                       # started by torch.distributed.run / torchrun
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            if not multirun and not any(a.startswith("hydra.run.dir=") for a in args):
                raise KdmtlError("with torchrun pass hydra.run.dir=DIR: every rank must use the same run directory")
            if os.environ["RANK"] != "0":
                args = [*args, "hydra.output_subdir=null", "hydra/job_logging=disabled",
                        "hydra/hydra_logging=disabled"]
        return args
    values = [a.split("=", 1)[1] for a in args if a.startswith(("hardware.nproc=", "+hardware.nproc="))]
    if values:
        try:
            nproc = int(values[-1])
        except ValueError:
            raise KdmtlError(f"hardware.nproc must be a number of processes (got '{values[-1]}')") from None
    elif "hardware=ddp" in args:
        from importlib import resources

        nproc = int(OmegaConf.create(resources.files("kdmtl_cli.conf").joinpath("hardware/ddp.yaml")
                                     .read_text()).get("nproc", 2))
    else:
        return args
    if nproc <= 1:
        return args
    if multirun:
        raise KdmtlError("hardware.nproc > 1 cannot be combined with -m yet: start each data-parallel run on its own")
    if not any(a.startswith("hydra.run.dir=") for a in args):   # one directory for all ranks, chosen here
        args = [*args, f"hydra.run.dir=outputs/{datetime.now():%Y-%m-%d/%H-%M-%S}-{_RUN_ID}"]
    from kdmtl_cli.engine import run_dir

    run_dir.own([a for a in args if a.startswith("hydra.run.dir=")][-1].split("=", 1)[1])   # for all ranks
    from kdmtl_cli.engine.distributed import launch

    sys.exit(launch(args, nproc))


def main(argv: Optional[List[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in completion.FLAGS:   # shell completion: its scripts and their callback
        try:
            sys.exit(completion.run(argv))
        except KdmtlError as err:
            print(f"kdmtl: error: {one_line(str(err))}", file=sys.stderr)
            sys.exit(1)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        sys.exit(0 if argv else 2)
    if argv[0] in ("-V", "--version"):
        from kdmtl_cli import __version__

        print(f"kdmtl {__version__}")
        sys.exit(0)
    name, rest = argv[0], argv[1:]
    from kdmtl_cli.provenance import remember_command

    remember_command(argv)      # each run records the command as typed (kdmtl_cli/provenance.py)
    if name in ("report", "export"):   # read finished runs: no Hydra composition involved
        import importlib

        command = importlib.import_module(f"kdmtl_cli.commands.{name}")
        if any(arg in ("-h", "--help") for arg in rest):
            print(command.HELP)
            sys.exit(0)
        try:
            sys.exit(getattr(command, f"{name}_main")(rest))
        except KdmtlError as err:
            print(f"kdmtl: error: {one_line(str(err))}", file=sys.stderr)
            sys.exit(1)
        except Exception as err:  # noqa: BLE001 - the CLI boundary: one line unless asked for more
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            print(f"kdmtl: error: {type(err).__name__}: {one_line(str(err))}", file=sys.stderr)
            sys.exit(1)
    if name in ("train", "eval") and any(arg in ("-sc", "--shell-completion") for arg in rest):
        # Hydra's would complete a program named kdmtl-train, without the subcommand
        print("kdmtl: error: Hydra's shell completion does not know kdmtl's subcommands; use kdmtl's, which "
              "covers them all: kdmtl --install-completion [bash|zsh|fish]", file=sys.stderr)
        sys.exit(1)
    commands = _commands()
    if name not in commands:
        print(f"kdmtl: error: unknown command '{name}'; choose one of: {', '.join([*commands, 'report', 'export'])} "
              "(kdmtl --help lists them)", file=sys.stderr)
        sys.exit(2)
    register_resolvers()
    from kdmtl_cli import plugins
    from kdmtl_cli.schema import EvalConfig, register_schemas, train_schema

    try:   # a user's plug-in files first: the schema Hydra composes against is derived from them
        plugins.load_user(plugins.config_dir_from_argv(rest))
    except KdmtlError as err:
        print(f"kdmtl: error: {one_line(str(err))}", file=sys.stderr)
        sys.exit(1)
    register_schemas()
    schema = train_schema() if name == "train" else EvalConfig
    # No config file names code for Hydra to run (hydra_guard.py); only the command line opts in.
    from kdmtl_cli import hydra_guard

    rest, allow_callbacks = hydra_guard.strip_opt_in(rest)
    hydra_guard.install(allow_callbacks)
    # Hydra parses sys.argv itself; it must not see the subcommand.
    if name == "train":
        try:
            from kdmtl_cli.resume import plan_run_dir

            from kdmtl_cli.schema import check_added_keys, mapping_entry_overrides

            check_added_keys(rest, schema)
            rest = mapping_entry_overrides(rest, schema)
            rest = plan_run_dir(rest, say=print if os.environ.get("RANK", "0") == "0" else (lambda _: None))
            rest = _data_parallel_argv(rest)
        except KdmtlError as err:
            if err.exit_code == 0:           # resume= of a finished run: said, and nothing done
                print(f"kdmtl: {one_line(str(err))}", flush=True)
                sys.exit(0)
            print(f"kdmtl: error: {one_line(str(err))}", file=sys.stderr)
            sys.exit(1)
    sys.argv = [f"kdmtl-{name}"] + rest
    sys.exit(_run(commands[name], schema))
