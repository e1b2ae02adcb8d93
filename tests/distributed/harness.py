"""The training loop's own pieces (spread, optimisation_step, DeadLatents, BatchStream, the full
state gathered for checkpoints) run for some steps at any world size, in float64 so that
TopK near-ties (1-ulp gaps that float32 rounding can flip; see test_parallel_equivalence.py)
cannot occur: what is compared is the algorithm, not the rounding."""
from __future__ import annotations

import os
from dataclasses import replace

import torch

from sae.hardware import HardwareConfig, Parallel
from sae.parallel import batch_part, split_axes, spread
from sae.parallel.group import free_port, joined  # noqa: F401 (the tests import it from here)
from sae.parallel.latents import full_optimizer_state, full_sae_state
from sae.saes import build_sae
from sae.saes.base import SAEConfig
from sae.training.resample import resample_dead_latents, resample_due
from sae.training.step import DeadLatents, make_optimizer, optimisation_step
from sae.activations.batches import BatchStream, calibration_sample
from sae.world import LOCAL, World

D_IN, ROWS = 16, 4096


def synthetic_table(seed: int = 0, transcoder: bool = False, layers: int = 1) -> torch.Tensor:
    """Sparse combinations of random directions: some latents die early, so AuxK runs. A transcoder's
    rows add a target column: a fixed random ReLU MLP of the input; with `layers` > 1 (a cross-layer
    transcoder) layer l's input is the previous one plus its target, as in a residual stream."""
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(64, D_IN, generator=g, dtype=torch.float64)
    codes = torch.rand(ROWS, 64, generator=g, dtype=torch.float64) * (torch.rand(ROWS, 64, generator=g) < 0.1)
    x = codes @ features
    if not transcoder:
        return x[:, None]  # [rows, 1 source, d_in]
    inputs, targets = [], []
    for _ in range(layers):
        W_in, W_out = (torch.randn(D_IN, 4 * D_IN, generator=g, dtype=torch.float64) / D_IN ** 0.5,
                       torch.randn(4 * D_IN, D_IN, generator=g, dtype=torch.float64) / (4 * D_IN) ** 0.5)
        inputs.append(x)
        targets.append(torch.relu(x @ W_in) @ W_out)
        x = x + targets[-1]
    return torch.stack(inputs + targets, dim=1)  # [rows, inputs + targets, d_in]


def train_steps(sae_cfg: SAEConfig, steps: int, batch_size: int, group=LOCAL, parallel=Parallel.data,
                grad_clip: float | None = 1.0) -> dict:
    """The whole-dictionary state after `steps` steps (rank 0's view; every rank must call it)."""
    layers = 2 if sae_cfg.type == "clt" else 1
    table = synthetic_table(transcoder=sae_cfg.transcoder, layers=layers)
    rows, shards = split_axes(parallel, group)
    torch.manual_seed(0)
    sae = build_sae(sae_cfg, layers, D_IN).double()
    sae.init_b_dec(table.mean(dim=0))
    sae.init_from_data(calibration_sample(table))
    forward = spread(sae, rows, shards)
    optimizer = make_optimizer(sae.parameters(), lr=3e-3)
    dead = DeadLatents(sae.d_sae, sae_cfg.dead_window, "cpu", rows, shards)
    batches = BatchStream(table, batch_size, torch.Generator().manual_seed(0), "cpu", part=batch_part(batch_size, rows))
    hardware = HardwareConfig()
    losses, restarted = [], 0
    for step in range(1, steps + 1):
        x = batches.next()
        out, loss = optimisation_step(sae, forward, optimizer, x, dead.dead, sae_cfg.sparsity_coef, grad_clip, hardware)
        dead.update(out, batch_size, step)
        if resample_due(step, sae_cfg.resample_every, sae_cfg.resample_until, steps):
            restarted += resample_dead_latents(sae, optimizer, dead, x, 0, step, sae_cfg.resample_encoder_scale)
        losses.append(rows.sum(loss.detach().clone()).item() / rows.size)
    optimizer_state = full_optimizer_state(optimizer, sae)["state"]
    return {"sae": full_sae_state(sae), "exp_avg_sq": {i: s["exp_avg_sq"] for i, s in optimizer_state.items()},
            **dead.state(), "losses": losses, "dead_seen": dead.dead is not None,
            "restarted": restarted}


def rank_main(rank: int, world_size: int, port: int, jobs: list, results) -> None:
    """torch.multiprocessing.spawn target: join through sae.parallel.group, run every job."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    world = World(rank, world_size, 0, "env")
    with joined(replace(HardwareConfig(), rendezvous_timeout_s=60, collective_timeout_s=120), world) as group:
        for name, (sae_cfg, steps, batch_size, parallel) in jobs:
            state = train_steps(sae_cfg, steps, batch_size, group, parallel)
            if rank == 0:
                results[name] = state


def build_cache_rank(rank: int, world_size: int, port: int, task, host) -> None:
    """torch.multiprocessing.spawn target: every rank loads (and so builds) the protein cache."""
    from sae.activations.protein import load_protein_activation_data

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    with joined(replace(HardwareConfig(), rendezvous_timeout_s=60, collective_timeout_s=300),
                World(rank, world_size, 0, "env")) as group:
        load_protein_activation_data(task, host, normalize=True, device="cpu", group=group)
