"""Two-rank runs exit cleanly. Before sae.parallel.group.joined() collected garbage after tearing
the group down, about one spawned latent-sharded run in four aborted at interpreter exit
(SIGABRT, "terminate called without an active exception": a gloo thread freeing an all_gather's
tensors took the GIL during finalisation). 12 runs: all 12 would pass by chance with p ~ 0.02."""
import os
from dataclasses import replace

import pytest
import torch
import torch.multiprocessing as mp

from sae.hardware import HardwareConfig, Parallel
from sae.parallel.group import free_port, joined
from sae.saes import TopKSAEConfig
from sae.world import World
from tests.distributed.harness import train_steps

pytestmark = pytest.mark.distributed
RUNS = 12


def rank_main(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    with joined(replace(HardwareConfig(), rendezvous_timeout_s=60, collective_timeout_s=120),
                World(rank, 2, 0, "env")) as group:
        train_steps(TopKSAEConfig(sparse_dim=128, k=8, k_aux=16, dead_window=1024), 10, 256, group, Parallel.latents)


def test_two_rank_runs_exit_without_aborting():
    aborted = []
    for run in range(RUNS):
        try:
            mp.spawn(rank_main, args=(free_port(),), nprocs=2, join=True)
        except mp.ProcessExitedException as error:
            aborted.append(f"run {run}: {error}")
    assert not aborted, aborted
