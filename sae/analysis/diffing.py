"""Model diffing with a crosscoder across checkpoints (Anthropic 2024; Lindsey et al.): which
latents belong to one checkpoint, which are shared.

    r_i = ||d_post,i|| / (||d_pre,i|| + ||d_post,i||)     relative decoder norm of latent i
    r ~ 0: only the pre checkpoint uses it; r ~ 1: only post; 0.3 < r < 0.7: shared.

Known artefacts (Minder et al. 2025): with an L1 penalty on sum_s ||d_s||, a latent used by both
checkpoints can shrink one decoder to save penalty and look exclusive (Complete Shrinkage), or a
shared concept can split into latents that each look exclusive (Latent Decoupling).
`latent_scaling` measures both per latent; `exclusivity_check` compares an L1 (vanilla) and a
TopK/BatchTopK crosscoder (no penalty on decoder norms) trained on the same data.

Units: a saved crosscoder takes raw activations (its training-time input scale c_s folded into
W_dec[:, s] / c_s), so decoder norms of sources with different scales are not comparable.
Pass the checkpoint's `input_scale` (sae.json) to compare them in the units training used.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

SHARED_RANGE = (0.3, 0.7)


def training_unit_decoders(sae, input_scale: Sequence[float] | torch.Tensor | None = None) -> torch.Tensor:
    """[d_sae, n_sources, d_in] W_dec in the units training saw (x the checkpoint's input_scale)."""
    W = sae.W_dec.detach()
    if input_scale is None:
        return W
    scale = torch.as_tensor(input_scale, dtype=W.dtype, device=W.device)
    return W * sae.targets_of(scale[None, :, None])[0][None]  # (a transcoder's decoder writes its targets)


def relative_decoder_norms(sae, pre_source: int = 0, post_source: int = 1,
                           input_scale: Sequence[float] | torch.Tensor | None = None) -> torch.Tensor:
    """[d_sae] r_i for two sources of a crosscoder (W_dec: [d_sae, n_sources, d_in]); with the
    checkpoint's input_scale, in training units (see the module docstring)."""
    if sae.n_sources < 2:
        raise ValueError(f"model diffing needs a crosscoder over >= 2 sources; this SAE has {sae.n_sources}")
    norms = training_unit_decoders(sae, input_scale).norm(dim=-1)
    pre, post = norms[:, pre_source], norms[:, post_source]
    return post / (pre + post).clamp_min(1e-12)


@torch.no_grad()
def latent_scaling(sae, x: torch.Tensor, latents: torch.Tensor, pre_source: int = 0, post_source: int = 1,
                   chunk: int = 4096) -> dict[str, torch.Tensor]:
    """Latent scaling after Minder et al. 2025, for each latent j in `latents` ([J] indices).

    With j's post decoder direction d_j = W_dec[j, post] and activation f_j(x), a least-squares
    scalar per source m and target y_m (closed form of argmin_b sum_x ||b f_j(x) d_j - y_m(x)||^2):

        b_m = sum_x f_j(x) <d_j, y_m(x)> / (||d_j||^2 sum_x f_j(x)^2)

    error target          y_m = x_m - x̂_m + f_j W_dec[j, m]      what the crosscoder leaves unexplained
                                                                  in m, with j's own share added back
    reconstruction target y_m = x̂_m - b_dec_m - f_j W_dec[j, m]  what the *other* latents rebuild in m

    Returns beta_{error,reconstruction}_{pre,post} and the ratios nu_error = b_pre / b_post (error)
    and nu_reconstruction (the same for reconstruction), each [J]. A truly post-only latent has
    both ratios near 0; nu_error near 1 means the pre checkpoint holds j's direction that the
    crosscoder's pre decoder shrank away (Complete Shrinkage); a large nu_reconstruction means other
    latents carry it in pre (Latent Decoupling). x: [N, n_sources, d_in] in the SAE's input units.
    """
    W = sae.W_dec.detach()
    d = W[latents, post_source]  # [J, d_in]
    own = {m: (W[latents, m] * d).sum(dim=1) for m in (pre_source, post_source)}  # <W_dec[j, m], d_j>
    numerator = {(t, m): torch.zeros(len(latents), dtype=torch.float64, device=x.device)
                 for t in ("error", "reconstruction") for m in (pre_source, post_source)}
    f_squared = torch.zeros(len(latents), dtype=torch.float64, device=x.device)
    for rows in x.split(chunk):
        f_all = sae.encode(rows)
        x_hat = sae.decode(f_all, rows)
        rows = sae.targets_of(rows)  # what the decoder writes (a transcoder's targets)
        f = f_all[:, latents]  # [n, J]
        f_squared += f.double().pow(2).sum(dim=0)
        for m in (pre_source, post_source):
            error = (rows[:, m] - x_hat[:, m]) @ d.t() + f * own[m]  # [n, J]: <d_j, y_m(x)>
            rebuilt = (x_hat[:, m] - sae.b_dec[m]) @ d.t() - f * own[m]
            numerator["error", m] += (f * error).double().sum(dim=0)
            numerator["reconstruction", m] += (f * rebuilt).double().sum(dim=0)
    denominator = (d.double().pow(2).sum(dim=1) * f_squared).clamp_min(1e-30)
    out = {}
    for target in ("error", "reconstruction"):
        pre = numerator[target, pre_source] / denominator
        post = numerator[target, post_source] / denominator
        out[f"beta_{target}_pre"], out[f"beta_{target}_post"] = pre.float(), post.float()
        out[f"nu_{target}"] = (pre / torch.where(post.abs() > 1e-12, post, torch.full_like(post, 1e-12))).float()
    return out


def split_latents(r: torch.Tensor, shared: tuple[float, float] = SHARED_RANGE) -> dict[str, torch.Tensor]:
    """Latent indices: pre_only (r < low), shared (low < r < high), post_only (r > high)."""
    low, high = shared
    return {"pre_only": torch.where(r < low)[0], "shared": torch.where((r > low) & (r < high))[0],
            "post_only": torch.where(r > high)[0]}


def decoder_cosines(sae, latents: torch.Tensor, pre_source: int = 0, post_source: int = 1) -> torch.Tensor:
    """Cosine between a latent's pre and post decoder directions (near 1: same direction in both;
    report it for shared latents: a shared latent whose directions differ changed its meaning).
    Cosines do not depend on the per-source input scale."""
    W = sae.W_dec.detach()[latents]
    return torch.nn.functional.cosine_similarity(W[:, pre_source], W[:, post_source], dim=-1)


def exclusivity_check(l1_sae, topk_sae, pre_source: int = 0, post_source: int = 1,
                      l1_latents: torch.Tensor | None = None, topk_latents: torch.Tensor | None = None,
                      l1_scale: Sequence[float] | None = None, topk_scale: Sequence[float] | None = None
                      ) -> dict[str, float]:
    """Fractions of pre-only / shared / post-only latents in both crosscoders, side by side, among
    the given latents of each (e.g. those that fire: a dead latent's r means nothing); all by default.
    *_scale: each checkpoint's input_scale, for r in training units."""
    report = {}
    for name, sae, latents, scale in (("l1", l1_sae, l1_latents, l1_scale),
                                      ("topk", topk_sae, topk_latents, topk_scale)):
        r = relative_decoder_norms(sae, pre_source, post_source, scale)
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
