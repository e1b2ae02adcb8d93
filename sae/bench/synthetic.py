"""SAE training benchmark: speed and dictionary quality, ours against a plain dense TopK reference.

    python scripts/benchmark.py                          # both default sizes, all implementations
    python scripts/benchmark.py --sizes 128,2048,16 --tokens 2e6 --impls topk,dense_topk

Data: synthetic activations with a known dictionary in superposition (Sharkey et al. 2022):
n_true = sparse_dim x --true-features (default 1) random unit features in d_in dimensions, each token
a sum of k/2 of them
(chosen uniformly) with magnitudes U(0, 1), plus 1% Gaussian noise, scaled so E||x||^2 = d_in.
Every implementation trains on the same tokens, one pass, with the same recipe as scripts/train.py
(fused AdamW, gradient clipping at 1.0, lr, batch).

Each (implementation, size) runs in a fresh process, so peak memory is its own: peak RSS on
CPU, torch.cuda.max_memory_allocated on CUDA. Tokens/s is the median over timed segments of
SEGMENT_STEPS steps after WARMUP_STEPS steps. Quality on 2^16 held-out tokens: FVU, L0, dead
fraction (latents that never fire), and against the true features: mean over true features of
the max cosine with any decoder row, and the fraction recovered (max cosine > 0.9).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
from queue import Empty
import resource
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sae.bench.correlated import correlated_activations, correlated_chunk_rows, scale_to_mean_square
from sae.bench.external import EXTERNAL, build_external, external_available
from sae.bench.hierarchy import HierarchicalData, absorption, hierarchical_activations, parents_per_token
from sae.saes import build_sae
from sae.activations.batches import calibration_sample
from sae.saes.base import SAEOutput, SparseCoder
from sae.saes.batchtopk import BatchTopKSAEConfig
from sae.saes.gated import GatedSAEConfig
from sae.saes.jumprelu import JumpReLUSAEConfig
from sae.saes.matryoshka import MatryoshkaSAEConfig
from sae.saes.topk import TopKSAEConfig
from sae.saes.vanilla import VanillaSAEConfig
from sae.hardware import DType, HardwareConfig
from sae.training.schedules import (Schedule, SchedulerConfig, lr_at, lr_for_sum, lr_problem, lr_sum_problem,
                                    sparsity_coef_at)
from sae.training import signum
from sae.training.resample import resample_dead_latents, resample_due
from sae.training.step import DeadLatents, make_optimizer, optimisation_step

GRAD_CLIP = 1.0  # scripts/train.py's default, so the timed step is the one training runs
# L1 coefficient for this data (sae=vanilla defaults to 5 on host activations); not tuned to TopK's L0
VANILLA_COEF = 1.0
WARMUP_STEPS = 3
SEGMENT_STEPS = 4
EVAL_TOKENS = 1 << 16
EVAL_CHUNK = 4096  # rows per evaluation matmul (tokens, or true features against every decoder row)
GIB = 2**30
DEFAULT_SIZES = ((128, 2048, 16), (512, 16384, 32))
IMPLEMENTATIONS = ("topk", "batchtopk", "matryoshka", "jumprelu", "dense_topk", "vanilla")
# more architectures, run when named in --impls: TopK transcoders (no skip / skip) and the gated SAE.
# A transcoder's target is a fixed random ReLU MLP of the input (synthetic_target); its quality is
# the FVU of that target (the true features live in the input space: no recovery score)
ARCHITECTURES = ("transcoder", "skip_transcoder", "gated")
TRANSCODERS = ("transcoder", "skip_transcoder")
# λ on L0 for this data (sae=jumprelu's default); not tuned to reach TopK's L0
JUMPRELU_COEF = 0.1


class DenseTopKReference(nn.Module):
    """A plain dense PyTorch TopK SAE, the way most code writes it: [batch, d_sae] codes, dense
    decode, autograd through everything. Same recipe as ours (tied init, unit-norm decoder rows with
    the parallel gradient removed, AuxK on dead latents) so quality compares like with like."""

    def __init__(self, d_in: int, d_sae: int, k: int, k_aux: int, aux_coef: float) -> None:
        super().__init__()
        self.d_sae, self.k, self.k_aux, self.aux_coef = d_sae, k, k_aux, aux_coef
        W_dec = torch.randn(d_sae, d_in)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec)
        self.W_enc = nn.Parameter(W_dec.t().clone())
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.b_dec = nn.Parameter(torch.zeros(d_in))

    def forward(self, x: torch.Tensor, dead_latents: torch.Tensor | None = None) -> SAEOutput:
        x = x[:, 0]
        pre = (x - self.b_dec) @ self.W_enc + self.b_enc
        values, indices = pre.topk(self.k, dim=-1, sorted=False)
        latents = torch.zeros_like(pre).scatter(-1, indices, values.relu())
        x_hat = latents @ self.W_dec + self.b_dec
        mse = (x_hat - x).pow(2).sum(dim=1).mean()
        aux = x.new_zeros(())
        if dead_latents is not None:
            dead = torch.zeros(self.d_sae, dtype=torch.bool, device=x.device)
            dead[dead_latents] = True
            aux_values, aux_indices = pre.masked_fill(~dead, float("-inf")).topk(
                min(self.k_aux, dead_latents.numel()), dim=-1, sorted=False)
            e = (x - x_hat).detach()
            e_hat = torch.zeros_like(pre).scatter(-1, aux_indices, aux_values.relu()) @ self.W_dec
            aux = self.aux_coef * (e_hat - e).pow(2).sum() / (e - e.mean(dim=0)).pow(2).sum().clamp_min(1e-12)
        return SAEOutput(x_hat[:, None], latents, mse, x.new_zeros(()), aux)

    @torch.no_grad()
    def before_optimizer_step(self) -> None:
        W_unit = self.W_dec / self.W_dec.norm(dim=1, keepdim=True)
        self.W_dec.grad -= (self.W_dec.grad * W_unit).sum(dim=1, keepdim=True) * W_unit

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True)

    def decoder_rows(self) -> torch.Tensor:
        return self.W_dec

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x).latents


DATA_GENERATORS = ("flat", "correlated")

@dataclass
class Case:
    impl: str
    d_in: int
    d_sae: int
    k: int
    batch: int
    tokens: int
    lr: float
    device: str
    threads: int
    dtype: str
    true_features: float = 1.0  # ground-truth features per latent
    vanilla_coef: float = VANILLA_COEF
    seed: int = 0
    jumprelu_coef: float = JUMPRELU_COEF
    bandwidth: float = 0.05  # JumpReLU's straight-through kernel width (sae.bandwidth)
    init_l0: int | None = None  # JumpReLU: θ from the data so the run starts at this L0 (sae.init_l0)
    # the recipe (ours and the dense reference; other libraries keep their own): scheduler.* and sae.* keys
    schedule: str = "constant"
    lr_sum: float | None = None  # set: the peak lr is the one whose per-step lrs sum to this (the trainer's lr_sum)
    warmup_fraction: float = 0.0
    min_lr_ratio: float = 0.0  # where linear_decay / cosine end, as a fraction of lr
    aux_coef: float = 1 / 32
    k_aux: int | None = None  # None: d_in rounded down to even, at most 512
    init_decoder_norm: float = 1.0
    beta2: float = 0.999
    b_dec_init: str = "mean"  # or "zeros": the decoder bias starts at the data mean (the trainer's) or at 0
    optimizer: str = "adam"  # or "signum": SignSGD under schedule-free averaging, sparsify's (sae/training/signum.py)
    dead_window: int | None = None  # tokens without firing before AuxK takes a latent on; None: an 8th of the run
    resample_every: int = 0  # dead-latent resampling every this many steps (sae.resample_every; 0: never)
    resample_until: float = 0.5  # sae.resample_until
    resample_scale: float = 0.2  # sae.resample_encoder_scale
    varied_complexity: bool = False  # a geometric number of features per token (mean k / 2) instead of exactly k / 2
    children: int = 0  # > 0: a feature hierarchy, each parent with this many children (sae/bench/hierarchy.py)
    token_features: int | None = None  # true features per token (on average); None: k / 2, the slack TopK gets
    data: str = "flat"  # or "correlated": firing spread 50x and correlated through a copula (sae/bench/correlated.py)
    copula_rank: int = 8  # correlated data: the copula's rank and strength (how many groups co-fire, how tightly)
    copula_rho: float = 0.5
    eval_every: int = 0  # also measure quality every this many steps (untimed; 0: only at the end)


def synthetic_activations(d_in: int, n_true: int, k_true: int, n: int, seed: int,
                          varied: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [n, d_in], true features [n_true, d_in]) from one seed. Each token sums k_true
    features, or with `varied` a geometric count of mean k_true (at most 4 k_true): rows that differ
    in complexity, ~13% of them with more than 2 k_true features (more than the benchmark's k), the
    case BatchTopK's per-batch budget is for."""
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(n_true, d_in, generator=generator)
    features /= features.norm(dim=1, keepdim=True)
    slots = 4 * k_true if varied else k_true
    chunks = []
    for start in range(0, n, 1 << 16):
        m = min(1 << 16, n - start)
        indices = torch.randint(n_true, (m, slots), generator=generator)
        magnitudes = torch.rand(m, slots, generator=generator)
        if varied:
            counts = (torch.empty(m, 1).geometric_(1 / k_true, generator=generator) if k_true > 1
                      else torch.ones(m, 1))  # 1, 2, ...: mean k_true
            magnitudes *= torch.arange(slots) < counts
        x = F.embedding_bag(indices, features, per_sample_weights=magnitudes, mode="sum")
        chunks.append(x + 0.01 * torch.randn(m, d_in, generator=generator))
    x = torch.cat(chunks)
    del chunks
    return scale_to_mean_square(x, d_in), features


def build(case: Case, k_aux: int, n_steps: int) -> nn.Module:
    if case.impl in EXTERNAL:
        return build_external(case.impl, case.d_in, case.d_sae, case.k, case.device)
    if case.impl == "dense_topk":
        return DenseTopKReference(case.d_in, case.d_sae, case.k, k_aux, case.aux_coef)
    topk_keys = dict(sparse_dim=case.d_sae, k=case.k, k_aux=k_aux, aux_coef=case.aux_coef,
                     init_decoder_norm=case.init_decoder_norm)
    if case.impl == "topk":
        cfg = TopKSAEConfig(**topk_keys)
    elif case.impl == "batchtopk":
        cfg = BatchTopKSAEConfig(**topk_keys)
    elif case.impl == "matryoshka":
        cfg = MatryoshkaSAEConfig(**topk_keys)
    elif case.impl in TRANSCODERS:
        cfg = TopKSAEConfig(**topk_keys, input_hookpoint="input", target_hookpoint="mlp_out",
                            skip=case.impl == "skip_transcoder")
    elif case.impl == "gated":
        cfg = GatedSAEConfig(sparse_dim=case.d_sae, sparsity_coef=case.vanilla_coef,
                             sparsity_warmup_steps=n_steps // 10)
    elif case.impl == "jumprelu":
        cfg = JumpReLUSAEConfig(sparse_dim=case.d_sae, sparsity_coef=case.jumprelu_coef,
                                sparsity_warmup_steps=n_steps // 10, bandwidth=case.bandwidth, init_l0=case.init_l0)
    else:
        cfg = VanillaSAEConfig(sparse_dim=case.d_sae, sparsity_coef=case.vanilla_coef,
                               sparsity_warmup_steps=n_steps // 10)
    return build_sae(cfg, 1, case.d_in)


def decoder_rows(sae: nn.Module) -> torch.Tensor:
    return sae.decoder_rows() if hasattr(sae, "decoder_rows") else sae.W_dec[:, 0]


def synthetic_target(x: torch.Tensor, seed: int) -> torch.Tensor:
    """A transcoder's target: a fixed random ReLU MLP (hidden 4 d_in, He-scaled, from the seed) of the
    tokens, scaled so E||y||^2 = d_in as the inputs are. -> [n, d_in]."""
    d_in = x.shape[1]
    generator = torch.Generator().manual_seed(seed + 1_000_003)
    W_in = torch.randn(d_in, 4 * d_in, generator=generator) * (2 / d_in) ** 0.5
    b_in = 0.1 * torch.randn(4 * d_in, generator=generator)
    W_out = torch.randn(4 * d_in, d_in, generator=generator) / (4 * d_in) ** 0.5
    y = torch.cat([torch.relu(chunk @ W_in.to(x) + b_in.to(x)) @ W_out.to(x) for chunk in x.split(1 << 16)])
    return y * (d_in / y.pow(2).sum(dim=1).mean()).sqrt()


@torch.no_grad()
def transcoder_quality(sae: SparseCoder, table: torch.Tensor) -> dict[str, float]:
    """FVU of the target predicted from the input, L0, dead fraction; table: [n, input + target, d_in]."""
    sae.eval()
    error, l0, fired = 0.0, [], torch.zeros(sae.d_sae, dtype=torch.bool, device=table.device)
    for chunk in table.split(4096):
        latents = sae.encode(chunk[:, :1])
        error += (sae.predict(chunk[:, :1]) - chunk[:, 1:]).pow(2).sum().item()
        l0.append((latents != 0).sum(dim=1).float())
        fired |= (latents > 0).any(dim=0)
    target = table[:, 1]
    nan = float("nan")
    return {"fvu": error / (target - target.mean(dim=0)).pow(2).sum().item(), "l0": torch.cat(l0).mean().item(),
            "dead_frac": 1 - fired.float().mean().item(), "mean_max_cos": nan, "recovered": nan}


@torch.no_grad()
def quality(sae: nn.Module, x_eval: torch.Tensor, features: torch.Tensor) -> dict[str, float]:
    if getattr(sae, "transcoder", False):
        return transcoder_quality(sae, x_eval)
    sae.eval()  # inference mode (BatchTopK: its threshold, not a batch ranking)
    x_hat, l0, fired = [], [], torch.zeros(sae.d_sae, dtype=torch.bool, device=x_eval.device)
    for chunk in x_eval.split(EVAL_CHUNK):
        latents = sae.encode(chunk[:, None])
        if hasattr(sae, "reconstruct"):  # another library: its own decode
            x_hat.append(sae.reconstruct(chunk[:, None]).float())
        else:
            x_hat.append(latents @ decoder_rows(sae) + (sae.b_dec if sae.b_dec.dim() == 1 else sae.b_dec[0]))
        l0.append((latents != 0).sum(dim=1).float())
        fired |= (latents > 0).any(dim=0)
    x_hat = torch.cat(x_hat)
    rows = F.normalize(decoder_rows(sae).float(), dim=1)
    best_cos = torch.cat([(part.to(rows.device) @ rows.t()).amax(dim=1) for part in features.split(EVAL_CHUNK)])
    return {
        "fvu": ((x_hat - x_eval).pow(2).sum() / (x_eval - x_eval.mean(dim=0)).pow(2).sum()).item(),
        "l0": torch.cat(l0).mean().item(),
        "dead_frac": 1 - fired.float().mean().item(),
        "mean_max_cos": best_cos.mean().item(),
        "recovered": (best_cos > 0.9).float().mean().item(),
    }


def run_case(case: Case) -> dict:
    """Train one implementation at one size; runs in its own process. With case.eval_every, also a
    quality curve: quality against tokens and against training seconds (evaluation time excluded)."""
    torch.set_num_threads(case.threads)
    device = torch.device(case.device)
    n_train = case.tokens // case.batch * case.batch
    x, features, hierarchy = synthetic_data(case, n_train + EVAL_TOKENS)
    x = x.to(device)
    rows = torch.stack([x, synthetic_target(x, case.seed)], dim=1) if case.impl in TRANSCODERS else x[:, None]
    train, x_eval = rows[:n_train], rows[n_train:]  # [n, columns, d_in]
    torch.manual_seed(case.seed)
    n_steps = n_train // case.batch
    sae = build(case, case.k_aux or default_k_aux(case.d_in), n_steps).to(device)
    if case.b_dec_init == "mean":
        with torch.no_grad():
            if isinstance(sae, SparseCoder):
                sae.init_b_dec(train[:65536].mean(dim=0))
            else:
                sae.b_dec.copy_(train[:65536].mean(dim=0).view_as(sae.b_dec))
    sample = calibration_sample(train)
    if isinstance(sae, SparseCoder):  # ours: the job's data-dependent initialisation (JumpReLU's θ)
        sae.init_from_data(sample)

    def evaluate() -> dict:
        if isinstance(sae, SparseCoder):  # as the trainer does before it evaluates (BatchTopK's θ)
            sae.calibrate_for_inference(sample)
        scores = best_quality(sae, x_eval if case.impl in TRANSCODERS else x_eval[:, 0], features)
        if hierarchy is not None:
            sae.eval()
            scores |= absorption(sae, hierarchy, slice(n_train, None), decoder_rows(sae))
            sae.train()
        return scores

    timing = train_sae(sae, case, lambda step: train[step * case.batch:(step + 1) * case.batch], n_steps,
                       evaluate=evaluate)
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {**case.__dict__, "steps": n_steps, **timing, "peak_memory_gib": peak / 2**30,
            **encoder_matmul_floor(case, device), **timing["curve"][-1]}


def synthetic_data(case: Case, n: int) -> tuple[torch.Tensor, torch.Tensor, HierarchicalData | None]:
    """(tokens, true features, the hierarchy's bookkeeping or None) for the case's data."""
    n_true = max(1, round(case.true_features * case.d_sae))
    per_token = case.token_features or max(1, case.k // 2)
    if case.data == "correlated":
        x, features, _ = correlated_activations(case.d_in, n_true, per_token, n, case.seed, rank=case.copula_rank,
                                                rho=case.copula_rho)
        return x, features, None
    if case.children:
        data = hierarchical_activations(case.d_in, n_true, case.children, parents_per_token(per_token), n, case.seed)
        return data.x, data.features, data
    x, features = synthetic_activations(case.d_in, n_true, per_token, n, case.seed, case.varied_complexity)
    return x, features, None


def case_lr_problem(case: Case, lr_key: str = "--lr", lr_sum_key: str = "--lr-sum") -> str | None:
    """Why the case's lr (or its lr_sum over its steps and schedule) is not a usable lr, or None."""
    if case.lr_sum is not None:
        schedule = SchedulerConfig(name=Schedule(case.schedule), warmup_fraction=case.warmup_fraction,
                                   min_lr_ratio=case.min_lr_ratio)
        return lr_sum_problem(case.lr_sum, max(1, case.tokens // case.batch), schedule, lr_sum_key)
    return lr_problem(case.lr, lr_key)


def default_k_aux(d_in: int) -> int:
    """AuxK's latents: d_in rounded down to even, at most 512 (Gao et al.: about d_in / 2 and more is fine)."""
    return min(512, d_in // 2 * 2)


def train_sae(sae: nn.Module, case: Case, batch_at, n_steps: int, evaluate) -> dict:
    """Train `sae` for n_steps on batch_at(step) ([batch, n_sources, d_in]) with case's recipe (ours
    and the dense reference; another library with its own optimiser, schedule and no clipping, its
    recommended settings). evaluate() -> quality dict, called every case.eval_every steps and at the
    end, untimed. Returns tokens_per_s (median over timed segments), train_seconds and the curve."""
    device = next(sae.parameters()).device
    external = case.impl in EXTERNAL
    if case.resample_every and (not isinstance(sae, SparseCoder) or case.optimizer != "adam"):
        raise ValueError(f"resample_every: ours with Adam only (resampling resets Adam's moments), got "
                         f"impl {case.impl}, optimizer {case.optimizer}")
    optimizer = sae.make_optimizer() if external else study_optimizer(sae, case)
    schedule = SchedulerConfig(name=Schedule(case.schedule), warmup_fraction=case.warmup_fraction,
                               min_lr_ratio=case.min_lr_ratio)
    peak_lr = case.lr if case.lr_sum is None else lr_for_sum(case.lr_sum, n_steps, schedule)
    grad_clip = None if external else GRAD_CLIP
    hardware = HardwareConfig(dtype=DType(case.dtype))
    dead = DeadLatents(sae.d_sae, window=case.dead_window or max(1, n_steps * case.batch // 8), device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    clock = TrainingClock(device)
    segments, segment_start, curve = [], None, []
    for step in range(n_steps):
        if step >= WARMUP_STEPS and (step - WARMUP_STEPS) % SEGMENT_STEPS == 0:
            now = clock.seconds()
            if segment_start is not None:
                segments.append(now - segment_start)
            segment_start = now
        if not external:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, peak_lr, n_steps, schedule)
        batch = batch_at(step)
        coef = (sparsity_coef_at(step, sae.cfg.sparsity_coef, sae.cfg.sparsity_warmup_steps)
                if case.impl in ("vanilla", "jumprelu", "gated") else 0.0)
        out, _ = optimisation_step(sae, sae, optimizer, batch, dead.dead, coef, grad_clip, hardware)
        dead.update(out, len(batch), step + 1)
        if resample_due(step + 1, case.resample_every or None, case.resample_until, n_steps):
            resample_dead_latents(sae, optimizer, dead, batch, case.seed, step + 1, case.resample_scale)
        if case.eval_every and (step + 1) % case.eval_every == 0 and step + 1 < n_steps:
            seconds = clock.seconds()
            with clock.paused():
                curve.append({"step": step + 1, "tokens": (step + 1) * len(batch), "seconds": seconds, **evaluate()})
    end = clock.seconds()
    if segment_start is not None and (n_steps - WARMUP_STEPS) % SEGMENT_STEPS == 0:
        segments.append(end - segment_start)
    if not segments:
        raise ValueError(f"--tokens too small: need at least {(WARMUP_STEPS + SEGMENT_STEPS) * case.batch} tokens")
    curve.append({"step": n_steps, "tokens": n_steps * case.batch, "seconds": end, **evaluate()})
    return {"tokens_per_s": SEGMENT_STEPS * case.batch / statistics.median(segments), "train_seconds": end,
            "curve": curve}


def study_optimizer(sae: nn.Module, case: Case) -> torch.optim.Optimizer:
    """Ours and the dense reference: AdamW (the trainer's), or schedule-free Signum, whose two
    iterates best_quality then scores (as sparsify's)."""
    if case.optimizer == "signum":
        optimizer = signum.schedule_free_signum(sae.parameters(), case.lr)
        sae.iterates = lambda: signum.iterates(optimizer)
        return optimizer
    return make_optimizer(sae.parameters(), case.lr, case.beta2)


class TrainingClock:
    """Seconds of training so far: wall clock with the evaluations taken out (CUDA: synchronised)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.excluded, self.start = device, 0.0, time.perf_counter()

    def seconds(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - self.start - self.excluded

    @contextlib.contextmanager
    def paused(self):
        began = time.perf_counter()
        try:
            yield
        finally:
            self.excluded += time.perf_counter() - began


def best_quality(sae: nn.Module, x_eval: torch.Tensor, features: torch.Tensor) -> dict:
    """quality() of the SAE; for an optimiser that keeps several iterates (schedule-free), of the one
    with the lowest FVU, named under "iterate". Leaves the SAE training."""
    iterates = getattr(sae, "iterates", None)
    if iterates is None:
        result = quality(sae, x_eval, features)
    else:
        scored = [{**quality(sae, x_eval, features), "iterate": name} for name in iterates()]
        result = min(scored, key=lambda r: r["fvu"])
    sae.train()
    return result


def _worker(case: Case, queue) -> None:
    queue.put(run_case(case))


def run_isolated(case: Case) -> dict:
    """run_case in a fresh process (its own peak memory); a crashed child is an error, not a hang."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_worker, args=(case, queue))
    process.start()
    while True:
        try:
            result = queue.get(timeout=1.0)
            break
        except Empty:
            if not process.is_alive() and queue.empty():
                raise RuntimeError(f"benchmark case {case.impl} {(case.d_in, case.d_sae, case.k)} died "
                                   f"(exit code {process.exitcode})") from None
    process.join()
    return result


def encoder_matmul_floor(case: Case, device: torch.device) -> dict[str, float]:
    """The [batch, d_in] x [d_in, d_sae] encoder matmul alone, measured here: the one dense product a
    TopK step cannot skip, so an upper bound on a TopK step's speed. Two rates: into a fresh output
    tensor (`x @ W.t()`, what a plain step pays, page faults of a new allocation included) and into a
    reused buffer (the GEMM's own FLOP rate: the tighter bound)."""
    x = torch.randn(case.batch, case.d_in, device=device)
    W = torch.randn(case.d_sae, case.d_in, device=device)
    out = torch.empty(case.batch, case.d_sae, device=device)
    rates = {}
    for name, product in (("fresh", lambda: x @ W.t()), ("reused", lambda: torch.mm(x, W.t(), out=out))):
        times = []
        for repeat in range(6):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            product()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if repeat:
                times.append(time.perf_counter() - start)
        seconds = statistics.median(times)
        rates[f"floor_{name}_tokens_per_s"] = case.batch / seconds
        rates[f"gemm_{name}_gflops"] = 2 * case.batch * case.d_in * case.d_sae / seconds / 1e9
    return rates


def table(results: list[dict]) -> str:
    lines = ["| size (d_in, d_sae, k) | impl | tokens/s | vs dense | of encoder-matmul floor: fresh / reused output "
             "| peak mem (GiB) | FVU | L0 | dead | mean max cos | recovered |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    dense = {(r["d_in"], r["d_sae"], r["k"], r["seed"]): r["tokens_per_s"]
             for r in results if r["impl"] == "dense_topk"}
    seeded = len({r["seed"] for r in results}) > 1
    for r in results:
        size = (r["d_in"], r["d_sae"], r["k"])
        ratio = f"{r['tokens_per_s'] / dense[(*size, r['seed'])]:.2f}x" if (*size, r["seed"]) in dense else "-"
        fresh, reused = r["floor_fresh_tokens_per_s"], r["floor_reused_tokens_per_s"]
        impl = f"{r['impl']} (seed {r['seed']})" if seeded else r["impl"]
        lines.append(f"| {size} | {impl} | {r['tokens_per_s']:,.0f} | {ratio} | "
                     f"{r['tokens_per_s'] / fresh:.0%} of {fresh:,.0f} / "
                     f"{r['tokens_per_s'] / reused:.0%} of {reused:,.0f} "
                     f"({r['gemm_fresh_gflops']:.0f} / {r['gemm_reused_gflops']:.0f} GFLOP/s) | "
                     f"{r['peak_memory_gib']:.2f} | "
                     f"{r['fvu']:.4f} | {r['l0']:.1f} | {r['dead_frac']:.1%} | {r['mean_max_cos']:.3f} | "
                     f"{r['recovered']:.1%} |")
    return "\n".join(lines)


def equal_time_table(results: list[dict]) -> str:
    """Quality of every implementation at the training time the fastest one needed for all its tokens:
    what a user with that much time gets from each (the last curve point within it)."""
    lines = ["| size (d_in, d_sae, k) | impl | at seconds | tokens by then | FVU | recovered | iterate |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for size in dict.fromkeys((r["d_in"], r["d_sae"], r["k"]) for r in results):
        runs = [r for r in results if (r["d_in"], r["d_sae"], r["k"]) == size]
        budget = min(r["curve"][-1]["seconds"] for r in runs)
        for r in runs:
            within = [point for point in r["curve"] if point["seconds"] <= budget * 1.001]
            if not within:
                lines.append(f"| {size} | {r['impl']} | {budget:.1f} | < {r['curve'][0]['tokens']:,} | - | - | - |")
                continue
            point = within[-1]
            lines.append(f"| {size} | {r['impl']} | {budget:.1f} | {point['tokens']:,} | {point['fvu']:.4f} | "
                         f"{point['recovered']:.1%} | {point.get('iterate', '-')} |")
    return "\n".join(lines)


def plot_curves(results: list[dict], path: str) -> None:
    """PNG: per size, FVU and recovered fraction against tokens and against training seconds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = list(dict.fromkeys((r["d_in"], r["d_sae"], r["k"]) for r in results))
    figure, axes = plt.subplots(len(sizes), 4, figsize=(18, 3.6 * len(sizes)), squeeze=False)
    for row, size in zip(axes, sizes):
        for r in (r for r in results if (r["d_in"], r["d_sae"], r["k"]) == size):
            curve = r["curve"]
            for ax, (x_key, y_key) in zip(row, [("tokens", "fvu"), ("seconds", "fvu"),
                                                ("tokens", "recovered"), ("seconds", "recovered")]):
                ax.plot([p[x_key] for p in curve], [p[y_key] for p in curve], marker=".", label=r["impl"])
                ax.set_xlabel("training tokens" if x_key == "tokens" else "training seconds (evaluation excluded)")
                ax.set_ylabel("FVU (lower is better)" if y_key == "fvu" else "true features recovered (cos > 0.9)")
                ax.set_title(f"(d_in, d_sae, k) = {size}", fontsize=9)
                if y_key == "fvu":
                    ax.set_yscale("log")
        row[0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def memory_estimate(case: Case) -> dict[str, float]:
    """GiB a case needs at its peak, by part (an upper bound of the big tensors, float32): the
    training and evaluation rows, the generator's temporaries, the SAE with its gradients and Adam
    moments, one step's [batch, d_sae] activations, the evaluation's [chunk, d_sae] products, and on
    CPU the process itself (interpreter and libraries: this process's resident memory, ~0.3-0.5 GiB)."""
    columns = 2 if case.impl in TRANSCODERS else 1
    n_rows = case.tokens // case.batch * case.batch + EVAL_TOKENS
    n_true = max(1, round(case.true_features * case.d_sae))
    data = 2 * n_rows * case.d_in * columns * 4  # the rows and, while they are joined, their chunks
    generator = (3 * 8 * correlated_chunk_rows(n_true) * n_true if case.data == "correlated" else 0)
    weights = (case.d_sae * case.d_in * (1 + columns) + (case.d_in ** 2 if case.impl == "skip_transcoder" else 0)) * 4
    step = 4 * case.batch * case.d_sae * 4  # pre-activations, their gradient and the dense paths' copies
    evaluation = 2 * EVAL_CHUNK * case.d_sae * 4
    process = process_memory_gib() * GIB if torch.device(case.device).type == "cpu" else 0
    return {"data": data / GIB, "generator": generator / GIB, "sae_and_adam": 4 * weights / GIB,
            "step": step / GIB, "evaluation": evaluation / GIB, "process": process / GIB,
            "total": (data + max(generator, step + evaluation) + 4 * weights + process) / GIB}


def process_memory_gib() -> float:
    """This process's resident memory (Linux /proc/self/statm), what a run's process starts from."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / GIB


def available_memory_gib(device: str) -> float:
    """What a new allocation can get: free GPU memory, or the kernel's MemAvailable (Linux)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.mem_get_info(torch.device(device))[0] / GIB
    with open("/proc/meminfo") as meminfo:
        fields = dict(line.split(":", 1) for line in meminfo)
    return int(fields["MemAvailable"].split()[0]) * 1024 / GIB


def too_big(case: Case, available_gib: float) -> str | None:
    """One line saying that the case does not fit in `available_gib` (None when it does)."""
    need = memory_estimate(case)
    if need["total"] <= 0.9 * available_gib:
        return None
    parts = ", ".join(f"{name.replace('_', ' ')} {need[name]:.1f}" for name in
                      ("data", "generator", "sae_and_adam", "step", "evaluation", "process") if need[name] >= 0.05)
    return (f"size {case.d_in},{case.d_sae},{case.k} ({case.impl}, --tokens {case.tokens}, --batch {case.batch}) needs "
            f"about {need['total']:.1f} GiB ({parts}) but {available_gib:.1f} GiB is available on {case.device}: "
            f"fewer --tokens, a smaller size or batch, or a machine with more memory")


def memory_refusal(cases: list[Case], device: str) -> str | None:
    """too_big's line for the first case that does not fit the device's available memory, or None."""
    available = available_memory_gib(device)
    return next(filter(None, (too_big(case, available) for case in cases)), None)


def parse_size(text: str) -> tuple[int, int, int]:
    parts = [int(p) for p in text.split(",")]
    if len(parts) != 3 or min(parts) <= 0 or parts[2] > parts[1]:
        raise argparse.ArgumentTypeError(f"--sizes entries are d_in,d_sae,k with 0 < k <= d_sae, got '{text}'")
    return tuple(parts)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description="SAE training speed and quality, ours vs a dense TopK reference")
    parser.add_argument("--sizes", nargs="+", type=parse_size, default=list(DEFAULT_SIZES), help="d_in,d_sae,k ...")
    parser.add_argument("--impls", default=",".join(IMPLEMENTATIONS),
                        help=f"some of {', '.join(IMPLEMENTATIONS + ARCHITECTURES + EXTERNAL)} "
                             "(the last two need pip install -e '.[compare]')")
    parser.add_argument("--tokens", type=float, default=2**19, help="training tokens per run (one pass)")
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--lr-sum", type=float, default=None,
                        help="instead of --lr: the sum of the per-step lrs over the run (peak lr = this / steps)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=[d.value for d in DType])
    parser.add_argument("--true-features", type=float, default=1.0, help="ground-truth features per latent")
    parser.add_argument("--data", default="flat", choices=DATA_GENERATORS,
                        help="flat: every feature equally likely, independent; correlated: firing probabilities "
                             "spread 50x, co-firing through a rank-8 Gaussian copula (rho 0.5)")
    parser.add_argument("--copula-rank", type=int, default=8, help="--data correlated: the copula's rank")
    parser.add_argument("--copula-rho", type=float, default=0.5,
                        help="--data correlated: the copula's strength, in [0, 1) (0: independent firing)")
    parser.add_argument("--token-features", type=int, default=None,
                        help="true features active per token on average (default k / 2)")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (data and init), one run each")
    parser.add_argument("--vanilla-coef", type=float, default=VANILLA_COEF, help="the vanilla SAE's L1 coefficient")
    parser.add_argument("--jumprelu-coef", type=float, default=JUMPRELU_COEF, help="the JumpReLU SAE's L0 coefficient")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--curve-every", type=int, default=0,
                        help="measure quality every this many steps (untimed): curves against tokens and seconds")
    parser.add_argument("--plot", default=None, help="write the quality curves here (PNG; needs --curve-every)")
    args = parser.parse_args(argv)
    if args.plot and not args.curve_every:
        parser.error("--plot needs --curve-every N (the steps between quality measurements)")
    if args.curve_every < 0:
        parser.error(f"--curve-every must be >= 0, got {args.curve_every}")
    if args.copula_rank < 1 or not 0 <= args.copula_rho < 1:
        parser.error(f"--copula-rank must be >= 1 and --copula-rho in [0, 1), got {args.copula_rank} and "
                     f"{args.copula_rho}")
    impls = args.impls.split(",")
    unknown = set(impls) - set(IMPLEMENTATIONS) - set(ARCHITECTURES) - set(EXTERNAL)
    if unknown:
        parser.error(f"--impls: unknown {sorted(unknown)}, "
                     f"expected some of {list(IMPLEMENTATIONS + ARCHITECTURES + EXTERNAL)}")
    missing = [impl for impl in impls if impl in EXTERNAL and not external_available(impl)]
    if missing:
        parser.error(f"--impls {','.join(missing)} needs the comparison libraries: pip install -e '.[compare]'")
    try:
        seeds = [int(seed) for seed in args.seeds.split(",")]
    except ValueError:
        parser.error(f"--seeds: comma-separated integers, got '{args.seeds}'")
    cases = [Case(impl, d_in, d_sae, k, args.batch, int(args.tokens), args.lr, args.device, args.threads,
                  args.dtype, args.true_features, args.vanilla_coef, seed=seed, jumprelu_coef=args.jumprelu_coef,
                  eval_every=args.curve_every, data=args.data, token_features=args.token_features,
                  copula_rank=args.copula_rank, copula_rho=args.copula_rho, lr_sum=args.lr_sum)
             for d_in, d_sae, k in args.sizes for seed in seeds for impl in impls]
    refusal = next(filter(None, map(case_lr_problem, cases)), None) or memory_refusal(cases, args.device)
    if refusal:
        parser.error(refusal)
    results = []
    for case in cases:
        results.append(run_isolated(case))
        print(f"{case.impl:10s} {(case.d_in, case.d_sae, case.k)} seed {case.seed}: "
              f"{results[-1]['tokens_per_s']:,.0f} tokens/s, FVU {results[-1]['fvu']:.4f}", flush=True)
    print(table(results))
    if args.curve_every:
        print(equal_time_table(results))
    if args.plot:
        plot_curves(results, args.plot)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=1)
    return results
