"""Shell completion: what bash, zsh and fish get when they ask `kdmtl --complete SHELL`, and
`kdmtl --install-completion SHELL` writing the script where each shell loads it.

bash is run for real: the script from `kdmtl --completion-script bash` is loaded in `bash -c`,
COMP_WORDS / COMP_CWORD / COMP_LINE / COMP_POINT are set as bash sets them for a Tab, the
completion function is called and COMPREPLY is read back. zsh and fish are not installed here:
their callback is called with the exact environment their scripts give it. `kdmtl` is a
wrapper on PATH running this interpreter's kdmtl_cli, so the scripts call this checkout.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

TRAIN_ONLY_GROUPS = ("loss", "weighting", "student", "teacher", "data", "optim", "tasks")


@pytest.fixture(scope="module")
def kdmtl_bin(tmp_path_factory) -> Path:
    """A directory holding a `kdmtl` that runs this checkout with this interpreter."""
    folder = tmp_path_factory.mktemp("bin")
    wrapper = folder / "kdmtl"
    wrapper.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m kdmtl_cli "$@"\n')
    wrapper.chmod(0o755)
    return folder


def _run(args: list, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(args, check=False, capture_output=True, text=True, timeout=60, **kwargs)


def _env(kdmtl_bin: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMP_", "XDG_", "ZDOTDIR"))}
    return {**env, "PATH": f"{kdmtl_bin}{os.pathsep}{env.get('PATH', '')}", **extra}


@pytest.fixture(scope="module")
def bash_script(kdmtl_bin, tmp_path_factory) -> Path:
    proc = _run(["kdmtl", "--completion-script", "bash"], env=_env(kdmtl_bin))
    assert proc.returncode == 0, proc.stderr
    path = tmp_path_factory.mktemp("bash") / "kdmtl.bash"
    path.write_text(proc.stdout)
    return path


def bash_words(line: str) -> list:
    """COMP_WORDS as bash splits the line: at blanks, and = and : (COMP_WORDBREAKS) are words of
    their own (`loss=k` -> loss, =, k)."""
    words = re.findall(r"[^\s=:]+|[=:]+", line)
    if not line or line[-1].isspace():
        words.append("")
    return words


def bash_complete(line: str, script: Path, kdmtl_bin: Path, cwd: Path = REPO) -> list:
    """What one Tab at the end of `line` completes the word under the cursor to, in bash: each
    COMPREPLY entry put in place of bash's current word, read back as the whole word."""
    words = bash_words(line)
    program = f"""
source {shlex.quote(str(script))}
COMP_LINE={shlex.quote(line)}
COMP_POINT={len(line)}
COMP_WORDS=({' '.join(shlex.quote(w) for w in words)})
COMP_CWORD={len(words) - 1}
_kdmtl_complete
printf '%s\\n' "${{COMPREPLY[@]}}"
"""
    proc = _run(["bash", "-c", program], cwd=cwd, env=_env(kdmtl_bin))
    assert proc.returncode == 0, proc.stderr
    replies = [reply for reply in proc.stdout.split("\n") if reply]
    before_word = line[:len(line) - len(words[-1])]
    completed = []
    for reply in replies:
        whole = re.split(r"\s", (before_word + reply).rstrip(" "))[-1]
        completed.append(whole + (" " if reply.endswith(" ") else ""))   # the space bash then types
    return completed


def words_of(completed: list) -> set:
    return {word.rstrip(" ") for word in completed}


# -- bash ---------------------------------------------------------------------------------------

def test_bash_completes_the_commands_and_top_flags(bash_script, kdmtl_bin):
    assert bash_complete("kdmtl tr", bash_script, kdmtl_bin) == ["train "]   # a whole word: a space follows
    assert words_of(bash_complete("kdmtl ", bash_script, kdmtl_bin)) >= {"train", "eval", "report", "export"}
    assert words_of(bash_complete("kdmtl --inst", bash_script, kdmtl_bin)) == {"--install-completion"}
    assert words_of(bash_complete("kdmtl --install-completion ", bash_script, kdmtl_bin)) == {"bash", "zsh", "fish"}


def test_bash_train_groups_options_keys(bash_script, kdmtl_bin):
    assert {"loss=", "loss."} <= words_of(bash_complete("kdmtl train los", bash_script, kdmtl_bin))
    options = bash_complete("kdmtl train loss=", bash_script, kdmtl_bin)    # bash's current word is "="
    assert {"loss=kd ", "loss=none ", "loss=dkd "} <= set(options), options
    starting_with_k = {f"loss={p.stem} " for p in (REPO / "conf" / "loss").glob("k*.yaml")}   # kd, kd4mtl, kdsvd...
    assert len(starting_with_k) >= 3
    assert starting_with_k == set(bash_complete("kdmtl train loss=k", bash_script, kdmtl_bin))
    assert bash_complete("kdmtl train loss.kd.te", bash_script, kdmtl_bin) == ["loss.kd.temperature="]
    listed = words_of(bash_complete("kdmtl train ", bash_script, kdmtl_bin))
    assert {"loss=", "student=", "seed=", "+experiment="} <= listed, listed
    assert "baselines=" not in listed          # conf/baselines holds Δm baseline files, not configs


def test_bash_eval_offers_only_what_eval_reads(bash_script, kdmtl_bin):
    listed = words_of(bash_complete("kdmtl eval ", bash_script, kdmtl_bin))
    assert {"run_dir=", "checkpoint=", "split=", "hardware=", "log."} <= listed, listed
    assert not {f"{group}=" for group in TRAIN_ONLY_GROUPS} & listed, listed
    assert not {word for word in listed if "experiment" in word}, listed
    options = words_of(bash_complete("kdmtl eval hardware=", bash_script, kdmtl_bin))
    assert {f"hardware={p.stem}" for p in (REPO / "conf" / "hardware").glob("*.yaml")} == options


def test_bash_honours_config_dir(bash_script, kdmtl_bin):
    plugins = "docs/examples/my_plugins"
    with_dir = words_of(bash_complete(f"kdmtl train --config-dir {plugins} data=", bash_script, kdmtl_bin))
    assert {"data=stripes", "data=shapes"} <= with_dir, with_dir
    assert "data=stripes" not in words_of(bash_complete("kdmtl train data=", bash_script, kdmtl_bin))
    keys = words_of(bash_complete(f"kdmtl train --config-dir={plugins} data=stripes data.m", bash_script, kdmtl_bin))
    assert {"data.min_period=", "data.max_period="} <= keys, keys   # keys of the option in that directory
    assert words_of(bash_complete("kdmtl train --config-dir docs/examples/my_p", bash_script, kdmtl_bin)) == \
        {"docs/examples/my_plugins/"}


def test_bash_hydra_flags_and_paths(bash_script, kdmtl_bin, tmp_path):
    assert words_of(bash_complete("kdmtl train --cf", bash_script, kdmtl_bin)) == {"--cfg"}
    assert words_of(bash_complete("kdmtl train --cfg ", bash_script, kdmtl_bin)) == {"job", "hydra", "all"}
    (tmp_path / "outputs" / "2024-01-01").mkdir(parents=True)
    assert bash_complete("kdmtl eval run_dir=out", bash_script, kdmtl_bin, cwd=tmp_path) == ["run_dir=outputs/"]
    assert bash_complete("kdmtl eval run_dir=outputs/", bash_script, kdmtl_bin, cwd=tmp_path) == \
        ["run_dir=outputs/2024-01-01/"]


def test_bash_report_directories_and_options(bash_script, kdmtl_bin, tmp_path):
    (tmp_path / "multirun").mkdir()
    (tmp_path / "notes.txt").write_text("")
    listed = words_of(bash_complete("kdmtl report ", bash_script, kdmtl_bin, cwd=tmp_path))
    assert listed == {"multirun/", "group_by=", "reference=", "out=", "plot="}, listed    # directories, not files
    assert bash_complete("kdmtl report mul", bash_script, kdmtl_bin, cwd=tmp_path) == ["multirun/"]
    assert set(bash_complete("kdmtl report multirun plot=", bash_script, kdmtl_bin, cwd=tmp_path)) == \
        {"plot=true ", "plot=false "}
    assert words_of(bash_complete("kdmtl report -", bash_script, kdmtl_bin, cwd=tmp_path)) == {"--help", "-h"}


def test_bash_export_arguments(bash_script, kdmtl_bin):
    assert set(bash_complete("kdmtl export format=", bash_script, kdmtl_bin)) == {"format=torchscript ", "format=onnx "}
    assert set(bash_complete("kdmtl export checkpoint=", bash_script, kdmtl_bin)) == {"checkpoint=best ",
                                                                                     "checkpoint=last "}
    rest = words_of(bash_complete("kdmtl export run_dir=outputs/x format=onnx ", bash_script, kdmtl_bin))
    assert rest == {"checkpoint=", "out=", "config_dir="}, rest               # the ones not given yet


def test_completion_tables_match_the_commands():
    """report / export arguments are mirrored in completion.py (export.py imports torch)."""
    from kdmtl_cli import completion
    from kdmtl_cli.commands import export, report

    assert tuple(completion.EXPORT_ARGS) == export.OPTIONS
    assert completion.EXPORT_ARGS["format"] == export.FORMATS
    assert tuple(completion.REPORT_ARGS) == report.OPTIONS


# -- the callback: zsh, fish, and what it imports -------------------------------------------------

def _callback(shell: str, kdmtl_bin: Path, **env) -> subprocess.CompletedProcess:
    return _run(["kdmtl", "--complete", shell], cwd=REPO, env=_env(kdmtl_bin, **env))


def test_zsh_callback_protocol(kdmtl_bin):
    script = _run(["kdmtl", "--completion-script", "zsh"], env=_env(kdmtl_bin)).stdout
    assert script.startswith("#compdef kdmtl\n")                       # autoloadable from fpath
    # the script's request: COMP_LINE = the words before the cursor's one, and the typed part of it
    assert 'local line="${(j: :)${(@)words[1,CURRENT-1]}} $PREFIX"' in script
    assert 'COMP_LINE="$line" command kdmtl --complete zsh' in script
    proc = _callback("zsh", kdmtl_bin, COMP_LINE="kdmtl train loss=")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    lines = proc.stdout.splitlines()
    assert {"loss=kd", "loss=none"} <= set(lines), lines                # whole words, no trailing space
    assert _callback("zsh", kdmtl_bin, COMP_LINE="kdmtl ev").stdout == "eval\n"


def test_fish_callback_protocol(kdmtl_bin):
    script = _run(["kdmtl", "--completion-script", "fish"], env=_env(kdmtl_bin)).stdout
    assert "set -lx COMP_LINE (commandline -cp)" in script and "command kdmtl --complete fish" in script
    assert "complete -c kdmtl -f -a '(__kdmtl_complete)'" in script
    lines = _callback("fish", kdmtl_bin, COMP_LINE="kdmtl eval hardware=").stdout.splitlines()
    assert {f"hardware={p.stem}" for p in (REPO / "conf" / "hardware").glob("*.yaml")} == set(lines)
    assert _callback("fish", kdmtl_bin, COMP_LINE="kdmtl export format=o").stdout == "format=onnx\n"


def test_bash_callback_reads_comp_point(kdmtl_bin):
    """The cursor may stand before the end of the line: only the text before it counts."""
    proc = _callback("bash", kdmtl_bin, COMP_LINE="kdmtl tr seed=1", COMP_POINT="8")
    assert proc.stdout == "train \n"


def test_callback_imports_no_torch_nor_plugin_files():
    """The callback runs on every Tab: no torch, and no code of a --config-dir runs."""
    code = """
import os, sys
os.environ["COMP_LINE"] = "kdmtl train --config-dir docs/examples/my_plugins data=stripes loss.kd.te"
from kdmtl_cli.cli import main
try:
    main(["--complete", "bash"])
except SystemExit:
    pass
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision", "timm", "my_data", "my_trunk"))
print("HEAVY", heavy)
"""
    proc = _run([sys.executable, "-c", code], cwd=REPO, env={k: v for k, v in os.environ.items()
                                                             if not k.startswith("COMP_")})
    assert "loss.kd.temperature=" in proc.stdout, proc.stdout + proc.stderr
    assert "HEAVY []" in proc.stdout, proc.stdout


# -- install -------------------------------------------------------------------------------------

def _install(shell, kdmtl_bin, home: Path, **env) -> subprocess.CompletedProcess:
    args = ["kdmtl", "--install-completion"] + ([shell] if shell else [])
    return _run(args, env=_env(kdmtl_bin, HOME=str(home), **env))


def test_install_bash_idempotent_and_working(kdmtl_bin, tmp_path):
    home = tmp_path / "home"
    target = home / ".local" / "share" / "bash-completion" / "completions" / "kdmtl"
    target.parent.mkdir(parents=True)
    (target.parent / "git").write_text("# someone else's\n")
    first = _install("bash", kdmtl_bin, home)
    assert first.returncode == 0, first.stderr
    assert f"wrote {target}" in first.stdout and "source" in first.stdout
    script = target.read_text()
    again = _install("bash", kdmtl_bin, home)
    assert again.returncode == 0 and "up to date" in again.stdout and str(target) in again.stdout
    assert target.read_text() == script
    assert (target.parent / "git").read_text() == "# someone else's\n"
    assert sorted(p.name for p in target.parent.iterdir()) == ["git", "kdmtl"]      # no temporary left
    assert bash_complete("kdmtl export format=t", target, kdmtl_bin) == ["format=torchscript "]   # it works


def test_install_respects_xdg_and_shell(kdmtl_bin, tmp_path):
    home, data, config = tmp_path / "home", tmp_path / "data", tmp_path / "config"
    bash = _install("bash", kdmtl_bin, home, XDG_DATA_HOME=str(data))
    assert bash.returncode == 0 and (data / "bash-completion" / "completions" / "kdmtl").is_file(), bash.stderr
    fish = _install(None, kdmtl_bin, home, SHELL="/usr/bin/fish", XDG_CONFIG_HOME=str(config))   # $SHELL's
    target = config / "fish" / "completions" / "kdmtl.fish"
    assert fish.returncode == 0 and f"wrote {target}" in fish.stdout, fish.stdout + fish.stderr
    assert "__kdmtl_complete" in target.read_text()
    bad = _install(None, kdmtl_bin, home, SHELL="/bin/tcsh")
    assert bad.returncode == 1 and bad.stderr.startswith("kdmtl: error:") and "bash, zsh, fish" in bad.stderr


def test_install_zsh_says_the_fpath_line(kdmtl_bin, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    proc = _install("zsh", kdmtl_bin, home)
    target = home / ".zfunc" / "_kdmtl"
    assert proc.returncode == 0 and f"wrote {target}" in proc.stdout, proc.stderr
    assert f"fpath=({home / '.zfunc'} $fpath)" in proc.stdout
    assert target.read_text().startswith("#compdef kdmtl")
    assert not (home / ".zshrc").exists()                                   # told, never edited
    (home / ".zshrc").write_text("fpath=(~/.zfunc $fpath)\nautoload -Uz compinit && compinit\n")
    again = _install("zsh", kdmtl_bin, home)
    assert "up to date" in again.stdout and "fpath=(" not in again.stdout, again.stdout
    assert (home / ".zshrc").read_text() == "fpath=(~/.zfunc $fpath)\nautoload -Uz compinit && compinit\n"


def test_install_leaves_a_file_it_did_not_write(kdmtl_bin, tmp_path):
    home = tmp_path / "home"
    target = home / ".config" / "fish" / "completions" / "kdmtl.fish"
    target.parent.mkdir(parents=True)
    target.write_text("complete -c kdmtl -a mine\n")
    proc = _install("fish", kdmtl_bin, home)
    assert proc.returncode == 1 and "not written by kdmtl" in proc.stderr, proc.stdout + proc.stderr
    assert target.read_text() == "complete -c kdmtl -a mine\n"


def test_completion_script_for_eval(kdmtl_bin):
    """`eval "$(kdmtl --completion-script bash)"` registers the completion of kdmtl itself."""
    proc = _run(["bash", "-c", 'eval "$(kdmtl --completion-script bash)"; complete -p kdmtl'], env=_env(kdmtl_bin))
    assert proc.stdout.strip() == "complete -o nospace -F _kdmtl_complete kdmtl", proc.stdout + proc.stderr


@pytest.mark.parametrize("command", ["train", "eval"])
def test_hydra_shell_completion_points_to_kdmtls(command, kdmtl_bin):
    """Hydra's -sc would register completion for a program named kdmtl-train."""
    proc = _run(["kdmtl", command, "-sc", "install=bash"], env=_env(kdmtl_bin))
    assert proc.returncode == 1 and proc.stdout == "", proc.stdout
    assert proc.stderr.startswith("kdmtl: error:") and "kdmtl --install-completion" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
