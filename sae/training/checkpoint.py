"""Atomic writes: a killed job never leaves half a file or half a checkpoint directory."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temp dir beside `final`; on success it replaces `final` in one rename."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        yield tmp
        if final.exists():  # rename over a non-empty dir is not allowed: move the old one aside
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(final: Path) -> Iterator[Path]:
    """Yield a temp path beside `final`; on success it replaces `final`."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{final.name}.", dir=final.parent)
    os.close(fd)
    try:
        yield Path(name)
        os.replace(name, final)
    finally:
        if os.path.exists(name):
            os.unlink(name)


def write_json(path: Path, data: Any) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")


# -- SAE checkpoints ---------------------------------------------------------------------------
# checkpoints/step_XXXXXXX/
#   sae.safetensors   weights in raw activation units (input scale folded in): sae.load() reads it
#   sae.json          SAE config, n_sources, d_in, source names, input scale, step, flops
#   config.json       the resolved run config
#   train_state.pt    step, FLOPs, unfolded weights, optimizer, RNG states, dead-latent counters


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:07d}"


def save_sae_checkpoint(run_dir: Path, step: int, sae_folded_state: dict, sae_meta: dict, config: dict,
                        train_state: dict) -> Path:
    import torch
    from safetensors.torch import save_file

    final = checkpoint_dir(run_dir, step)
    with atomic_dir(final) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in sae_folded_state.items()}, str(tmp / "sae.safetensors"))
        (tmp / "sae.json").write_text(json.dumps(sae_meta, indent=2, default=str) + "\n")
        (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
        torch.save(train_state, tmp / "train_state.pt")
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint dir (temp dirs start with '.', so half-written ones never match)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return None
    done = [d for d in root.glob("step_*") if (d / "train_state.pt").is_file()]
    return max(done, key=lambda d: int(d.name.split("_")[1]), default=None)


def load_train_state(checkpoint: Path, device: str) -> dict:
    import torch

    return torch.load(Path(checkpoint) / "train_state.pt", map_location=device, weights_only=True)
