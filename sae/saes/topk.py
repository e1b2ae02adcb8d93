"""TopK SAE (Gao et al. 2024): keep the k largest pre-activations, AuxK loss on dead latents,
unit-norm decoder rows (norm taken over all sources together in a crosscoder)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sae.saes.base import SAEConfig, SparseCoder


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


class TopKSAE(SparseCoder):
    cfg: TopKSAEConfig

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        values, indices = pre.topk(self.cfg.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter_(-1, indices, values.relu())

    def auxiliary_loss(self, x, x_hat, pre, dead_mask) -> torch.Tensor:
        """AuxK: reconstruct the residual e = x - x̂ from the top k_aux *dead* latents.

        Normalised by the residual's variance, so the loss is comparable across layers; e is
        detached, so the gradient reaches only the dead latents.
        """
        if dead_mask is None or self.cfg.aux_coef == 0 or not bool(dead_mask.any()):
            return x.new_zeros(())
        k_aux = min(self.cfg.k_aux, int(dead_mask.sum()))
        dead_pre = pre.masked_fill(~dead_mask, float("-inf"))
        values, indices = dead_pre.topk(k_aux, dim=-1, sorted=False)
        aux_latents = torch.zeros_like(pre).scatter_(-1, indices, values.relu())
        e = (x - x_hat).detach()
        e_hat = (aux_latents @ self.W_dec.flatten(1)).view_as(e)
        total_variance = (e - e.mean(dim=0)).pow(2).sum().clamp_min(1e-12)
        return self.cfg.aux_coef * (e_hat - e).pow(2).sum() / total_variance

    @torch.no_grad()
    def before_optimizer_step(self) -> None:
        """Remove the gradient component that would change a decoder row's norm."""
        if self.W_dec.grad is None:
            return
        W, G = self.W_dec.flatten(1), self.W_dec.grad.flatten(1)
        W_unit = W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)
        G -= (G * W_unit).sum(dim=1, keepdim=True) * W_unit

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        norms = self.W_dec.flatten(1).norm(dim=1).clamp_min(1e-12)
        self.W_dec.div_(norms[:, None, None])
