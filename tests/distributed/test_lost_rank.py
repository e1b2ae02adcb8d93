"""A rank that dies between its forward and its backward: the survivor's DDP gradient all-reduce
fails inside loss.backward(), outside the collectives sae/parallel/group.py wraps itself, and the
training step's guard must still turn it into the one-line lost-rank error (two gloo processes)."""
import os
from dataclasses import replace

import pytest
import torch
import torch.multiprocessing as mp

from sae.hardware import HardwareConfig, Parallel
from sae.parallel import split_axes, spread
from sae.parallel.group import LostRankError, free_port, joined
from sae.saes import TopKSAEConfig, build_sae
from sae.training.step import make_optimizer, optimisation_step
from sae.world import World

pytestmark = pytest.mark.distributed


def rank_main(rank: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    hardware = replace(HardwareConfig(), rendezvous_timeout_s=60, collective_timeout_s=60)
    with joined(hardware, World(rank, 2, 0, "env")) as group:
        rows, shards = split_axes(Parallel.data, group)
        torch.manual_seed(0)
        sae = build_sae(TopKSAEConfig(sparse_dim=32, k=4, k_aux=8), 1, 8)
        forward = spread(sae, rows, shards)  # DDP: its constructor is the last collective both ranks run
        optimizer = make_optimizer(sae.parameters(), lr=1e-3)
        x = torch.randn(16, 1, 8)
        if rank == 1:
            os._exit(0)  # dies before its backward's all-reduce
        try:
            with rows.guarded("the step's gradient all-reduce"):
                optimisation_step(sae, forward, optimizer, x, None, 0.0, None, HardwareConfig())
            results["outcome"] = "no error"
        except LostRankError as error:
            results["outcome"] = f"LostRankError: {error}"
        except Exception as error:  # noqa: BLE001 (what the test reports)
            results["outcome"] = f"{type(error).__name__}: {error}"
        os._exit(0)  # the group's teardown would wait for the dead rank


def test_a_rank_lost_inside_backward_is_reported_as_a_lost_rank_in_one_line():
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(rank_main, args=(free_port(), results), nprocs=2, join=True)
        outcome = results.get("outcome", "rank 0 recorded nothing")
    assert outcome.startswith("LostRankError: rank 0 of 2: the step's gradient all-reduce failed ("), outcome
    assert "another rank died or hung" in outcome and "\n" not in outcome


def test_an_error_that_is_not_the_transports_passes_through_unchanged():
    from sae.parallel.group import ProcessGroupCollective

    group = ProcessGroupCollective(World(0, 2, 0, "env"))
    with pytest.raises(RuntimeError, match="^mat1 and mat2 shapes cannot be multiplied$"):
        with group.guarded("a step"):
            raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")
    with pytest.raises(LostRankError, match="a step failed"):
        with group.guarded("a step"):
            raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:1234")
