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
decoder are TopK's, and so are the sparse kernels a training step runs (sae/saes/sparse_ops.py): after
the selection only the kept entries, any number per row, do any work (gradients w.r.t. the input
and inference take the dense path).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

from sae.saes.base import SAEOutput, squared_error
from sae.saes.sparse_ops import (ActiveLayout, encoder_backward, entries_layout, preactivation_buffer, row_offsets,
                                 sparse_decode)
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
    largest entries, and the cut is taken over all offers. `floor`: see candidates_above."""
    cut = _cut_and_candidates(pre, k, spread, global_rows, floor)[0]
    return torch.where(pre >= cut, pre, 0.0), cut  # (a cut of 0 keeps every positive entry: ReLU)


def batch_selection(pre: torch.Tensor, k: int, spread: Collective = LOCAL, global_rows: int | None = None,
                    floor: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """batch_topk's selection as (positions in pre.flatten() of the kept entries, ascending, so
    row-major; the cut)."""
    cut, positions, pool = _cut_and_candidates(pre, k, spread, global_rows, floor)
    if positions is None:
        return (pre.detach().flatten() >= cut).nonzero().squeeze(1), cut
    # the cut is at least this process's budget-th largest, which is above the floor: all are candidates
    return positions[pool >= cut], cut


def _cut_and_candidates(pre, k, spread, global_rows, floor):
    """(the cut, positions of the candidates or None for all entries, their values)."""
    budget = k * (global_rows or pre.shape[0])
    positions, pool = candidate_pool(pre.detach().flatten(), budget, floor)
    offers = largest_entries(pool, budget)
    if spread.size > 1:
        offers = largest_entries(spread.gather(offers).flatten(), budget)
    return offers.min().clamp_min(0), positions, pool  # the cut of the ReLU'd entries: ReLU keeps the order


def largest_entries(flat: torch.Tensor, budget: int, floor: float | None = None) -> torch.Tensor:
    """The `budget` largest entries of `flat`, in no order; exactly those of a full topk."""
    pool = candidate_pool(flat, budget, floor)[1]
    return pool.topk(min(budget, pool.numel()), sorted=False).values


def candidate_pool(flat: torch.Tensor, budget: int, floor: float | None) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(positions of the candidates, or None for all of `flat`; their values)."""
    positions = candidates_above(flat, budget, floor)
    return positions, flat if positions is None else flat[positions]


def candidates_above(flat: torch.Tensor, budget: int, floor: float | None) -> torch.Tensor | None:
    """Positions of the entries above `floor` when there are at least `budget` of them (then they
    hold the budget largest, found by a far smaller topk than over all of `flat`: the cut moves
    little from one step to the next), else None. Syncs with the host: pass a floor on CPU only."""
    if floor is None or floor <= 0:
        return None
    positions = (flat > floor).nonzero().squeeze(1)
    return positions if len(positions) >= budget else None


class KeptEntries(NamedTuple):
    """A batch's kept entries, row-major: values [n] (with their gradient), latents and rows [n],
    offsets [batch] (where each row's entries start), the cut, and their layout by latent."""

    values: torch.Tensor
    latents: torch.Tensor
    rows: torch.Tensor
    offsets: torch.Tensor
    cut: torch.Tensor
    layout: ActiveLayout


class _BatchTopKEncode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, b_dec, W_enc, b_enc, select: Callable, aux_columns, extra: list):
        """x: [B, D] data (no gradient); b_dec: [D]; W_enc: [D, d_sae]; select(pre) -> batch_selection.
        Returns values [n], latents [n], offsets [B], pre-activations of aux_columns [B, n_aux];
        appends rows, cut and the layout to `extra`."""
        pre = torch.addmm(b_enc, x - b_dec, W_enc, out=preactivation_buffer(x, W_enc))
        positions, cut = select(pre)
        rows, latents = positions // pre.shape[1], positions % pre.shape[1]
        values = pre.flatten()[positions]
        pre_aux = pre.index_select(1, aux_columns)
        layout = entries_layout(latents, rows, W_enc.shape[1], len(x))
        extra.extend([rows, cut, layout])
        ctx.layout = layout
        ctx.save_for_backward(x, b_dec, W_enc, latents, aux_columns)
        offsets = row_offsets(rows, len(x))
        ctx.mark_non_differentiable(latents, offsets)
        return values, latents, offsets, pre_aux

    @staticmethod
    def backward(ctx, grad_values, _grad_latents, _grad_offsets, grad_pre_aux):
        x, b_dec, W_enc, latents, aux_columns = ctx.saved_tensors
        grads = encoder_backward(x, b_dec, W_enc, grad_values, latents, ctx.layout, aux_columns, grad_pre_aux)
        return None, *grads, None, None, None


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
        return self.batch_ranking(batch_topk, pre)

    def select_positions(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The same selection as (positions in pre.flatten(), cut), for the sparse kernels."""
        return self.batch_ranking(batch_selection, pre)

    def batch_ranking(self, rank, pre: torch.Tensor):
        """rank(pre, ...) over this batch and the other processes' shares; on CPU it looks for the
        top entries above CANDIDATE_FLOOR x the last step's cut."""
        spread = self.rows if self.rows.size > 1 else self.latent_shards
        on_cpu = pre.device.type == "cpu" and not torch.compiler.is_compiling()  # (a host sync)
        floor = self.last_cut * CANDIDATE_FLOOR if on_cpu and self.last_cut is not None else None
        selected, cut = rank(pre, self.cfg.k, spread, len(pre) * self.rows.size, floor)
        if on_cpu:
            self.last_cut = cut.item()
        return selected, cut

    def kept_entries(self, x: torch.Tensor, aux_columns: torch.Tensor | None) -> tuple[KeptEntries, torch.Tensor]:
        """A training batch's selection by the sparse kernels: (kept entries, pre-activations of the aux
        columns). x: a table [batch, n_columns, d_in], no gradient."""
        if aux_columns is None:
            aux_columns = torch.zeros(0, dtype=torch.long, device=x.device)
        centre = self.input_centre().flatten()
        extra: list = []
        W_enc = self.W_enc.flatten(1).t()
        values, latents, offsets, pre_aux = _BatchTopKEncode.apply(
            self.inputs_of(x).flatten(1).detach(), centre, W_enc, self.b_enc, self.select_positions, aux_columns,
            extra)
        rows, cut, layout = extra
        return KeptEntries(values, latents, rows, offsets, cut, layout), pre_aux

    def forward_sources(self, x: torch.Tensor, dead_latents: torch.Tensor | None = None) -> SAEOutput:
        if self.training and not x.requires_grad:
            return self.sparse_forward(x, dead_latents)
        pre = self.pre_activations(x)
        latents = self.encode_for_loss(pre)
        x_hat = self.decode(latents, x)
        mse = squared_error(x_hat, self.targets_of(x))
        sparsity = self.batch_sparsity(latents)
        aux_columns = dead_latents if self.cfg.aux_coef > 0 else None
        pre_aux = pre[:, aux_columns] if aux_columns is not None else None
        aux = self.auxk_loss(x, x_hat, pre_aux, aux_columns, self.W_dec.flatten(1))
        return SAEOutput(x_hat, latents, mse, sparsity, aux)

    def sparse_forward(self, x: torch.Tensor, dead_latents: torch.Tensor | None) -> SAEOutput:
        """forward_sources of a training step, through the sparse kernels (same loss and gradients)."""
        aux_columns = dead_latents if self.cfg.aux_coef > 0 else None
        kept, pre_aux = self.kept_entries(x, aux_columns)
        self.update_threshold(kept.cut)
        W_dec = self.W_dec.flatten(1)
        x_hat = self.sum_over_latents(sparse_decode(kept.values, kept.latents, W_dec, kept.layout, kept.offsets))
        x_hat = x_hat.view(len(x), self.n_sources, self.d_in) + self.output_offset(x)
        mse = squared_error(x_hat, self.targets_of(x))
        aux = self.auxk_loss(x, x_hat, pre_aux, aux_columns, W_dec)
        return SAEOutput(x_hat, kept.values, mse, self.entries_sparsity(kept, len(x)), aux, kept.latents, kept.rows)

    def entries_sparsity(self, kept: KeptEntries, batch: int) -> torch.Tensor:
        """batch_sparsity of the kept entries."""
        with self.penalty_gradient():
            norms = self.decoder_norms().sum(dim=1)
            return self.sum_over_latents((kept.values * norms[kept.latents]).sum() / batch)

    def penalty_gradient(self):
        """Grad mode for the L1 term: a penalty with its gradient when sparsity_coef is set, else only a
        metric (no backward through it)."""
        return torch.set_grad_enabled(torch.is_grad_enabled() and self.cfg.sparsity_coef > 0)

    def encode_for_loss(self, pre: torch.Tensor) -> torch.Tensor:
        """The latents a forward trains or evaluates on; while training, moves θ's estimate."""
        if not self.training:
            return self.activation(pre)
        latents, cut = self.select(pre)
        self.update_threshold(cut)
        return latents

    def batch_sparsity(self, latents: torch.Tensor) -> torch.Tensor:
        """sparsity_of the dense codes (see penalty_gradient)."""
        with self.penalty_gradient():
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
