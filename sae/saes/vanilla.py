"""Vanilla SAE: ReLU encoder, L1 penalty weighted by decoder norms (Anthropic, April 2024 update)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sae.saes.base import SAEConfig, SparseCoder


@dataclass
class VanillaSAEConfig(SAEConfig):
    type: str = "vanilla"
    sparsity_coef: float = 5.0
    sparsity_warmup_steps: int = 500
    init_decoder_norm: float = 0.1


class VanillaSAE(SparseCoder):
    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        return torch.relu(pre)
