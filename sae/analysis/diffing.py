"""Model diffing with a crosscoder across checkpoints (Anthropic 2024; Lindsey et al.): which
latents belong to one checkpoint, which are shared.

    r_i = ||d_post,i|| / (||d_pre,i|| + ||d_post,i||)     relative decoder norm of latent i
    r ~ 0: only the pre checkpoint uses it; r ~ 1: only post; 0.3 < r < 0.7: shared.

Known artefact (Minder et al. 2025): with an L1 penalty on sum_s ||d_s||, a latent used by both
checkpoints can shrink one decoder to save penalty and look exclusive. `exclusivity_check`
compares two crosscoders trained on the same data: the fraction of exclusive latents should
agree between an L1 (vanilla) and a TopK crosscoder (no penalty on decoder norms) if it is real.
"""
from __future__ import annotations

from pathlib import Path

import torch

SHARED_RANGE = (0.3, 0.7)


def relative_decoder_norms(sae, pre_source: int = 0, post_source: int = 1) -> torch.Tensor:
    """[d_sae] r_i for two sources of a crosscoder (W_dec: [d_sae, n_sources, d_in])."""
    if sae.n_sources < 2:
        raise ValueError(f"model diffing needs a crosscoder over >= 2 sources; this SAE has {sae.n_sources}")
    norms = sae.W_dec.detach().norm(dim=-1)
    pre, post = norms[:, pre_source], norms[:, post_source]
    return post / (pre + post).clamp_min(1e-12)


def split_latents(r: torch.Tensor, shared: tuple[float, float] = SHARED_RANGE) -> dict[str, torch.Tensor]:
    """Latent indices: pre_only (r < low), shared (low < r < high), post_only (r > high)."""
    low, high = shared
    return {"pre_only": torch.where(r < low)[0], "shared": torch.where((r > low) & (r < high))[0],
            "post_only": torch.where(r > high)[0]}


def decoder_cosines(sae, latents: torch.Tensor, pre_source: int = 0, post_source: int = 1) -> torch.Tensor:
    """Cosine between a latent's pre and post decoder directions (near 1: same direction in both)."""
    W = sae.W_dec.detach()[latents]
    return torch.nn.functional.cosine_similarity(W[:, pre_source], W[:, post_source], dim=-1)


def exclusivity_check(l1_sae, topk_sae, pre_source: int = 0, post_source: int = 1,
                      l1_latents: torch.Tensor | None = None, topk_latents: torch.Tensor | None = None
                      ) -> dict[str, float]:
    """Fractions of pre-only / shared / post-only latents in both crosscoders, side by side, among
    the given latents of each (e.g. those that fire: a dead latent's r means nothing); all by default."""
    report = {}
    for name, sae, latents in (("l1", l1_sae, l1_latents), ("topk", topk_sae, topk_latents)):
        r = relative_decoder_norms(sae, pre_source, post_source)
        r = r if latents is None else r[latents]
        for group, indices in split_latents(r).items():
            report[f"{name}/{group}"] = len(indices) / max(len(r), 1)
    return report


def plot_relative_norms(r: torch.Tensor, path: str | Path, title: str = "relative decoder norm") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    ax.hist(r.numpy(), bins=50, range=(0, 1))
    for edge in SHARED_RANGE:
        ax.axvline(edge, color="grey", linestyle="--")
    ax.set_xlabel("r = |d_post| / (|d_pre| + |d_post|)")
    ax.set_ylabel("latents")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
