"""Real sweeps on the local SLURM cluster (scripts/slurm/cluster.sh start). Skipped without one."""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
TINY = ["task.p=23", "task.train_fraction=0.6", "host_model.d_model=32", "host_model.n_heads=2", "host_model.kv_heads=2",
        "host_model.d_mlp=64", "host_model.train.num_steps=60", "host_model.train.steps_after_grok=null",
        "batch_size=64", "scheduler.warmup_steps=5", "tracking=disabled"]


def cluster_is_up() -> bool:
    if shutil.which("sinfo") is None or shutil.which("sacct") is None:
        return False
    try:
        up = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=10)
        accounting = subprocess.run(["sacct", "-n", "-X", "-S", "now"], capture_output=True, timeout=10)
    except subprocess.TimeoutExpired:
        return False
    return up.returncode == 0 and any(s in up.stdout for s in ("idle", "mixed", "alloc")) and accounting.returncode == 0


pytestmark = [pytest.mark.slurm,
              pytest.mark.skipif(not cluster_is_up(), reason="no SLURM cluster with accounting (scripts/slurm/cluster.sh start)")]


def sweep(tmp_path: Path, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "train.py"), "--multirun", "hardware=slurm_cpu", *TINY, *overrides,
         f"hydra.sweep.dir={tmp_path / 'sweep'}"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def job_dirs(tmp_path: Path) -> list[Path]:
    return sorted(p.parent.parent for p in (tmp_path / "sweep").glob("*/.hydra/overrides.yaml"))


def summarize(tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "summarize.py"), str(tmp_path / "sweep")],
                          capture_output=True, text=True, timeout=120)


def sacct_state(job_id: str) -> str:
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"], capture_output=True, text=True)
    return out.stdout.strip()


def final_sacct_state(job_id: str, timeout: float = 60) -> str:
    """submitit returns once the job wrote its result; the SLURM step may still be RUNNING/COMPLETING then."""
    deadline = time.time() + timeout
    while (state := sacct_state(job_id)) in ("RUNNING", "COMPLETING", "PENDING", "") and time.time() < deadline:
        time.sleep(0.5)
    return state


def test_sweep_of_four_jobs_on_slurm(tmp_path):
    process = sweep(tmp_path, "num_steps=30", "eval_every=15", "sae=vanilla,topk", "sae.sparse_dim=32,64")
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output[-3000:]
    jobs = job_dirs(tmp_path)
    assert len(jobs) == 4
    for job in jobs:
        metrics = json.loads((job / "final_metrics.json").read_text())
        assert metrics["step"] == 30 and 0 <= metrics["eval/test/fvu"] < 1
        info = json.loads((job / "job.json").read_text())
        assert info["status"] == "completed" and final_sacct_state(info["slurm_job_id"]) == "COMPLETED"
    result = summarize(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "4/4 jobs completed" in result.stdout
    assert (tmp_path / "sweep" / "frontier.png").stat().st_size > 0
    csv_rows = (tmp_path / "sweep" / "summary.csv").read_text().splitlines()
    assert len(csv_rows) == 5 and "sae" in csv_rows[0] and "sae.sparse_dim" in csv_rows[0]


REQUEUE_STEPS = 4000  # the requeue test's jobs: long enough to be mid-run at step 100 on any machine


def wait_for(predicate, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise TimeoutError(f"timed out waiting for {what}")


@pytest.mark.parametrize("tasks", [1, 2])
def test_requeued_job_resumes_and_ends_like_an_uninterrupted_one(tmp_path, tasks):
    """Two jobs differ only in log_every (which does not change the weights); one is requeued
    mid-run as a preemption would, resumes from its checkpoint, and ends with the same weights.
    tasks=2: each job is one SAE trained by 2 gloo processes (SLURM tasks), one job at a time."""
    # The requeue comes right after the first checkpoint (step 100), while thousands of steps are
    # left (seconds at this size): SIGTERM stops the job after its next step's checkpoint and SLURM
    # starts it again, from that checkpoint. A job that had already ended would make scontrol fail.
    process = sweep(tmp_path, f"num_steps={REQUEUE_STEPS}", "checkpoint_every=100", f"eval_every={REQUEUE_STEPS}",
                    "log_every=50,60", "sae.sparse_dim=64", "sae.k=8", f"hydra.launcher.tasks_per_node={tasks}",
                    *(["hydra.launcher.array_parallelism=1"] if tasks > 1 else []))
    try:
        first = wait_for(lambda: next(iter(job_dirs(tmp_path)), None), 300, "the first job to start")
        wait_for(lambda: (first / "checkpoints" / "step_0000100").is_dir(), 300, "a periodic checkpoint of the first job")
        job_id = json.loads((first / "job.json").read_text())["slurm_job_id"]
        subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=30)
        output, _ = process.communicate(timeout=600)
    finally:
        process.kill()
    assert process.returncode == 0, output[-3000:]
    logs = "".join(p.read_text() for p in (tmp_path / "sweep" / ".submitit").glob(f"{job_id}*/*_log.out"))
    assert "Resuming from" in logs
    jobs = job_dirs(tmp_path)
    finals = [load_file(str(job / "checkpoints" / f"step_{REQUEUE_STEPS:07d}" / "sae.safetensors")) for job in jobs]
    assert all(t.equal(finals[1][k]) for k, t in finals[0].items())


def test_a_two_task_job_trains_one_sae_with_gloo_like_one_process(tmp_path):
    """hydra.launcher.tasks_per_node=2: one SLURM job of 2 tasks joins one gloo group (address and
    port from submitit) and trains the SAE one process trains (float32: close, not equal)."""
    overrides = ["num_steps=200", "sae.sparse_dim=64", "sae.k=8", "checkpoint_every=100"]
    process = sweep(tmp_path, *overrides, "hydra.launcher.tasks_per_node=2")
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output[-3000:]
    (job,) = job_dirs(tmp_path)
    assert json.loads((job / "final_metrics.json").read_text())["world_size"] == 2
    task_logs = sorted(p.name for p in (tmp_path / "sweep" / ".submitit").glob("*/*_log.out"))
    assert [name.split("_")[-2] for name in task_logs] == ["0", "1"], task_logs  # <job>_<task>_log.out
    single = subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), *TINY, *overrides, "hardware.threads=1",
                             f"hydra.run.dir={tmp_path / 'single'}"], cwd=tmp_path, capture_output=True, text=True)
    assert single.returncode == 0, single.stderr[-3000:]
    ours = load_file(str(job / "checkpoints" / "step_0000200" / "sae.safetensors"))
    reference = load_file(str(tmp_path / "single" / "checkpoints" / "step_0000200" / "sae.safetensors"))
    for name, tensor in reference.items():
        assert (ours[name] - tensor).norm() / tensor.norm() < 1e-4, name


def test_cancelled_jobs_do_not_stop_the_sweep_waiting_for_the_rest(tmp_path):
    """One job at a time (array_parallelism=1): the running job is cancelled (scancel: SIGTERM, it
    checkpoints and records itself cancelled) and a pending one is cancelled before it starts. The
    sweep still waits for the third, then prints the count and exits 1; the summary lists all three."""
    process = sweep(tmp_path, "num_steps=3000", "checkpoint_every=100", "eval_every=3000", "sae.sparse_dim=32,48,64",
                    "hydra.launcher.array_parallelism=1")
    try:
        first = wait_for(lambda: next(iter(job_dirs(tmp_path)), None), 300, "the first job to start")
        metrics = first / "metrics.jsonl"
        wait_for(lambda: metrics.is_file() and metrics.stat().st_size > 0, 300, "the first job's first training steps")
        job_id = json.loads((first / "job.json").read_text())["slurm_job_id"]
        array_id = job_id.split("_")[0]
        subprocess.run(["scancel", f"{array_id}_2"], check=True, timeout=30)  # still pending
        subprocess.run(["scancel", job_id], check=True, timeout=30)  # running
        output, _ = process.communicate(timeout=900)
    finally:
        process.kill()
    sweep_dir = tmp_path / "sweep"
    assert process.returncode == 1, output[-3000:]
    assert (f"Sweep finished: 1 completed, 0 failed, 2 cancelled (of 3 jobs) in {sweep_dir}; "
            f"see python scripts/summarize.py {sweep_dir}") in output
    assert json.loads((first / "job.json").read_text())["status"] == "cancelled"
    assert (sweep_dir / "001_sae.sparse_dim=48" / "final_metrics.json").is_file()  # waited for it
    result = summarize(tmp_path)
    assert result.returncode == 1
    assert "1/3 jobs completed (1 cancelled, 1 not started)" in result.stdout
    assert "002_sae.sparse_dim=64 (not started" in result.stdout


def test_a_partition_slurm_rejects_fails_before_submission(tmp_path):
    env = {**os.environ, "SLURM_PARTITION": "no-such-partition"}
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), "--multirun", "hardware=slurm_cpu",
                             f"hydra.sweep.dir={tmp_path / 'sweep'}"], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert "SLURM rejects partition 'no-such-partition'" in last and "sinfo -s" in last
    assert not (tmp_path / "sweep" / ".submitit").exists()

