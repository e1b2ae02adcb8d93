"""SAE registry: configs select an architecture by name (`sae=topk`); checkpoints store the name,
never an import path."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file

from sae.atomic_io import MANIFEST, verify_manifest
from sae.errors import ReportedError
from sae.saes.base import WEIGHTS_FORMAT, SAEConfig, SAEOutput, SparseCoder
from sae.saes.batchtopk import BatchTopKSAE, BatchTopKSAEConfig
from sae.saes.clt import CLTConfig, CrossLayerTranscoder
from sae.saes.foreign import foreign_format, load_foreign
from sae.saes.gated import GatedSAE, GatedSAEConfig
from sae.saes.jumprelu import JumpReLUSAE, JumpReLUSAEConfig
from sae.saes.matryoshka import MatryoshkaSAE, MatryoshkaSAEConfig
from sae.saes.topk import TopKSAE, TopKSAEConfig
from sae.saes.vanilla import VanillaSAE, VanillaSAEConfig

log = logging.getLogger(__name__)

SAE_TYPES: dict[str, tuple[type[SAEConfig], type[SparseCoder]]] = {
    "vanilla": (VanillaSAEConfig, VanillaSAE),
    "topk": (TopKSAEConfig, TopKSAE),
    "batchtopk": (BatchTopKSAEConfig, BatchTopKSAE),
    "jumprelu": (JumpReLUSAEConfig, JumpReLUSAE),
    "matryoshka": (MatryoshkaSAEConfig, MatryoshkaSAE),
    "gated": (GatedSAEConfig, GatedSAE),
    "clt": (CLTConfig, CrossLayerTranscoder),
}


def build_sae(cfg: SAEConfig, n_sources: int, d_in: int) -> SparseCoder:
    """The SAE class registered for the config's class (not its `type` string, which only names it)."""
    for config_cls, sae_cls in SAE_TYPES.values():
        if type(cfg) is config_cls:
            return sae_cls(cfg, n_sources, d_in)
    raise ValueError(f"no SAE registered for {type(cfg).__name__}; registered: {sorted(SAE_TYPES)}")


class InvalidCheckpointError(ReportedError):
    """A checkpoint dir whose files do not match their manifest, or hold non-finite weights."""


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """A run dir's checkpoint dirs, newest first (temps start with '.', so half-written ones never match)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted((d for d in root.glob("step_*") if d.is_dir()), key=lambda d: int(d.name.split("_")[1]), reverse=True)


def load(path: str | Path, device: str = "cpu") -> SparseCoder:
    """Load an SAE/crosscoder saved by training in raw activation units, in inference mode
    (`.eval()`: each row is encoded on its own, e.g. BatchTopK by its threshold). path: a checkpoint
    dir (`.../checkpoints/<name>/`), a run dir (its newest checkpoint that verifies; each newer one
    skipped is named in a warning), or a SAELens / sparsify folder (sae.saes.foreign)."""
    if foreign_format(Path(path)) is not None:
        return load_foreign(Path(path), device)
    return load_with_source(path, device)[1]


def load_with_source(path: str | Path, device: str = "cpu") -> tuple[Path, SparseCoder]:
    """(the checkpoint dir it came from, the SAE) for a checkpoint dir or a run dir (see `load`)."""
    path = Path(path)
    if (path / "sae.json").is_file() or not (path / "checkpoints").is_dir():
        return path, load_checkpoint(path, device)
    problems = []
    for checkpoint in checkpoint_dirs(path):
        try:
            sae = load_checkpoint(checkpoint, device)
        except (InvalidCheckpointError, FileNotFoundError) as problem:
            problems.append(f"{checkpoint.name}: {problem}")
            continue
        for problem in problems:
            log.warning("Skipping checkpoint %s", problem)
        return checkpoint, sae
    raise InvalidCheckpointError(f"{path} holds no valid checkpoint" + (f" ({'; '.join(problems)})" if problems else
                                                                      " (its checkpoints/ dir is empty)"))


def load_checkpoint(checkpoint_dir: str | Path, device: str = "cpu") -> SparseCoder:
    """Load one checkpoint dir (see `load`).

    The files are verified against the checkpoint's manifest.json and the weights must be finite;
    a checkpoint written before manifests existed can be adopted with
    `sae.atomic_io.write_manifest(checkpoint_dir)` once you trust it."""
    checkpoint_dir = Path(checkpoint_dir)
    weights, meta = checkpoint_dir / "sae.safetensors", checkpoint_dir / "sae.json"
    for path in (weights, meta):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: expected a checkpoint dir written by scripts/train.py")
    problem = verify_manifest(checkpoint_dir)
    if problem:
        raise InvalidCheckpointError(f"checkpoint {checkpoint_dir}: {problem}" + (
            " (written before checkpoints carried manifests? adopt it with sae.atomic_io.write_manifest)"
            if problem == f"no {MANIFEST}" else ""))
    info = json.loads(meta.read_text())
    if info.get("weights_format", 1) != WEIGHTS_FORMAT:
        raise InvalidCheckpointError(f"checkpoint {checkpoint_dir}: weights_format {info.get('weights_format', 1)} "
                                     f"(an early layout) is not read any more; retrain it with scripts/train.py")
    config_cls, _ = SAE_TYPES[info["sae"]["type"]]
    sae = build_sae(config_cls(**info["sae"]), info["n_sources"], info["d_in"])
    state = load_file(str(weights), device=device)
    bad = [name for name, tensor in state.items() if not torch.isfinite(tensor).all()]
    if bad:
        raise InvalidCheckpointError(f"checkpoint {checkpoint_dir}: non-finite values in {', '.join(bad)}")
    sae.load_state_dict(state)
    return sae.to(device).eval()  # inference mode: BatchTopK's threshold, not a ranking over the batch given


__all__ = ["CLTConfig", "CrossLayerTranscoder",
           "InvalidCheckpointError", "SAEConfig", "SAEOutput", "SparseCoder", "SAE_TYPES", "build_sae", "load",
           "BatchTopKSAE", "BatchTopKSAEConfig", "GatedSAE", "GatedSAEConfig", "JumpReLUSAE", "JumpReLUSAEConfig",
           "MatryoshkaSAE", "MatryoshkaSAEConfig", "checkpoint_dirs", "load_checkpoint", "TopKSAE", "TopKSAEConfig",
           "VanillaSAE",
           "VanillaSAEConfig"]
