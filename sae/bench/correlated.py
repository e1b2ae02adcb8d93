"""A second synthetic generator, unlike the flat one (`synthetic_activations`: every feature equally
likely, independent): features fire with probabilities spread `spread`-fold (geometric in the
feature's rank) and **together**, through a low-rank Gaussian copula, the data issue 29 measured on.

    z_i   = <L_i, g> + sqrt(1 - rho) e_i,   g ~ N(0, I_rank), e_i ~ N(0, 1), ||L_i||^2 = rho
    fires = z_i > Phi^-1(1 - p_i)          (so P(fire_i) = p_i exactly, whatever rho)
    x     = sum_i fires_i m_i f_i + noise,  m_i ~ U(0, 1], f_i random unit vectors

p_i = c r^i with r = spread^(-1 / (n_true - 1)) and c chosen so that sum_i p_i = per_token (the mean
number of active features per token). Features whose loadings L_i point the same way co-fire; rho = 0
gives independent features with the same marginals. Tokens are scaled so that E||x||^2 = d_in, as the
flat generator's are.
"""
from __future__ import annotations

import math

import torch

CHUNK = 16384  # rows drawn at once; fewer when there are many features (a [rows, n_true] float64 z each)
MAX_CHUNK_ELEMENTS = 1 << 24


def correlated_chunk_rows(n_true: int) -> int:
    """Rows per chunk: CHUNK up to 1024 features (the data every result so far was measured on), then
    fewer so that a chunk's temporaries stay near 3 x 128 MiB."""
    return max(1, min(CHUNK, MAX_CHUNK_ELEMENTS // n_true))


def scale_to_mean_square(x: torch.Tensor, d_in: int) -> torch.Tensor:
    """x scaled in place so that E||x||^2 = d_in; no full-size temporary (row norms a chunk at a time)."""
    mean_square = torch.cat([part.pow(2).sum(dim=1) for part in x.split(CHUNK)]).mean()
    return x.mul_((d_in / mean_square).sqrt())


def firing_probabilities(n_true: int, per_token: float, spread: float) -> torch.Tensor:
    """[n_true] p_i, geometric from the most to the least frequent (ratio `spread`), summing to per_token."""
    if spread < 1:
        raise ValueError(f"spread must be >= 1, got {spread}")
    ratio = spread ** (-1 / max(n_true - 1, 1))
    shape = ratio ** torch.arange(n_true, dtype=torch.float64)
    p = per_token * shape / shape.sum()
    if p.max() >= 1:
        raise ValueError(f"{per_token} features per token with spread {spread} over {n_true} features needs a "
                         f"firing probability of {p.max().item():.2f} >= 1: use more features or fewer per token")
    return p


class CopulaFeatures:
    """The generator's ground truth: unit feature directions, firing probabilities, copula loadings."""

    def __init__(self, d_in: int, n_true: int, per_token: float, spread: float, rank: int, rho: float,
                 generator: torch.Generator):
        if not 0 <= rho < 1:
            raise ValueError(f"rho must be in [0, 1), got {rho}")
        self.features = torch.randn(n_true, d_in, generator=generator)
        self.features /= self.features.norm(dim=1, keepdim=True)
        self.p = firing_probabilities(n_true, per_token, spread)
        self.loadings = torch.randn(n_true, rank, generator=generator, dtype=torch.float64)
        self.loadings *= math.sqrt(rho) / self.loadings.norm(dim=1, keepdim=True)
        self.rho = rho
        self.cut = torch.special.ndtri(1 - self.p)  # z_i > cut_i with probability p_i for a standard normal z_i

    def fires(self, m: int, generator: torch.Generator) -> torch.Tensor:
        """[m, n_true] bool: which features each of m tokens has."""
        shared = torch.randn(m, self.loadings.shape[1], generator=generator, dtype=torch.float64) @ self.loadings.t()
        z = shared + math.sqrt(1 - self.rho) * torch.randn(m, len(self.p), generator=generator, dtype=torch.float64)
        return z > self.cut


def correlated_activations(d_in: int, n_true: int, per_token: float, n: int, seed: int, spread: float = 50.0,
                           rank: int = 8, rho: float = 0.5, noise: float = 0.01
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tokens [n, d_in], true features [n_true, d_in], their firing probabilities [n_true]) from one seed."""
    generator = torch.Generator().manual_seed(seed)
    truth = CopulaFeatures(d_in, n_true, per_token, spread, rank, rho, generator)
    chunks = []
    rows = correlated_chunk_rows(n_true)
    for start in range(0, n, rows):
        m = min(rows, n - start)
        codes = truth.fires(m, generator).float() * (1 - torch.rand(m, n_true, generator=generator))  # U(0, 1]
        chunks.append(codes @ truth.features + noise * torch.randn(m, d_in, generator=generator))
    x = torch.cat(chunks)
    del chunks
    return scale_to_mean_square(x, d_in), truth.features, truth.p.float()
