"""Scaling of one SAE's training over processes (scripts/benchmark_parallel.py): tokens/s at world
size 1 and N (gloo, one thread per rank) for data and latent parallelism, and the share of a step
that communication takes.

The communication share is measured, not modelled: the same N-rank run is timed a second time
with every collective replaced by a no-op of the same shapes (DDP by a comm hook that returns the
local gradients; our reductions by the identity, gathers by copies), so the ranks compute exactly
what they computed before and only the communication (and the waiting on the slowest rank) is
gone: share = 1 - t_without / t_with.
"""
from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass, replace

import torch
import torch.multiprocessing as mp

from sae.activations.batches import BatchStream
from sae.hardware import HardwareConfig, Parallel
from sae.parallel import batch_part, split_axes, spread
from sae.parallel.group import free_port, joined
from sae.saes import TopKSAEConfig, build_sae
from sae.training.step import DeadLatents, make_optimizer, optimisation_step
from sae.world import LOCAL, Collective, World


class NoCommunication(Collective):
    """A group's shapes without its communication: what each rank computes stays the same."""

    def __init__(self, group: Collective):
        self.rank, self.size = group.rank, group.size

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor[None].expand(self.size, *tensor.shape).clone()


def local_gradients_hook(state, bucket):
    future = torch.futures.Future()
    future.set_result(bucket.buffer())
    return future


@dataclass(frozen=True)
class Case:
    d_in: int
    d_sae: int
    k: int
    batch: int = 4096
    steps: int = 20
    warmup: int = 3


def timed_steps(case: Case, group: Collective, parallel: Parallel, communicate: bool) -> float:
    """Seconds per training step (the ranks step in lockstep: rank 0's clock is the run's)."""
    rows, shards = split_axes(parallel, group if communicate else NoCommunication(group))
    torch.manual_seed(0)
    table = torch.randn(32 * case.batch, 1, case.d_in)
    sae = build_sae(TopKSAEConfig(sparse_dim=case.d_sae, k=case.k), 1, case.d_in)
    sae.init_b_dec(table.mean(dim=0))
    forward = spread(sae, rows, shards)
    if rows.size > 1 and not communicate:  # DDP's reducer still runs; its all-reduce does not
        forward.register_comm_hook(None, local_gradients_hook)
    optimizer = make_optimizer(sae.parameters(), lr=1e-3)
    dead = DeadLatents(sae.d_sae, 10**9, "cpu", rows, shards)
    batches = BatchStream(table, case.batch, torch.Generator().manual_seed(0), "cpu",
                          part=batch_part(case.batch, rows))
    hardware = HardwareConfig()
    for step in range(1, case.warmup + case.steps + 1):
        if step == case.warmup + 1:
            group.barrier()
            started = time.perf_counter()
        out, _ = optimisation_step(sae, forward, optimizer, batches.next(), dead.dead, 0.0, 1.0, hardware)
        dead.update(out, case.batch, step)
    group.barrier()
    return (time.perf_counter() - started) / case.steps


def _rank(rank: int, world_size: int, port: int, cases: list[Case], results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    hardware = replace(HardwareConfig(), rendezvous_timeout_s=60, collective_timeout_s=600)
    with joined(hardware, World(rank, world_size, 0, "env")) as group:
        for case in cases:
            for parallel in (Parallel.data, Parallel.latents):
                for communicate in (True, False):
                    seconds = timed_steps(case, group, parallel, communicate)
                    if rank == 0:
                        results[(case, parallel.value, communicate)] = seconds


def measure(cases: list[Case], world_size: int) -> dict:
    torch.set_num_threads(1)
    single = {case: timed_steps(case, LOCAL, Parallel.data, True) for case in cases}
    with mp.Manager() as manager:
        shared = manager.dict()
        mp.spawn(_rank, args=(world_size, free_port(), cases, shared), nprocs=world_size, join=True)
        many = dict(shared)
    return {"single": single, "many": many}


def table(results: dict, cases: list[Case], world_size: int) -> str:
    lines = [f"| size (d_in, d_sae, k), batch | world 1 tokens/s | mode | world {world_size} tokens/s | speed-up | "
             "communication share |", "|---|---|---|---|---|---|"]
    for case in cases:
        base = case.batch / results["single"][case]
        for mode in ("data", "latents"):
            with_comm, without = results["many"][(case, mode, True)], results["many"][(case, mode, False)]
            rate = case.batch / with_comm
            size = f"({case.d_in}, {case.d_sae}, {case.k}), {case.batch}"
            lines.append(f"| {size} | {base:,.0f} | {mode} | {rate:,.0f} | {rate / base:.2f}x | "
                         f"{1 - without / with_comm:.0%} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--sizes", default="128,2048,16;512,16384,32", help="d_in,d_sae,k;...")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)
    cases = [Case(*map(int, size.split(",")), steps=args.steps) for size in args.sizes.split(";")]
    report = table(measure(cases, args.world_size), cases, args.world_size)
    print(report)
    return report
