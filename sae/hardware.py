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


class Parallel(str, Enum):
    data = "data"  # each process a slice of every batch, gradients averaged (DDP)
    latents = "latents"  # each process a slice of the dictionary's latents, global TopK across them


class Backend(str, Enum):
    gloo = "gloo"
    nccl = "nccl"


@dataclass
class HardwareConfig:
    device: Device = Device.cpu
    dtype: DType = DType.float32  # autocast dtype for the SAE forward; weights stay float32
    compile: bool = False  # torch.compile the SAE forward
    threads: Optional[int] = None  # torch intra-op threads; null = SLURM_CPUS_PER_TASK or all cores
    # A run launched as several processes (torchrun, or a SLURM job of several tasks):
    parallel: Parallel = Parallel.data
    backend: Optional[Backend] = None  # torch.distributed backend; null = gloo on CPU, nccl on CUDA
    rendezvous_timeout_s: int = 300  # every rank must join within this
    collective_timeout_s: int = 1800  # a collective waiting longer (a hung rank) fails the run

    def __post_init__(self) -> None:
        if self.threads is not None and self.threads <= 0:
            raise ValueError(f"hardware.threads must be > 0 or null, got {self.threads}")
        for key in ("rendezvous_timeout_s", "collective_timeout_s"):
            if getattr(self, key) <= 0:
                raise ValueError(f"hardware.{key} must be > 0, got {getattr(self, key)}")

    @property
    def dist_backend(self) -> Backend:
        return self.backend or (Backend.nccl if self.device is Device.cuda else Backend.gloo)


def check_hardware(cfg: HardwareConfig) -> None:
    """Fail before any work if the requested device cannot be used here."""
    if cfg.device is Device.cuda and not torch.cuda.is_available():
        raise UserInputError("hardware.device=cuda but torch sees no CUDA device (torch.cuda.is_available() is False); "
                         "use hardware=cpu or install a CUDA build of torch")
    if cfg.device is Device.cpu and cfg.dtype is DType.float16:
        raise UserInputError("hardware.dtype=float16 is not supported on CPU, expected one of [float32, bfloat16]")
    if cfg.device is Device.cpu and cfg.backend is Backend.nccl:
        raise UserInputError("hardware.backend=nccl needs CUDA but hardware.device=cpu; use hardware.backend=gloo "
                             "(or null: gloo on CPU, nccl on CUDA)")


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
