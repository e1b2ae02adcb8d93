"""What a latent writes: its decoder direction pushed through the rest of a modular host to the answer.

For a direction d at hookpoint h (raw units) and a scale m, the logit effect is

    effect(d) = mean over pairs x of [ logits(x with m d added to h at the answer position) - logits(x) ]

over the p number tokens, centred (minus its mean over the p answers: a shift shared by every answer
changes no probability). With the final residual stream as h and no final norm this is exactly
m d @ W_U restricted to the numbers (centred); elsewhere the rest of the host is non-linear and
the mean is over a fixed sample of pairs.
"""
from __future__ import annotations

import torch

ROWS_PER_PASS = 16384


def adding_hook(delta: torch.Tensor):
    """A hook that adds delta [batch, width] at the last (answer) position."""

    def hook(activation: torch.Tensor) -> torch.Tensor:
        patched = activation.clone()
        patched[:, -1] += delta.to(activation.dtype)
        return patched

    hook.answer_position_only = True  # the final block may then compute the answer position alone
    return hook


@torch.no_grad()
def decoder_logit_effects(model, hook: str, tokens: torch.Tensor, directions: torch.Tensor, p: int) -> torch.Tensor:
    """tokens: [n, seq] the pairs to average over; directions: [m, width] already multiplied by their
    scale -> [m, p] the centred mean change of the answer logits over the numbers (module docstring)."""
    clean = model(tokens)[:, :p].double()
    per_pass = max(1, ROWS_PER_PASS // len(tokens))
    effects = []
    for start in range(0, len(directions), per_pass):
        chunk = directions[start:start + per_pass]
        delta = chunk.repeat_interleave(len(tokens), dim=0)
        logits = model(tokens.repeat(len(chunk), 1), {hook: adding_hook(delta)})[:, :p].double()
        change = (logits.view(len(chunk), len(tokens), p) - clean).mean(dim=1)
        effects.append(change - change.mean(dim=1, keepdim=True))
    return torch.cat(effects).float() if effects else torch.zeros(0, p)


def sample_pairs(n_pairs: int, n: int, seed: int = 0) -> torch.Tensor:
    """Indices of a fixed sample of n of n_pairs pairs (all of them when n >= n_pairs), sorted."""
    if n >= n_pairs:
        return torch.arange(n_pairs)
    return torch.randperm(n_pairs, generator=torch.Generator().manual_seed(seed))[:n].sort().values
