"""`scripts/train.py` as two processes, for real: torchrun, or two processes given RANK/WORLD_SIZE
by hand (what a SLURM step of two tasks amounts to), gloo on CPU. What a user relies on: the run
matches one process, only rank 0 writes, a stop signal to one rank stops both at the same step
with one checkpoint, that checkpoint resumes at the same world size bit for bit and at another
world size, a dead rank stops the other with one line, bad input is refused before any rank waits.

Run with `make test-distributed` (marker `distributed`; part of .ci/run, about two minutes).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sae.saes import load
from sae.training.checkpoint import checkpoint_dirs
from tests.distributed.harness import free_port
from tests.faults.test_faults import (ROOT, TINY, assert_same_weights, command, final_weights, last_line, logged_step,
                                      snapshot, status, train, wait_for)

pytestmark = pytest.mark.distributed

SHORT = ["num_steps=60", "eval_every=1000", "checkpoint_every=20"]
LONG = ["num_steps=1500", "eval_every=1000", "checkpoint_every=500", "sae.dead_window=2048"]


@pytest.fixture(scope="module")
def hosts(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hosts")


def torchrun(run_dir: Path, hosts: Path, *overrides: str, processes: int = 2) -> subprocess.Popen:
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
                f"--master_port={free_port()}"]
    script = command(run_dir, hosts, *overrides)[1:]
    return subprocess.Popen(launcher + script, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=run_dir.parent)


def by_hand(run_dir: Path, hosts: Path, *overrides: str, ranks=(0, 1), world_size: int = 2) -> list[subprocess.Popen]:
    """Ranks started as plain processes with the env:// variables (no torchrun agent)."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    port = str(free_port())
    return [subprocess.Popen(command(run_dir, hosts, *overrides), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, cwd=run_dir.parent,
                             env={**os.environ, "OMP_NUM_THREADS": "1", "RANK": str(rank), "WORLD_SIZE": str(world_size),
                                  "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})
            for rank in ranks]


def finish(process: subprocess.Popen, timeout: float = 600) -> subprocess.CompletedProcess:
    stdout, stderr = process.communicate(timeout=timeout)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def logged_steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_close_weights(a: Path, b: Path, rtol: float) -> None:
    """Float32 runs that differ by rounding: close, not equal (see test_parallel_equivalence.py)."""
    first, second = final_weights(a), final_weights(b)
    for name in first:
        difference = (first[name] - second[name]).norm() / first[name].norm().clamp_min(1e-12)
        assert difference < rtol, f"{name}: relative difference {difference:.2e}"


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, hosts) -> Path:
    run_dir = tmp_path_factory.mktemp("single") / "run"
    result = train(run_dir, hosts, *SHORT)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


@pytest.mark.parametrize("parallel", ["data", "latents"])
def test_torchrun_trains_what_one_process_trains_and_only_rank_0_writes(tmp_path, hosts, one_process, parallel):
    run_dir = tmp_path / "run"
    result = finish(torchrun(run_dir, hosts, *SHORT, f"hardware.parallel={parallel}"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert_close_weights(one_process, run_dir, rtol=1e-4)
    assert logged_steps(run_dir) == logged_steps(one_process), "rank 1 logs nothing"
    assert status(run_dir)["status"] == "completed"
    assert json.loads((run_dir / "final_metrics.json").read_text())["world_size"] == 2
    assert [d.name for d in checkpoint_dirs(run_dir)] == [d.name for d in checkpoint_dirs(one_process)]
    assert load(run_dir).W_enc.shape == load(one_process).W_enc.shape  # the single-process layout
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["run"]


@pytest.fixture(scope="module")
def two_process_reference(tmp_path_factory, hosts) -> Path:
    run_dir = tmp_path_factory.mktemp("reference2") / "run"
    result = finish(torchrun(run_dir, hosts, *LONG))
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def test_sigterm_to_one_rank_stops_both_at_one_step_and_resumes_bit_identically(tmp_path, hosts, two_process_reference):
    run_dir = tmp_path / "run"
    launcher = torchrun(run_dir, hosts, *LONG)
    wait_for(lambda: logged_step(run_dir) >= 300, timeout=300, what="step 300")
    os.kill(status(run_dir)["pid"], signal.SIGTERM)  # rank 0's process only, not the launcher
    finish(launcher, timeout=120)
    record = status(run_dir)
    assert record["status"] == "cancelled", record
    stopped_at = int(record["error"].split("SIGTERM at step ")[1].split(";")[0])
    assert [d.name for d in checkpoint_dirs(run_dir)][0] == f"step_{stopped_at:07d}"
    resumed = finish(torchrun(run_dir, hosts, *LONG))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"(step {stopped_at}/1500)" in resumed.stdout
    assert_same_weights(two_process_reference, run_dir)


def test_a_checkpoint_of_two_processes_resumes_in_one_and_one_of_one_in_two(tmp_path, hosts, two_process_reference):
    single = tmp_path / "single"
    assert train(single, hosts, *LONG).returncode == 0
    for written_by, resumed_by in (("two", "one"), ("one", "two")):
        run_dir = tmp_path / f"{written_by}_then_{resumed_by}"
        source = two_process_reference if written_by == "two" else single
        (run_dir / "checkpoints").mkdir(parents=True)
        step_500 = source / "checkpoints" / "step_0000500"
        subprocess.run(["cp", "-r", str(step_500), str(run_dir / "checkpoints")], check=True)
        result = finish(torchrun(run_dir, hosts, *LONG)) if resumed_by == "two" else train(run_dir, hosts, *LONG)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "(step 500/1500)" in result.stdout
        assert_close_weights(single, run_dir, rtol=2e-2)  # TopK near-ties make long float32 runs drift apart


def test_a_rank_killed_mid_run_stops_the_other_with_one_line(tmp_path, hosts):
    run_dir = tmp_path / "run"
    rank0, rank1 = by_hand(run_dir, hosts, *LONG, "hardware.collective_timeout_s=120")
    wait_for(lambda: logged_step(run_dir) >= 200, timeout=300, what="step 200")
    rank1.kill()
    started = time.time()
    result = finish(rank0, timeout=200)
    assert result.returncode == 1 and time.time() - started < 150
    assert last_line(result).startswith("Error: rank 0 of 2:") and "another rank died or hung" in last_line(result)
    assert status(run_dir)["status"] == "failed"
    finish(rank1)


def test_a_rank_nobody_joins_is_refused_in_one_line_and_leaves_the_run_dir_as_it_was(tmp_path, hosts, one_process):
    before = snapshot(one_process)
    (rank0,) = by_hand(one_process, hosts, *SHORT, "num_steps=80", "hardware.rendezvous_timeout_s=3", ranks=(0,))
    result = finish(rank0, timeout=120)
    assert result.returncode == 1
    assert "rendezvous" in last_line(result) and "hardware.rendezvous_timeout_s=3" in last_line(result)
    assert snapshot(one_process) == before


@pytest.mark.parametrize("overrides, message", [
    (["batch_size=63"], "batch_size=63 is not divisible by the world size 2"),
    (["hardware.parallel=latents", "sae.sparse_dim=63"], "sae.sparse_dim=63 is not divisible by the world size 2"),
    (["hardware.backend=nccl"], "hardware.backend=nccl needs CUDA"),
    (["hardware.parallel=latents", "sae=matryoshka"], "hardware.parallel=latents supports sae in"),
])
def test_a_split_the_run_cannot_make_is_refused_before_any_rank_waits(tmp_path, hosts, overrides, message):
    (rank0,) = by_hand(tmp_path / "run", hosts, *SHORT, *overrides, ranks=(0,))  # rank 1 never comes
    result = finish(rank0, timeout=60)
    assert result.returncode == 1 and message in last_line(result), result.stderr[-2000:]
    assert not (tmp_path / "run").exists()
