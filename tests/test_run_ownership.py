"""A run directory is never overwritten, and a stopped job never loses work — teachers and the
teacher-output cache included. Each scenario runs the real CLI in subprocesses, with real signals
(tests/faults/sitecustomize.py sends them from inside at a known step), and reads the files back."""

from __future__ import annotations

import hashlib
import inspect
import json
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import FAST, WORKERS, assert_one_line_error, read_jsonl, run_kdmtl, show
from kdmtl_cli.engine import run_dir as run_dirs
from kdmtl_cli.resume import find_latest_interrupted

SMALL = ["train", *FAST, "optim.epochs=2", "data.batch_size=16", "limit_train_batches=4"]


def checksums(root: Path) -> dict:
    """Every file under `root` (the owner lock excluded: its bytes say who holds it now)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != run_dirs.LOCK_NAME}


def final(run_dir: Path) -> dict:
    return next(r for r in read_jsonl(run_dir / "metrics.jsonl") if r["type"] == "final")


def assert_same_results(a: Path, b: Path) -> None:
    ra, rb = final(a), final(b)
    keys = [k for k in ra if k.startswith(("test/", "val/", "teacher/test/"))]
    assert keys and all(ra[k] == rb[k] for k in keys), [(k, ra[k], rb[k]) for k in keys if ra[k] != rb[k]]
    wa = torch.load(a / "checkpoints" / "last.pt", weights_only=True)["model"]
    wb = torch.load(b / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


SCENARIOS = {}


def scenario(fn):
    """A CLI scenario; all of them run concurrently in the module fixture `outcomes` (each CLI
    process spends much of its time starting up), and one test per scenario reports its outcome."""
    SCENARIOS[fn.__name__] = fn
    return fn


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory, shared_cache):
    area = tmp_path_factory.mktemp("owned")
    finished = area / "finished"           # one finished run, the directory other commands must leave alone
    proc = run_kdmtl([*SMALL, "loss=none", f"hydra.run.dir={finished}"], area, shared_cache)
    assert proc.returncode == 0, show(proc)

    def run(name, fn):
        place = tmp_path_factory.mktemp(name)
        (place / "work").mkdir()
        given = {"finished": finished, "workdir": place / "work", "tmp_path": place, "shared_cache": shared_cache}
        try:
            fn(**{k: given[k] for k in inspect.signature(fn).parameters})
        except BaseException as err:  # noqa: BLE001 - reported by the scenario's own test
            return err
        return None

    with ThreadPoolExecutor(WORKERS) as pool:
        futures = {name: pool.submit(run, name, fn) for name, fn in SCENARIOS.items()}
    return {name: future.result() for name, future in futures.items()}


@scenario
def resume_into_another_directory_is_refused_and_touches_neither(finished, workdir, shared_cache):
    stopped = workdir / "stopped"
    first = run_kdmtl([*SMALL, "loss=none", "stop_after_epoch=1", f"hydra.run.dir={stopped}"], workdir, shared_cache)
    assert first.returncode == 0, show(first)
    before_a, before_b = checksums(stopped), checksums(finished)
    proc = run_kdmtl(["train", f"resume={stopped}", f"hydra.run.dir={finished}"], workdir, shared_cache)
    assert_one_line_error(proc, f"resume={stopped}", "hydra.run.dir", "another")
    assert checksums(stopped) == before_a and checksums(finished) == before_b


@scenario
def a_finished_run_is_refused_before_hydra_rewrites_its_record(finished, workdir, shared_cache):
    before = checksums(finished)
    for args in ([*SMALL, "loss=none", f"++hydra.run.dir={finished}"], [*SMALL, "loss=none", f"hydra.run.dir={finished}"]):
        assert_one_line_error(run_kdmtl(args, workdir, shared_cache), str(finished), "finished", rc=1)
        assert checksums(finished) == before, args
    # resume= of a finished run: nothing to resume, said on one line, exit 0 (a requeued job whose run
    # finished just before it was killed ends cleanly), nothing touched
    for args in (["train", f"resume={finished}"], [*SMALL, "loss=none", f"hydra.run.dir={finished}", "resume=true"]):
        proc = run_kdmtl(args, workdir, shared_cache)
        assert proc.returncode == 0 and proc.stderr == "", show(proc)
        assert proc.stdout.strip() == f"kdmtl: {finished} has finished (results.json): nothing to resume; it is left as it is"
        assert checksums(finished) == before, args


@scenario
def a_second_writer_is_refused_while_the_first_runs(workdir, shared_cache):
    run_dir = workdir / "busy"
    env_cmd = [sys.executable, "-m", "kdmtl_cli", *SMALL, "loss=none", "optim.epochs=3", f"hydra.run.dir={run_dir}"]
    import os

    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env["KDMTL_CACHE"] = str(shared_cache)
    first = subprocess.Popen(env_cmd, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not run_dirs.is_alive(run_dir) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert run_dirs.is_alive(run_dir)
        for args in ([*SMALL, "loss=none", f"hydra.run.dir={run_dir}"], ["train", f"resume={run_dir}"]):
            second = run_kdmtl(args, workdir, shared_cache)
            line = assert_one_line_error(second, str(run_dir), "in use", f"pid {first.pid}")
            assert "live" in line
    finally:
        out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    records = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["epoch"] for r in records if r["type"] == "epoch"] == [1, 2, 3]
    assert sum(r["type"] == "final" for r in records) == 1
    assert not run_dirs.is_alive(run_dir)         # the kernel dropped the lock when it ended


def test_resume_true_skips_a_run_whose_process_is_alive(tmp_path, monkeypatch):
    """Two interrupted runs under outputs/; the newer is held by a live process (a real flock
    in another process), so resume=true picks the older."""
    monkeypatch.chdir(tmp_path)
    older, newer = tmp_path / "outputs" / "a", tmp_path / "outputs" / "b"
    for i, run_dir in enumerate((older, newer)):
        (run_dir / "checkpoints").mkdir(parents=True)
        (run_dir / "config.yaml").write_text("seed: 0\n")
        (run_dir / "checkpoints" / "last.pt").write_bytes(b"x")
        stamp = time.time() - 100 + i * 50
        import os

        os.utime(run_dir / "checkpoints" / "last.pt", (stamp, stamp))
    assert find_latest_interrupted() == Path("outputs/b")
    holder = _hold(newer)
    try:
        assert run_dirs.is_alive(newer) and not run_dirs.is_alive(older)
        assert find_latest_interrupted() == Path("outputs/a")
    finally:
        holder.kill()
        holder.wait()
    assert find_latest_interrupted() == Path("outputs/b")      # its owner is gone: resumable again


@scenario
def resume_true_with_a_run_dir_means_that_directory(workdir, shared_cache):
    run_dir = workdir / "fixed"
    command = [*SMALL, "loss=none", "stop_after_epoch=1", f"hydra.run.dir={run_dir}", "resume=true"]
    fresh = run_kdmtl(command, workdir, shared_cache)              # nothing there yet: a new run
    assert fresh.returncode == 0, show(fresh)
    assert [r["epoch"] for r in read_jsonl(run_dir / "metrics.jsonl") if r["type"] == "epoch"] == [1]
    again = run_kdmtl([*SMALL, "loss=none", f"hydra.run.dir={run_dir}", "resume=true"], workdir, shared_cache)
    assert again.returncode == 0, show(again)                      # interrupted: continued in place
    assert "resuming" in again.stdout
    assert [r["epoch"] for r in read_jsonl(run_dir / "metrics.jsonl") if r["type"] == "epoch"] == [1, 2]
    assert (run_dir / "results.json").exists()


@scenario
def a_run_stopped_before_its_first_checkpoint_starts_over_in_place(workdir, shared_cache):
    run_dir = workdir / "early"
    command = [*SMALL, "loss=none", f"hydra.run.dir={run_dir}"]
    killed = run_kdmtl(command, workdir, shared_cache, faults={"kill_in_checkpoint_write": 1})
    assert killed.returncode == -9, show(killed)
    assert run_dirs.state(run_dir) == "started" and list((run_dir / "checkpoints").glob(".*.tmp"))
    again = run_kdmtl([*command, "resume=true"], workdir, shared_cache)
    assert again.returncode == 0, show(again)
    assert "starting it over in place" in again.stdout
    assert not list((run_dir / "checkpoints").glob(".*.tmp"))     # the killed write's temporary file
    assert run_dirs.state(run_dir) == "finished"


@scenario
def an_edited_config_is_refused_on_resume_with_the_keys_named(workdir, shared_cache):
    run_dir = workdir / "edited"
    first = run_kdmtl([*SMALL, "loss=kd", "stop_after_epoch=1", f"hydra.run.dir={run_dir}"], workdir, shared_cache)
    assert first.returncode == 0, show(first)
    config = run_dir / "config.yaml"
    original = config.read_text()
    config.write_text(original.replace("lr: 0.003", "lr: 0.1", 1))
    assert config.read_text() != original
    before = checksums(run_dir)
    proc = run_kdmtl(["train", f"resume={run_dir}"], workdir, shared_cache)
    line = assert_one_line_error(proc, "config.yaml", "edited", "optim.lr", "0.003", "0.1")
    assert "restore" in line
    assert checksums(run_dir) == before
    config.write_text(original)                                  # restored: it resumes
    assert run_kdmtl(["train", f"resume={run_dir}"], workdir, shared_cache).returncode == 0


@scenario
def sigterm_while_the_teacher_trains_resumes_it_bit_identically(workdir, tmp_path, shared_cache):
    """The teacher's checkpoint goes to its cache staging area; the same command continues the
    teacher mid-epoch, then the student; everything equals an uninterrupted run."""
    common = [*SMALL, "teacher.optim.epochs=2", f"data.root={shared_cache}/data"]
    straight, stopped = workdir / "straight", workdir / "stopped"
    cache_a, cache_b = tmp_path / "cache_a", tmp_path / "cache_b"
    # fresh=True (conftest.run_kdmtl): runs compared bit for bit, each in an interpreter of its own
    done = run_kdmtl([*common, f"hydra.run.dir={straight}"], workdir, cache_a, fresh=True)
    assert done.returncode == 0, show(done)
    command = [*common, f"hydra.run.dir={stopped}"]
    first = run_kdmtl(command, workdir, cache_b, faults={"signal_at_step": 3, "label": "teacher"})
    assert first.returncode == 75, show(first)
    lines = first.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kdmtl: stopped:") and "SIGTERM" in lines[0]
    staged = list((cache_b / "teachers").glob(f"*/training/checkpoints/last.pt"))
    assert len(staged) == 1
    checkpoint = torch.load(staged[0], weights_only=True)
    assert checkpoint["global_step"] == 3 and checkpoint["position"]["batches_done"] == 3
    assert json.loads((stopped / "PREEMPTED").read_text())["signal"] == "SIGTERM"
    assert not (stopped / "checkpoints").exists() and not list((cache_b / "teachers").glob("*/teacher.safetensors"))

    second = run_kdmtl(command, workdir, cache_b, fresh=True)     # the requeued, identical command
    assert second.returncode == 0, show(second)
    assert "teacher: resuming from" in second.stdout and "after epoch 0 + 3 steps" in second.stdout
    assert not list((cache_b / "teachers").glob("*/training")) and not (stopped / "PREEMPTED").exists()
    ta = load_file(next((cache_a / "teachers").glob("*/teacher.safetensors")))
    tb = load_file(next((cache_b / "teachers").glob("*/teacher.safetensors")))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert_same_results(straight, stopped)
    teacher_log = [r for r in read_jsonl(stopped / "teacher" / "metrics.jsonl") if r["type"] == "epoch"]
    assert [r["epoch"] for r in teacher_log] == [1, 2]           # no epoch twice in the teacher's log


@scenario
def sigterm_while_the_teacher_output_cache_is_built(workdir, tmp_path, shared_cache):
    common = [*SMALL, "teacher.cache=views", "teacher.cache_views=2", f"data.root={shared_cache}/data"]
    run_dir, cache = workdir / "cached", tmp_path / "cache"
    first = run_kdmtl([*common, f"hydra.run.dir={run_dir}"], workdir, cache, faults={"signal_at_cache_batch": 2})
    assert first.returncode == 75, show(first)
    assert "teacher-output cache" in first.stderr
    assert not list((cache / "teacher_outputs").glob("*")) or \
        not list((cache / "teacher_outputs").glob("*/meta.json"))    # nothing half-built is kept
    assert not list((cache / "teacher_outputs").glob(".*building*"))
    second = run_kdmtl([*common, f"hydra.run.dir={run_dir}"], workdir, cache)
    assert second.returncode == 0, show(second)
    assert "reusing cached teacher" in second.stdout and len(list((cache / "teacher_outputs").glob("*/meta.json"))) == 1
    assert run_dirs.state(run_dir) == "finished"


@scenario
def a_stopped_sweep_starts_no_further_job_and_the_same_command_continues_it(workdir, shared_cache):
    sweep = workdir / "sweep"
    command = ["train", "-m", *SMALL[1:], "loss=none", "seed=0,1", f"hydra.sweep.dir={sweep}"]
    first = run_kdmtl(command, workdir, shared_cache, faults={"signal_at_step": 3})
    assert first.returncode == 75, show(first)
    assert (sweep / "0" / "PREEMPTED").exists() and not (sweep / "1" / "config.yaml").exists()
    other = run_kdmtl(["train", "-m", *SMALL[1:], "loss=none", "seed=5,6", f"hydra.sweep.dir={sweep}"], workdir, shared_cache)
    before = checksums(sweep)
    assert_one_line_error(other, str(sweep), "another command line")
    assert checksums(sweep) == before
    again = run_kdmtl(command, workdir, shared_cache)
    assert again.returncode == 0, show(again)
    assert "continuing the sweep" in again.stdout
    assert run_dirs.state(sweep / "0") == "finished" and run_dirs.state(sweep / "1") == "finished"
    kept = checksums(sweep / "0")
    third = run_kdmtl(command, workdir, shared_cache)          # everything finished: kept as it is
    assert third.returncode == 0, show(third)
    assert "finished before; kept" in third.stdout
    assert checksums(sweep / "0") == kept


def _hold(run_dir: Path) -> subprocess.Popen:
    """Another live process owning `run_dir` (a real flock), until killed."""
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from kdmtl_cli.engine import run_dir; "
                               "run_dir.own(sys.argv[1]); print('held', flush=True); time.sleep(120)", str(run_dir)],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


@scenario
def export_does_not_write_into_a_live_run(finished, workdir, shared_cache):
    finished = shutil.copytree(finished, workdir / "finished_copy")   # the other scenarios use the original
    holder = _hold(finished)
    try:
        before = checksums(finished)
        proc = run_kdmtl(["export", f"run_dir={finished}"], workdir, shared_cache)
        assert_one_line_error(proc, str(finished), "in use", f"pid {holder.pid}", "out=")
        assert checksums(finished) == before
        elsewhere = run_kdmtl(["export", f"run_dir={finished}", f"out={workdir / 'exported'}"], workdir, shared_cache)
        assert elsewhere.returncode == 0, show(elsewhere)
        assert (workdir / "exported" / "student.torchscript.pt").is_file() and checksums(finished) == before
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_scenario(outcomes, name):
    if outcomes[name] is not None:
        raise outcomes[name]
