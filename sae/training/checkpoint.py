"""SAE training checkpoints: written atomically with a manifest, verified before they are used.

checkpoints/step_XXXXXXX/
  sae.safetensors   weights in raw activation units (input scale folded in): sae.load() reads it
  sae.json          SAE config, n_sources, d_in, source names, input scale, step, flops
  config.json       the resolved run config
  train_state.pt    step, FLOPs, unfolded weights, optimizer, RNG states, dead-latent counters
  manifest.json     sizes + sha256 of the files above, written last

A resumed run takes the newest checkpoint that verifies, loads and holds only finite numbers;
each one it skips gets a one-line warning naming it.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from sae.saes import checkpoint_dirs
from sae.atomic_io import atomic_dir, remove_stale_temps, verify_manifest, write_manifest
from sae.errors import ReportedError

log = logging.getLogger(__name__)


class NoValidCheckpointError(ReportedError):
    """Every checkpoint of a run dir failed verification."""


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:07d}"


def save_sae_checkpoint(run_dir: Path, step: int, sae_folded_state: dict, sae_meta: dict, config: dict,
                        train_state: dict) -> Path:
    final = checkpoint_dir(run_dir, step)
    with atomic_dir(final) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in sae_folded_state.items()}, str(tmp / "sae.safetensors"))
        (tmp / "sae.json").write_text(json.dumps(sae_meta, indent=2, default=str) + "\n")
        (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
        torch.save(train_state, tmp / "train_state.pt")
        write_manifest(tmp)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint dir whose files match its manifest (no loading: for readers)."""
    return next((d for d in checkpoint_dirs(run_dir) if verify_manifest(d) is None), None)


def non_finite_tensor(state, prefix: str = "") -> str | None:
    """The name of the first floating tensor holding NaN/inf in a nested state, or None."""
    if isinstance(state, torch.Tensor):
        return prefix or "tensor" if state.is_floating_point() and not torch.isfinite(state).all() else None
    items = state.items() if isinstance(state, dict) else enumerate(state) if isinstance(state, (list, tuple)) else ()
    for key, value in items:
        found = non_finite_tensor(value, f"{prefix}.{key}" if prefix else str(key))
        if found:
            return found
    return None


def checkpoint_problem(checkpoint: Path, device: str) -> tuple[str | None, dict | None]:
    """(None, train state) for a usable checkpoint, else (what is wrong, None)."""
    problem = verify_manifest(checkpoint)
    if problem:
        return problem, None
    try:
        state = torch.load(checkpoint / "train_state.pt", map_location=device, weights_only=True)
    except Exception as error:  # verified bytes that still do not load: written by another torch?
        return f"train_state.pt does not load ({type(error).__name__}: {str(error).splitlines()[0][:100]})", None
    bad = non_finite_tensor({"sae": state.get("sae", {}), "optimizer": state.get("optimizer", {})})
    if bad:
        return f"non-finite values in {bad}", None
    return None, state


@dataclass
class Resume:
    checkpoint: Path
    state: dict
    skipped: list[str]  # a warning line per newer checkpoint that failed verification


def newest_valid_checkpoint(run_dir: Path, device: str) -> Resume | None:
    """The newest usable checkpoint and what was skipped on the way (the caller logs it once the
    run owns its dir); None when the run has none; NoValidCheckpointError when it has some and
    none is usable."""
    skipped = []
    for checkpoint in checkpoint_dirs(run_dir):
        problem, state = checkpoint_problem(checkpoint, device)
        if problem is None:
            return Resume(checkpoint, state, [f"Skipping checkpoint {c}: {why}" for c, why in skipped])
        skipped.append((checkpoint, problem))
    if skipped:
        raise NoValidCheckpointError(
            f"{run_dir} holds no valid checkpoint: {'; '.join(f'{c.name} ({why})' for c, why in skipped)}. Move "
            f"{Path(run_dir) / 'checkpoints'} away to start this run over, or use a new output dir (hydra.run.dir=...)")
    return None


def remove_stale_checkpoint_temps(run_dir: Path) -> None:
    """Temps of checkpoints and records a killed run left behind (call holding the run-dir lock)."""
    for directory in (Path(run_dir), Path(run_dir) / "checkpoints"):
        for path in remove_stale_temps(directory):
            log.info("Removed %s (left by a run killed while writing)", path)


def load_train_state(checkpoint: Path, device: str) -> dict:
    """The verified train state of one checkpoint; NoValidCheckpointError names what is wrong."""
    problem, state = checkpoint_problem(Path(checkpoint), device)
    if problem:
        raise NoValidCheckpointError(f"checkpoint {checkpoint}: {problem}")
    return state
