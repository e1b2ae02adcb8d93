"""Other libraries' TopK SAEs as benchmark columns, each with its own recommended settings
(`pip install -e .[compare]` installs them). Each adapter exposes what sae/bench/synthetic.py's loop needs:
forward(x, dead_latents) -> SAEOutput, the decoder hooks, encode/decoder_rows for quality, and
its own optimiser.

    saelens   sae_lens.TopKTrainingSAE (SAELens 6): its training_forward_pass (MSE + its AuxK,
              coefficient 1), Adam at SAELens' default lr 3e-4, decoder init norm 0.1.
    sparsify  EleutherAI sparsify.SparseCoder: FVU loss, AuxK off (its default auxk_alpha 0),
              SignSGD in a schedule-free wrapper (momentum 0.95) at lr 5e-3 / sqrt(d_sae / 2^14),
              unit-norm decoder with the parallel gradient removed, as its Trainer does.
"""
from __future__ import annotations

import torch
from torch import nn

from sae.saes.base import SAEOutput
from sae.training import signum

EXTERNAL = ("saelens", "sparsify")


class SAELensTopK(nn.Module):
    def __init__(self, d_in: int, d_sae: int, k: int, device: str) -> None:
        super().__init__()
        from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

        self.sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=k, device=device))
        self.d_sae, self.step = d_sae, 0

    def forward(self, x: torch.Tensor, dead_latents: torch.Tensor | None = None) -> SAEOutput:
        from sae_lens.saes.sae import TrainStepInput

        dead = torch.zeros(self.d_sae, dtype=torch.bool, device=x.device)
        if dead_latents is not None:
            dead[dead_latents] = True
        out = self.sae.training_forward_pass(TrainStepInput(
            sae_in=x[:, 0], coefficients={}, dead_neuron_mask=dead, n_training_steps=self.step, is_logging_step=False))
        self.step += 1
        aux = out.loss - out.losses["mse_loss"]
        return SAEOutput(out.sae_out[:, None], out.feature_acts, out.losses["mse_loss"], x.new_zeros(()), aux)

    def before_optimizer_step(self) -> None:
        pass

    def after_optimizer_step(self) -> None:
        pass

    @property
    def b_dec(self) -> torch.Tensor:
        return self.sae.b_dec

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.sae.encode(x[:, 0])

    def decoder_rows(self) -> torch.Tensor:
        return self.sae.W_dec

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.sae.decode(self.sae.encode(x[:, 0]))

    def make_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=3e-4, betas=(0.9, 0.999))


class SparsifyTopK(nn.Module):
    def __init__(self, d_in: int, d_sae: int, k: int, device: str) -> None:
        super().__init__()
        from sparsify import SparseCoder, SparseCoderConfig

        self.sae = SparseCoder(d_in, SparseCoderConfig(num_latents=d_sae, k=k), device=device)
        self.d_sae = d_sae
        self.optimizer = None

    def forward(self, x: torch.Tensor, dead_latents: torch.Tensor | None = None) -> SAEOutput:
        out = self.sae(x[:, 0])  # auxk_alpha 0: sparsify's default trains without AuxK
        return SAEOutput(out.sae_out[:, None], out.latent_acts, out.fvu, x.new_zeros(()), x.new_zeros(()),
                         out.latent_indices)

    def before_optimizer_step(self) -> None:
        self.sae.remove_gradient_parallel_to_decoder_directions()

    def after_optimizer_step(self) -> None:
        self.sae.set_decoder_norm_to_unit_norm()

    @property
    def b_dec(self) -> torch.Tensor:
        return self.sae.b_dec

    def iterates(self):
        """Each of schedule-free's iterates in turn (sae.training.signum.iterates)."""
        return signum.iterates(self.optimizer)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        out = self.sae.encode(x[:, 0])
        top_acts, top_indices = out[0], out[1]
        return torch.zeros(len(x), self.d_sae, device=x.device).scatter_(1, top_indices, top_acts.float())

    def decoder_rows(self) -> torch.Tensor:
        return self.sae.W_dec

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.sae(x[:, 0]).sae_out

    def make_optimizer(self) -> torch.optim.Optimizer:
        from schedulefree import ScheduleFreeWrapper
        from sparsify.sign_sgd import SignSGD

        lr = 5e-3 / (self.d_sae / 2**14) ** 0.5
        self.optimizer = ScheduleFreeWrapper(SignSGD([dict(params=self.sae.parameters(), lr=lr)]), momentum=0.95)
        self.optimizer.train()
        return self.optimizer


MODULES = {"saelens": "sae_lens", "sparsify": "sparsify"}


def external_available(impl: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(MODULES[impl]) is not None


def build_external(impl: str, d_in: int, d_sae: int, k: int, device: str) -> nn.Module:
    try:
        return {"saelens": SAELensTopK, "sparsify": SparsifyTopK}[impl](d_in, d_sae, k, device)
    except ImportError as error:
        raise SystemExit(f"--impls {impl} needs the comparison libraries: pip install -e '.[compare]' ({error})")
