"""The scripts as a user runs them, in a subprocess, on tiny overrides."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = ["task.p=23", "task.train_fraction=0.6", "host_model.d_model=32", "host_model.n_heads=2", "host_model.kv_heads=2",
        "host_model.d_mlp=64", "host_model.train.num_steps=60", "host_model.train.steps_after_grok=null", "hardware.threads=1"]
SAE_TINY = ["sae.sparse_dim=64", "sae.k=8", "batch_size=64", "scheduler.warmup_steps=5"]


def run_script(script: str, *overrides: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true"}
    return subprocess.run([sys.executable, str(ROOT / "scripts" / script), *overrides], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_train_script_end_to_end(tmp_path):
    run_dir = tmp_path / "run"
    result = run_script("train.py", *TINY, *SAE_TINY, "num_steps=30",
                        "eval_every=15", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "loss recovered" in result.stdout
    summary = json.loads((run_dir / "final_metrics.json").read_text())
    assert summary["step"] == 30 and summary["eval/test/l0"] <= 8
    assert (run_dir / "checkpoints" / "step_0000030" / "sae.safetensors").is_file()
    assert list((run_dir / "wandb").glob("offline-run-*"))  # offline W&B by default
    log = (run_dir / "train.log").read_text()  # Hydra's log holds what the run said
    assert "loss recovered" in log and f"Run dir: {run_dir}" in log
    hosts = list((tmp_path / "outputs" / "hosts").iterdir())
    assert len(hosts) == 1 and (hosts[0] / "summary.json").is_file() and (hosts[0] / "curves.png").is_file()


def test_train_host_script_then_sae_on_its_run(tmp_path):
    host_dir = tmp_path / "host"
    result = run_script("train_host.py", *TINY, "tracking=disabled", f"hydra.run.dir={host_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((host_dir / "summary.json").read_text())
    assert summary["final_step"] == 60 and summary["checkpoints"][-1]["step"] == 60
    result = run_script("train.py", *TINY, f"host_model.run_dir={host_dir}", "host_model.checkpoints=[step_50,final]",
                        *SAE_TINY, "num_steps=10", "tracking=disabled",
                        f"hydra.run.dir={tmp_path / 'sae'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "sae" / "final_metrics.json").read_text())["sources"] == ["step_50.L0", "final.L0"]
    assert not (tmp_path / "outputs" / "hosts").exists()  # the given run was used, nothing retrained


@pytest.mark.parametrize("overrides, message", [
    (["sae.k=5000", "sae.sparse_dim=2048"], "Error: sae.k must be in (0, sae.sparse_dim=2048], got 5000"),
    (["+sae.kk=3"], "Error: Key 'kk' not in 'TopKSAEConfig' (full key: sae.kk)"),
    (["hardware=cuda"], "Error: hardware.device=cuda but torch sees no CUDA device"),
    (["host_model.checkpoints=[missing/step.safetensors]"], "Error: host_model.checkpoints: file not found: missing/step.safetensors"),
    (["host_model.run_dir=nowhere"], "Error: host_model.run_dir=nowhere holds no finished host run"),
    (["sae.kk=50"], "Error: Could not override 'sae.kk': Key 'kk' not in 'TopKSAEConfig' (full key: sae.kk)"),
    (["sae=topkk"], "Error: Could not find 'sae/topkk' (available options: "
                    f"{', '.join(sorted(p.stem for p in (ROOT / 'conf' / 'sae').glob('*.yaml')))})"),
    (["hardware.device=gpu"], "Error: Error merging override hardware.device=gpu: Invalid value 'gpu', expected one "
                              "of [cpu, cuda] (full key: hardware.device)"),
    (["sae.k=fifty"], "Error: Error merging override sae.k=fifty: Value 'fifty' of type 'str' could not be converted "
                      "to Integer (full key: sae.k)"),
])
def test_bad_input_fails_in_one_line_before_any_work(tmp_path, overrides, message):
    if "cuda" in overrides[0]:
        pytest.importorskip("torch")
        import torch

        if torch.cuda.is_available():
            pytest.skip("a CUDA device is present")
    existing = tmp_path / "run"
    (existing / "checkpoints").mkdir(parents=True)
    (existing / "keep.txt").write_text("earlier results")
    result = run_script("train.py", *overrides, f"hydra.run.dir={existing}", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [message] or message in result.stderr.strip().splitlines()[-1]
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in existing.iterdir()) == ["checkpoints", "keep.txt"]  # no .hydra/, job.json, log
    assert (existing / "keep.txt").read_text() == "earlier results"
    assert not (tmp_path / "outputs").exists()  # no host was trained
    fresh = run_script("train.py", *overrides, f"hydra.run.dir={tmp_path / 'fresh'}", cwd=tmp_path)
    assert fresh.returncode == 1 and not (tmp_path / "fresh").exists()  # a refused new run leaves no empty dir


def test_online_tracking_without_credentials_is_refused_before_work(tmp_path):
    env_home = tmp_path / "home"
    env_home.mkdir()
    env = {**os.environ, "HOME": str(env_home), "WANDB_API_KEY": ""}
    env.pop("WANDB_API_KEY")
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), "tracking=online",
                             f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode != 0
    assert "tracking.mode=online needs W&B credentials" in result.stderr
    assert not (tmp_path / "outputs").exists()


def test_slurm_preset_without_sbatch_fails_at_submission_with_a_hint(tmp_path):
    env = {**os.environ, "PATH": str(Path(sys.executable).parent)}  # no sbatch on this PATH
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), "--multirun", "hardware=slurm_gpu",
                             f"hydra.sweep.dir={tmp_path / 'sweep'}"], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith("Error: hardware=slurm_*: `sbatch` not found on PATH")
    assert "Traceback" not in result.stderr
    assert not list((tmp_path / "sweep").glob("*/.hydra"))  # no job ran


@pytest.mark.parametrize("hardware", ["cpu", "submitit_local"])
def test_local_multirun_without_slurm_and_its_summary(tmp_path, hardware):
    """Plain --multirun (Hydra's basic launcher) and submitit's local launcher need no SLURM."""
    sweep_dir = tmp_path / "sweep"
    env = {**os.environ, "PATH": str(Path(sys.executable).parent) + ":/usr/local/bin:/bin"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train.py"), "--multirun", f"hardware={hardware}", *TINY, "sae.sparse_dim=64",
         "batch_size=64", "scheduler.warmup_steps=5", "num_steps=10", "eval_every=10", "sae=vanilla,topk", "hardware.threads=1", f"hydra.sweep.dir={sweep_dir}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted(sweep_dir.glob("0*"))
    assert [j.name for j in jobs] == ["000_sae=vanilla", "001_sae=topk"]  # named from the swept keys only
    for job in jobs:
        assert json.loads((job / "job.json").read_text())["status"] == "completed"
        group = json.loads((job / "config.json").read_text())["tracking"]["group"]
        assert group == str(sweep_dir).replace("/", "_")  # one W&B group per sweep
    summary = subprocess.run([sys.executable, str(ROOT / "scripts" / "summarize.py"), str(sweep_dir)],
                             capture_output=True, text=True, timeout=120)
    assert summary.returncode == 0 and "2/2 jobs completed" in summary.stdout
    assert "| sae |" in summary.stdout.splitlines()[0].replace(" sae_type |", "")
    header, *rows = [line.split(",") for line in (sweep_dir / "summary.csv").read_text().splitlines()]
    assert "sae_type" not in header  # the swept `sae` column names the type already
    for row, job in zip(rows, jobs):  # the reconstruction spliced into the host (one source: its own value)
        final = json.loads((job / "final_metrics.json").read_text())
        for column in ("loss_recovered", "acc_spliced"):
            assert float(row[header.index(column)]) == pytest.approx(final[f"eval/test/final.L0/{column}"])
    (summary_run,) = (sweep_dir / "wandb").glob("offline-run-*")  # the frontier and table in the sweep's W&B group
    assert list(summary_run.glob("files/media/images/sweep/frontier_*.png"))
    assert list(summary_run.glob("files/media/table/sweep/summary_*.table.json"))


def test_summarize_refuses_a_dir_that_is_not_a_sweep(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "summarize.py"), str(tmp_path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "holds no job dirs" in result.stderr


PROTEIN = ["task=protein_mlm", "host_model=esm2_t6_8M", f"task.fasta={ROOT / 'tests' / 'data' / 'proteins.fasta'}",
           "host_model.layers=[2]", "task.max_length=200", "task.tokens_per_batch=2048", "task.test_fraction=0.2",
           "task.max_train_tokens=3000", "task.max_test_tokens=1000", "task.eval_sequences=4",
           "sae=topk", "sae.k=8", "sae.sparse_dim=64", "batch_size=64", "scheduler.warmup_steps=5",
           "tracking=disabled", "hardware.threads=1"]


def test_protein_sweep_builds_the_activation_cache_once(tmp_path, tiny_esm2_files):
    """The issue's command on a tiny local ESM-2 (fair-esm's local loader), as a two-job sweep."""
    sweep_dir = tmp_path / "sweep"
    result = run_script("train.py", "--multirun", *PROTEIN, f"host_model.checkpoints=[{tiny_esm2_files[0]}]",
                        "num_steps=20", "eval_every=20", "sae.sparse_dim=32,64", f"hydra.sweep.dir={sweep_dir}",
                        cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("Activation cache written") == 1 and "Reusing activation cache" in result.stdout
    assert "masked-LM CE clean" in result.stdout
    for job in sorted(sweep_dir.glob("0*")):
        summary = json.loads((job / "final_metrics.json").read_text())
        assert summary["eval/test/l0"] <= 8 and "eval/test/esm2_tiny_seed0.L2/loss_recovered" in summary
    assert len(list((tmp_path / "outputs" / "activations").glob("proteins_*/record.json"))) == 1


@pytest.mark.parametrize("extra, message", [
    (["task.fasta=tests/data/bad_residue.fasta"], "record 'bad_2' has '*' at position 6"),
    (["task.fasta=nowhere.fasta"], "task.fasta: file not found: nowhere.fasta"),
    (["host_model.checkpoints=[missing/esm2_x.pt]"], "host_model.checkpoints: file not found: missing/esm2_x.pt"),
    (["host_model.layers=[4]"], "host_model.layers: layer 4 out of range [0, 3]"),
])
def test_protein_bad_input_fails_in_one_line_before_any_work(tmp_path, tiny_esm2_files, extra, message):
    checkpoint = f"host_model.checkpoints=[{tiny_esm2_files[0]}]"
    overrides = [o for o in PROTEIN if not o.startswith(extra[0].split("=")[0] + "=")]
    result = run_script("train.py", *overrides, checkpoint, *extra, f"hydra.run.dir={tmp_path / 'run'}", cwd=ROOT)
    assert result.returncode == 1 and message in result.stderr.strip().splitlines()[-1], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists() and not (ROOT / "outputs" / "activations" / "nowhere").exists()


def test_esm2_extraction_benchmark_runs(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "benchmark_esm2.py"), "--repeats", "1",
                             "--layers", "2,6", "--max-records", "6", "--threads", "1"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| 2 ") or line.startswith("| 6 ")]
    assert len(rows) == 2 and all(row.rstrip().endswith("% |") for row in rows)


def test_esm2_memory_benchmark_builds_a_cache_per_multiple(tmp_path):
    records = (ROOT / "tests/data/proteins.fasta").read_text().split(">")[1:9]  # 8 records
    fasta = tmp_path / "few.fasta"
    fasta.write_text("".join(">" + r for r in records))
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "benchmark_esm2_memory.py"), "--fasta", str(fasta),
                             "--multiples", "1,3"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line.split("|") for line in result.stdout.splitlines() if line.startswith("| 1x") or line.startswith("| 3x")]
    residues = [int(row[3].replace(",", "")) for row in rows]
    assert len(rows) == 2 and residues[1] == 3 * residues[0] > 0  # every copy's residues were extracted


def test_random_esm2_checkpoint_loads_through_fair_esm(tmp_path):
    from sae.host_models.esm2 import ESM2Host, load_fair_esm

    out = tmp_path / "esm2_t6_8M_random.pt"
    result = run_script("esm2_random_checkpoint.py", "esm2_t6_8M_UR50D", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    host = ESM2Host(load_fair_esm(str(out), "esm2_t6_8M_UR50D")[0])
    assert (host.n_layers, host.d_model) == (6, 320)
    refused = run_script("esm2_random_checkpoint.py", "esm2_t6_8M_UR50D", str(tmp_path / "model.pt"), cwd=tmp_path)
    assert refused.returncode != 0 and refused.stderr.strip().splitlines()[-1].startswith("Error: out:")
