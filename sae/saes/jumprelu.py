"""JumpReLU SAE (Rajamanoharan et al. 2024, "Jumping Ahead", arXiv:2407.14435).

    f_i = z_i H(z_i - θ_i),   z = (x - b_dec) W_enc + b_enc,   θ_i = exp(log_threshold_i) > 0
    loss = ||x - x̂||^2 + λ ||f||_0        (λ: sae.sparsity_coef, with its warm-up)

The step H has no useful derivative, so the threshold learns through the paper's
straight-through estimators with a rectangle kernel K(u) = 1[|u| < 1/2] of bandwidth ε:

    ∂f_i/∂θ_i := -(θ_i/ε) K((z_i - θ_i)/ε)      ∂H(z_i - θ_i)/∂θ_i := -(1/ε) K((z_i - θ_i)/ε)

and the gradient to z is the ordinary one (H(z - θ) through f, none through the L0 term).
ε and the initial θ are in the units of the (normalised) activations: with sae.normalize,
E||x||^2 = d_in, so pre-activations are O(1). Decoder rows are kept at unit norm (as for TopK),
so a latent's activation is its contribution's size.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from sae.saes.base import SAEConfig, SAEOutput, SparseCoder, UnitNormDecoder, squared_error


@dataclass
class JumpReLUSAEConfig(SAEConfig):
    type: str = "jumprelu"
    sparsity_coef: float = 0.1  # λ on the L0 norm
    sparsity_warmup_steps: int = 500
    bandwidth: float = 0.05  # ε of the rectangle kernel
    init_threshold: float = 0.05  # θ at initialisation, every latent (when init_l0 is null)
    # θ_i at initialisation from the data: latent i's pre-activation quantile at which it fires on
    # init_l0 / sparse_dim of a sample of rows, so the run starts at L0 ~ init_l0 (null: init_threshold).
    # Adam moves log θ by about lr per step, so from a fixed θ0 a short run cannot reach the scale
    # λ asks for (docs/recipe.md has what each gives; neither is a tuned default yet).
    init_l0: Optional[float] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.bandwidth <= 0:
            raise ValueError(f"sae.bandwidth must be > 0, got {self.bandwidth}")
        if self.init_threshold <= 0:
            raise ValueError(f"sae.init_threshold must be > 0, got {self.init_threshold}")
        if self.init_l0 is not None and not 0 < self.init_l0 <= self.sparse_dim:
            raise ValueError(f"sae.init_l0 must be in (0, sae.sparse_dim={self.sparse_dim}] or null, "
                             f"got {self.init_l0}")


CALIBRATION_LATENTS = 4096  # latents per chunk when calibrating θ (bounds the [rows, latents] buffer)


def rectangle(u: torch.Tensor) -> torch.Tensor:
    return (u.abs() < 0.5).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre, threshold, bandwidth: float):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        grad_pre = grad * (pre > threshold)
        window = rectangle((pre - threshold) / ctx.bandwidth)
        grad_threshold = -(threshold / ctx.bandwidth) * (grad * window).sum(dim=0)
        return grad_pre, grad_threshold, None


class _Step(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre, threshold, bandwidth: float):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        window = rectangle((pre - threshold) / ctx.bandwidth)
        return None, -(grad * window).sum(dim=0) / ctx.bandwidth, None


class JumpReLUSAE(UnitNormDecoder, SparseCoder):
    cfg: JumpReLUSAEConfig

    def __init__(self, cfg: JumpReLUSAEConfig, n_sources: int, d_in: int):
        super().__init__(cfg, n_sources, d_in)
        self.log_threshold = nn.Parameter(torch.full((self.d_sae,), math.log(cfg.init_threshold)))

    def threshold(self) -> torch.Tensor:
        return self.log_threshold.exp()

    @torch.no_grad()
    def init_from_data(self, sample: torch.Tensor) -> None:
        """θ_i halfway between latent i's m-th and (m+1)-th largest pre-activation on `sample` (rows of
        the normalised training table), m = len(sample) x init_l0 / d_sae: latent i fires on m rows.
        Floored at 1e-3 so θ stays positive."""
        if self.cfg.init_l0 is None:
            return
        fires_on = max(1, round(len(sample) * self.cfg.init_l0 / self.d_sae))  # rows per latent
        centred = (self.inputs_of(sample) - self.input_centre()).flatten(1)
        for start in range(0, self.d_sae, CALIBRATION_LATENTS):
            stop = min(self.d_sae, start + CALIBRATION_LATENTS)
            pre = torch.addmm(self.b_enc[start:stop], centred, self.W_enc[start:stop].flatten(1).t())
            if fires_on < len(sample):
                top = pre.topk(fires_on + 1, dim=0).values
                theta = (top[-2] + top[-1]) / 2
            else:
                theta = pre.amin(dim=0) - 1.0
            self.log_threshold[start:stop] = theta.clamp_min(1e-3).log()

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        return _JumpReLU.apply(pre, self.threshold(), self.cfg.bandwidth)

    def forward_sources(self, x: torch.Tensor, dead_latents: torch.Tensor | None = None) -> SAEOutput:
        pre = self.pre_activations(x)
        threshold = self.threshold()
        latents = _JumpReLU.apply(pre, threshold, self.cfg.bandwidth)
        x_hat = self.decode(latents, x)
        mse = squared_error(x_hat, self.targets_of(x))
        l0 = self.sum_over_latents(_Step.apply(pre, threshold, self.cfg.bandwidth).sum(dim=1).mean())
        return SAEOutput(x_hat, latents, mse, l0, x.new_zeros(()))

    @torch.no_grad()
    def restart_latents(self, latents: torch.Tensor) -> None:
        self.log_threshold[latents] = math.log(self.cfg.init_threshold)

    def sharded_parameters(self) -> set[str]:
        return super().sharded_parameters() | {"log_threshold"}
