"""Latent tables for modular-arithmetic hosts: every latent's activation over every (a, b) pair of
every operation, with the train/test split, firing frequencies and top-activating inputs."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sae.errors import UserInputError
from sae.host_models.config import TokenPositions
from sae.tasks.modular import Operation


@dataclass
class LatentGrid:
    """values: [n_ops, p, p, d_sae] activation at (op, a, b), 0 where the pair does not exist
    (b = 0 for division); exists / is_train: [n_ops, p, p] bool."""

    values: torch.Tensor
    exists: torch.Tensor
    is_train: torch.Tensor
    operations: list[Operation]

    def split_mask(self, split: str) -> torch.Tensor:
        """[n_ops, p, p]: the pairs of `split` (train | test | all)."""
        if split == "all":
            return self.exists
        if split not in ("train", "test"):
            raise ValueError(f"split must be train, test or all, got '{split}'")
        return self.exists & (self.is_train if split == "train" else ~self.is_train)


@torch.no_grad()
def latent_grid(sae, data) -> LatentGrid:
    """data: sae.training.activations.ActivationData of a modular task at the answer position."""
    if getattr(data, "positions", None) is not TokenPositions.answer:
        raise UserInputError("latent tables need one activation per pair: train the SAE with "
                             "host_model.token_positions=answer on a modular task")
    dataset = data.dataset
    p, n_ops = dataset.p, len(dataset.operations)
    values = torch.zeros(n_ops, p, p, sae.d_sae)
    exists = torch.zeros(n_ops, p, p, dtype=torch.bool)
    is_train = torch.zeros(n_ops, p, p, dtype=torch.bool)
    for split, x in (("train", data.train), ("test", data.test)):
        in_split = dataset.is_train if split == "train" else ~dataset.is_train
        tokens, op_ids = dataset.tokens[in_split].cpu(), dataset.op_ids[in_split].cpu()
        latents = torch.cat([sae.encode(chunk).cpu() for chunk in x.split(8192)])
        a, b = tokens[:, 0], tokens[:, 2]
        values[op_ids, a, b] = latents
        exists[op_ids, a, b] = True
        is_train[op_ids, a, b] = split == "train"
    return LatentGrid(values, exists, is_train, list(dataset.operations))


def firing_frequency(grid: LatentGrid, split: str = "all") -> torch.Tensor:
    """[n_ops, d_sae]: fraction of the split's pairs of each operation on which each latent fires."""
    mask = grid.split_mask(split)
    fires = (grid.values > 0) & mask[..., None]
    return fires.sum(dim=(1, 2)).float() / mask.sum(dim=(1, 2)).clamp_min(1)[:, None]


def top_activating(grid: LatentGrid, latent: int, n: int = 10, split: str = "all") -> list[dict]:
    """The n pairs where `latent` is largest: [{"op", "a", "b", "value", "train"}]."""
    scores = grid.values[..., latent].masked_fill(~grid.split_mask(split), float("-inf"))
    values, flat = scores.flatten().topk(min(n, int(grid.split_mask(split).sum())))
    p = grid.values.shape[1]
    rows = []
    for value, index in zip(values.tolist(), flat.tolist()):
        op, a, b = index // (p * p), (index // p) % p, index % p
        rows.append({"op": grid.operations[op].value, "a": a, "b": b, "value": value,
                     "train": bool(grid.is_train[op, a, b])})
    return rows
