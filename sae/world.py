"""Which process of a distributed run this is, and the collectives the SAEs and the loop use.

A run is distributed when its launcher says so: `torchrun` (RANK, WORLD_SIZE, LOCAL_RANK) or a
SLURM job step of several tasks (SLURM_PROCID, SLURM_NTASKS; submitit's `tasks_per_node`). This
module only reads the environment; `sae.parallel` joins the process group. `Collective` is what
the SAE code sees: `LOCAL` (this process holds the whole batch and every latent) is a no-op, so a
single-process run runs exactly the code it always ran.
"""
from __future__ import annotations

import contextlib

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    launcher: str = "single"  # single | torchrun | slurm

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_world() -> World:
    """This process's place in the run, from the launcher's environment variables."""
    env = os.environ
    if int(env.get("WORLD_SIZE", 1)) > 1:
        return World(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)), "torchrun")
    if int(env.get("SLURM_NTASKS", 1)) > 1 and "SLURM_PROCID" in env and "SLURM_STEP_ID" in env:
        return World(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)), "slurm")
    return World()


class Collective:
    """Reductions over the processes that share one axis of the work (the batch rows, or the
    latents). This base class is one process: every call returns its input."""

    rank, size = 0, 1

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def max(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def min(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """[size, *tensor.shape]: every process's tensor, in rank order."""
        return tensor[None]

    def broadcast_object(self, obj):
        """Rank 0's `obj` on every process."""
        return obj

    def barrier(self) -> None:
        pass

    def guarded(self, what: str) -> contextlib.AbstractContextManager:
        """Around work that runs collectives of its own (DDP's gradient all-reduce in backward): a
        failed one raises as a lost rank, as these methods' own do. Nothing to guard here."""
        return contextlib.nullcontext()


LOCAL = Collective()
