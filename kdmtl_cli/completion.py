"""Shell completion for `kdmtl` in bash, zsh and fish: the scripts, their install, and the answers.

    kdmtl --install-completion [bash|zsh|fish]   write the script where that shell loads it
    kdmtl --completion-script [bash|zsh|fish]    print it (eval "$(kdmtl --completion-script bash)")
    kdmtl --complete bash|zsh|fish               the callback the scripts make on every Tab

The scripts only pass the command line back to `kdmtl --complete SHELL`: bash its own COMP_LINE
and COMP_POINT, zsh and fish COMP_LINE = the line up to the cursor. The answer is one whole word
per line (`loss=kd`, `loss.kd.temperature=`, `multirun/`); for bash a word that is complete ends
with a space, as bash adds none itself (`complete -o nospace`, so `loss=` can be continued).

After `train` / `eval` the answer is Hydra's own completion (hydra/plugins/completion_plugin.py:
config groups, their options, keys and values) for that command's primary config and a
`--config-dir DIR` on the line, narrowed to the groups the command reads (conf/ holds train's
groups, which eval ignores). After `report` / `export`: their arguments and directories.

The callback runs on every Tab, so nothing here imports torch, and Hydra composes the config
only when Hydra's completion asks for it. It composes against the common keys of kdmtl's
schema instead of the plug-in-derived one (building that imports every plug-in, and torch),
so the plug-in files of a --config-dir are not imported: their YAML options and keys complete,
and no code of a directory named on the line runs on Tab.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import re
import shlex
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from kdmtl_cli.errors import KdmtlError

SHELLS = ("bash", "zsh", "fish")
FLAGS = ("--complete", "--install-completion", "--completion-script")   # the flags cli.py hands here
COMMANDS = ("train", "eval", "report", "export")
TOP_FLAGS = ("--help", "--version", "--install-completion", "--completion-script")
HELP_FLAGS = ("--help", "-h")
MARKER = "# kdmtl shell completion"   # an installed file carrying it is ours to replace

# The value of a key=... argument: a fixed choice, or a path on disk.
DIRS, PATHS = "<directory>", "<path>"
Values = str | tuple[str, ...]
REPORT_ARGS: dict[str, Values] = {"group_by": (), "reference": (), "out": PATHS, "plot": ("true", "false")}
# export.py imports torch, so its OPTIONS / FORMATS are mirrored here (tests/test_completion.py
# checks they agree).
EXPORT_ARGS: dict[str, Values] = {"run_dir": DIRS, "format": ("torchscript", "onnx"),
                                  "checkpoint": ("best", "last"), "out": DIRS, "config_dir": DIRS}
# Keys of the Hydra commands whose value is a run directory (Hydra completes a path only once it
# starts with / or .), with the words they also take.
RUN_DIR_KEYS = {"train": {"resume": ("true",)}, "eval": {"run_dir": ()}}
# Groups a command's configs are added from (+GROUP=NAME) rather than chosen in its defaults list.
ADDED_GROUPS = {"train": ("experiment",)}
OPT_IN_FLAG = "--allow-hydra-callbacks"   # kdmtl's own flag (hydra_guard.py), removed before Hydra parses


# -- the answer --------------------------------------------------------------------------------

def complete_line(line: str) -> list[str]:
    """The words that may complete the last word of `line` (text up to the cursor)."""
    words = _words(line)
    if not words:
        return []
    *before, current = words
    if not before:
        return _matching(current, [*COMMANDS, *TOP_FLAGS])
    command, args = before[0], before[1:]
    if command in ("--install-completion", "--completion-script") and not args:
        return _matching(current, SHELLS)
    if command in ("train", "eval"):
        return _hydra_command(command, args, current)
    if command == "report":
        return _key_values(current, args, REPORT_ARGS, directories=True)
    if command == "export":
        return _key_values(current, args, EXPORT_ARGS, directories=False)
    return []


def _words(line: str) -> list[str]:
    """The arguments after the program name, the last one being the word under the cursor
    ('' when the cursor starts a new word). Leading VAR=value assignments are not the command."""
    try:
        words = shlex.split(line)
    except ValueError:              # an unclosed quote: the user is still typing it
        words = line.split()
    if not line or line[-1].isspace():
        words.append("")
    while len(words) > 1 and re.match(r"[A-Za-z_]\w*=", words[0]):
        words.pop(0)
    return words[1:]


def _matching(prefix: str, options: Sequence[str]) -> list[str]:
    return [option for option in options if option.startswith(prefix)]


def _paths(prefix: str, dirs_only: bool) -> list[str]:
    """Files and directories (ending in /) whose path starts with `prefix`, as typed (~ kept)."""
    folder, start = os.path.split(prefix)
    listed = os.path.expanduser(folder) or "."
    try:
        entries = sorted(os.scandir(listed), key=lambda e: e.name)
    except OSError:
        return []
    found = []
    for entry in entries:
        if not entry.name.startswith(start) or (entry.name.startswith(".") and not start.startswith(".")):
            continue
        is_dir = entry.is_dir()
        if is_dir or not dirs_only:
            found.append(os.path.join(folder, entry.name) + ("/" if is_dir else ""))
    return found


def _values(spec: Values, typed: str) -> list[str]:
    if spec == DIRS or spec == PATHS:
        return _paths(typed, dirs_only=spec == DIRS)
    return _matching(typed, spec)


def _key_values(current: str, before: list[str], table: Mapping[str, Values], directories: bool) -> list[str]:
    """report / export: `key=` arguments (those not given yet), their values, and for report the
    run directories themselves."""
    if current.startswith("-"):
        return _matching(current, HELP_FLAGS)
    key, eq, typed = current.partition("=")
    if eq and key in table:
        return [f"{key}={value}" for value in _values(table[key], typed)]
    given = {word.split("=", 1)[0] for word in before if "=" in word}
    keys = _matching(current, [f"{key}=" for key in table if key not in given])
    return (_paths(current, dirs_only=True) if directories else []) + keys


# -- train / eval: Hydra's completion ------------------------------------------------------------

def _hydra_command(command: str, before: list[str], current: str) -> list[str]:
    flags, flag_values = _hydra_flags()
    previous = before[-1] if before else ""
    if previous in flag_values:                     # --config-dir DIR, --cfg job|hydra|all...
        return _values(flag_values[previous], current)
    flag, eq, typed = current.partition("=")
    if current.startswith("-"):
        if eq and flag in flag_values:
            return [f"{flag}={value}" for value in _values(flag_values[flag], typed)]
        return _matching(current, flags)
    if eq and flag in RUN_DIR_KEYS[command]:
        words = _matching(typed, RUN_DIR_KEYS[command][flag]) + _paths(typed, dirs_only=True)
        return [f"{flag}={word}" for word in words]
    return _hydra_answer(command, [word for word in before if word != OPT_IN_FLAG], current)


def _hydra_flags() -> tuple[list[str], dict[str, Values]]:
    """Hydra's command-line flags as kdmtl passes them on (its own -sc completion is replaced by
    kdmtl's), and the values of those that take one."""
    from hydra._internal.utils import get_args_parser

    flags, flag_values = ["-m", OPT_IN_FLAG], {}
    for action in get_args_parser()._actions:
        if "--shell-completion" in action.option_strings:
            continue
        flags += [name for name in action.option_strings if name.startswith("--")]
        if action.nargs != 0 and action.option_strings:
            spec = tuple(action.choices) if action.choices else DIRS if action.dest in ("config_dir", "config_path") \
                else ()
            flag_values.update({name: spec for name in action.option_strings})
    return sorted(flags), flag_values


def _hydra_answer(command: str, before: list[str], current: str) -> list[str]:
    """Hydra's CompletionPlugin answer for `kdmtl COMMAND BEFORE... CURRENT`, narrowed to the
    config groups COMMAND reads."""
    from hydra.plugins.completion_plugin import DefaultCompletionPlugin

    from kdmtl_cli.plugins import config_dir_from_argv

    try:
        loader = _config_loader(config_dir_from_argv(before))
        # Hydra's query parses the line with its own argparse (which prints to stderr and exits on
        # a word it cannot parse) and starts a new word when the line ends with a space.
        with contextlib.redirect_stderr(io.StringIO()):
            found = DefaultCompletionPlugin(loader)._query(config_name=command, line=" ".join([*before, current]))
        return _groups_of(command, loader, found, current)
    except (Exception, SystemExit):   # noqa: BLE001 - a half-typed line: no candidates, never a traceback
        return []


def _config_loader(config_dir: str | None):
    """Hydra's config loader with the search path `kdmtl train|eval` use: kdmtl's conf/, after a
    --config-dir on the line (which Hydra prepends too)."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.utils import create_config_search_path
    from hydra.core.config_search_path import SearchPathQuery
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.utils import setup_globals

    from kdmtl_cli.cli import register_resolvers

    setup_globals()           # Hydra's resolvers (${now:...}), for values completed from the config
    register_resolvers()
    _register_common_schemas()
    # The configs' folder, found without importing its package: the commands' pkg://kdmtl_cli.conf
    # imports it, and its __init__ registers the plug-in-derived schema (and so imports torch).
    conf_dir = importlib.util.find_spec("kdmtl_cli.conf").submodule_search_locations[0]
    search_path = create_config_search_path(f"file://{conf_dir}")
    if config_dir and os.path.isdir(os.path.expanduser(config_dir)):
        search_path.prepend(provider="command-line", path=f"file://{os.path.abspath(os.path.expanduser(config_dir))}",
                            anchor=SearchPathQuery(provider="schema"))

    class OnceLoader(ConfigLoaderImpl):
        """Hydra's loader with one config repository per (primary config, overrides): Hydra's
        completion asks for the options of every group, and each ask re-reads the primary config."""

        def __init__(self, **kwargs) -> None:
            super().__init__(**kwargs)
            self.repos = {}

        def _parse_overrides_and_create_caching_repo(self, config_name, overrides):
            key = (config_name, tuple(overrides))
            if key not in self.repos:
                self.repos[key] = super()._parse_overrides_and_create_caching_repo(config_name, overrides)[1]
            return OverridesParser.create().parse_overrides(overrides=overrides), self.repos[key]

    return OnceLoader(config_search_path=search_path)


def _register_common_schemas() -> None:
    """train.yaml / eval.yaml list their schema first in their defaults; here it is the keys every
    run has, as plain (unchecked) config: any plug-in's keys from the YAML files compose on top.
    It replaces the real schemas in Hydra's ConfigStore: only for the callback's own process."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    from kdmtl_cli.schema import EvalConfig, TrainCommon

    store = ConfigStore.instance()
    for name, schema in (("kdmtl_train_schema", TrainCommon), ("kdmtl_eval_schema", EvalConfig)):
        store.store(name=name, node=OmegaConf.to_container(OmegaConf.structured(schema)))


def _groups_of(command: str, loader, found: list[str], current: str) -> list[str]:
    """`found` without the choices (GROUP=, GROUP=OPTION, GROUP/...) of the config groups `command`
    does not read; a group its configs are added from is offered as +GROUP= when listing all."""
    all_groups = set(loader.list_groups(""))
    if not any(_group_named(word) in all_groups for word in found):
        return found                                  # config keys only: no defaults list needed
    readable = _groups_read(command, loader, all_groups)
    added = set(ADDED_GROUPS.get(command, ())) - readable
    kept = []
    for word in found:
        group = _group_named(word)
        if group in all_groups and group not in readable | added:
            continue
        if group in added and current == "" and word == f"{group}=":
            word = f"+{word}"
        kept.append(word)
    return kept


def _group_named(word: str) -> str | None:
    """The top-level group a candidate chooses from (`loss=kd`, `hydra/launcher=`), None for a key."""
    name = word.lstrip("+~").split("=", 1)[0]
    return None if "." in name else name.split("/")[0]


def _groups_read(command: str, loader, all_groups: set) -> set:
    """The top-level groups in the defaults list of `command`'s primary config."""
    from hydra.types import RunMode

    defaults = loader.compute_defaults_list(command, [], RunMode.RUN)
    # known_choices holds the groups with one option chosen (or null); a list (loss: [kd, fitnet])
    # shows as the configs it loads
    listed = [*defaults.overrides.known_choices, *(d.config_path for d in defaults.defaults if d.config_path)]
    return {group.split("/")[0] for group in listed if "/" in group or group in all_groups}


# -- the scripts ---------------------------------------------------------------------------------

BASH_SCRIPT = MARKER + """ for bash: kdmtl --completion-script bash
_kdmtl_complete() {
    local cur="${COMP_WORDS[COMP_CWORD]}" line="${COMP_LINE:0:COMP_POINT}" candidate
    # kdmtl answers whole words; bash splits a word at = and : (COMP_WORDBREAKS) and replaces only
    # its last part: cut the part before it from each answer
    local word="${line##*[[:space:]]}"
    local before="${word%"$cur"}"
    COMPREPLY=()
    while IFS= read -r candidate; do
        COMPREPLY+=("${candidate#"$before"}")
    done < <(COMP_LINE="$COMP_LINE" COMP_POINT="$COMP_POINT" command kdmtl --complete bash 2>/dev/null)
}
complete -o nospace -F _kdmtl_complete kdmtl
"""

ZSH_SCRIPT = "#compdef kdmtl\n" + MARKER + """ for zsh: kdmtl --completion-script zsh
_kdmtl_complete() {
    local line="${(j: :)${(@)words[1,CURRENT-1]}} $PREFIX"
    local -a candidates
    candidates=("${(@f)$(COMP_LINE="$line" command kdmtl --complete zsh 2>/dev/null)}")
    candidates=(${candidates:#})
    # a key, group or directory goes on (no space after it); anything else is a whole word
    compadd -S '' -- ${(M)candidates:#*[=./]}
    compadd -- ${candidates:#*[=./]}
}
if [[ "${zsh_eval_context[-1]}" == loadautofunc ]]; then
    _kdmtl_complete "$@"            # autoloaded from fpath as _kdmtl (by compinit)
else
    compdef _kdmtl_complete kdmtl   # eval "$(kdmtl --completion-script zsh)", after compinit
fi
"""

FISH_SCRIPT = MARKER + """ for fish: kdmtl --completion-script fish
function __kdmtl_complete
    set -lx COMP_LINE (commandline -cp)
    command kdmtl --complete fish 2>/dev/null
end
complete -c kdmtl -f -a '(__kdmtl_complete)'
"""

SCRIPTS = {"bash": BASH_SCRIPT, "zsh": ZSH_SCRIPT, "fish": FISH_SCRIPT}


def script(shell: str) -> str:
    return SCRIPTS[shell]


def answer(shell: str, environ: Mapping[str, str]) -> str:
    """The callback's output for the request `environ` carries (see the module docstring)."""
    line = environ.get("COMP_LINE", "")
    point = environ.get("COMP_POINT", "")
    if point.isdigit():
        line = line[:int(point)]
    words = complete_line(line)
    if shell == "bash":   # bash adds no space itself: a whole word gets one, so the next can start
        words = [word if word.endswith(("=", ".", "/")) else word + " " for word in words]
    return "".join(f"{word}\n" for word in words)


# -- installing ----------------------------------------------------------------------------------

def shell_named(name: str | None, environ: Mapping[str, str]) -> str:
    """`name`, or the shell of $SHELL; one line naming the choices when neither is one kdmtl knows."""
    chosen = name or os.path.basename(environ.get("SHELL", ""))
    if chosen not in SHELLS:
        said = f"'{name}'" if name else f"$SHELL={environ.get('SHELL', '')!r}"
        raise KdmtlError(f"no completion for {said}; choose one of: {', '.join(SHELLS)} "
                         "(e.g. kdmtl --install-completion bash)")
    return chosen


def _xdg(environ: Mapping[str, str], variable: str, default: str) -> Path:
    value = environ.get(variable, "")
    return Path(value) if os.path.isabs(value) else _home(environ) / default   # the spec ignores relative ones


def _home(environ: Mapping[str, str]) -> Path:
    return Path(environ.get("HOME") or Path.home())


def install_path(shell: str, environ: Mapping[str, str]) -> Path:
    """Where each shell loads a command's completion from, per user."""
    if shell == "bash":   # bash-completion (2.x) loads it the first time kdmtl is completed
        return _xdg(environ, "XDG_DATA_HOME", ".local/share") / "bash-completion" / "completions" / "kdmtl"
    if shell == "fish":
        return _xdg(environ, "XDG_CONFIG_HOME", ".config") / "fish" / "completions" / "kdmtl.fish"
    return _home(environ) / ".zfunc" / "_kdmtl"   # a directory for fpath: zsh has no per-user default


def install(shell: str, environ: Mapping[str, str]) -> str:
    """Write `shell`'s script to its per-user location (only that file, replaced when it is an older
    kdmtl one) and return what was done and how to turn it on."""
    path = install_path(shell, environ)
    text = script(shell)
    old = path.read_text(errors="replace") if path.is_file() else None
    if old is not None and MARKER not in old:
        raise KdmtlError(f"{path} exists and was not written by kdmtl; remove it, or load "
                         f"`kdmtl --completion-script {shell}` yourself")
    if old == text:
        done = f"kdmtl completion for {shell} is up to date: {path}"
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        partial.write_text(text)
        os.replace(partial, path)                  # a shell never reads a half-written script
        done = f"{'wrote' if old is None else 'updated'} {path}"
    return f"{done}\n{_activation(shell, path, environ)}"


def _activation(shell: str, path: Path, environ: Mapping[str, str]) -> str:
    if shell == "bash":
        return (f"New bash shells load it through the bash-completion package (without that package, add "
                f"`source {path}` to ~/.bashrc); in this one: source {path}")
    if shell == "fish":
        return f"New fish sessions load it; in this one: source {path}"
    zshrc = Path(environ.get("ZDOTDIR") or _home(environ)) / ".zshrc"
    try:
        on_fpath = re.search(r"^\s*fpath\+?=.*\.zfunc", zshrc.read_text(errors="replace"), re.MULTILINE)
    except OSError:
        on_fpath = None
    if on_fpath:
        return "New zsh shells load it (in this one: exec zsh)."
    return (f"To load it, add this line to {zshrc} before compinit, then open a new shell:\n"
            f"  fpath=({path.parent} $fpath)\n"
            "(no compinit in it yet? add after that line: autoload -Uz compinit && compinit)")


# -- the flags -----------------------------------------------------------------------------------

def run(argv: list[str], environ: Mapping[str, str] | None = None) -> int:
    """`kdmtl --complete SHELL` / `--completion-script [SHELL]` / `--install-completion [SHELL]`."""
    environ = os.environ if environ is None else environ
    flag, args = argv[0], argv[1:]
    if len(args) > 1:
        raise KdmtlError(f"{flag} takes one shell ({', '.join(SHELLS)}), got: {' '.join(args)}")
    shell = shell_named(args[0] if args else None, environ)
    if flag == "--complete":
        sys.stdout.write(answer(shell, environ))
    elif flag == "--completion-script":
        sys.stdout.write(script(shell))
    else:
        print(install(shell, environ))
    return 0

