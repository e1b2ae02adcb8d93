"""Fourier view of modular arithmetic (Nanda et al. 2023): a latent's activation over the p x p
grid of (a, b) in frequency space, its dominant frequencies, and the host's key frequencies."""
from __future__ import annotations

import torch


def grid_power(grid: torch.Tensor) -> torch.Tensor:
    """grid: [p, p] (a, b) -> [p, p] power |DFT2|^2 with the constant (0, 0) term removed,
    normalised to sum to 1 (a constant grid gives all zeros)."""
    power = torch.fft.fft2(grid.double()).abs().pow(2)
    constant = power[0, 0].item()
    power[0, 0] = 0.0
    total = power.sum().item()
    if total <= 1e-12 * max(constant, 1e-300):  # a (numerically) constant grid has no frequencies
        return torch.zeros_like(power, dtype=torch.float32)
    return (power / total).float()


def dominant_frequencies(power: torch.Tensor, n: int = 3) -> list[tuple[int, int, float]]:
    """The n strongest (k_a, k_b) with their share of the power; k and p - k are folded into
    min(k, p - k), since a real grid's spectrum is symmetric."""
    p = power.shape[0]
    fold = torch.minimum(torch.arange(p), p - torch.arange(p))
    folded: dict[tuple[int, int], float] = {}
    for ka in range(p):
        for kb in range(p):
            key = (int(fold[ka]), int(fold[kb]))
            folded[key] = folded.get(key, 0.0) + float(power[ka, kb])
    ranked = sorted(folded.items(), key=lambda item: item[1], reverse=True)[:n]
    return [(ka, kb, share) for (ka, kb), share in ranked]


def embedding_frequency_norms(W_E: torch.Tensor) -> torch.Tensor:
    """W_E: [p, d] number-token embeddings -> [p // 2 + 1] norm of each frequency k (cos and sin
    together) of the embedding along the token axis, normalised to sum to 1."""
    spectrum = torch.fft.rfft(W_E.double(), dim=0).abs().pow(2).sum(dim=1)
    spectrum[0] = 0.0
    return (spectrum / spectrum.sum()).float()


def key_frequencies(W_E: torch.Tensor, min_share: float = 0.05) -> list[int]:
    """Frequencies holding at least min_share of the embedding's (non-constant) power, strongest
    first: the handful a grokked host uses (Nanda et al. find 3-7)."""
    norms = embedding_frequency_norms(W_E)
    order = norms.argsort(descending=True, stable=True)
    return [int(k) for k in order if norms[k] >= min_share]


def latent_frequencies(values: torch.Tensor, latents: torch.Tensor) -> list[dict]:
    """values: [p, p, d_sae] one operation's latent grid -> per latent its strongest folded
    frequency pair (k_a, k_b) and that pair's share of the latent's non-constant power."""
    rows = []
    for latent in latents.tolist():
        (ka, kb, share), = dominant_frequencies(grid_power(values[..., latent]), n=1)
        rows.append({"latent": latent, "k_a": ka, "k_b": kb, "share": share})
    return rows
