"""Latent sharding: each process holds an equal slice of the dictionary's latents (rows of W_enc,
W_dec, b_enc and their optimiser state); b_dec is replicated. The SAE code does the rest through
`SparseCoder.latent_shards` (global TopK from per-shard candidates, partial decodes summed).

Checkpoints hold the whole dictionary in the single-process layout (gathered on save, sliced on
load), so a run resumes at any world size and any checkpoint loads with `sae.saes.load`.
"""
from __future__ import annotations

import torch
from torch import nn

from sae.saes.base import SparseCoder
from sae.world import Collective


def latent_range(d_sae: int, group: Collective) -> slice:
    size = d_sae // group.size
    return slice(group.rank * size, (group.rank + 1) * size)


def shard_latents(sae: SparseCoder, group: Collective) -> None:
    """Keep only this process's latents of a whole dictionary (in place)."""
    rows = latent_range(sae.d_sae, group)
    for name in sorted(sae.sharded_parameters()):
        setattr(sae, name, nn.Parameter(getattr(sae, name).detach()[rows].clone()))
    sae.d_sae = rows.stop - rows.start
    sae.latent_shards = group


def is_sharded(sae: SparseCoder) -> bool:
    return sae.latent_shards.size > 1


def gather_rows(tensor: torch.Tensor, group: Collective) -> torch.Tensor:
    """Every process's rows of a latent-major tensor, in latent order."""
    return group.gather(tensor).flatten(0, 1)


def full_sae_state(sae: SparseCoder) -> dict:
    """The whole dictionary's state_dict (a collective: every process calls it)."""
    sharded = sae.sharded_parameters() if is_sharded(sae) else set()
    return {name: gather_rows(value.detach(), sae.latent_shards) if name in sharded else value
            for name, value in sae.state_dict().items()}


def local_sae_state(sae: SparseCoder, full: dict) -> dict:
    """This process's slice of a whole dictionary's state_dict."""
    if not is_sharded(sae):
        return full
    rows = latent_range(full["b_enc"].shape[0], sae.latent_shards)
    return {name: value[rows] if name in sae.sharded_parameters() else value for name, value in full.items()}


def _sharded_indices(sae: SparseCoder) -> set[int]:
    """Optimiser parameter indices (sae.parameters() order) of the sharded parameters."""
    return {i for i, (name, _) in enumerate(sae.named_parameters()) if name in sae.sharded_parameters()}


def full_optimizer_state(optimizer: torch.optim.Optimizer, sae: SparseCoder) -> dict:
    state = optimizer.state_dict()
    if not is_sharded(sae):
        return state
    sharded = _sharded_indices(sae)
    gathered = {index: {key: gather_rows(value, sae.latent_shards) if index in sharded and value.dim() else value
                        for key, value in per_param.items()}
                for index, per_param in state["state"].items()}
    return {**state, "state": gathered}


def local_optimizer_state(state: dict, sae: SparseCoder) -> dict:
    if not is_sharded(sae):
        return state
    sharded, d_sae = _sharded_indices(sae), sae.d_sae * sae.latent_shards.size
    rows = latent_range(d_sae, sae.latent_shards)
    sliced = {index: {key: value[rows] if index in sharded and value.dim() else value
                      for key, value in per_param.items()}
              for index, per_param in state["state"].items()}
    return {**state, "state": sliced}
