"""`kdmtl export run_dir=RUN [format=torchscript|onnx] [checkpoint=best|last] [out=DIR]`: the
run's student (and its teacher, when it had one) as a deployable file, checked against the
PyTorch model on a batch, plus a teacher-vs-student table: parameters, FLOPs, file size and
latency per image on this device.

The exported module takes an image batch [N, 3, H, W] (normalised as in training) and returns
the task outputs as a tuple, in the order of `tasks` printed by the command (TorchScript by
tracing: the architectures have no data-dependent control flow)."""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path
from typing import List

import torch

from kdmtl_cli.errors import KdmtlError
from kdmtl_cli.runfiles import read_config, read_json

HELP = """usage: kdmtl export run_dir=RUN [format=torchscript|onnx] [checkpoint=best|last] [out=DIR] [config_dir=DIR]

A finished run's student (and its teacher, when the run had one) as a deployable file, checked
against the PyTorch model on a batch, then a table comparing them: parameters, FLOPs, file size
and latency per image on this machine's CPU. The exported module takes an image batch
[N, 3, H, W] (normalised as in training) and returns the task outputs as a tuple, in the order
of the tasks the command prints.

arguments:
  run_dir=RUN              a kdmtl train run directory (required)
  format=torchscript|onnx  TorchScript, traced (default), or ONNX (pip install kdmtl[onnx])
  checkpoint=best|last     the run's checkpoint to export (default: best)
  out=DIR                  where student.* and teacher.* go (default: RUN/export; a run that is
                           still running can only be exported elsewhere)
  config_dir=DIR           the --config-dir the run was trained with, when it used plug-ins of
                           its own (a trunk, a task kind)
  -h, --help               this text

examples:
  kdmtl export run_dir=outputs/DATE/TIME-ID
  kdmtl export run_dir=outputs/DATE/TIME-ID format=onnx checkpoint=last out=deploy
  kdmtl export run_dir=outputs/DATE/TIME-ID config_dir=my_configs"""

OPTIONS = ("run_dir", "format", "checkpoint", "out", "config_dir")   # config_dir: the run's plug-in files
FORMATS = ("torchscript", "onnx")


class TupleOutputs(torch.nn.Module):
    """The model with its task outputs as a tuple (export formats want tensors, not dicts)."""

    def __init__(self, model: torch.nn.Module, tasks: List[str]):
        super().__init__()
        self.model, self.tasks = model, list(tasks)

    def forward(self, image):
        outputs = self.model(image)["outputs"]
        return tuple(outputs[name] for name in self.tasks)


def parse(args: List[str]) -> dict:
    options = {"format": "torchscript", "checkpoint": "best"}
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep or key not in OPTIONS:
            raise KdmtlError(f"unknown export argument '{arg}'; use {'=..., '.join(OPTIONS)}=... "
                             "(e.g. kdmtl export run_dir=outputs/DATE/TIME format=torchscript)")
        options[key] = value
    if "run_dir" not in options:
        raise KdmtlError("kdmtl export needs run_dir=<a kdmtl train run directory>")
    if options["format"] not in FORMATS:
        raise KdmtlError(f"unknown export format '{options['format']}'; choose torchscript or onnx")
    if options["checkpoint"] not in ("best", "last"):
        raise KdmtlError(f"checkpoint must be best or last (got '{options['checkpoint']}')")
    return options


def _load_student(run_dir: Path, which: str):
    from kdmtl_cli.engine.checkpoint import load_checkpoint
    from kdmtl_cli.teachers import build_teacher

    path = run_dir / "checkpoints" / f"{which}.pt"
    if not path.is_file():
        raise KdmtlError(f"{path} not found; pass run_dir= a finished kdmtl train run (checkpoints/{which}.pt)")
    state = load_checkpoint(path)
    if "model_meta" not in state or "model" not in state:
        raise KdmtlError(f"{path} has no model or model description (model_meta); it was not written by this "
                         "kdmtl train: pass another run_dir, or checkpoint=last / best")
    return build_teacher(path, state["model_meta"], state["model"]), state["model_meta"]


def _teacher_source(run_dir: Path):
    """The teacher file results.json records, when there is one to export (read before any
    export, so a bad results.json stops the command before it writes anything)."""
    results = run_dir / "results.json"
    if not results.is_file():
        return None
    saved = read_json(results, "delete it to export the student alone, or pass another run_dir")
    teacher = saved.get("teacher") or {}
    source = teacher.get("source") if isinstance(teacher, dict) else None
    if not isinstance(source, str) or not source or ";" in source or not Path(source).is_file():
        return None                                                  # none, per-task, or gone
    return Path(source)


def _load_teacher(source):
    from kdmtl_cli.teachers import build_teacher, read_teacher_file

    if source is None:
        return None
    meta, weights = read_teacher_file(source)
    return build_teacher(source, meta, weights)


def _export(model, tasks, example, fmt: str, path: Path) -> int:
    """Write the exported model; check it against eager on `example`; return its size in bytes."""
    from kdmtl_cli.engine.checkpoint import _atomic_write

    wrapped = TupleOutputs(model.eval(), tasks).eval()
    with torch.no_grad():
        expected = wrapped(example)
    if fmt == "torchscript":
        # torch flags jit as deprecated in favour of torch.export, and the trace warns about the
        # size checks in the heads (constant for a fixed input size): both are noise here.
        warnings.filterwarnings("ignore", category=FutureWarning, module="torch.jit")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        with torch.no_grad():
            traced = torch.jit.trace(wrapped, example, check_trace=False)
        buffer = io.BytesIO()
        torch.jit.save(traced, buffer)
        _atomic_write(path, lambda handle: handle.write(buffer.getvalue()))
        loaded = torch.jit.load(str(path))
        with torch.no_grad():
            got = loaded(example)
    else:
        try:
            import onnx  # noqa: F401
            import onnxruntime
            import onnxscript  # noqa: F401  (torch's exporter)
        except ImportError:
            raise KdmtlError("format=onnx needs the onnx extra: pip install kdmtl[onnx] "
                             "(onnx, onnxruntime, onnxscript)") from None
        buffer = io.BytesIO()
        with contextlib.redirect_stdout(io.StringIO()):   # the exporter narrates its passes
            torch.onnx.export(wrapped, (example,), buffer, input_names=["image"], output_names=list(tasks),
                              dynamic_axes={"image": {0: "batch"}})
        _atomic_write(path, lambda handle: handle.write(buffer.getvalue()))
        session = onnxruntime.InferenceSession(str(path))
        got = tuple(torch.from_numpy(o) for o in session.run(None, {"image": example.numpy()}))
    for name, a, b in zip(tasks, expected, got):
        if a.shape != b.shape or not torch.allclose(a, b, atol=1e-4, rtol=1e-4):
            raise KdmtlError(f"the exported {path.name} differs from the PyTorch model on task {name} "
                             f"(max |Δ| {float((a - b).abs().max()):.3g}); not kept")
    return path.stat().st_size


@contextlib.contextmanager
def _each_warning_once():
    """Show each distinct warning of the block once, when it ends. torch's ONNX exporter changes
    the warning filters on every call, which makes Python forget the warnings it has shown:
    exporting the student and then the teacher printed each exporter warning twice."""
    caught = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            yield
    finally:
        shown = set()
        for warning in caught:
            if (warning.category, str(warning.message)) not in shown:
                shown.add((warning.category, str(warning.message)))
                warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno,
                                     warning.file, warning.line)


def export_main(args: List[str]) -> int:
    from rich.console import Console
    from rich.table import Table

    from kdmtl_cli.engine.efficiency import measure
    from kdmtl_cli.engine.hardware import Hardware

    options = parse(args)
    if options.get("config_dir"):   # a run with plug-ins of its own (a trunk, a task kind): import them first
        from kdmtl_cli.plugins import load_user

        if not Path(options["config_dir"]).expanduser().is_dir():
            raise KdmtlError(f"config_dir={options['config_dir']} is not a directory; pass the --config-dir the run used")
        load_user(options["config_dir"])
    run_dir = Path(options["run_dir"]).expanduser()
    config = run_dir / "config.yaml"
    if not config.is_file():
        raise KdmtlError(f"{run_dir} is not a kdmtl train run directory (no config.yaml)")
    cfg = read_config(config, "it is the config kdmtl train saved there: restore it, or pass another run_dir")
    data = cfg.get("data")
    size = data.get("image_size", 32) if hasattr(data, "get") else 32
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise KdmtlError(f"{config}: data.image_size must be a whole number >= 1 (got {size!r}); restore the "
                         "config kdmtl train saved there, or pass another run_dir")
    teacher_source = _teacher_source(run_dir)
    student, meta = _load_student(run_dir, options["checkpoint"])
    tasks = list(meta["tasks"])
    torch.manual_seed(0)
    example = torch.randn(4, 3, size, size)
    out_dir = Path(options.get("out") or run_dir / "export")
    from kdmtl_cli.engine import run_dir as run_dirs

    if not options.get("out"):          # the run's directory belongs to its live process
        run_dirs.refuse_if_alive(run_dir, "export it when it has ended, or write the export elsewhere with out=DIR")
    suffix = ".torchscript.pt" if options["format"] == "torchscript" else ".onnx"
    hardware = Hardware(device=torch.device("cpu"), precision="32", channels_last=False, scaler=None)
    rows = []
    models = [("student", student)]
    teacher = _load_teacher(teacher_source)
    if teacher is not None:
        models.append(("teacher", teacher))
    with _each_warning_once():
        for name, model in models:
            path = out_dir / f"{name}{suffix}"
            own_tasks = [t for t in tasks if t in model.heads] if hasattr(model, "heads") else tasks
            size_bytes = _export(model, own_tasks, example, options["format"], path)
            cost = measure(model, example, hardware)
            rows.append((name, cost["params"], cost["flops"], size_bytes, cost["latency_ms"], path))
    table = Table(title=f"kdmtl export: {options['format']}, tasks {', '.join(tasks)} (outputs in this order)")
    for column in ("model", "parameters", "FLOPs / image", "file size", "latency / image (cpu)", "file"):
        table.add_column(column, justify="left" if column in ("model", "file") else "right")
    for name, params, flops, size_bytes, latency, path in rows:
        table.add_row(name, f"{params / 1e6:.3f}M", f"{flops / 1e6:.1f}M", f"{size_bytes / 2**20:.2f} MiB",
                      f"{latency:.2f} ms", str(path))
    Console(width=200).print(table)
    return 0
