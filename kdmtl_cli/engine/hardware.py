"""Device selection and precision: the only place that knows about cuda vs cpu."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Optional

import torch

from kdmtl_cli.errors import KdmtlError

PRECISIONS = ("32", "bf16", "16-mixed")


@dataclass
class Hardware:
    device: torch.device
    precision: str
    channels_last: bool
    scaler: Optional["torch.amp.GradScaler"]

    def autocast(self):
        if self.precision == "32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def to_input(self, image: torch.Tensor) -> torch.Tensor:
        return image.contiguous(memory_format=torch.channels_last) if self.channels_last else image

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        model = model.to(self.device)
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


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


def setup_hardware(hw_cfg) -> Hardware:
    precision = str(hw_cfg.precision)
    if precision not in PRECISIONS:
        raise KdmtlError(f"unknown hardware.precision '{precision}'; choose one of: {', '.join(PRECISIONS)}")
    device = select_device(hw_cfg.device)
    if hw_cfg.num_threads:
        torch.set_num_threads(int(hw_cfg.num_threads))
    if hw_cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise KdmtlError(f"{device} does not support bf16; use hardware.precision=16-mixed or 32")
    # fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none.
    scaler = torch.amp.GradScaler(device.type) if precision == "16-mixed" else None
    return Hardware(device=device, precision=precision, channels_last=bool(hw_cfg.channels_last), scaler=scaler)
