"""Cross-layer transcoder (CLT; Ameisen et al. 2025, "Circuit Tracing"): on a host with L layers,
the latents of layer l read the residual stream before layer l's MLP (resid_mid) and write to the
MLP outputs of every layer l' >= l; all layers' targets are trained jointly:

    f_l   = TopK_k((x_l - b_in_l) W_enc_l + b_enc_l)                 latents of layer l, [m] each
    ŷ_l'  = sum_{l <= l'} f_l W_dec_{l -> l'} + b_dec_l' (+ W_skip_l' x_l')
    loss  = sum_l' ||y_l' - ŷ_l'||^2 + AuxK

Stored in the shared sparse-coder layout with one source per layer: d_sae = L m latents (latent i
belongs to layer i // m), W_enc and W_dec [d_sae, L, d_in] whose entries outside the causal pattern
are held at zero by fixed masks (a latent reads only its own layer, writes only its own and later
ones). Selection is TopK within each layer (k per layer), so layer l's latents never depend on a
later layer's input and the replacement model can run them layer by layer inside the host
(`layer_latents`, `layer_output`). On one layer it is a transcoder. Data parallel only (the
per-layer TopK does not shard over latents).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from sae.saes.base import SAEOutput, squared_error
from sae.saes.row_topk import row_topk
from sae.saes.topk import TopKSAE, TopKSAEConfig


@dataclass
class CLTConfig(TopKSAEConfig):
    type: str = "clt"
    sparse_dim: int = 256  # latents per layer (the dictionary has n_layers x this many)
    k: int = 16  # active latents per layer
    input_hookpoint: Optional[str] = "resid_mid"
    target_hookpoint: Optional[str] = "mlp_out"


class CrossLayerTranscoder(TopKSAE):
    cfg: CLTConfig

    @staticmethod
    def dictionary_size(cfg: CLTConfig, n_sources: int) -> int:
        return cfg.sparse_dim * n_sources

    def __init__(self, cfg: CLTConfig, n_sources: int, d_in: int):
        super().__init__(cfg, n_sources, d_in)
        self.per_layer = cfg.sparse_dim
        layer_of = torch.arange(self.d_sae) // self.per_layer
        layers = torch.arange(n_sources)
        self.register_buffer("encoder_mask", (layer_of[:, None] == layers[None, :]).float()[..., None],
                             persistent=False)  # [d_sae, L, 1]: a latent reads its own layer
        self.register_buffer("decoder_mask", (layer_of[:, None] <= layers[None, :]).float()[..., None],
                             persistent=False)  # [d_sae, L, 1]: ... and writes its own and later ones
        self.apply_masks(torch.arange(self.d_sae))

    @torch.no_grad()
    def apply_masks(self, latents: torch.Tensor) -> None:
        """Zero the weights outside the causal pattern (init, after a restart), decoder rows back to unit norm."""
        self.W_enc[latents] *= self.encoder_mask[latents]
        self.W_dec[latents] *= self.decoder_mask[latents]
        norms = self.W_dec[latents].flatten(1).norm(dim=1).clamp_min(1e-12)
        self.W_dec[latents] /= norms[:, None, None]

    def encoder(self) -> torch.Tensor:
        return self.W_enc * self.encoder_mask

    def decoder(self) -> torch.Tensor:
        return self.W_dec * self.decoder_mask

    # -- the maths ---------------------------------------------------------------------------
    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        centred = (self.inputs_of(x) - self.input_centre()).flatten(1)
        return torch.addmm(self.b_enc, centred, self.encoder().flatten(1).t())

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        """TopK within each layer's block of latents."""
        by_layer = pre.reshape(-1, self.per_layer)
        values, indices = row_topk(by_layer, min(self.cfg.k, self.per_layer))
        return torch.zeros_like(by_layer).scatter_(-1, indices, values.relu()).view_as(pre)

    def decode(self, latents: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        decoded = (latents @ self.decoder().flatten(1)).view(-1, self.n_sources, self.d_in)
        return decoded + (self.b_dec if x is None else self.output_offset(x))

    def forward_sources(self, x: torch.Tensor, dead_latents: torch.Tensor | None = None) -> SAEOutput:
        """Dense: the per-layer selection has no sparse kernel yet (the hosts it runs on are small)."""
        pre = self.pre_activations(x)
        latents = self.activation(pre)
        x_hat = self.decode(latents, x)
        aux_columns = dead_latents if self.cfg.aux_coef > 0 else None
        pre_aux = pre[:, aux_columns] if aux_columns is not None else None
        aux = self.auxk_loss(x, x_hat, pre_aux, aux_columns, self.decoder().flatten(1))
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.cfg.sparsity_coef > 0):
            sparsity = self.sparsity_of(latents)
        return SAEOutput(x_hat, latents, squared_error(x_hat, self.targets_of(x)), sparsity, aux)

    # -- the replacement model: one layer at a time, inside the host --------------------------
    def block(self, layer: int) -> slice:
        return slice(layer * self.per_layer, (layer + 1) * self.per_layer)

    def layer_latents(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """x: [n, d_in] layer `layer`'s input (resid_mid, in the units the CLT takes) -> its latents [n, m]."""
        rows = self.block(layer)
        pre = torch.addmm(self.b_enc[rows], x - self.b_in[layer], self.W_enc[rows, layer].t())
        values, indices = row_topk(pre, min(self.cfg.k, self.per_layer))
        return torch.zeros_like(pre).scatter_(-1, indices, values.relu())

    def layer_output(self, layer: int, latents: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """The prediction of layer `layer`'s target (MLP output) from the latents of layers 0..layer
        (latents[j]: [n, m]) and, for the skip path, that layer's input x [n, d_in]."""
        out = self.b_dec[layer] + sum(latents[j] @ self.W_dec[self.block(j), layer] for j in range(layer + 1))
        if self.cfg.skip:
            out = out + x @ self.W_skip[layer].t()
        return out

    @torch.no_grad()
    def restart_latents(self, latents: torch.Tensor) -> None:
        self.apply_masks(latents)
