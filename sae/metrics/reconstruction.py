"""Reconstruction and sparsity metrics. x, x_hat: [rows, n_sources, d_in]; latents: [rows, d_sae]."""
from __future__ import annotations

import torch


def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Fraction of variance unexplained per source: sum ||x - x̂||^2 / sum ||x - mean(x)||^2 -> [n_sources].

    0 for a perfect reconstruction, 1 for predicting the mean.
    """
    residual = (x - x_hat).pow(2).sum(dim=(0, 2))
    total = (x - x.mean(dim=0)).pow(2).sum(dim=(0, 2))
    return residual / total.clamp_min(1e-12)


def fvu_all_sources(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """FVU over all sources together (their variances added)."""
    return (x - x_hat).pow(2).sum() / (x - x.mean(dim=0)).pow(2).sum().clamp_min(1e-12)


def mse(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Mean squared error per element, per source -> [n_sources]."""
    return (x - x_hat).pow(2).mean(dim=(0, 2))


def dead_fraction(fire_counts: torch.Tensor) -> torch.Tensor:
    """Fraction of latents that never fired. fire_counts: [d_sae]."""
    return (fire_counts == 0).float().mean()
