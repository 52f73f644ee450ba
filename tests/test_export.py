"""`kdmtl export`: a finished run's student and teacher to TorchScript; the saved module, loaded
back, gives the PyTorch model's outputs on a batch; the comparison table; bad arguments."""

from __future__ import annotations

import pytest
import torch

from conftest import FAST, assert_one_line_error, run_kdmtl, show
from kdmtl_cli.engine.checkpoint import load_checkpoint
from kdmtl_cli.teachers import build_teacher


def test_export_torchscript_round_trip_and_table(workdir, shared_cache):
    run_dir = workdir / "run"
    trained = run_kdmtl(["train", *FAST, f"hydra.run.dir={run_dir}"], workdir, shared_cache)
    assert trained.returncode == 0, show(trained)
    proc = run_kdmtl(["export", f"run_dir={run_dir}"], workdir, shared_cache)
    assert proc.returncode == 0, show(proc)
    assert "student" in proc.stdout and "teacher" in proc.stdout and "MiB" in proc.stdout
    assert "Warning" not in proc.stderr, proc.stderr
    state = load_checkpoint(run_dir / "checkpoints" / "best.pt")
    model = build_teacher(run_dir / "checkpoints" / "best.pt", state["model_meta"], state["model"]).eval()
    exported = torch.jit.load(str(run_dir / "export" / "student.torchscript.pt"))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)["outputs"]
        got = exported(x)
    assert len(got) == 3
    for name, value in zip(("cls", "seg", "depth"), got):
        assert torch.allclose(value, expected[name], atol=1e-5), name
    assert (run_dir / "export" / "teacher.torchscript.pt").stat().st_size > \
        (run_dir / "export" / "student.torchscript.pt").stat().st_size


def test_export_bad_arguments(workdir, shared_cache):
    assert_one_line_error(run_kdmtl(["export", "format=torchscript"], workdir, shared_cache), "needs run_dir")
    assert_one_line_error(run_kdmtl(["export", f"run_dir={workdir}", "format=tflite"], workdir, shared_cache),
                          "unknown export format")
    assert_one_line_error(run_kdmtl(["export", f"run_dir={workdir}"], workdir, shared_cache), "no config.yaml")


@pytest.mark.slow  # ~30 s; run with -m slow
def test_export_onnx_checked_against_pytorch(workdir, shared_cache):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    import onnxruntime

    run_dir = workdir / "run"
    assert run_kdmtl(["train", *FAST, "loss=none", f"hydra.run.dir={run_dir}"], workdir, shared_cache).returncode == 0
    proc = run_kdmtl(["export", f"run_dir={run_dir}", "format=onnx"], workdir, shared_cache, timeout=600)
    assert proc.returncode == 0, show(proc)
    state = load_checkpoint(run_dir / "checkpoints" / "best.pt")
    model = build_teacher(run_dir / "checkpoints" / "best.pt", state["model_meta"], state["model"]).eval()
    session = onnxruntime.InferenceSession(str(run_dir / "export" / "student.onnx"))
    x = torch.randn(2, 3, 32, 32)                                   # another batch size than the export's
    got = session.run(None, {"image": x.numpy()})
    with torch.no_grad():
        expected = model(x)["outputs"]
    for name, value in zip(("cls", "seg", "depth"), got):
        assert torch.allclose(torch.from_numpy(value), expected[name], atol=1e-4), name


def test_each_exporter_warning_shown_once(monkeypatch):
    """torch's ONNX exporter changes the warning filters on every call, which makes Python show a
    warning it has shown already: exporting the student and the teacher printed each twice."""
    import warnings

    from kdmtl_cli.commands.export import _each_warning_once

    def export_like_torch():
        warnings.warn("dynamic_axes is not recommended", UserWarning)   # the same place every time
        warnings.filterwarnings("ignore", message="something else")    # ... and the filters change

    shown = []
    monkeypatch.setattr(warnings, "showwarning", lambda message, *args, **kwargs: shown.append(str(message)))
    with warnings.catch_warnings():
        warnings.simplefilter("default")              # Python's own: once per place, until filters change
        export_like_torch()
        export_like_torch()
        assert shown == ["dynamic_axes is not recommended"] * 2        # what happened without the fix
        shown.clear()
        with _each_warning_once():
            export_like_torch()
            export_like_torch()
            warnings.warn("another one", UserWarning)
    assert shown == ["dynamic_axes is not recommended", "another one"]


@pytest.mark.slow  # ~45 s; run with -m slow
def test_export_onnx_with_teacher_warns_once(workdir, shared_cache):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    run_dir = workdir / "run"
    assert run_kdmtl(["train", *FAST, f"hydra.run.dir={run_dir}"], workdir, shared_cache).returncode == 0
    proc = run_kdmtl(["export", f"run_dir={run_dir}", "format=onnx"], workdir, shared_cache, timeout=600)
    assert proc.returncode == 0, show(proc)
    assert "teacher" in proc.stdout, show(proc)                       # two models exported
    warned = [line for line in proc.stderr.splitlines() if "Warning:" in line]
    assert len(warned) == len(set(warned)), show(proc)
