"""Steering a host by clamping SAE/crosscoder latents at evaluation time.

The activation at the hookpoint is replaced by x + decode(f_clamped) - decode(f): the clamp moves
x along the clamped latents' decoder directions and keeps the SAE's reconstruction error, so an
empty clamp leaves the host exactly as it was. Compare every clamp with `random_control`: the
same number of latents drawn at random.
"""
from __future__ import annotations

import torch

from sae.metrics.downstream import answer_losses


@torch.no_grad()
def clamp_replacement(sae, x: torch.Tensor, latents: torch.Tensor, value: float) -> torch.Tensor:
    """x: [batch, n_sources, d_in] raw activations -> the same with `latents` clamped to `value`."""
    f = sae.encode(x)
    delta = torch.zeros_like(f)
    delta[:, latents] = value - f[:, latents]
    # decode(f + delta) - decode(f) = delta @ W_dec: b_dec cancels, and an empty clamp adds exactly 0
    return x + (delta @ sae.W_dec.flatten(1)).view_as(x)


def random_control(d_sae: int, chosen: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """As many latents as `chosen`, drawn uniformly from the others."""
    others = torch.ones(d_sae, dtype=torch.bool)
    others[chosen] = False
    pool = torch.where(others)[0]
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))
    return pool[order[:len(chosen)]]


@torch.no_grad()
def steered_metrics(sae, data, latents: torch.Tensor, value: float, source: int = 0) -> dict[str, float]:
    """Answer accuracy and CE of source `source`'s host with the clamp spliced in, per split and
    per operation: {"<split>/acc", "<split>/ce", "<split>/acc_<op>"}. data: a modular ActivationData."""
    metrics = {}
    for split, x in (("train", data.train), ("test", data.test)):
        tokens, labels = data.dataset.train if split == "train" else data.dataset.test
        in_split = data.dataset.is_train if split == "train" else ~data.dataset.is_train
        raw = x / data.scale[:, None]
        steered = clamp_replacement(sae, x, latents, value) / data.scale[:, None]
        replacement = steered[:, source] if len(latents) else raw[:, source]
        model, hook = data.sources[source].model, data.sources[source].hook
        losses, correct = answer_losses(model, tokens, labels, hook, replacement, data.positions)
        metrics[f"{split}/acc"], metrics[f"{split}/ce"] = correct.mean().item(), losses.mean().item()
        op_ids = data.dataset.op_ids[in_split]
        for index, op in enumerate(data.dataset.operations):
            metrics[f"{split}/acc_{op.value}"] = correct[op_ids == index].mean().item()
    return metrics
