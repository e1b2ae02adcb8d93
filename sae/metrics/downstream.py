"""Downstream metrics: splice the SAE's reconstruction into the host and read the answer.

For one source (checkpoint, layer) the activation at its hookpoint is replaced by the
reconstruction (answer position only, or every position, as the SAE was trained), and the
host's answer cross-entropy and accuracy are compared with the clean run and with zero-ablation:
    loss_recovered = (CE_zero - CE_spliced) / (CE_zero - CE_clean)
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from sae.host_models.config import TokenPositions
from sae.host_models.transformer import GrokTransformer

CHUNK = 8192


def replacing_hook(replacement: torch.Tensor, positions: TokenPositions) -> Callable[[torch.Tensor], torch.Tensor]:
    """replacement: [n, d] (answer) or [n * seq, d] (all) for a chunk of n pairs."""

    def hook(activation: torch.Tensor) -> torch.Tensor:
        if positions is TokenPositions.all:
            return replacement.view_as(activation).to(activation.dtype)
        patched = activation.clone()
        patched[:, -1] = replacement.to(activation.dtype)
        return patched

    return hook


@torch.no_grad()
def answer_metrics(model: GrokTransformer, tokens: torch.Tensor, labels: torch.Tensor,
                   hook_name: str | None = None, replacement: torch.Tensor | None = None,
                   positions: TokenPositions = TokenPositions.answer) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of the answer, with `replacement` spliced in at `hook_name`."""
    rows_per_pair = tokens.shape[1] if positions is TokenPositions.all else 1
    total_loss, total_correct = 0.0, 0.0
    for start in range(0, len(tokens), CHUNK):
        chunk = slice(start, start + CHUNK)
        hooks = {}
        if hook_name is not None:
            rows = replacement[start * rows_per_pair:(start + CHUNK) * rows_per_pair]
            hooks[hook_name] = replacing_hook(rows, positions)
        logits = model(tokens[chunk], hooks).float()
        total_loss += F.cross_entropy(logits, labels[chunk], reduction="sum").item()
        total_correct += (logits.argmax(-1) == labels[chunk]).sum().item()
    return total_loss / len(tokens), total_correct / len(tokens)


def spliced_metrics(model: GrokTransformer, tokens: torch.Tensor, labels: torch.Tensor, hook_name: str,
                    x_hat: torch.Tensor, x: torch.Tensor, positions: TokenPositions) -> dict[str, float]:
    """x_hat, x: [rows, d] for one source, in the host's raw units."""
    ce_clean, acc_clean = answer_metrics(model, tokens, labels)
    ce_spliced, acc_spliced = answer_metrics(model, tokens, labels, hook_name, x_hat, positions)
    ce_zero, acc_zero = answer_metrics(model, tokens, labels, hook_name, torch.zeros_like(x), positions)
    gap = ce_zero - ce_clean
    return {
        "ce_clean": ce_clean, "ce_spliced": ce_spliced, "ce_zero": ce_zero,
        "acc_clean": acc_clean, "acc_spliced": acc_spliced, "acc_zero": acc_zero,
        "loss_recovered": (ce_zero - ce_spliced) / gap if abs(gap) > 1e-9 else float("nan"),
    }
