"""TopK SAE (Gao et al. 2024): keep the k largest pre-activations, AuxK loss on dead latents,
unit-norm decoder rows (norm taken over all sources together in a crosscoder)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sae.saes.base import (SAEConfig, SAEOutput, SparseCoder, UnitNormDecoder, reaches_global_topk, squared_error,
                           total_variance)
from sae.saes.row_topk import row_topk
from sae.saes.sparse_ops import sparse_decode, topk_encode


@dataclass
class TopKSAEConfig(SAEConfig):
    type: str = "topk"
    k: int = 32
    k_aux: int = 256  # latents the AuxK reconstruction may use (Gao et al.: ~d_in/2, a power of 2)
    aux_coef: float = 1 / 32

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.k <= self.sparse_dim:
            raise ValueError(f"sae.k must be in (0, sae.sparse_dim={self.sparse_dim}], got {self.k}")
        if self.k_aux <= 0:
            raise ValueError(f"sae.k_aux must be > 0, got {self.k_aux}")
        if self.aux_coef < 0:
            raise ValueError(f"sae.aux_coef must be >= 0, got {self.aux_coef}")


class TopKSAE(UnitNormDecoder, SparseCoder):
    """Training runs the sparse kernels of sae/saes/sparse_ops.py (same loss and gradients as the
    dense computation, tested); `encode`/`decode` stay dense for analysis code."""

    cfg: TopKSAEConfig

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        values, indices = row_topk(pre, self.cfg.k)
        return torch.zeros_like(pre).scatter_(-1, indices, values.relu())

    def forward_sources(self, x: torch.Tensor, dead_latents: torch.Tensor | None = None) -> SAEOutput:
        if x.requires_grad:  # the sparse kernels treat x as data; gradients w.r.t. x need the dense path
            return super().forward_sources(x, dead_latents)
        batch = x.shape[0]
        aux_columns = dead_latents if self.cfg.aux_coef > 0 else None
        values, indices, pre_aux, layout = topk_encode(self.inputs_of(x).flatten(1), self.input_centre().flatten(),
                                                       self.W_enc.flatten(1).t(), self.b_enc,
                                                       min(self.cfg.k, self.d_sae), aux_columns)
        if self.latent_shards.size > 1:  # this process's top k, of which those in the global top k
            values = values * reaches_global_topk(values, self.cfg.k, self.latent_shards)
        W_dec = self.W_dec.flatten(1)
        x_hat = self.sum_over_latents(sparse_decode(values, indices, W_dec, layout))
        x_hat = x_hat.view(batch, self.n_sources, self.d_in) + self.output_offset(x)
        mse = squared_error(x_hat, self.targets_of(x))
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.cfg.sparsity_coef > 0):
            sparsity = self.sum_over_latents((values * self.decoder_norms().sum(dim=1)[indices]).sum(dim=1).mean())
        aux = self.auxk_loss(x, x_hat, pre_aux, aux_columns, W_dec)
        return SAEOutput(x_hat, values, mse, sparsity, aux, indices)

    def auxk_loss(self, x, x_hat, pre_aux, dead_latents, W_dec) -> torch.Tensor:
        """AuxK: reconstruct the residual e = x - x̂ from the top k_aux *dead* latents.

        Only the dead columns' pre-activations exist here (pre_aux: [batch, n_dead]), so the cost
        scales with the number of dead latents. Normalised by the residual's variance, so the loss
        is comparable across layers; e is detached, so the gradient reaches only the dead latents.
        """
        sharded = self.latent_shards.size > 1
        if dead_latents is None or (dead_latents.numel() == 0 and not sharded):
            return x.new_zeros(())  # (sharded: None when no shard has a dead latent, so all agree)
        k_aux = min(self.cfg.k_aux, dead_latents.numel())  # numel is metadata: no host sync
        values, local = row_topk(pre_aux, k_aux)
        if sharded:
            values = values * reaches_global_topk(values, self.cfg.k_aux, self.latent_shards, width=self.cfg.k_aux)
        e = (self.targets_of(x) - x_hat).detach()
        if k_aux:
            partial = sparse_decode(values.relu(), dead_latents[local], W_dec)
        else:  # a shard without dead latents while others have some
            partial = e.new_zeros(len(e), W_dec.shape[1])
        e_hat = self.sum_over_latents(partial).view_as(e)
        return self.auxk_of(e_hat, e)

    def auxk_of(self, e_hat: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """aux_coef x ||e_hat - e||^2 / the residual's total variance, over the global batch. With the
        batch split over N processes each returns N x its share (the gradient average then gives
        the global loss's gradient, and the average of the values the global value)."""
        squared_error = (e_hat - e).pow(2).sum()
        return self.cfg.aux_coef * self.rows.size * squared_error / total_variance(e, self.rows)
