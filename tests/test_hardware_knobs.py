"""Hardware knobs: hardware.compile / compile_mode (torch.compile in place), bf16 autocast on CPU.

torch.compile's first call costs tens of seconds on this 2-core CPU (inductor builds C++
kernels; ~30-50 s with a cold cache), so the tests that really compile are marked slow
(`pytest -m slow tests/test_hardware_knobs.py`); the config plumbing is tested without compiling.
"""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from conftest import FAST, assert_one_line_error, run_kdmtl, show
from kdmtl_cli.data import TargetSpec
from kdmtl_cli.engine.hardware import COMPILE_MODES, Hardware, setup_hardware
from kdmtl_cli.errors import KdmtlError
from kdmtl_cli.models import build_model
from kdmtl_cli.schema import HardwareConfig, ModelConfig
from kdmtl_cli.tasks import TASK_KINDS, Task, _load_kinds

CPU = torch.device("cpu")


def _model():
    _load_kinds()
    tasks = {"cls": Task("cls", TASK_KINDS.get("classification")(), TargetSpec("classification", 5), "cls"),
             "seg": Task("seg", TASK_KINDS.get("segmentation")(), TargetSpec("segmentation", 3), "seg")}
    torch.manual_seed(0)
    return build_model(OmegaConf.structured(ModelConfig(arch="convnet", width=8, decoder_width=8)), tasks)


def _hardware(**overrides):
    return setup_hardware(OmegaConf.structured(HardwareConfig(device="cpu", **overrides)))


# ---- config plumbing (fast: nothing is compiled until a forward runs) ----------------------

def test_compile_settings_reach_hardware_and_default_off():
    assert (_hardware().compile, _hardware().compile_mode) == (False, "default")
    for mode in COMPILE_MODES:
        hw = _hardware(compile=True, compile_mode=mode)
        assert (hw.compile, hw.compile_mode) == (True, mode)


def test_prepare_model_compiles_in_place_keeping_state_dict_keys():
    eager = _model()
    keys = list(eager.state_dict())
    model = _hardware(compile=True).prepare_model(_model())
    # the module itself is compiled (no OptimizedModule wrapper), so no `_orig_mod.` key prefix
    assert type(model) is type(eager)
    assert getattr(model, "_compiled_call_impl", None) is not None
    assert list(model.state_dict()) == keys
    eager.load_state_dict(model.state_dict())  # checkpoints stay loadable by non-compiled runs
    plain = _hardware().prepare_model(_model())
    assert getattr(plain, "_compiled_call_impl", None) is None


def test_compile_mode_typo_fails_even_with_compile_off():
    for overrides in ({"compile_mode": "fastest"}, {"compile": True, "compile_mode": "fastest"}):
        with pytest.raises(KdmtlError, match="unknown hardware.compile_mode 'fastest'.*max-autotune"):
            _hardware(**overrides)


def test_missing_cpp_compiler_is_one_clear_error(monkeypatch):
    from torch._inductor import cpp_builder
    from torch._inductor.exc import InvalidCxxCompiler

    def no_compiler():
        raise InvalidCxxCompiler()

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", no_compiler)
    with pytest.raises(KdmtlError) as err:
        _hardware(compile=True)
    message = str(err.value)
    assert "\n" not in message and "C++ compiler" in message and "hardware.compile=false" in message
    assert _hardware(compile=False).compile is False  # compile off never needs a compiler


def test_unknown_compile_mode_is_one_line_cli_error(workdir, shared_cache):
    proc = run_kdmtl(["train", *FAST, "hardware.compile_mode=fastest", f"hydra.run.dir={workdir / 'run'}"],
                     workdir, shared_cache)
    assert_one_line_error(proc, "hardware.compile_mode", "fastest", "default", "reduce-overhead", "max-autotune")
    assert not (workdir / "run" / "checkpoints").exists()  # failed before any training


# ---- bf16 autocast on CPU, end to end ------------------------------------------------------

def test_bf16_cli_run_finishes_with_finite_metrics(workdir, shared_cache):
    run_dir = workdir / "bf16"
    proc = run_kdmtl(["train", *FAST, "hardware.device=cpu", "hardware.precision=bf16", f"hydra.run.dir={run_dir}"],
                     workdir, shared_cache)
    assert proc.returncode == 0, show(proc)
    results = json.loads((run_dir / "results.json").read_text())
    assert results["config"]["hardware"]["precision"] == "bf16"
    final = results["results"]
    tested = {k: v for k, v in final.items() if k.startswith(("test/", "teacher/test/")) and isinstance(v, float)}
    assert "test/cls/accuracy" in tested and "teacher/test/seg/miou" in tested
    assert all(torch.isfinite(torch.tensor(v)) for v in tested.values()), tested
    assert torch.isfinite(torch.tensor(final["best_value"]))


def test_channels_last_applies_to_inputs_and_models():
    hw = Hardware(device=CPU, precision="32", channels_last=True, scaler=None)
    model = hw.prepare_model(_model())
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert hw.to_input(torch.randn(2, 3, 16, 16)).is_contiguous(memory_format=torch.channels_last)


# ---- real compilation (slow) ---------------------------------------------------------------

@pytest.mark.slow
def test_compiled_outputs_match_eager_and_keys_unchanged(one_thread):
    eager = _model().eval()
    keys = list(eager.state_dict())
    compiled = Hardware(device=CPU, precision="32", channels_last=False, scaler=None, compile=True).prepare_model(
        _model()).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        want, got = eager(x)["outputs"], compiled(x)["outputs"]
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-5)
    assert list(compiled.state_dict()) == keys
    # training mode: backward twice through one graph (per-task gradients, retain_graph)
    compiled.train()
    out = compiled(x)["outputs"]
    params = [p for p in compiled.trunk.parameters()]
    torch.autograd.grad(out["cls"].sum(), params, retain_graph=True)
    torch.autograd.grad(out["seg"].mean(), params)


@pytest.mark.slow
def test_feature_hooks_are_captured_under_compile(one_thread):
    hw = Hardware(device=CPU, precision="32", channels_last=False, scaler=None, compile=True)
    names = ["trunk.stages.1", "trunk.stages.2"]
    x = torch.randn(4, 3, 32, 32)
    eager = _model().eval()
    eager.capture_features(names)
    with torch.no_grad():
        want = eager(x)["features"]
    # hooked before the first compiled forward (the student, hooked by Objective.setup)
    hooked_first = hw.prepare_model(_model()).eval()
    hooked_first.capture_features(names)
    with torch.no_grad():
        got = hooked_first(x)["features"]
    assert set(got) == set(names)
    for name in names:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-5)
    # hooked after a compiled forward (a teacher trained in this run, then hooked for feature KD)
    hooked_later = hw.prepare_model(_model()).eval()
    with torch.no_grad():
        assert hooked_later(x)["features"] == {}
        hooked_later.capture_features(names[:1])
        got = hooked_later(x)["features"]
    assert set(got) == set(names[:1])
    torch.testing.assert_close(got[names[0]], want[names[0]], atol=1e-5, rtol=1e-5)


def test_compile_failure_at_first_forward_is_one_kdmtl_error(monkeypatch, one_thread):
    """Inductor fails at the first forward (here: its C++ compiler vanishes after start-up);
    the trainer sees one KdmtlError naming hardware.compile=false, not inductor's traceback.
    Fast: the failure comes before any C++ is built."""
    import torch._inductor.config as inductor_config
    from torch._inductor import cpp_builder

    monkeypatch.setattr(inductor_config, "fx_graph_cache", False)  # a cached kernel would need no compiler
    monkeypatch.setattr(inductor_config.cpp, "cxx", ("no-such-cxx-for-kdmtl-tests",))
    cpp_builder.cpp_compiler_search.cache_clear()
    try:
        model = Hardware(device=CPU, precision="32", channels_last=False, scaler=None, compile=True).prepare_model(
            torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()))
        with pytest.raises(KdmtlError) as err:
            model(torch.randn(2, 3, 8, 8))
    finally:
        cpp_builder.cpp_compiler_search.cache_clear()  # forget the bad search for later tests
    message = str(err.value)
    assert "\n" not in message and "torch.compile" in message and "hardware.compile=false" in message


# ---- determinism: what each device needs, nothing more -------------------------------------
def test_deterministic_on_cpu_keeps_deterministic_kernels_without_the_memory_fill():
    import torch.utils.deterministic as det

    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              det.fill_uninitialized_memory, torch.backends.cudnn.benchmark)
    try:
        _hardware(deterministic=True)
        assert torch.are_deterministic_algorithms_enabled()
        assert det.fill_uninitialized_memory is False        # the CPU tax: one fill_ per new tensor
        assert torch.backends.cudnn.benchmark is False
        _hardware(deterministic=False)
        assert not torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.benchmark is True
        from kdmtl_cli.engine.hardware import set_determinism

        set_determinism(True, torch.device("cuda"))          # flags only: no CUDA device is touched
        assert det.fill_uninitialized_memory is True and torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        det.fill_uninitialized_memory, torch.backends.cudnn.benchmark = before[2], before[3]


def test_cpu_determinism_adds_no_fill_calls_to_a_training_step():
    """The 15-20% tax the speed issue measured was torch filling every new tensor (`fill_`
    calls); with `hardware.deterministic=true` a CPU step now runs the same ops as with false."""
    from torch.profiler import ProfilerActivity, profile

    import torch.utils.deterministic as det

    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              det.fill_uninitialized_memory, torch.backends.cudnn.benchmark)
    model = _model()
    x = torch.randn(4, 3, 16, 16)

    def fills(deterministic: bool) -> int:
        _hardware(deterministic=deterministic)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            out = model(x)["outputs"]
            sum(v.float().mean() for v in out.values()).backward()
        return sum(e.count for e in prof.key_averages() if e.key == "aten::fill_")

    try:
        assert fills(True) == fills(False)
        torch.use_deterministic_algorithms(True, warn_only=True)
        det.fill_uninitialized_memory = True                 # what the old default did
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            out = model(x)["outputs"]
            sum(v.float().mean() for v in out.values()).backward()
        assert sum(e.count for e in prof.key_averages() if e.key == "aten::fill_") > fills(False)
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        det.fill_uninitialized_memory, torch.backends.cudnn.benchmark = before[2], before[3]


# ---- hardware.keep_freed_memory (kdmtl_cli/engine/host_memory.py) -------------------------------

ALLOCATION_STEPS = r"""
import resource, sys
import torch
torch.set_num_threads(1)
if sys.argv[1] == "keep":
    from kdmtl_cli.engine.hardware import setup_hardware
    from kdmtl_cli.schema import HardwareConfig
    from omegaconf import OmegaConf
    setup_hardware(OmegaConf.structured(HardwareConfig(device="cpu")))   # the default: keep_freed_memory=true
torch.manual_seed(0)
def net(width, depth):
    layers = [torch.nn.Conv2d(3, width, 3, padding=1)]
    for _ in range(depth):
        layers += [torch.nn.BatchNorm2d(width), torch.nn.ReLU(), torch.nn.Conv2d(width, width, 3, padding=1)]
    return torch.nn.Sequential(*layers, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(width, 10))
student, teacher = net(16, 6), net(32, 6).eval()
x = torch.randn(32, 3, 32, 32)
def step():      # a KD step, the student's forward first: its activations live while the teacher runs
    out = student(x)
    with torch.no_grad():
        target = teacher(x)
    ((out - target) ** 2).mean().backward()
step(); step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_keep_freed_memory_stops_the_page_faults_of_repeated_steps():
    """With glibc's defaults the memory a step frees goes back to the kernel and the next step
    faults in fresh pages (tens of thousands for three small KD steps); `hardware.keep_freed_memory`
    (default on, set by setup_hardware) keeps it for reuse. Separate processes: the setting is
    process-wide and permanent."""
    import platform
    import subprocess
    import sys

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("the setting applies to glibc's malloc only")
    faults = {}
    for mode in ("default", "keep"):
        proc = subprocess.run([sys.executable, "-c", ALLOCATION_STEPS, mode], capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, proc.stderr
        faults[mode] = int(proc.stdout.split()[-1])
    assert faults["default"] > 10_000, faults          # the steps fault in fresh pages again and again ...
    assert 10 * faults["keep"] < faults["default"], faults   # ... and with the setting hardly at all
