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
    """data: sae.activations.modular.ActivationData of a modular task at the answer position."""
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


@torch.no_grad()
def neuron_grid(model, dataset, hook: str) -> torch.Tensor:
    """[n_ops, p, p, width]: the host's own activation at `hook` (e.g. blocks.0.mlp_hidden) at the
    answer position for every (op, a, b); 0 where the pair does not exist. Compare with latent_grid."""
    p, n_ops = dataset.p, len(dataset.operations)
    acts = torch.cat([model.capture(chunk, [hook])[hook][:, -1].cpu() for chunk in dataset.tokens.split(8192)])
    grid = torch.zeros(n_ops, p, p, acts.shape[-1])
    tokens, op_ids = dataset.tokens.cpu(), dataset.op_ids.cpu()
    grid[op_ids, tokens[:, 0], tokens[:, 2]] = acts
    return grid


def operation_selectivity(grid: LatentGrid, split: str = "all") -> torch.Tensor:
    """[n_ops, d_sae]: each latent's share of its firing frequency that falls on each operation
    (rows sum to 1 over operations for a latent that fires; 0 for one that never does)."""
    freq = firing_frequency(grid, split)
    return freq / freq.sum(dim=0, keepdim=True).clamp_min(1e-12)


def operation_latents(grid: LatentGrid, op: int, n: int) -> torch.Tensor:
    """The n latents that fire most on operation `op`'s pairs beyond their firing on any other
    operation (frequency on op minus the largest frequency on another), strongest first. Ranking by
    selectivity alone would pick rare latents that are selective but barely used."""
    freq = firing_frequency(grid)
    others = torch.cat([freq[:op], freq[op + 1:]]).max(dim=0).values if len(freq) > 1 else torch.zeros_like(freq[op])
    return (freq[op] - others).argsort(descending=True, stable=True)[:n]


def plot_grids(grids: torch.Tensor, titles: list[str], path, suptitle: str = "", columns: int = 4):
    """Heatmaps of [n, p, p] grids over (a, b), one panel each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = (len(grids) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(2.6 * columns, 2.5 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, grid, title in zip(axes.flat, grids, titles):
        ax.imshow(grid.numpy(), cmap="viridis", origin="lower")
        ax.set_title(title, fontsize=8)
        ax.set_xlabel("b", fontsize=7)
        ax.set_ylabel("a", fontsize=7)
    fig.suptitle(suptitle)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
