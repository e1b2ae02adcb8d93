"""How a dictionary's latents line up with a grokked host's key frequencies: the first look at
transcoders (issue 26). A latent's activation over the p x p pairs has a 2-D Fourier spectrum; a
grokked host's MLP multiplies the key frequencies w of a and b (Nanda et al. 2023), so its latents
should put their power on pairs (k_a, k_b) made of key frequencies and 0: (w, w) for a product
term cos(w (a + b)), (w, 0) / (0, w) for a term of one input.

`key_frequency_alignment(run)`: per alive latent, the share of its (folded, non-constant) power on
those key pairs and its strongest pair; summarised over the dictionary, next to the share a latent
with a flat spectrum would have there (`chance`).
"""
from __future__ import annotations

import torch

from sae.analysis.fourier import (PHASE_SIGN, folded_power, grid_power, key_frequencies, operation_grid,
                                  operation_key_frequencies, strongest_folded)
from sae.analysis.latents import latent_grid


def key_pairs_mask(size: int, keys: list[int]) -> torch.Tensor:
    """[size, size] bool over folded (k_a, k_b): both in K ∪ {0}, not both 0."""
    allowed = torch.zeros(size, dtype=torch.bool)
    allowed[[0, *keys]] = True
    mask = allowed[:, None] & allowed[None, :]
    mask[0, 0] = False
    return mask


def host_key_frequencies(run, operation: str) -> list[int]:
    """The host's key frequencies for the operation (embedding Fourier norms; on the multiplicative
    group for multiplication and division)."""
    p = run.data.dataset.p
    W_E = run.data.sources[0].model.embed.weight.detach()[:p].cpu()
    return operation_key_frequencies(W_E, operation) if operation in PHASE_SIGN else key_frequencies(W_E)


@torch.no_grad()
def key_frequency_alignment(run, operation_index: int = 0, keys: list[int] | None = None) -> dict:
    """run: sae.analysis.runs.SaeRun of a one-source SAE or transcoder on a modular task; keys: the
    key frequencies (default: the host's, `host_key_frequencies`). Returns
    {"keys": K, "alive": n, "key_share": mean over alive latents of their power share on key pairs,
    "top_on_key": fraction whose strongest pair is a key pair, "top_product": fraction whose strongest
    pair is (w, w) with w in K, "chance": a flat spectrum's share on key pairs, "latents": per latent
    {latent, key_share, product_share (on (w, w), w in K), single_share (on (w, 0) and (0, w)), k_a, k_b}}."""
    grid = latent_grid(run.sae, run.data)
    operation = grid.operations[operation_index].value
    keys = host_key_frequencies(run, operation) if keys is None else keys
    values = operation_grid(grid.values[operation_index].permute(2, 0, 1), operation)  # [d_sae, n, n]
    alive = torch.where(values.flatten(1).abs().amax(dim=1) > 0)[0]
    folded = folded_power(grid_power(values[alive]))  # [alive, size, size], each sums to 1 (or 0: constant)
    mask = key_pairs_mask(folded.shape[-1], keys)
    shares = (folded * mask).sum(dim=(1, 2))
    in_range = [k for k in keys if 0 < k < folded.shape[-1]]
    products = folded[:, in_range, in_range].sum(dim=1)  # (w, w): cos(w a) cos(w b) terms, cos(w (a ± b))
    singles = (folded[:, in_range, 0] + folded[:, 0, in_range]).sum(dim=1)  # (w, 0), (0, w): one input alone
    rows = []
    for latent, share, product, single, spectrum in zip(alive.tolist(), shares.tolist(), products.tolist(),
                                                        singles.tolist(), folded):
        (k_a, k_b, _), = strongest_folded(spectrum, 1)
        rows.append({"latent": latent, "key_share": share, "product_share": product, "single_share": single,
                     "k_a": k_a, "k_b": k_b})
    flat = torch.ones(values.shape[-1], values.shape[-1])
    flat[0, 0] = 0
    chance = (folded_power(flat / flat.sum()) * mask).sum().item()
    n = max(1, len(rows))
    return {"operation": operation, "keys": keys, "alive": len(rows), "d_sae": run.sae.d_sae,
            "key_share": sum(r["key_share"] for r in rows) / n,
            "top_on_key": sum(bool(mask[r["k_a"], r["k_b"]]) for r in rows) / n,
            "top_product": sum(r["k_a"] == r["k_b"] and r["k_a"] in keys for r in rows) / n,
            "chance": chance, "latents": rows}
