"""The repository tracks sources, docs and published results, never run outputs: a checkpoint or an
activation file in git makes every clone carry it (127 files, 22 MB of a study's checkpoints were
once tracked under experimental/outputs/)."""
import shutil
import subprocess
from pathlib import Path, PurePosixPath

import pytest

ROOT = Path(__file__).resolve().parents[2]
# weights, optimizer states, activation tables and caches, in the formats this project writes or reads
RUN_OUTPUT_SUFFIXES = {".safetensors", ".pt", ".pth", ".ckpt", ".npy", ".npz", ".bin", ".pkl", ".h5"}
ALLOWED_DIRS = ("tests/data/",)  # tiny fixtures the tests read


def tracked_files() -> list[str]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    return subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()


def run_outputs(paths: list[str]) -> list[str]:
    """Tracked paths that are run outputs: checkpoint/activation files, or anything in an outputs/ dir."""
    found = []
    for path in paths:
        if path.startswith(ALLOWED_DIRS) or path == "outputs/README.md":
            continue
        parts = PurePosixPath(path)
        if parts.suffix in RUN_OUTPUT_SUFFIXES or "outputs" in parts.parts[:-1] or "checkpoints" in parts.parts[:-1]:
            found.append(path)
    return found


def test_no_checkpoint_or_activation_file_is_tracked():
    offenders = run_outputs(tracked_files())
    assert not offenders, f"{len(offenders)} run output(s) tracked, e.g. {offenders[:5]}: git rm --cached them"


def test_the_rule_catches_what_was_once_tracked():
    once = ["experimental/outputs/experimental_full/cc_first-division/study/seed0/crosscoder/config.json",
            "docs/runs/checkpoints/step_0000010/sae.json", "notes/acts.npy", "weights/model.safetensors"]
    kept = ["tests/data/proteins.fasta", "tests/data/tiny.pt", "outputs/README.md", "experimental/results/a/results.json",
            "docs/img/benchmark_curves.png", "sae/training/checkpoint.py"]
    assert run_outputs(once + kept) == once


def test_every_outputs_dir_is_ignored():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    probes = ["outputs/runs/x/sae.safetensors", "experimental/outputs/study/train_state.pt", "sae/outputs/x.json"]
    ignored = subprocess.run(["git", "check-ignore", "--no-index", *probes], cwd=ROOT, capture_output=True, text=True)
    assert ignored.stdout.split() == probes
    kept = subprocess.run(["git", "check-ignore", "--no-index", "outputs/README.md"], cwd=ROOT, capture_output=True)
    assert kept.returncode == 1  # not ignored
