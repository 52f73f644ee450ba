"""Device selection and precision: the only place that knows about cuda vs cpu."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.utils.deterministic

from kdmtl_cli.engine.host_memory import keep_freed_memory
from kdmtl_cli.errors import KdmtlError

PRECISIONS = ("32", "bf16", "16-mixed")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")
_COMPILE_OFF = "or run with hardware.compile=false"   # every compile error names the way out


@dataclass
class Hardware:
    device: torch.device
    precision: str
    channels_last: bool
    scaler: Optional["torch.amp.GradScaler"]
    compile: bool = False
    compile_mode: str = "default"

    def autocast(self):
        if self.precision == "32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def to_input(self, image: torch.Tensor) -> torch.Tensor:
        return image.contiguous(memory_format=torch.channels_last) if self.channels_last else image

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        model = model.to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if self.compile:
            if self.device.type == "cpu":
                _quiet_cuda_probe()
            compile_in_place(model, self.compile_mode)
        return model

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


@functools.lru_cache(1)
def _quiet_cuda_probe() -> None:
    """Inductor on CPU imports torch.utils.cpp_extension, which warns 'No CUDA runtime is found'
    on stderr when a CUDA build of torch runs without a GPU: irrelevant to a CPU run, so dropped."""
    logging.getLogger("torch.utils.cpp_extension").addFilter(
        lambda record: "No CUDA runtime is found" not in record.getMessage())


def _is_compiled(module: torch.nn.Module) -> bool:
    return getattr(module, "_compiled_call_impl", None) is not None


def compile_in_place(model: torch.nn.Module, mode: str) -> None:
    """Compile `model`'s forward in place (nn.Module.compile): the module stays itself, so
    state_dict keys carry no `_orig_mod.` prefix and checkpoints load in non-compiled runs.
    Compilation happens on the first forward; its failures become one KdmtlError."""
    if any(_is_compiled(m) for m in model.modules()):
        # Already compiled, or a wrapper (per-task teachers) around compiled teachers: compiling
        # again would nest one compiled region in another for no gain.
        return
    # By default dynamo does not guard on module hooks, so a feature hook registered after the
    # first compiled forward (a teacher trained in this run, hooked afterwards for feature KD)
    # would silently never fire. Guarding on hooks recompiles once when hooks change instead.
    import torch._dynamo
    import torch._functorch.config

    torch._dynamo.config.skip_nnmodule_hook_guards = False
    # The trainer backpropagates twice through one graph (per-task gradients with retain_graph for
    # gradient-norm logging and gradient-based weightings); compiled backward graphs that donate
    # their buffers refuse that, so buffer donation (a memory saving only) is turned off.
    torch._functorch.config.donated_buffer = False
    model.compile(mode=mode)
    compiled = model._compiled_call_impl

    def call(*args, **kwargs):
        try:
            return compiled(*args, **kwargs)
        except _compile_errors() as err:
            first = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
            raise KdmtlError(f"torch.compile (hardware.compile=true, mode {mode}) failed: "
                             f"{type(err).__name__}: {first[:300]}; fix that {_COMPILE_OFF}") from err

    model._compiled_call_impl = call


@functools.lru_cache(1)
def _compile_errors() -> tuple:
    from torch._dynamo.exc import TorchDynamoException
    from torch._inductor.exc import CppCompileError, InductorError, InvalidCxxCompiler

    return TorchDynamoException, InductorError, CppCompileError, InvalidCxxCompiler


def check_compile(device: torch.device) -> None:
    """Fail at start-up, not at the first training step, when torch.compile cannot work here:
    inductor (torch.compile's default backend) builds C++ kernels on CPU and Triton kernels on CUDA."""
    if device.type == "cpu":
        from torch._inductor import cpp_builder

        try:
            cpp_builder.get_cpp_compiler()
        except Exception:  # noqa: BLE001 - InvalidCxxCompiler, or whatever the probe raises
            raise KdmtlError("hardware.compile=true needs a C++ compiler on CPU (torch.compile's inductor backend "
                             "builds C++ kernels) and none was found (g++, or $CXX); install one (e.g. "
                             f"apt-get install g++) {_COMPILE_OFF}") from None
    elif device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            raise KdmtlError(f"hardware.compile=true on {device} needs Triton (pip install triton) "
                             f"and it is not usable here; install it {_COMPILE_OFF}")


def select_device(spec: str) -> torch.device:
    spec = str(spec)
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise KdmtlError(f"hardware.device={spec} but no CUDA device is available; "
                             "use hardware.device=cpu or hardware.device=auto")
        device = torch.device(spec)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise KdmtlError(f"hardware.device={spec} but only {torch.cuda.device_count()} CUDA "
                             f"device(s) exist (cuda:0..cuda:{torch.cuda.device_count() - 1})")
        return device
    raise KdmtlError(f"unknown hardware.device '{spec}'; use auto, cpu, cuda or cuda:N")


def device_memory_budget(device: torch.device) -> int:
    """Bytes a resident store may take on a CUDA device: a quarter of its free memory (the rest
    is for the model, its activations and the optimiser); 0 elsewhere (host memory is the page
    cache's business)."""
    if device.type != "cuda":
        return 0
    free, _ = torch.cuda.mem_get_info(device)
    return free // 4


def set_determinism(on: bool, device: torch.device, compile_on: bool = False) -> None:
    """What `hardware.deterministic` needs on each device, and nothing more.

    Both devices: `torch.use_deterministic_algorithms` (the few ops with a non-deterministic
    kernel take a deterministic one or warn). CUDA also: cuDNN autotuning off and cuBLAS's fixed
    workspace. Not on CPU: torch's fill of every newly allocated tensor
    (`torch.utils.deterministic.fill_uninitialized_memory`), which only guards against kernels
    that read memory they never wrote, a CUDA-side concern; on the CPU it costs a `fill_` call per
    tensor a step allocates while changing no result. With the same
    thread count a CPU run is bit-identical on rerun and on resume (tests/test_train_e2e.py,
    tests/test_hardware_knobs.py); on CUDA, runs repeat on the same card and software.
    """
    if compile_on:
        torch.use_deterministic_algorithms(on, warn_only=True)    # also sets torch._inductor's switch
    else:
        # The same switch without importing torch._inductor (its config, read only when
        # compiling, is what the public function also sets): that import costs ~1.2 s of start-up.
        torch._C._set_deterministic_algorithms(on, warn_only=True)
    if on:
        torch.utils.deterministic.fill_uninitialized_memory = device.type != "cpu"
        if device.type == "cuda":
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = not on


def setup_hardware(hw_cfg) -> Hardware:
    precision = str(hw_cfg.precision)
    if precision not in PRECISIONS:
        raise KdmtlError(f"unknown hardware.precision '{precision}'; choose one of: {', '.join(PRECISIONS)}")
    device = select_device(hw_cfg.device)
    compile_on, compile_mode = bool(getattr(hw_cfg, "compile", False)), str(getattr(hw_cfg, "compile_mode", "default"))
    if compile_mode not in COMPILE_MODES:  # an error even while compile is off: a typo stays a typo
        raise KdmtlError(f"unknown hardware.compile_mode '{compile_mode}'; choose one of: {', '.join(COMPILE_MODES)}")
    if compile_on:
        check_compile(device)
    if hw_cfg.num_threads:
        torch.set_num_threads(int(hw_cfg.num_threads))
    if getattr(hw_cfg, "keep_freed_memory", True):
        keep_freed_memory()
    set_determinism(bool(hw_cfg.deterministic), device, compile_on)
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise KdmtlError(f"{device} does not support bf16; use hardware.precision=16-mixed or 32")
    # fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none.
    scaler = torch.amp.GradScaler(device.type) if precision == "16-mixed" else None
    return Hardware(device=device, precision=precision, channels_last=bool(hw_cfg.channels_last), scaler=scaler,
                    compile=compile_on, compile_mode=compile_mode)
