"""BatchTopK SAE (Bussmann, Leask & Nanda 2024, arXiv:2412.06410): during training keep the
k x batch largest (ReLU'd) pre-activations of the whole batch, so rows may use more or fewer than k
latents while the batch averages k; at inference, where there is no batch to rank against, keep
the pre-activations above a threshold θ estimated during training (a JumpReLU at θ).

θ is an exponential moving average (`threshold_decay`) of the smallest activation kept in each
training batch (the paper's estimate is the mean of that minimum over training batches). AuxK and
the unit-norm decoder are TopK's. The forward is dense: BatchTopK's selection over the flattened
batch does not fit TopK's per-row sparse kernels.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sae.saes.base import SAEOutput, squared_error
from sae.world import LOCAL, Collective
from sae.saes.topk import TopKSAE, TopKSAEConfig


@dataclass
class BatchTopKSAEConfig(TopKSAEConfig):
    type: str = "batchtopk"
    threshold_decay: float = 0.99  # EMA decay of the inference threshold θ

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.threshold_decay < 1.0:
            raise ValueError(f"sae.threshold_decay must be in [0, 1), got {self.threshold_decay}")


def batch_topk(pre: torch.Tensor, k: int, spread: Collective = LOCAL, global_rows: int | None = None) -> torch.Tensor:
    """[batch, d_sae] -> the ReLU'd entries that reach the (k x batch)-th largest of the whole
    batch, the rest 0. Entries tied with that value are all kept (a row drawn twice into a batch
    ties with itself), so the selection does not depend on how topk breaks ties, nor on how the
    batch or the latents are split over processes (`spread`): each then offers its k x
    global_rows largest entries, and the threshold is taken over all offers."""
    flat = pre.relu().flatten()
    budget = k * (global_rows or pre.shape[0])
    offers = flat.detach().topk(min(budget, flat.numel()), sorted=False).values
    if spread.size > 1:
        offers = spread.gather(offers).flatten()
        offers = offers.topk(min(budget, offers.numel()), sorted=False).values
    threshold = offers.min()
    return (flat * (flat >= threshold)).view_as(pre)


class BatchTopKSAE(TopKSAE):
    cfg: BatchTopKSAEConfig

    def __init__(self, cfg: BatchTopKSAEConfig, n_sources: int, d_in: int):
        super().__init__(cfg, n_sources, d_in)
        # buffers: saved with the weights (safetensors), restored on resume, moved with .to()
        self.register_buffer("threshold", torch.zeros(()))
        self.register_buffer("threshold_updates", torch.zeros((), dtype=torch.long))

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        """Batch top-k while training; the threshold θ at inference."""
        if self.training:
            spread = self.rows if self.rows.size > 1 else self.latent_shards
            return batch_topk(pre, self.cfg.k, spread, len(pre) * self.rows.size)
        return pre * (pre > self.threshold)

    def forward_sources(self, x: torch.Tensor, dead_latents: torch.Tensor | None = None) -> SAEOutput:
        pre = self.pre_activations(x)
        latents = self.activation(pre)
        if self.training:
            self.update_threshold(latents)
        x_hat = self.decode(latents)
        mse = squared_error(x_hat, x)
        sparsity = self.sparsity_of(latents)
        aux_columns = dead_latents if self.cfg.aux_coef > 0 else None
        pre_aux = pre[:, aux_columns] if aux_columns is not None else None
        aux = self.auxk_loss(x, x_hat, pre_aux, aux_columns, self.W_dec.flatten(1))
        return SAEOutput(x_hat, latents, mse, sparsity, aux)

    @torch.no_grad()
    def update_threshold(self, latents: torch.Tensor) -> None:
        """θ <- decay θ + (1 - decay) min(kept > 0); the first batch sets it; a batch where nothing
        fired changes nothing. Tensor ops only: no host sync."""
        kept = latents.detach().float()
        smallest = torch.where(kept > 0, kept, torch.full_like(kept, float("inf"))).min()
        smallest = self.latent_shards.min(self.rows.min(smallest))  # over the global batch and dictionary
        fired = torch.isfinite(smallest)
        decay = torch.where(self.threshold_updates > 0, self.cfg.threshold_decay, 0.0)
        updated = decay * self.threshold + (1 - decay) * torch.where(fired, smallest, self.threshold)
        self.threshold.copy_(torch.where(fired, updated, self.threshold))
        self.threshold_updates.add_(fired.long())
