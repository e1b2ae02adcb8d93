"""BatchTopK SAE (Bussmann, Leask & Nanda 2024, arXiv:2412.06410): during training keep the
k x batch largest (ReLU'd) pre-activations of the whole batch, so rows may use more or fewer than k
latents while the batch averages k; at inference, where there is no batch to rank against, keep
the pre-activations above a threshold θ (a JumpReLU at θ).

θ while training is an exponential moving average (`threshold_decay`) of each batch's cut, the
smallest activation kept (the paper's estimate is the mean of that minimum over training batches).
Such an average lags the cut while it still moves: after a 200-step run, inference kept 7 latents a
row for k 16 (docs/recipe.md). So by default (`calibrate_threshold`) θ is set again whenever the
dictionary is evaluated or saved: to the cut batch top-k makes on a fixed sample of training rows
taken as one batch, where inference then keeps k latents a row on average. AuxK and the unit-norm
decoder are TopK's. The forward is dense: BatchTopK's selection over the flattened batch does not
fit TopK's per-row sparse kernels.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sae.saes.base import SAEOutput, squared_error
from sae.world import LOCAL, Collective
from sae.saes.topk import TopKSAE, TopKSAEConfig

# the candidates for the batch's top k x batch: the entries above this fraction of the last cut
CANDIDATE_FLOOR = 0.9
CALIBRATION_CHUNK = 512  # rows of the calibration sample encoded at once


@dataclass
class BatchTopKSAEConfig(TopKSAEConfig):
    type: str = "batchtopk"
    threshold_decay: float = 0.99  # EMA decay of the training estimate of θ
    calibrate_threshold: bool = True  # θ from a sample of training rows at each evaluation and save

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.threshold_decay < 1.0:
            raise ValueError(f"sae.threshold_decay must be in [0, 1), got {self.threshold_decay}")


def batch_topk(pre: torch.Tensor, k: int, spread: Collective = LOCAL, global_rows: int | None = None,
               floor: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """[batch, d_sae] -> (the ReLU'd entries that reach the (k x batch)-th largest of the whole batch,
    the rest 0; that cut). Entries tied with the cut are all kept (a row drawn twice into a batch
    ties with itself), so the selection does not depend on how topk breaks ties, nor on how the
    batch or the latents are split over processes (`spread`): each then offers its k x global_rows
    largest entries, and the cut is taken over all offers. `floor`: see largest_entries."""
    budget = k * (global_rows or pre.shape[0])
    offers = largest_entries(pre.detach().flatten(), budget, floor)
    if spread.size > 1:
        offers = spread.gather(offers).flatten()
        offers = offers.topk(min(budget, offers.numel()), sorted=False).values
    cut = offers.min().clamp_min(0)  # of the ReLU'd entries: ReLU keeps the order
    return torch.where(pre >= cut, pre, 0.0), cut  # (a cut of 0 keeps every positive entry: ReLU)


def largest_entries(flat: torch.Tensor, budget: int, floor: float | None = None) -> torch.Tensor:
    """The `budget` largest entries of `flat`, in no order; exactly those of a full topk. With a
    `floor` expected below the budget-th largest, they are taken from the entries above it, a far
    smaller topk than over all of `flat` (the cut moves little from one step to the next); when
    fewer than `budget` entries are above it, from all of them. Boolean indexing syncs with the
    host: pass a floor on CPU only."""
    if floor is not None and floor > 0:
        candidates = flat[flat > floor]
        if candidates.numel() >= budget:
            return candidates.topk(budget, sorted=False).values
    return flat.topk(min(budget, flat.numel()), sorted=False).values


class BatchTopKSAE(TopKSAE):
    cfg: BatchTopKSAEConfig

    def __init__(self, cfg: BatchTopKSAEConfig, n_sources: int, d_in: int):
        super().__init__(cfg, n_sources, d_in)
        # buffers: saved with the weights (safetensors), restored on resume, moved with .to()
        self.register_buffer("threshold", torch.zeros(()))
        self.register_buffer("threshold_updates", torch.zeros((), dtype=torch.long))
        self.last_cut: float | None = None  # CPU training: where the next step looks for candidates

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        """Batch top-k while training; the threshold θ at inference."""
        if self.training:
            return self.select(pre)[0]
        return pre * (pre > self.threshold)

    def select(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Training's batch top-k over this batch (and the other processes' shares): (latents, cut)."""
        spread = self.rows if self.rows.size > 1 else self.latent_shards
        on_cpu = pre.device.type == "cpu" and not torch.compiler.is_compiling()  # (a host sync)
        floor = self.last_cut * CANDIDATE_FLOOR if on_cpu and self.last_cut is not None else None
        latents, cut = batch_topk(pre, self.cfg.k, spread, len(pre) * self.rows.size, floor)
        if on_cpu:
            self.last_cut = cut.item()
        return latents, cut

    def forward_sources(self, x: torch.Tensor, dead_latents: torch.Tensor | None = None) -> SAEOutput:
        pre = self.pre_activations(x)
        latents = self.encode_for_loss(pre)
        x_hat = self.decode(latents)
        mse = squared_error(x_hat, x)
        sparsity = self.batch_sparsity(latents)
        aux_columns = dead_latents if self.cfg.aux_coef > 0 else None
        pre_aux = pre[:, aux_columns] if aux_columns is not None else None
        aux = self.auxk_loss(x, x_hat, pre_aux, aux_columns, self.W_dec.flatten(1))
        return SAEOutput(x_hat, latents, mse, sparsity, aux)

    def encode_for_loss(self, pre: torch.Tensor) -> torch.Tensor:
        """The latents a forward trains or evaluates on; while training, moves θ's estimate."""
        if not self.training:
            return self.activation(pre)
        latents, cut = self.select(pre)
        self.update_threshold(cut)
        return latents

    def batch_sparsity(self, latents: torch.Tensor) -> torch.Tensor:
        """sparsity_of the codes: a penalty with its gradient when sparsity_coef is set, else only a
        metric (no backward through a [batch, d_sae] product)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.cfg.sparsity_coef > 0):
            return self.sparsity_of(latents)

    @torch.no_grad()
    def update_threshold(self, cut: torch.Tensor) -> None:
        """θ <- decay θ + (1 - decay) cut; the first batch sets it; a batch whose cut is 0 (fewer
        positive pre-activations than k x batch) changes nothing. Tensor ops only: no host sync. The
        cut is already the whole batch's and dictionary's (batch_topk gathers the offers)."""
        fired = cut.detach().float() > 0
        decay = torch.where(self.threshold_updates > 0, self.cfg.threshold_decay, 0.0)
        updated = decay * self.threshold + (1 - decay) * cut.detach().float()
        self.threshold.copy_(torch.where(fired, updated, self.threshold))
        self.threshold_updates.add_(fired.long())

    @torch.no_grad()
    def calibrate_for_inference(self, sample: torch.Tensor) -> None:
        """θ <- the cut batch top-k makes on `sample` ([rows, n_sources, d_in] training rows) taken as
        one batch: inference then keeps k latents a row on average over the sample. A whole
        dictionary in one process only (the trainer calibrates the gathered copy it saves)."""
        if not self.cfg.calibrate_threshold:
            return
        budget, offers = self.cfg.k * len(sample), None
        for chunk in sample.split(CALIBRATION_CHUNK):
            entries = self.pre_activations(chunk).relu().flatten()
            pool = entries if offers is None else torch.cat([offers, entries])
            offers = largest_entries(pool, budget)
        self.threshold.copy_(offers.min())
