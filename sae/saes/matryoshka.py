"""Matryoshka SAE (Bussmann, Nabeshima, Karvonen & Nanda 2025, arXiv:2503.17547; Nabeshima 2024):
nested prefixes of the dictionary, latents [0, m_1) ⊂ [0, m_2) ⊂ ... ⊂ [0, d_sae), each trained to
reconstruct the input on its own, so the first latents learn general features and later ones
refine them instead of absorbing them. On BatchTopK (the paper's choice): one selection over the
whole dictionary, then

    loss = mean over prefixes m of ||x - (f[:, :m] W_dec[:m] + b_dec)||^2   (+ AuxK)

(the paper sums over prefixes; the mean keeps the loss on the scale of one reconstruction, so the
learning rates of the other architectures carry over). out.mse is that training objective;
out.x_hat is the full dictionary's reconstruction, which the metrics report. Prefix sizes are
fractions of sparse_dim, so they follow sweeps over it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

import torch

from sae.saes.base import SAEOutput, squared_error
from sae.saes.batchtopk import BatchTopKSAE, BatchTopKSAEConfig
from sae.saes.sparse_ops import entries_layout, row_offsets, sparse_decode


@dataclass
class MatryoshkaSAEConfig(BatchTopKSAEConfig):
    type: str = "matryoshka"
    prefix_fractions: List[float] = field(default_factory=lambda: [0.0625, 0.25, 1.0])

    def __post_init__(self) -> None:
        super().__post_init__()
        fractions = list(self.prefix_fractions)
        if not fractions or fractions[-1] != 1.0 or any(not 0 < f <= 1 for f in fractions) or fractions != sorted(
                set(fractions)):
            raise ValueError(f"sae.prefix_fractions must increase strictly within (0, 1] and end at 1.0, "
                             f"got {fractions}")
        sizes = prefix_sizes(fractions, self.sparse_dim)
        if len(set(sizes)) != len(sizes) or sizes[0] < 1:
            raise ValueError(f"sae.prefix_fractions={fractions} of sae.sparse_dim={self.sparse_dim} give prefixes "
                             f"{sizes}: each must hold at least one latent more than the one before")


def prefix_sizes(fractions, d_sae: int) -> list[int]:
    return [round(f * d_sae) for f in fractions]


class MatryoshkaSAE(BatchTopKSAE):
    cfg: MatryoshkaSAEConfig

    def forward_sources(self, x: torch.Tensor, dead_latents: torch.Tensor | None = None) -> SAEOutput:
        if self.training and not x.requires_grad:
            return self.sparse_forward(x, dead_latents)
        pre = self.pre_activations(x)
        latents = self.encode_for_loss(pre)

        def decode_block(start: int, end: int) -> torch.Tensor:
            return latents[:, start:end] @ self.W_dec[start:end].flatten(1)

        x_hat, mse = self.nested_reconstructions(x, decode_block)
        aux_columns = dead_latents if self.cfg.aux_coef > 0 else None
        pre_aux = pre[:, aux_columns] if aux_columns is not None else None
        aux = self.auxk_loss(x, x_hat, pre_aux, aux_columns, self.W_dec.flatten(1))
        return SAEOutput(x_hat, latents, mse, self.batch_sparsity(latents), aux)

    def sparse_forward(self, x: torch.Tensor, dead_latents: torch.Tensor | None) -> SAEOutput:
        """forward_sources of a training step through the sparse kernels: each prefix's block of
        latents decodes its own kept entries."""
        aux_columns = dead_latents if self.cfg.aux_coef > 0 else None
        kept, pre_aux = self.kept_entries(x, aux_columns)
        self.update_threshold(kept.cut)
        W_dec = self.W_dec.flatten(1)

        def decode_block(start: int, end: int) -> torch.Tensor:
            block = (kept.latents >= start) & (kept.latents < end)
            latents, rows = kept.latents[block], kept.rows[block]
            layout = entries_layout(latents, rows, self.d_sae, len(x))
            return sparse_decode(kept.values[block], latents, W_dec, layout, row_offsets(rows, len(x)))

        x_hat, mse = self.nested_reconstructions(x, decode_block)
        aux = self.auxk_loss(x, x_hat, pre_aux, aux_columns, W_dec)
        return SAEOutput(x_hat, kept.values, mse, self.entries_sparsity(kept, len(x)), aux, kept.latents, kept.rows)

    def nested_reconstructions(self, x: torch.Tensor, decode_block) -> tuple[torch.Tensor, torch.Tensor]:
        """(the full dictionary's reconstruction, the mean over prefixes of each one's squared error);
        decode_block(start, end) -> [batch, n_sources * d_in], latents [start, end)'s part."""
        target = self.targets_of(x)
        x_hat, squared_errors, start = self.output_offset(x).expand_as(target), [], 0
        for end in prefix_sizes(self.cfg.prefix_fractions, self.d_sae):
            x_hat = x_hat + decode_block(start, end).view_as(target)
            squared_errors.append(squared_error(x_hat, target))
            start = end
        return x_hat, torch.stack(squared_errors).mean()
