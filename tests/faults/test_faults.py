"""Faults injected for real into `scripts/train.py` runs in subprocesses: SIGKILL (at a random step
and inside a checkpoint write), SIGTERM and Ctrl-C, a second process in the run dir, refused resumes, a
diverging lr, a torn metrics line, a full disk (a real small tmpfs; needs root) and a sweep with a
failing job. Each resumed run must end bit-identical to an uninterrupted one (1 thread, same
machine), and a refused run must leave every byte of an existing run dir as it was.

Run with `make test-faults` (marker `faults`; part of .ci/run, a few minutes on 2 cores).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sae.training.checkpoint import checkpoint_dirs, checkpoint_problem

pytestmark = pytest.mark.faults

ROOT = Path(__file__).resolve().parents[2]
TINY = ["task.p=23", "task.train_fraction=0.6", "host_model.d_model=32", "host_model.n_heads=2", "host_model.kv_heads=2",
        "host_model.d_mlp=64", "host_model.train.num_steps=60", "host_model.train.steps_after_grok=null",
        "hardware.threads=1", "sae.sparse_dim=64", "sae.k=8", "batch_size=64", "tracking=disabled", "log_every=10"]
LONG = ["num_steps=3000", "eval_every=1000", "checkpoint_every=100"]  # ~10 s: long enough to be hit mid-run


@pytest.fixture(scope="module")
def hosts(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hosts")


def command(run_dir: Path, hosts: Path, *overrides: str) -> list[str]:
    return [sys.executable, str(ROOT / "scripts" / "train.py"), *TINY, f"host_model.cache_dir={hosts}", *overrides,
            f"hydra.run.dir={run_dir}"]


def train(run_dir: Path, hosts: Path, *overrides: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command(run_dir, hosts, *overrides), capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=run_dir.parent)


def start(run_dir: Path, hosts: Path, *overrides: str) -> subprocess.Popen:
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(command(run_dir, hosts, *overrides), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=run_dir.parent)


def wait_for(condition, timeout: float = 120, what: str = "condition") -> None:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def freeze(process: subprocess.Popen) -> None:
    """SIGSTOP and wait until the kernel reports the process stopped: the signal is delivered
    asynchronously, and a process still running on the other core could finish a write meanwhile."""
    process.send_signal(signal.SIGSTOP)
    state = lambda: Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    wait_for(lambda: state() in ("T", "t"), timeout=30, what="the process to stop")


def logged_step(run_dir: Path) -> int:
    """The last step in metrics.jsonl (0 before the first log line)."""
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    try:
        return json.loads(lines[-1])["step"] if lines else 0
    except ValueError:
        return 0


def last_line(result) -> str:
    lines = [line for line in result.stderr.replace("\r", "\n").splitlines() if line.strip() and not line.startswith("sae:")]
    return lines[-1] if lines else ""


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(checkpoint_dirs(run_dir)[0] / "sae.safetensors"))


def assert_same_weights(a: Path, b: Path) -> None:
    first, second = final_weights(a), final_weights(b)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def snapshot(directory: Path) -> dict[str, str]:
    """sha256 of every file under `directory`, hidden ones included."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def status(run_dir: Path) -> dict:
    return json.loads((run_dir / "job.json").read_text())


@pytest.fixture(scope="module")
def reference(tmp_path_factory, hosts) -> Path:
    """The uninterrupted run every interrupted one must end identical to."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    result = train(run_dir, hosts, *LONG)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


# -- kills and signals -------------------------------------------------------------------------------

def test_sigkill_at_a_random_step_then_resume_is_bit_identical(tmp_path, hosts, reference):
    run_dir = tmp_path / "run"
    kill_after = random.Random().randint(150, 2500)
    process = start(run_dir, hosts, *LONG)
    wait_for(lambda: logged_step(run_dir) >= kill_after, what=f"step {kill_after}")
    process.kill()
    process.wait()
    assert status(run_dir)["status"] == "running"  # SIGKILL: nothing could be recorded
    resumed = train(run_dir, hosts, *LONG)
    assert resumed.returncode == 0, f"killed after step {kill_after}: {resumed.stderr[-3000:]}"
    assert "Resuming from" in resumed.stdout and status(run_dir)["status"] == "completed"
    assert_same_weights(reference, run_dir)
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [json.loads(line)["step"] for line in (reference / "metrics.jsonl").read_text().splitlines()]


def test_sigkill_inside_a_checkpoint_write_leaves_a_temp_that_the_resume_removes(tmp_path, hosts, reference):
    run_dir = tmp_path / "run"
    process = start(run_dir, hosts, *LONG, "checkpoint_every=1")  # a write every step: the kill lands in one
    temps = lambda: list((run_dir / "checkpoints").glob(".step_*.tmp-*")) if (run_dir / "checkpoints").is_dir() else []
    while True:  # freeze the run with a temp checkpoint dir on disk, then kill it there
        wait_for(lambda: logged_step(run_dir) >= 200 and temps(), timeout=300, what="a checkpoint being written")
        freeze(process)
        if temps():
            break
        process.send_signal(signal.SIGCONT)  # the write finished in between: try the next one
    process.kill()
    process.wait()
    left = temps()
    assert left, "the kill was meant to land inside a checkpoint write"
    for checkpoint in checkpoint_dirs(run_dir):  # whatever was renamed into place is complete
        assert checkpoint_problem(checkpoint, "cpu")[0] is None
    # a torn last metrics line, as a kill in the middle of a write leaves it
    with open(run_dir / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 99999, "train/lo')
    resumed = train(run_dir, hosts, *LONG)  # checkpoint_every may change on resume: it never changes the weights
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not any(path.exists() for path in left) and not temps()
    assert_same_weights(reference, run_dir)
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        assert json.loads(line)["step"] <= 3000


STOPS = {"SIGTERM": (signal.SIGTERM, "SIGTERM"), "Ctrl-C": (signal.SIGINT, "Ctrl-C (SIGINT)")}


@pytest.mark.parametrize("stop", STOPS)
def test_a_stop_signal_checkpoints_the_step_marks_the_job_cancelled_and_resumes(tmp_path, hosts, reference, stop):
    """SIGTERM (scancel) and Ctrl-C (a person at a local run) both finish the step, checkpoint it,
    mark the job cancelled and exit 128 + the signal with one line; the rerun resumes bit-identical."""
    signum, name = STOPS[stop]
    run_dir = tmp_path / "run"
    process = start(run_dir, hosts, *LONG)
    wait_for(lambda: logged_step(run_dir) >= 300, what="step 300")
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=60)  # the step ends, the checkpoint is written, the job exits
    assert process.returncode == 128 + signum
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    record = status(run_dir)
    assert record["status"] == "cancelled"
    stopped_at = int(record["error"].split(f"{name} at step ")[1].split(";")[0])
    assert stopped_at >= 300
    newest = checkpoint_dirs(run_dir)[0]
    assert newest.name == f"step_{stopped_at:07d}" and checkpoint_problem(newest, "cpu")[0] is None
    assert stderr.replace("\r", "\n").strip().splitlines()[-1].startswith(f"Stopped: {name} at step {stopped_at}")
    assert f"Stopped: {name} at step {stopped_at}" in (run_dir / "train.log").read_text().splitlines()[-1]
    resumed = train(run_dir, hosts, *LONG)
    assert resumed.returncode == 0 and f"(step {stopped_at}/3000)" in resumed.stdout
    assert_same_weights(reference, run_dir)


@pytest.mark.parametrize("stop", STOPS)
def test_a_stop_before_training_ends_the_job_at_once_as_cancelled(tmp_path, stop):
    """SIGTERM or Ctrl-C while the host is still being trained: nothing to checkpoint, the job stops
    now (submitit alone would ignore SIGTERM and keep going until SLURM's SIGKILL)."""
    signum, name = STOPS[stop]
    run_dir = tmp_path / "run"
    process = start(run_dir, tmp_path / "fresh_hosts", *LONG, "host_model.train.num_steps=5000")
    wait_for(lambda: (run_dir / "job.json").is_file(), what="the job to start")
    time.sleep(1.0)  # inside host training (thousands of steps before the SAE loop)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=60)
    # (stderr in the message: this failed once in CI with exit status 1 and could not be reproduced)
    assert process.returncode == 128 + signum, stderr[-3000:]
    assert "Traceback" not in stderr
    assert status(run_dir)["status"] == "cancelled", (status(run_dir), stderr[-3000:])
    assert f"{name} before the first SAE step" in status(run_dir)["error"]
    assert stderr.strip().splitlines()[-1].startswith(f"Stopped: {name} before the first SAE step")
    assert not checkpoint_dirs(run_dir)


def test_ctrl_c_during_train_host_is_one_line(tmp_path):
    run_dir = tmp_path / "host"
    process = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "train_host.py"), *TINY[:8],
                                "host_model.train.num_steps=5000", "tracking=disabled", f"hydra.run.dir={run_dir}"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    wait_for(lambda: (run_dir / "job.json").is_file(), what="the job to start")
    time.sleep(1.0)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGINT
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1].startswith("Stopped: Ctrl-C (SIGINT) during host training")
    assert status(run_dir)["status"] == "cancelled" and not (run_dir / "summary.json").exists()


def test_ctrl_c_during_activation_extraction_leaves_no_partial_cache(tmp_path):
    """Ctrl-C while ESM-2 activations are being extracted: one line, exit 130, and neither a
    half-built cache nor a lock record left for the next run to trip over."""
    model = tmp_path / "esm2_t6_8M_random.pt"  # t6_8M's shapes, random weights: extraction takes seconds
    subprocess.run([sys.executable, str(ROOT / "scripts" / "esm2_random_checkpoint.py"), "esm2_t6_8M_UR50D",
                    str(model)], check=True, capture_output=True, timeout=300)
    cache, run_dir = tmp_path / "cache", tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "train.py"), "task=protein_mlm", "host_model=esm2_t6_8M",
         f"task.fasta={ROOT / 'tests' / 'data' / 'real_proteins.fasta'}", f"host_model.checkpoints=[{model}]",
         "host_model.layers=[3]", "task.tokens_per_batch=1024", f"task.activation_cache={cache}",
         "tracking=disabled", "hardware.threads=1", f"hydra.run.dir={run_dir}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"})
    temps = lambda: list(tmp_path.glob(".cache.tmp-*"))
    wait_for(lambda: temps() and list(temps()[0].rglob("*.npy")), timeout=300, what="extraction under way")
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGINT
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1].startswith("Stopped: Ctrl-C (SIGINT) before the first SAE step")
    assert not temps() and not cache.exists()
    assert not (tmp_path / ".cache.lock.holder").exists()
    assert status(run_dir)["status"] == "cancelled"


# -- refusals ----------------------------------------------------------------------------------------

def test_a_second_process_in_the_run_dir_is_refused_and_the_first_is_unharmed(tmp_path, hosts, reference):
    run_dir = tmp_path / "run"
    first = start(run_dir, hosts, *LONG)
    holder = run_dir.parent / ".run.lock.holder"
    wait_for(lambda: holder.is_file() and logged_step(run_dir) >= 10, what="the first run to start")
    second = train(run_dir, hosts, *LONG)
    assert second.returncode == 1
    assert last_line(second).startswith(f"Error: run dir {run_dir} is in use by pid {first.pid} on ")
    assert "Traceback" not in second.stderr
    first.communicate(timeout=300)
    assert first.returncode == 0 and status(run_dir)["status"] == "completed"
    assert_same_weights(reference, run_dir)
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [json.loads(line)["step"] for line in (reference / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("overrides, message", [
    (["lr=0.01"], "holds a checkpoint of a different run ('lr' differs: saved 0.001, now 0.01)"),
    (["hardware=cuda"], "hardware.device=cuda but torch sees no CUDA device"),
    (["sae.k=5000"], "sae.k must be in (0, sae.sparse_dim=64], got 5000"),
    (["sae.kk=3"], "Key 'kk' not in 'TopKSAEConfig' (full key: sae.kk)"),
    (["sae=topkk"], "Could not find 'sae/topkk'"),
])
def test_a_refused_run_leaves_every_byte_of_the_existing_run_dir(tmp_path, hosts, reference, overrides, message):
    if overrides == ["hardware=cuda"] and torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    before = snapshot(run_dir)
    refused = train(run_dir, hosts, *LONG, *overrides)
    assert refused.returncode == 1 and message in last_line(refused), refused.stderr[-2000:]
    assert "Traceback" not in refused.stderr
    assert snapshot(run_dir) == before
    assert status(run_dir)["status"] == "completed"


# -- divergence --------------------------------------------------------------------------------------

def test_a_diverging_lr_stops_the_run_as_failed_with_only_finite_checkpoints(tmp_path, hosts):
    run_dir = tmp_path / "run"
    result = train(run_dir, hosts, "num_steps=300", "lr=1e3", "checkpoint_every=5")
    assert result.returncode == 1
    assert last_line(result).startswith("Error: training diverged at step ")
    assert "likely cause: lr=1000 too high" in last_line(result)
    assert last_line(result) in (run_dir / "train.log").read_text().splitlines()[-1]  # the run's log says it too
    assert status(run_dir)["status"] == "failed" and not (run_dir / "final_metrics.json").exists()
    assert checkpoint_dirs(run_dir)
    for checkpoint in checkpoint_dirs(run_dir):
        assert checkpoint_problem(checkpoint, "cpu")[0] is None


# -- a full disk -------------------------------------------------------------------------------------

@pytest.fixture
def small_tmpfs(tmp_path):
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=False)


def test_a_full_disk_is_one_line_keeps_the_last_checkpoint_and_the_run_resumes(tmp_path, hosts, small_tmpfs):
    overrides = ["num_steps=40", "eval_every=20", "checkpoint_every=5"]
    full = tmp_path / "full"
    assert train(full, hosts, *overrides).returncode == 0
    run_dir = small_tmpfs / "run"
    result = train(run_dir, hosts, *overrides)
    assert result.returncode == 1
    assert last_line(result).startswith(f"Error: no space left on device in {run_dir}")
    assert "Traceback" not in result.stderr
    saved = checkpoint_dirs(run_dir)
    assert saved and checkpoint_problem(saved[0], "cpu")[0] is None  # the previous checkpoint stays valid
    subprocess.run(["mount", "-o", "remount,size=20m", str(small_tmpfs)], check=True)
    resumed = train(run_dir, hosts, *overrides)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same_weights(full, run_dir)


# -- permissions -------------------------------------------------------------------------------------

def test_outputs_get_the_users_normal_permissions(tmp_path, hosts):
    run_dir = tmp_path / "run"
    previous = os.umask(0o002)
    try:
        assert train(run_dir, hosts, "num_steps=10").returncode == 0
    finally:
        os.umask(previous)
    modes = {p.relative_to(run_dir): p.stat().st_mode & 0o777 for p in run_dir.rglob("*")}
    assert {m for p, m in modes.items() if (run_dir / p).is_dir()} == {0o775}
    assert {m for p, m in modes.items() if (run_dir / p).is_file()} == {0o664}


# -- sweeps ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("hardware", ["cpu", "submitit_local"])
def test_a_sweep_runs_every_job_past_a_failed_one_and_ends_with_the_count(tmp_path, hosts, hardware):
    sweep_dir = tmp_path / "sweep"
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train.py"), "--multirun", f"hardware={hardware}", *TINY,
         f"host_model.cache_dir={hosts}", "num_steps=10", "eval_every=10", "sae.k=4,5000,8",
         f"hydra.sweep.dir={sweep_dir}"], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 1
    assert last_line(result) == (f"Sweep finished: 2 completed, 1 failed, 0 cancelled (of 3 jobs) in {sweep_dir}; "
                                 f"see python scripts/summarize.py {sweep_dir}")
    failed = sweep_dir / "001_sae.k=5000"
    assert status(failed)["status"] == "failed" and "sae.k must be in (0, sae.sparse_dim=64]" in status(failed)["error"]
    assert status(sweep_dir / "002_sae.k=8")["status"] == "completed"  # the job after the failure ran
    summary = subprocess.run([sys.executable, str(ROOT / "scripts" / "summarize.py"), str(sweep_dir)],
                             capture_output=True, text=True, timeout=120)
    assert summary.returncode == 1 and "2/3 jobs completed (1 failed)" in summary.stdout
    assert "Error: sae.k must be in (0, sae.sparse_dim=64], got 5000" in summary.stdout


def test_a_sweep_where_every_job_fails_is_summarised_without_a_plot(tmp_path, hosts):
    sweep_dir = tmp_path / "sweep"
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train.py"), "--multirun", *TINY, f"host_model.cache_dir={hosts}",
         "sae.k=5000,6000", f"hydra.sweep.dir={sweep_dir}"], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 1 and "Sweep finished: 0 completed, 2 failed, 0 cancelled (of 2 jobs)" in last_line(result)
    (sweep_dir / "frontier.png").write_bytes(b"a stale plot from an earlier summary")
    summary = subprocess.run([sys.executable, str(ROOT / "scripts" / "summarize.py"), str(sweep_dir)],
                             capture_output=True, text=True, timeout=120)
    assert summary.returncode == 1 and "0/2 jobs completed (2 failed)" in summary.stdout
    assert not (sweep_dir / "frontier.png").exists()
    usage = subprocess.run([sys.executable, str(ROOT / "scripts" / "summarize.py"), "--help"],
                           capture_output=True, text=True, timeout=120)
    assert usage.returncode == 0 and "usage: summarize.py [-h] sweep_dir" in usage.stdout
