"""The pieces that make runs trustworthy, in-process and fast: atomic files and their permissions,
manifests, stale temps, the run-dir lock, torn metrics lines, warm-up defaults, the divergence
guard and corrupted checkpoints on resume. tests/faults/ injects the same faults into real runs."""
import json
import logging
import os
import shutil
import subprocess
import sys

import pytest
import torch

import sae
from sae.atomic_io import (DiskFullError, atomic_dir, atomic_file, disk_full_as_one_line, remove_stale_temps,
                           verify_manifest, write_json, write_manifest)
from sae.run_lock import RunDirBusyError, exclusive_dir, waiting_lock
from sae.saes import InvalidCheckpointError
from sae.saes.vanilla import VanillaSAEConfig
from sae.tracking import truncate_jsonl
from sae.training.checkpoint import NoValidCheckpointError, checkpoint_dirs, checkpoint_problem
from sae.jobs import TrainingDivergedError, ineffective_settings, run_training
from sae.training.schedules import SchedulerConfig, lr_at
from tests.conftest import tiny_train_config


def final_weights(run_dir):
    from safetensors.torch import load_file

    return load_file(str(checkpoint_dirs(run_dir)[0] / "sae.safetensors"))


# -- files ---------------------------------------------------------------------------------------

def test_atomic_outputs_get_the_umask_permissions_not_private_ones(tmp_path):
    previous = os.umask(0o002)
    try:
        with atomic_dir(tmp_path / "ckpt") as tmp:
            from safetensors.torch import save_file

            save_file({"w": torch.zeros(2)}, str(tmp / "w.safetensors"))  # safetensors creates 0600 files
        write_json(tmp_path / "job.json", {"a": 1})
    finally:
        os.umask(previous)
    assert (tmp_path / "ckpt").stat().st_mode & 0o777 == 0o775
    assert (tmp_path / "ckpt" / "w.safetensors").stat().st_mode & 0o777 == 0o664
    assert (tmp_path / "job.json").stat().st_mode & 0o777 == 0o664


def test_a_failed_write_leaves_the_target_and_no_temp(tmp_path):
    write_json(tmp_path / "a.json", {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_file(tmp_path / "a.json") as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert json.loads((tmp_path / "a.json").read_text()) == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_stale_temps_are_removed_and_only_those(tmp_path):
    (tmp_path / ".step_0000010.tmp-abc").mkdir()
    (tmp_path / ".step_0000010.tmp-abc" / "x").write_text("half a checkpoint")
    (tmp_path / ".job.json.tmp-x1").write_text("{")
    (tmp_path / "step_0000005").mkdir()
    (tmp_path / ".step_0000005.json").write_text("")
    removed = remove_stale_temps(tmp_path)
    assert sorted(p.name for p in removed) == [".job.json.tmp-x1", ".step_0000010.tmp-abc"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".step_0000005.json", "step_0000005"]


def test_disk_full_is_one_line_naming_the_dir(tmp_path):
    import errno

    with pytest.raises(DiskFullError, match=f"no space left on device in {tmp_path}"):
        with disk_full_as_one_line(tmp_path):
            raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(ValueError):  # other errors pass through untouched
        with disk_full_as_one_line(tmp_path):
            raise ValueError("not a disk problem")


def test_manifest_finds_truncation_corruption_and_missing_files(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"0123456789")
    (tmp_path / "b.json").write_text("{}")
    write_manifest(tmp_path)
    assert verify_manifest(tmp_path) is None
    (tmp_path / "a.bin").write_bytes(b"01234")
    assert "a.bin has 5 bytes, the manifest says 10 (truncated?)" == verify_manifest(tmp_path)
    (tmp_path / "a.bin").write_bytes(b"0123456780")
    assert "a.bin does not match its sha256" in verify_manifest(tmp_path)
    (tmp_path / "a.bin").unlink()
    assert verify_manifest(tmp_path) == "a.bin is missing"


def test_truncate_jsonl_drops_a_torn_last_line_and_later_steps(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 10, "a": 1}\n{"step": 20, "a": 2}\n{"step": 30, "a": 3}\n{"step": 40, "tr')
    truncate_jsonl(path, after_step=20)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [10, 20]


# -- the run-dir lock ----------------------------------------------------------------------------

def test_a_wait_for_a_shared_cache_says_what_it_waits_for_and_who_holds_it(tmp_path, caplog):
    """Two runs that need the same uncached host: the second waits on the lock, and says so (what,
    who, and every report interval how long), instead of minutes of silence."""
    import socket

    lock_file = tmp_path / ".cache.lock"
    script = ("import sys, time; sys.path.insert(0, sys.argv[2]); from sae.run_lock import waiting_lock\n"
              "with waiting_lock(sys.argv[1], 'x'):\n    print('holding', flush=True); time.sleep(2.5)")
    holder = subprocess.Popen([sys.executable, "-c", script, str(lock_file), os.getcwd()], stdout=subprocess.PIPE,
                              text=True)
    assert holder.stdout.readline().strip() == "holding"
    with caplog.at_level(logging.INFO, logger="sae.run_lock"):
        with waiting_lock(lock_file, "the host model outputs/hosts/addition_p97_x", report_every_s=0.5):
            assert json.loads((tmp_path / ".cache.lock.holder").read_text())["pid"] == os.getpid()
    holder.wait(timeout=30)
    lines = [record.getMessage() for record in caplog.records]
    assert lines[0].startswith(f"Waiting for the host model outputs/hosts/addition_p97_x: pid {holder.pid} on "
                               f"{socket.gethostname()} (since ")
    assert any(line.startswith("Still waiting for the host model outputs/hosts/addition_p97_x (") for line in lines)
    assert lines[-1].startswith("the host model outputs/hosts/addition_p97_x: lock acquired after")
    assert not (tmp_path / ".cache.lock.holder").exists()  # the record goes with the lock


def test_an_uncontended_shared_lock_says_nothing(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="sae.run_lock"):
        with waiting_lock(tmp_path / ".cache.lock", "the cache"):
            pass
    assert caplog.records == []


def test_a_second_holder_is_refused_naming_the_first(tmp_path):
    import socket

    with exclusive_dir(tmp_path) as lock:
        lock.claim()
        holder = subprocess.run(
            [sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[2]); from sae.run_lock import exclusive_dir\n"
             "with exclusive_dir(sys.argv[1]): pass", str(tmp_path), str(os.getcwd())],
            capture_output=True, text=True, timeout=60)
        assert holder.returncode != 0
        assert (f"RunDirBusyError: run dir {tmp_path} is in use by pid {os.getpid()} on {socket.gethostname()}"
                in holder.stderr)
    assert not (tmp_path.parent / f".{tmp_path.name}.lock.holder").exists()  # released: the record goes with it
    assert not list(tmp_path.iterdir())  # the lock lives beside the run dir, never in it
    with exclusive_dir(tmp_path):
        pass


def test_a_holder_killed_with_sigkill_releases_the_lock(tmp_path):
    code = ("import sys, time; sys.path.insert(0, sys.argv[2]); from sae.run_lock import exclusive_dir\n"
            "with exclusive_dir(sys.argv[1]) as lock:\n    lock.claim(); print('held', flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path), os.getcwd()], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(RunDirBusyError, match=f"pid {holder.pid}"):
        with exclusive_dir(tmp_path):
            pass
    holder.kill()
    holder.wait()
    with exclusive_dir(tmp_path):  # the kernel dropped the dead holder's lock
        pass


# -- configuration that cannot take effect ----------------------------------------------------------

def test_default_warmup_is_a_fraction_so_short_runs_work(host_cache):
    cfg = tiny_train_config(host_cache, num_steps=50, scheduler=SchedulerConfig())
    assert cfg.scheduler.warmup_for(50) == 2 and cfg.scheduler.warmup_for(2000) == 100
    assert lr_at(0, 1.0, 50, cfg.scheduler) == 0.5 and lr_at(2, 1.0, 50, cfg.scheduler) == 1.0
    with pytest.raises(ValueError, match="scheduler.warmup_steps must be < num_steps=50, got 50"):
        tiny_train_config(host_cache, num_steps=50, scheduler=SchedulerConfig(warmup_steps=50))


def test_a_sparsity_warmup_longer_than_the_run_is_warned_about(host_cache):
    cfg = tiny_train_config(host_cache, num_steps=100, sae=VanillaSAEConfig(sparse_dim=64, sparsity_warmup_steps=500))
    assert ineffective_settings(cfg) == [
        "sae.sparsity_warmup_steps=500 > num_steps=100: the sparsity penalty only reaches 20% of sae.sparsity_coef; "
        "lower sae.sparsity_warmup_steps or raise num_steps"]
    assert ineffective_settings(tiny_train_config(host_cache, num_steps=600, sae=cfg.sae)) == []


# -- divergence and corrupted checkpoints ------------------------------------------------------------

def test_an_injected_nan_stops_the_run_and_is_never_checkpointed(tmp_path, host_cache, monkeypatch):
    import sae.jobs as run_module

    real_step = run_module.optimisation_step
    calls = {"n": 0}

    def poisoned_step(sae_model, *args):
        calls["n"] += 1
        if calls["n"] == 13:  # after the step-7 checkpoint, before the step-15 one
            with torch.no_grad():
                sae_model.W_dec[3, 0, 1] = float("nan")
        return real_step(sae_model, *args)

    monkeypatch.setattr(run_module, "optimisation_step", poisoned_step)
    cfg = tiny_train_config(host_cache, num_steps=40, log_every=100, checkpoint_every=15)
    with pytest.raises(TrainingDivergedError, match="training diverged at step 1[3-5]: .*the last checkpoint "
                                                    "\\(step 7\\) is finite"):
        run_training(cfg, tmp_path / "run")
    for checkpoint in checkpoint_dirs(tmp_path / "run"):
        assert checkpoint_problem(checkpoint, "cpu")[0] is None
    assert max(int(c.name.split("_")[1]) for c in checkpoint_dirs(tmp_path / "run")) == 7


def corrupt(checkpoint, how):
    if how == "truncated train_state.pt":
        path = checkpoint / "train_state.pt"
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "random bytes in sae.safetensors":
        path = checkpoint / "sae.safetensors"
        data = bytearray(path.read_bytes())
        data[-64:] = os.urandom(64)
        path.write_bytes(bytes(data))
    else:  # a NaN that loads: the files match their manifest, the numbers do not
        state = torch.load(checkpoint / "train_state.pt", weights_only=True)
        state["sae"]["W_enc"][0, 0, 0] = float("nan")
        torch.save(state, checkpoint / "train_state.pt")
        (checkpoint / "manifest.json").unlink()
        write_manifest(checkpoint)


@pytest.mark.parametrize("how", ["truncated train_state.pt", "random bytes in sae.safetensors", "nan in the state"])
def test_resume_skips_a_corrupted_newest_checkpoint_and_ends_identical(tmp_path, host_cache, how, caplog):
    cfg = tiny_train_config(host_cache, num_steps=40, checkpoint_every=10)
    run_training(cfg, tmp_path / "full")
    interrupted = tmp_path / "interrupted"
    for step in (10, 20):
        name = f"step_{step:07d}"
        shutil.copytree(tmp_path / "full" / "checkpoints" / name, interrupted / "checkpoints" / name)
    corrupt(interrupted / "checkpoints" / "step_0000020", how)
    if how != "nan in the state":  # (that NaN is in the optimiser's view only; sae.safetensors is finite)
        with pytest.raises(InvalidCheckpointError):
            sae.saes.load(interrupted / "checkpoints" / "step_0000020")  # load() verifies the manifest too
    with caplog.at_level(logging.WARNING):
        summary = run_training(cfg, interrupted)
    skipped = [r.getMessage() for r in caplog.records if "Skipping checkpoint" in r.getMessage()]
    assert len(skipped) == 1
    assert skipped[0].startswith(f"Skipping checkpoint {interrupted / 'checkpoints' / 'step_0000020'}: {PROBLEMS[how]}")
    assert summary["step"] == 40
    full, resumed = final_weights(tmp_path / "full"), final_weights(interrupted)
    assert all(torch.equal(full[k], resumed[k]) for k in full)


PROBLEMS = {"truncated train_state.pt": "train_state.pt has ",  # ... bytes, the manifest says ... (truncated?)
            "random bytes in sae.safetensors": "sae.safetensors does not match its sha256 in the manifest (corrupted)",
            "nan in the state": "non-finite values in sae.W_enc"}


def test_no_valid_checkpoint_is_one_clear_error_and_changes_nothing(tmp_path, host_cache):
    cfg = tiny_train_config(host_cache, num_steps=20)
    run_training(cfg, tmp_path / "run")
    for checkpoint in checkpoint_dirs(tmp_path / "run"):
        corrupt(checkpoint, "random bytes in sae.safetensors")
    before = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    with pytest.raises(NoValidCheckpointError, match=f"{tmp_path / 'run'} holds no valid checkpoint: step_0000020 "):
        run_training(cfg, tmp_path / "run")
    assert {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()} == before


def test_the_readme_snippet_import_sae_then_load(tmp_path, host_cache):
    run_training(tiny_train_config(host_cache, num_steps=10), tmp_path / "run")
    checkpoint = checkpoint_dirs(tmp_path / "run")[0]
    assert sae.saes.load(checkpoint).W_dec.shape == (64, 1, 32)
    from safetensors.torch import load_file, save_file

    weights = load_file(str(checkpoint / "sae.safetensors"))
    weights["b_enc"][0] = float("inf")
    save_file(weights, str(checkpoint / "sae.safetensors"))
    write_manifest(checkpoint)  # bytes that verify, numbers that are not finite
    with pytest.raises(InvalidCheckpointError, match="non-finite values in b_enc"):
        sae.saes.load(checkpoint)
