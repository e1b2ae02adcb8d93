"""`hardware.*`: device, precision, compile, threads; applied once at start-up."""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from enum import Enum
from typing import Optional

from sae.errors import UserInputError

import torch


class Device(str, Enum):
    cpu = "cpu"
    cuda = "cuda"


class DType(str, Enum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


@dataclass
class HardwareConfig:
    device: Device = Device.cpu
    dtype: DType = DType.float32  # autocast dtype for the SAE forward; weights stay float32
    compile: bool = False  # torch.compile the SAE forward
    threads: Optional[int] = None  # torch intra-op threads; null = SLURM_CPUS_PER_TASK or all cores

    def __post_init__(self) -> None:
        if self.threads is not None and self.threads <= 0:
            raise ValueError(f"hardware.threads must be > 0 or null, got {self.threads}")


def check_hardware(cfg: HardwareConfig) -> None:
    """Fail before any work if the requested device cannot be used here."""
    if cfg.device is Device.cuda and not torch.cuda.is_available():
        raise UserInputError("hardware.device=cuda but torch sees no CUDA device (torch.cuda.is_available() is False); "
                         "use hardware=cpu or install a CUDA build of torch")
    if cfg.device is Device.cpu and cfg.dtype is DType.float16:
        raise UserInputError("hardware.dtype=float16 is not supported on CPU, expected one of [float32, bfloat16]")


def apply_threads(cfg: HardwareConfig) -> int:
    threads = cfg.threads or int(os.environ.get("SLURM_CPUS_PER_TASK", 0)) or os.cpu_count() or 1
    torch.set_num_threads(threads)
    return threads


def autocast(cfg: HardwareConfig) -> contextlib.AbstractContextManager:
    if cfg.dtype is DType.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=cfg.device.value, dtype=getattr(torch, cfg.dtype.value))


def host_dtype(cfg: HardwareConfig) -> torch.dtype:
    """The dtype an ESM-2 host runs in: hardware.dtype, fixed before its first forward (fair-esm's
    rotary cache keeps the dtype of the first forward). The grokking hosts always run in float32."""
    return getattr(torch, cfg.dtype.value)
