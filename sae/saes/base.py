"""The sparse coder shared by every SAE type: one latent space over S sources.

Shapes: x [batch, n_sources, d_in]; latents f [batch, d_sae]; W_enc and W_dec are both
[d_sae, n_sources, d_in] (latent-major, so the sparse TopK kernels read and write contiguous
rows). A plain SAE is n_sources=1; a crosscoder (Anthropic 2024) has one encoder per source,
summed, and one decoder per source:
    pre  = sum_s (x_s - b_dec_s) @ W_enc[:, s].T + b_enc
    x̂_s  = f @ W_dec[:, s] + b_dec_s
Subclasses choose the activation f = act(pre) and may add an auxiliary loss.

A transcoder (sae.target_hookpoint set) reads one hook and predicts another: its table rows hold
the S input columns and then the S target columns ([batch, 2 S, d_in]); the encoder centres the
inputs by its own b_in (not b_dec), the decoder predicts the targets, and a skip transcoder adds a
linear map of the input per source (Paulo et al. 2025):
    pre  = sum_s (x_s - b_in_s) @ W_enc[:, s].T + b_enc
    ŷ_s  = f @ W_dec[:, s] + b_dec_s (+ W_skip[s] @ x_s)
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from sae.world import LOCAL, Collective


@dataclass
class SAEConfig:
    """`sae.*` keys shared by every SAE type."""

    type: str = "vanilla"
    sparse_dim: int = 512  # d_sae, the dictionary size
    sparsity_coef: float = 0.0  # λ on sum_i f_i * sum_s ||W_dec[i, s]|| (the L1 penalty)
    sparsity_warmup_steps: int = 0  # λ ramps linearly from 0 over these steps
    normalize: bool = True  # scale each source once so E||x||^2 = d_in; folded back when saved
    dead_window: int = 100_000  # a latent that has not fired for this many tokens is dead
    init_decoder_norm: float = 1.0
    # dead-latent resampling (sae/training/resample.py): every this many steps (null: never) ...
    resample_every: int | None = None
    resample_until: float = 0.5  # ... while step <= this fraction of num_steps, and never in the last interval
    resample_encoder_scale: float = 0.2  # a restarted encoder row's norm, x the alive latents' mean
    # transcoder: read input_hookpoint, predict target_hookpoint of the same layer (null: an SAE)
    input_hookpoint: Optional[str] = None
    target_hookpoint: Optional[str] = None
    skip: bool = False  # skip transcoder: a learned linear map from input to target beside the latents

    def __post_init__(self) -> None:
        own_type = next(f.default for f in fields(self) if f.name == "type")
        if self.type != own_type:  # the class decides the architecture; `type` only names it in files
            raise ValueError(f"sae.type is set by the sae group, not overridden: this is a {own_type} config "
                             f"(sae={own_type}), got sae.type={self.type}; "
                             f"choose another architecture with sae={self.type}")
        if self.sparse_dim <= 0:
            raise ValueError(f"sae.sparse_dim must be > 0, got {self.sparse_dim}")
        if self.sparsity_coef < 0:
            raise ValueError(f"sae.sparsity_coef must be >= 0, got {self.sparsity_coef}")
        if self.sparsity_warmup_steps < 0:
            raise ValueError(f"sae.sparsity_warmup_steps must be >= 0, got {self.sparsity_warmup_steps}")
        if self.dead_window <= 0:
            raise ValueError(f"sae.dead_window must be > 0, got {self.dead_window}")
        if self.init_decoder_norm <= 0:
            raise ValueError(f"sae.init_decoder_norm must be > 0, got {self.init_decoder_norm}")
        if self.resample_every is not None and self.resample_every <= 0:
            raise ValueError(f"sae.resample_every must be > 0 (steps) or null (never), got {self.resample_every}")
        if not 0 < self.resample_until <= 1:
            raise ValueError(f"sae.resample_until must be in (0, 1] (a fraction of num_steps), "
                             f"got {self.resample_until}")
        if self.resample_encoder_scale <= 0:
            raise ValueError(f"sae.resample_encoder_scale must be > 0, got {self.resample_encoder_scale}")
        if (self.input_hookpoint is None) != (self.target_hookpoint is None):
            raise ValueError("a transcoder names both sae.input_hookpoint and sae.target_hookpoint (an SAE "
                             f"neither), got input_hookpoint={self.input_hookpoint}, "
                             f"target_hookpoint={self.target_hookpoint}")
        if self.skip and not self.transcoder:
            raise ValueError("sae.skip=true needs a transcoder (sae.input_hookpoint and sae.target_hookpoint "
                             "set, e.g. sae=transcoder)")

    @property
    def transcoder(self) -> bool:
        return self.target_hookpoint is not None


WEIGHTS_FORMAT = 2  # W_enc [d_sae, n_sources, d_in] (format 1, [n_sources, d_in, d_sae], is refused on load)


class SAEOutput(NamedTuple):
    x_hat: torch.Tensor  # [batch, n_sources, d_in] reconstruction
    # [batch, d_sae] codes; [batch, k] values of the active latents if `indices` is set (sparse TopK path);
    # [n] values of the kept entries if `rows` is set too (sparse BatchTopK path: any number per row)
    latents: torch.Tensor
    mse: torch.Tensor  # scalar: squared error summed over sources and d_in, mean over batch
    sparsity: torch.Tensor  # scalar: sum_i f_i * sum_s ||W_dec[i, s]||, mean over batch
    aux: torch.Tensor  # scalar: auxiliary loss (AuxK for TopK; 0 otherwise)
    indices: torch.Tensor | None = None  # which latents `latents` holds: [batch, k], or [n] with `rows`
    rows: torch.Tensor | None = None  # [n] the batch row of each entry (sparse BatchTopK path)

    def l0(self) -> torch.Tensor:
        """[batch] number of nonzero latents per row."""
        if self.rows is None:
            return (self.latents != 0).sum(dim=1).float()
        counts = torch.zeros(len(self.x_hat), device=self.latents.device)
        return counts.index_add_(0, self.rows, (self.latents != 0).float())

    def dense_latents(self, d_sae: int) -> torch.Tensor:
        """[batch, d_sae] codes, whichever form `latents` holds."""
        if self.indices is None:
            return self.latents
        codes = self.latents.new_zeros(len(self.x_hat), d_sae)
        if self.rows is None:
            return codes.scatter_(1, self.indices, self.latents)
        return codes.index_put_((self.rows, self.indices), self.latents)

    def fire_counts(self, d_sae: int) -> torch.Tensor:
        """[d_sae] how many rows of the batch each latent fired on (no host sync)."""
        if self.indices is None:
            return (self.latents > 0).sum(dim=0).float()
        counts = torch.zeros(d_sae, device=self.latents.device)
        return counts.index_add_(0, self.indices.flatten(), (self.latents > 0).flatten().float())

    def fired(self, d_sae: int) -> torch.Tensor:
        """[d_sae] bool: latents that fired on some row of the batch."""
        return self.fire_counts(d_sae) > 0


class _SumOverShards(torch.autograd.Function):
    """Forward: the sum of every process's partial (each holds some latents' share). Backward:
    the gradient as is (every process computes the same loss from the same sum)."""

    @staticmethod
    def forward(ctx, partial, group):
        return group.sum(partial.clone())

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _SharedInput(torch.autograd.Function):
    """Forward: a replicated tensor as is. Backward: the sum of every process's gradient (each
    process's latents contribute their share of it)."""

    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        return tensor.clone()

    @staticmethod
    def backward(ctx, grad):
        return ctx.group.sum(grad.clone()), None


def reaches_global_topk(values: torch.Tensor, k: int, group: Collective, width: int | None = None) -> torch.Tensor:
    """values: [batch, m] this process's candidates for each row's top k over the whole dictionary
    (its own top k) -> bool mask of those that are in the global top k (ties at the k-th value all
    pass). width: pad every process's offer to this many with -inf (when m differs per process)."""
    offers = values.detach()
    if width is not None and offers.shape[1] < width:
        offers = torch.cat([offers, offers.new_full((len(offers), width - offers.shape[1]), float("-inf"))], dim=1)
    everyone = group.gather(offers).permute(1, 0, 2).flatten(1)  # [batch, size x width]
    kth = everyone.topk(min(k, everyone.shape[1]), dim=1, sorted=False).values.min(dim=1, keepdim=True).values
    return values >= kth


def squared_error(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """||x_hat - x||^2 summed over sources and features, mean over the batch (one fused kernel each way)."""
    return F.mse_loss(x_hat, x, reduction="sum") / len(x)


def total_variance(x: torch.Tensor, rows: Collective = LOCAL) -> torch.Tensor:
    """sum over rows and features of (x - column mean)^2, over the global batch when its rows are
    split over `rows` (no gradient: for normalising)."""
    x = x.detach()
    if rows.size == 1:
        return (x - x.mean(dim=0)).pow(2).sum().clamp_min(1e-12)
    mean = (rows.sum(x.sum(dim=0).double()) / (len(x) * rows.size)).to(x.dtype)
    return rows.sum((x - mean).pow(2).sum()).clamp_min(1e-12)


class SparseCoder(nn.Module):
    # The processes a training step is spread over (sae.parallel sets them; LOCAL: this one).
    # rows: the global batch is split into equal slices over these (data parallel); latents: the
    # dictionary's rows are split over these (latent sharding). Losses are global-batch losses.
    rows: Collective = LOCAL
    latent_shards: Collective = LOCAL

    def __init__(self, cfg: SAEConfig, n_sources: int, d_in: int):
        super().__init__()
        self.cfg, self.n_sources, self.d_in = cfg, n_sources, d_in
        self.d_sae = self.dictionary_size(cfg, n_sources)
        self.transcoder = cfg.transcoder
        self.n_columns = 2 * n_sources if self.transcoder else n_sources  # of a table row: inputs (+ targets)
        W_dec = torch.randn(self.d_sae, n_sources, d_in)
        W_dec *= cfg.init_decoder_norm / W_dec.flatten(1).norm(dim=1)[:, None, None]
        self.W_dec = nn.Parameter(W_dec)
        self.W_enc = nn.Parameter(W_dec.clone())  # encoder starts as the decoder transpose
        self.b_enc = nn.Parameter(torch.zeros(self.d_sae))
        self.b_dec = nn.Parameter(torch.zeros(n_sources, d_in))
        if self.transcoder:
            self.b_in = nn.Parameter(torch.zeros(n_sources, d_in))  # centres the input (b_dec is the target's)
        if cfg.skip:
            self.W_skip = nn.Parameter(torch.zeros(n_sources, d_in, d_in))  # [s, target, input]; starts off

    @staticmethod
    def dictionary_size(cfg: SAEConfig, n_sources: int) -> int:
        """How many latents the dictionary has: sae.sparse_dim (a cross-layer transcoder: per layer)."""
        return cfg.sparse_dim

    # -- a table row: the input columns, then (transcoders) the target columns ------------------
    def inputs_of(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder's input [batch, n_sources, d_in] of a table [batch, n_columns, d_in] (or of
        inputs alone, which come back as they are)."""
        return x[:, :self.n_sources] if self.transcoder and x.shape[1] == self.n_columns else x

    def targets_of(self, x: torch.Tensor) -> torch.Tensor:
        """What the decoder reconstructs, [batch, n_sources, d_in], of a table [batch, n_columns, d_in]."""
        return x[:, self.n_sources:] if self.transcoder else x

    def input_centre(self) -> torch.Tensor:
        """[n_sources, d_in] subtracted from the input before the encoder: b_dec for an SAE, b_in for
        a transcoder."""
        return self.shared_input(self.b_in if self.transcoder else self.b_dec)

    def output_offset(self, x: torch.Tensor) -> torch.Tensor:
        """What the decoder adds besides the latents' sum: b_dec, plus the skip path W_skip x of the
        input (skip transcoders). x: a table or the inputs; -> [n_sources, d_in] or [batch, ...]."""
        if not self.cfg.skip:
            return self.b_dec
        return self.b_dec + torch.einsum("bsi,soi->bso", self.inputs_of(x), self.W_skip)

    # -- the maths ---------------------------------------------------------------------------
    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """x: [batch, n_sources, d_in] inputs, or a transcoder's whole table -> [batch, d_sae]."""
        centred = (self.inputs_of(x) - self.input_centre()).flatten(1)
        return torch.addmm(self.b_enc, centred, self.W_enc.flatten(1).t())

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def as_sources(self, x: torch.Tensor, columns: tuple[int, ...] | None = None) -> torch.Tensor:
        """x as [batch, columns, d_in]: that shape as is, [batch, d_in] for one column; any other shape
        is refused (no silent broadcasting). columns: the widths accepted (default: a table row's)."""
        columns = tuple(dict.fromkeys(columns or (self.n_columns,)))  # (a plain SAE's two widths are one)
        if x.dim() == 3 and x.shape[1] in columns and x.shape[2] == self.d_in:
            return x
        if x.dim() == 2 and columns[0] == 1 and x.shape[1] == self.d_in:
            return x[:, None]
        accepted = " or ".join(f"[batch, {c}, {self.d_in}]" for c in columns)
        accepted += f" or [batch, {self.d_in}]" if columns[0] == 1 else ""
        what = "transcoder (inputs, or inputs then targets)" if self.transcoder else "SAE"
        raise ValueError(f"input of shape {tuple(x.shape)}: this {what} takes {accepted}")

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x: [batch, n_sources, d_in] (or [batch, d_in], one source; a transcoder also takes its
        whole table) -> dense codes [batch, d_sae]."""
        return self.activation(self.pre_activations(self.as_sources(x, (self.n_sources, self.n_columns))))

    def decode(self, latents: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """latents: [batch, d_sae] -> [batch, n_sources, d_in]. A skip transcoder adds its skip path
        when given the input x (a table or the inputs); without it, only the latents' part + b_dec."""
        decoded = self.sum_over_latents(latents @ self.W_dec.flatten(1)).view(-1, self.n_sources, self.d_in)
        return decoded + (self.b_dec if x is None else self.output_offset(x))

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """From inputs alone ([batch, n_sources, d_in], or [batch, d_in] for one source): an SAE's
        reconstruction, a transcoder's prediction of its target (skip path included)."""
        inputs = self.as_sources(x, (self.n_sources,))
        out = self.decode(self.encode(inputs), inputs)
        return out[:, 0] if x.dim() == 2 else out

    def decoder_norms(self) -> torch.Tensor:
        """[d_sae, n_sources]: ||W_dec[i, s]||."""
        return self.W_dec.norm(dim=-1)

    def forward(self, x: torch.Tensor, dead_latents: torch.Tensor | None = None) -> SAEOutput:
        """x: [batch, n_sources, d_in], or [batch, d_in] for a one-source SAE (x_hat then comes back
        2-D too). out.latents: dense codes [batch, d_sae], or on TopK's sparse path the k values per
        row [batch, k] with out.indices [batch, k], or on BatchTopK's the kept entries [n] with
        out.indices and out.rows [n]; out.dense_latents(d_sae) gives [batch, d_sae] either way.
        dead_latents: [n_dead] indices of dead latents (for auxiliary losses), or None."""
        out = self.forward_sources(self.as_sources(x), dead_latents)
        return out._replace(x_hat=out.x_hat[:, 0]) if x.dim() == 2 else out

    def forward_sources(self, x: torch.Tensor, dead_latents: torch.Tensor | None = None) -> SAEOutput:
        """The forward on a table x: [batch, n_columns, d_in] (architectures override this, not forward);
        out.x_hat reconstructs targets_of(x)."""
        pre = self.pre_activations(x)
        latents = self.activation(pre)
        x_hat = self.decode(latents, x)
        mse = squared_error(x_hat, self.targets_of(x))
        return SAEOutput(x_hat, latents, mse, self.sparsity_of(latents), x.new_zeros(()))

    def sparsity_of(self, latents: torch.Tensor) -> torch.Tensor:
        """The L1 penalty of dense codes [batch, d_sae]: sum_i f_i * sum_s ||W_dec[i, s]||, batch mean."""
        return self.sum_over_latents((latents * self.decoder_norms().sum(dim=1)).sum(dim=1).mean())

    # -- latent sharding: this process may hold only some of the latents (sae.parallel) ---------
    def shared_input(self, tensor: torch.Tensor) -> torch.Tensor:
        """A replicated tensor that this process's latents read: its gradient sums over shards."""
        return tensor if self.latent_shards.size == 1 else _SharedInput.apply(tensor, self.latent_shards)

    def sum_over_latents(self, partial: torch.Tensor) -> torch.Tensor:
        """A sum over latents computed from this process's share: the sum over all shards."""
        return partial if self.latent_shards.size == 1 else _SumOverShards.apply(partial, self.latent_shards)

    # -- training hooks (no-ops unless the architecture constrains its decoder) ----------------
    def before_optimizer_step(self) -> None:
        pass

    def after_optimizer_step(self) -> None:
        pass

    @torch.no_grad()
    def restart_latents(self, latents: torch.Tensor) -> None:
        """Dead-latent resampling rewrote these latents' encoder, decoder and b_enc: put any other
        per-latent parameter back to its initial value (none here)."""

    def sharded_parameters(self) -> set[str]:
        """Parameters whose first dimension is the latent (what latent sharding splits)."""
        return {"W_enc", "W_dec", "b_enc"}

    @torch.no_grad()
    def init_b_dec(self, mean: torch.Tensor) -> None:
        """mean: [n_columns, d_in], the data mean (a transcoder's b_in takes the inputs' part)."""
        self.b_dec.copy_(self.targets_of(mean[None])[0])
        if self.transcoder:
            self.b_in.copy_(self.inputs_of(mean[None])[0])

    @torch.no_grad()
    def init_from_data(self, sample: torch.Tensor) -> None:
        """Initialisation that needs data besides b_dec (after init_b_dec); sample: [rows, n_sources,
        d_in] training rows, normalised as training sees them. Nothing for most architectures."""

    @torch.no_grad()
    def calibrate_for_inference(self, sample: torch.Tensor) -> None:
        """Set what inference needs from the data before the dictionary is evaluated or saved;
        sample: as init_from_data's. Nothing for most architectures (BatchTopK: its threshold)."""

    @torch.no_grad()
    def fold_input_scale(self, scale: torch.Tensor) -> None:
        """Absorb a per-column input scale c (the model saw c_s * x_s, [n_columns]) so it takes raw x_s;
        a transcoder's input columns scale the encoder, its target columns the decoder."""
        c_in, c_out = self.inputs_of(scale[None, :, None])[0, :, 0], self.targets_of(scale[None, :, None])[0, :, 0]
        self.W_enc.mul_(c_in[None, :, None])
        self.W_dec.div_(c_out[None, :, None])
        self.b_dec.div_(c_out[:, None])
        if self.transcoder:
            self.b_in.div_(c_in[:, None])
        if self.cfg.skip:
            self.W_skip.mul_((c_in / c_out)[:, None, None])  # per-source scalars: ŷ/c_out = W_skip (c_in x)/c_out


class UnitNormDecoder:
    """Mixin: every decoder row has unit norm (over all sources together in a crosscoder): the
    gradient's radial part is removed before the step and the rows renormalised after it."""

    W_dec: nn.Parameter

    @torch.no_grad()
    def before_optimizer_step(self) -> None:
        if self.W_dec.grad is None:
            return
        W, G = self.W_dec.flatten(1), self.W_dec.grad.flatten(1)
        W_unit = W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)
        G -= (G * W_unit).sum(dim=1, keepdim=True) * W_unit

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        norms = self.W_dec.flatten(1).norm(dim=1).clamp_min(1e-12)
        self.W_dec.div_(norms[:, None, None])
