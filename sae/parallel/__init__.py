"""One SAE/crosscoder trained by several processes (torchrun, or a SLURM job of several tasks).

hardware.parallel=data: every process holds the whole SAE and a slice of every global batch
(rows drawn from the same generator on every rank, then split); DDP averages the gradients;
AuxK's normalisation, BatchTopK's batch-wide selection and threshold, the dead-latent counters and
the logged metrics are computed over the global batch, so N processes at global batch B train
what one process at batch B trains (up to float rounding).

hardware.parallel=latents: every process sees the whole batch and holds a slice of the latents
(sae.parallel.latents); TopK, AuxK and BatchTopK select globally from per-shard candidates.

Both at once (a 2-D mesh) is not supported yet: a run takes one or the other.
Only rank 0 writes (checkpoints, metrics, W&B, records); every rank reads the checkpoint it
resumes from, whatever world size wrote it.
"""
from __future__ import annotations

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from sae.errors import UserInputError
from sae.hardware import HardwareConfig, Parallel, check_hardware
from sae.parallel.latents import shard_latents
from sae.saes.base import SparseCoder
from sae.world import LOCAL, Collective, World

SHARDABLE_TYPES = ("vanilla", "topk", "batchtopk", "jumprelu", "gated")


def check_parallel(hardware: HardwareConfig, world: World, batch_size: int, sparse_dim: int, sae_type: str) -> None:
    """Refuse, in one line and before any rank waits for another, a split this run cannot make."""
    check_hardware(hardware)
    if world.size == 1:
        return
    if hardware.parallel is Parallel.data and batch_size % world.size:
        raise UserInputError(f"batch_size={batch_size} is not divisible by the world size {world.size} "
                             f"(hardware.parallel=data gives every rank an equal slice of each batch); "
                             f"use a multiple of {world.size}")
    if hardware.parallel is Parallel.latents:
        if sparse_dim % world.size:
            raise UserInputError(f"sae.sparse_dim={sparse_dim} is not divisible by the world size {world.size} "
                                 f"(hardware.parallel=latents gives every rank an equal slice of the latents); "
                                 f"use a multiple of {world.size}")
        if sae_type not in SHARDABLE_TYPES:
            raise UserInputError(f"hardware.parallel=latents supports sae in {list(SHARDABLE_TYPES)}, got {sae_type}")


def split_axes(parallel: Parallel, group: Collective) -> tuple[Collective, Collective]:
    """(rows, latent shards): the axis the processes split; the other is LOCAL."""
    if group.size == 1:
        return LOCAL, LOCAL
    return (group, LOCAL) if parallel is Parallel.data else (LOCAL, group)


def batch_part(batch_size: int, rows: Collective) -> slice:
    """This process's rows of each global batch."""
    size = batch_size // rows.size
    return slice(rows.rank * size, (rows.rank + 1) * size)


def spread(sae: SparseCoder, rows: Collective, shards: Collective) -> nn.Module:
    """Place a whole, freshly initialised SAE on the run's processes (every rank built the same
    one from the same seed); returns the module a training step calls. Build the optimiser after:
    latent sharding replaces the parameters by this rank's slices."""
    if shards.size > 1:
        shard_latents(sae, shards)
    sae.rows = rows
    # the buffers (BatchTopK's threshold) are computed identically on every rank: no sync per forward
    return DistributedDataParallel(sae, forward_sync_buffers=False) if rows.size > 1 else sae
