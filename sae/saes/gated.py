"""Gated SAE (Rajamanoharan et al. 2024, "Improving Dictionary Learning with Gated Sparse
Autoencoders", arXiv:2404.16014): which latents fire and how strongly are decided by two paths that
share their weights, so the L1 penalty shrinks only the first.

    π_gate = W_gate (x - b_dec) + b_gate                       (W_gate is W_enc, b_gate is b_enc)
    π_mag  = W_mag (x - b_dec) + b_mag,  W_mag = exp(r_mag) ⊙ W_gate  (row i scaled by exp(r_mag_i))
    f      = 1[π_gate > 0] ⊙ ReLU(π_mag)
    x̂      = f W_dec + b_dec
    loss   = ||x - x̂||^2 + λ Σ_i ReLU(π_gate)_i ||W_dec,i|| + ||x - (ReLU(π_gate) sg(W_dec) + sg(b_dec))||^2

The gate gets no gradient through the reconstruction (the step function), only through the L1 term
and the auxiliary reconstruction, whose decoder is a stop-gradient (sg) copy. The paper keeps decoder
rows at unit norm and penalises ||ReLU(π_gate)||_1; with free decoder norms, weighting each latent by
its decoder norm is the same penalty (and what SAELens and our vanilla SAE do). Crosscoders carry
over unchanged: π_gate sums the sources' encoders, each source has its decoder, and both
reconstructions run over every source.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sae.saes.base import SAEConfig, SAEOutput, SparseCoder, squared_error


@dataclass
class GatedSAEConfig(SAEConfig):
    type: str = "gated"
    sparsity_coef: float = 5.0  # λ on the decoder-norm-weighted L1 of ReLU(π_gate)
    sparsity_warmup_steps: int = 500
    init_decoder_norm: float = 0.1


class GatedSAE(SparseCoder):
    cfg: GatedSAEConfig

    def __init__(self, cfg: GatedSAEConfig, n_sources: int, d_in: int):
        super().__init__(cfg, n_sources, d_in)
        self.r_mag = nn.Parameter(torch.zeros(self.d_sae))  # exp(0) = 1: the magnitude path starts as the gate's
        self.b_mag = nn.Parameter(torch.zeros(self.d_sae))

    def gate_and_magnitude(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [batch, n_sources, d_in] -> (π_gate, π_mag), each [batch, d_sae]. W_mag (x - b_dec) is
        exp(r_mag) times the gate's own W_gate (x - b_dec), so one matmul serves both paths."""
        pi_gate = self.pre_activations(x)
        pi_mag = (pi_gate - self.b_enc) * self.r_mag.exp() + self.b_mag
        return pi_gate, pi_mag

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pi_gate, pi_mag = self.gate_and_magnitude(self.as_sources(x, (self.n_sources, self.n_columns)))
        return (pi_gate > 0) * torch.relu(pi_mag)

    def forward_sources(self, x: torch.Tensor, dead_latents: torch.Tensor | None = None) -> SAEOutput:
        pi_gate, pi_mag = self.gate_and_magnitude(x)
        latents = (pi_gate > 0) * torch.relu(pi_mag)
        x_hat = self.decode(latents, x)
        gate_activity = torch.relu(pi_gate)
        frozen = self.sum_over_latents(gate_activity @ self.W_dec.detach().flatten(1))
        x_frozen = frozen.view(-1, self.n_sources, self.d_in) + self.output_offset(x).detach()
        target = self.targets_of(x)
        return SAEOutput(x_hat, latents, squared_error(x_hat, target), self.sparsity_of(gate_activity),
                         squared_error(x_frozen, target))

    @torch.no_grad()
    def restart_latents(self, latents: torch.Tensor) -> None:
        self.r_mag[latents] = 0.0
        self.b_mag[latents] = 0.0

    def sharded_parameters(self) -> set[str]:
        return super().sharded_parameters() | {"r_mag", "b_mag"}
