"""Sparse kernels for TopK coders: after the top-k selection only the k active latents of each
row do any work, in the forward and the backward pass.

    topk_encode   pre = (x - b_dec) @ W_enc + b_enc is dense (every pre-activation is needed to
                  pick the top k), then top-k + ReLU. Backward touches only the active entries:
                  grad W_enc through a CSR [d_sae, batch] x [batch, D] product, grad b_enc by
                  index_add, grad b_dec as -W_enc @ (grad b_enc) (a mat-vec: x is data and needs
                  no gradient). Optionally also returns the pre-activations of a few extra columns
                  (AuxK's dead latents) with their exact gradient.
    sparse_decode x_hat = sum_j values_j * W_dec[index_j]: an embedding-bag gather, never the
                  dense [batch, d_sae] x [d_sae, D] product; grad W_dec through the same CSR
                  product, grad values as a sampled dense-dense product (CSR pattern).

The one dense product per step is the encoder's forward matmul (a dense TopK step does six of
that size). The CSR layout of the active entries is built once per step and shared by both
backward passes. CPU and CUDA both have embedding_bag and CSR matmul.
"""
from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F

from sae.saes.row_topk import row_topk

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")

class ActiveLayout(NamedTuple):
    """The active entries, grouped by latent (CSR of the transpose of the [batch, d_sae] codes)."""

    crow: torch.Tensor  # [d_sae + 1] start of each latent's entries
    rows: torch.Tensor  # [n] batch row of each entry, grouped by latent
    order: torch.Tensor  # [n] position of each entry in the flattened entries (indices.flatten())
    d_sae: int
    batch: int


def active_layout(indices: torch.Tensor, d_sae: int) -> ActiveLayout:
    """Of a [batch, k] index matrix: k entries in every row."""
    batch, k = indices.shape
    rows = torch.arange(batch, device=indices.device).repeat_interleave(k)
    return entries_layout(indices.flatten(), rows, d_sae, batch)


def entries_layout(latents: torch.Tensor, rows: torch.Tensor, d_sae: int, batch: int) -> ActiveLayout:
    """Of entries given as (latent, row) pairs, [n] each, any number per row."""
    order = latents.argsort()  # any order within a latent gives the same sums up to rounding
    crow = torch.zeros(d_sae + 1, dtype=torch.long, device=latents.device)
    crow[1:] = torch.bincount(latents, minlength=d_sae).cumsum(0)
    return ActiveLayout(crow, rows[order], order, d_sae, batch)


def row_offsets(rows: torch.Tensor, batch: int) -> torch.Tensor:
    """[batch] where each row's entries start, for entries sorted by row (rows [n])."""
    counts = torch.bincount(rows, minlength=batch)
    return counts.cumsum(0) - counts


def _csr(layout: ActiveLayout, values_in_layout_order: torch.Tensor) -> torch.Tensor:
    return torch.sparse_csr_tensor(layout.crow, layout.rows, values_in_layout_order,
                                   size=(layout.d_sae, layout.batch), check_invariants=False)


def active_outer(values: torch.Tensor, layout: ActiveLayout, dense: torch.Tensor) -> torch.Tensor:
    """L^T @ dense for the latent matrix L ([batch, d_sae], `values` at the active entries):
    [d_sae, D] at O(batch * k * D) cost."""
    return torch.sparse.mm(_csr(layout, values.flatten()[layout.order].to(dense.dtype)), dense)


def active_dots(W: torch.Tensor, dense: torch.Tensor, layout: ActiveLayout, shape: torch.Size) -> torch.Tensor:
    """<W[i], dense[b]> for every active entry (b, i): [batch, k], as a sampled dense-dense product
    (no [batch, k, D] gather)."""
    pattern = _csr(layout, torch.zeros(len(layout.rows), dtype=dense.dtype, device=dense.device))
    dots = torch.sparse.sampled_addmm(pattern, W.to(dense.dtype), dense.t(), beta=0.0).values()
    out = torch.empty_like(dots)
    out[layout.order] = dots
    return out.view(shape)


class _TopKEncode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, b_dec, W_enc, b_enc, k: int, aux_columns, layout_out: list):
        """x: [B, D] data (no gradient); b_dec: [D]; W_enc: [D, d_sae] -> values [B, k] (ReLU'd),
        indices [B, k], pre-activations of aux_columns [B, n_aux]. The active layout is appended
        to layout_out for sparse_decode to reuse."""
        pre = torch.addmm(b_enc, x - b_dec, W_enc, out=preactivation_buffer(x, W_enc))
        values, indices = row_topk(pre, k)
        values = values.relu()
        pre_aux = pre.index_select(1, aux_columns)
        layout = active_layout(indices, W_enc.shape[1])
        layout_out.append(layout)
        ctx.layout = layout
        ctx.save_for_backward(x, b_dec, W_enc, values, indices, aux_columns)
        ctx.mark_non_differentiable(indices)
        return values, indices, pre_aux

    @staticmethod
    def backward(ctx, grad_values, _grad_indices, grad_pre_aux):
        x, b_dec, W_enc, values, indices, aux_columns = ctx.saved_tensors
        grad_b_dec, grad_W, grad_b_enc = encoder_backward(x, b_dec, W_enc, grad_values * (values > 0), indices,
                                                          ctx.layout, aux_columns, grad_pre_aux)  # through the ReLU
        return None, grad_b_dec, grad_W, grad_b_enc, None, None, None


def encoder_backward(x, b_dec, W_enc, grad_entries, latents, layout: ActiveLayout, aux_columns, grad_pre_aux):
    """Gradients (b_dec, W_enc, b_enc) of an encoder whose pre-activations reached the loss only at the
    active entries (grad_entries, at latents; any shape, flattened alike) and at the aux columns."""
    # under autocast the forward ran in low precision; the weight gradients are computed in theirs
    g = grad_entries.to(W_enc.dtype)
    grad_pre_aux = grad_pre_aux.to(W_enc.dtype) if grad_pre_aux is not None else None
    grad_b_enc = torch.zeros(W_enc.shape[1], dtype=g.dtype, device=g.device)
    grad_b_enc.index_add_(0, latents.flatten(), g.flatten())
    centred = x - b_dec
    grad_W = active_outer(g, layout, centred)  # [d_sae, D]
    if aux_columns.numel() and grad_pre_aux is not None:
        grad_W.index_add_(0, aux_columns, (centred.t() @ grad_pre_aux).t())
        grad_b_enc.index_add_(0, aux_columns, grad_pre_aux.sum(0))
    grad_b_dec = -(W_enc @ grad_b_enc.to(W_enc.dtype))  # d/d b_dec of sum over rows of (x - b_dec) @ W_enc
    return grad_b_dec, grad_W.t(), grad_b_enc


_BUFFERS: dict[tuple, torch.Tensor] = {}


def preactivation_buffer(x: torch.Tensor, W_enc: torch.Tensor) -> torch.Tensor | None:
    """A reused [batch, d_sae] buffer for the pre-activations on CPU (None: let addmm allocate).
    A fresh tensor of that size is a fresh mmap each step and its page faults cost ~40% of the
    matmul at (128, 2048, 16); the buffer is dead once the forward has picked the top k."""
    if x.device.type != "cpu" or torch.is_autocast_enabled("cpu") or x.dtype != W_enc.dtype:
        return None
    key = (len(x), W_enc.shape[1], x.dtype)
    if key not in _BUFFERS:
        _BUFFERS.clear()  # one size at a time (training); evaluation sizes come and go
        _BUFFERS[key] = torch.empty(key[:2], dtype=x.dtype)
    return _BUFFERS[key]


def topk_encode(x: torch.Tensor, b_dec: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, k: int,
                aux_columns: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, ActiveLayout]:
    """(values [B, k], indices [B, k], pre-activations of aux_columns [B, n_aux], active layout)."""
    if aux_columns is None:
        aux_columns = torch.zeros(0, dtype=torch.long, device=x.device)
    layout_out: list[ActiveLayout] = []
    values, indices, pre_aux = _TopKEncode.apply(x.detach(), b_dec, W_enc, b_enc, k, aux_columns, layout_out)
    return values, indices, pre_aux, layout_out[0]


class _SparseDecode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, indices, W_dec, layout, offsets):
        """values, indices: [B, k] (offsets None), or [n] entries whose rows start at offsets [B];
        W_dec: [d_sae, D] -> [B, D]."""
        ctx.layout = layout
        ctx.save_for_backward(values, indices, W_dec)
        return F.embedding_bag(indices, W_dec, offsets, per_sample_weights=values.to(W_dec.dtype), mode="sum")

    @staticmethod
    def backward(ctx, grad_out):
        values, indices, W_dec = ctx.saved_tensors
        grad_out = grad_out.to(W_dec.dtype)
        grad_values = grad_W = None
        layout = ctx.layout if ctx.layout is not None else active_layout(indices, W_dec.shape[0])
        if ctx.needs_input_grad[0]:  # <W_dec[index], grad_out[row]> per active entry
            grad_values = active_dots(W_dec, grad_out, layout, indices.shape).to(values.dtype)
        if ctx.needs_input_grad[2]:
            grad_W = active_outer(values, layout, grad_out)
        return grad_values, None, grad_W, None, None


def sparse_decode(values: torch.Tensor, indices: torch.Tensor, W_dec: torch.Tensor,
                  layout: ActiveLayout | None = None, offsets: torch.Tensor | None = None) -> torch.Tensor:
    """[B, D] = sum_j values[:, j] * W_dec[indices[:, j]]; `layout` (from topk_encode) saves a sort.
    With `offsets` [B] (and then a layout), values and indices are [n] entries, row b's from
    offsets[b] on (BatchTopK: any number per row)."""
    return _SparseDecode.apply(values, indices, W_dec, layout, offsets)
