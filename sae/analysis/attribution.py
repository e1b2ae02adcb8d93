"""Which input token drives a latent: resample ablation over the inputs [a, op, b, =].

For a pair and an input position j, the attribution of latent i is
    f_i(x) - mean over replacement tokens t of f_i(x with position j set to t),
where t runs over every number 0..p-1 for a and b, and over the task's operator tokens for op.
A latent that reads only b has attribution ~0 at a and op. Exact means, no sampling.
"""
from __future__ import annotations

import torch

from sae.tasks.modular import op_token
from sae.activations.modular import extract

POSITIONS = ("a", "op", "b")


@torch.no_grad()
def latent_codes(sae, data, tokens: torch.Tensor) -> torch.Tensor:
    """[n, d_sae] codes of the SAE/crosscoder for arbitrary inputs, through every source as in training."""
    x = extract(data.sources, tokens, data.positions) * data.scale[:, None]
    return torch.cat([sae.encode(chunk) for chunk in x.split(8192)])


@torch.no_grad()
def ablation_attribution(sae, data, tokens: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """tokens: [n, 4] inputs; latents: [m] -> [n, 3, m] attribution to a, op, b (module doc)."""
    p = data.dataset.p
    base = latent_codes(sae, data, tokens)[:, latents]
    replacements = {0: torch.arange(p), 2: torch.arange(p),
                    1: torch.tensor([op_token(p, op) for op in data.dataset.operations])}
    out = torch.zeros(len(tokens), 3, len(latents))
    for position, candidates in replacements.items():
        variants = tokens.repeat_interleave(len(candidates), dim=0)
        variants[:, position] = candidates.repeat(len(tokens)).to(variants.device)
        codes = latent_codes(sae, data, variants)[:, latents].view(len(tokens), len(candidates), -1)
        out[:, position] = (base - codes.mean(dim=1)).cpu()
    return out
