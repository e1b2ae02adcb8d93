"""What a dashboard is built from: the dir the user named (a run or a sweep), the run's SAE from its
newest valid checkpoint, its config, and the activations it was trained on while they still exist.

A part that is gone (the host run of a modular SAE, the activation cache or FASTA file of a protein
SAE) does not stop the build: what needs only the SAE is drawn and `missing` says which panels are
not there and why. Everything here is checked before any encoding starts.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from sae.activations.modular import ActivationData, load_activation_data
from sae.analysis.runs import saved_path
from sae.atomic_io import file_sha256
from sae.config import TrainConfig, config_from_dict
from sae.errors import UserInputError
from sae.saes import SparseCoder, checkpoint_dirs, load_with_source
from sae.tasks.protein import ProteinTaskConfig

log = logging.getLogger(__name__)

RUN_HINT = "a run dir (outputs/runs/<date>/<time>, with config.json and checkpoints/)"
SWEEP_HINT = "a sweep dir (outputs/sweeps/<date>/<time>, with multirun.yaml)"


def dir_kind(path: Path) -> str:
    """'run' or 'sweep'; anything else is refused in one line."""
    path = Path(path)
    if not path.is_dir():
        raise UserInputError(f"{path} is not a directory: pass {RUN_HINT} or {SWEEP_HINT}")
    if (path / "config.json").is_file():
        if not checkpoint_dirs(path):
            raise UserInputError(f"{path} is a training run with no checkpoint yet (checkpoints/ is empty or "
                                 "missing): let it reach its first checkpoint, or rerun its command to resume")
        return "run"
    if (path / "multirun.yaml").is_file() or any(path.glob("*/.hydra/overrides.yaml")):
        return "sweep"
    raise UserInputError(f"{path} is neither a training run nor a sweep: pass {RUN_HINT} or {SWEEP_HINT}")


@dataclass
class ProteinCache:
    """A protein run's activation cache, and whether its FASTA file still matches it (then the rows
    can be mapped back to residues: sequence windows, enrichment, position)."""

    cache_dir: Path
    rows: dict[str, int]
    fasta_matches: bool


@dataclass
class RunInputs:
    run_dir: Path
    config: TrainConfig
    checkpoint: Path
    sae: SparseCoder
    meta: dict  # the checkpoint's sae.json
    modular: ActivationData | None = None  # raw units (scale 1), as the saved SAE reads them
    protein: ProteinCache | None = None
    missing: list[str] = field(default_factory=list)  # panels that cannot be drawn, and why

    @property
    def family(self) -> str:
        return "protein" if isinstance(self.config.task, ProteinTaskConfig) else "modular"

    @property
    def source_names(self) -> list[str]:
        return [source["name"] for source in self.meta["sources"]]


def load_run_inputs(run_dir: Path, device: str = "cpu") -> RunInputs:
    run_dir = Path(run_dir)
    try:
        config = config_from_dict(json.loads((run_dir / "config.json").read_text()))
    except (ValueError, KeyError, TypeError) as error:
        raise UserInputError(f"{run_dir}/config.json does not describe a training run of this version "
                             f"({type(error).__name__}: {str(error).splitlines()[0][:120]})") from None
    checkpoint, sae = load_with_source(run_dir, device)  # the newest valid one; skipped ones are warned about
    sae.eval()
    meta = json.loads((checkpoint / "sae.json").read_text())
    inputs = RunInputs(run_dir, config, checkpoint, sae, meta)
    if inputs.family == "protein":
        inputs.protein = protein_cache(inputs)
    else:
        inputs.modular = modular_activations(inputs, device)
    return inputs


def modular_activations(inputs: RunInputs, device: str) -> ActivationData | None:
    """The host's activations over every pair, recomputed from the host run (never retrained: a new
    host would be another model); None, with the reason in `missing`, when the host run is gone."""
    host_dir = saved_path(inputs.meta["host_run_dir"])
    if not (host_dir / "summary.json").is_file():
        inputs.missing.append(f"firing frequencies, heatmaps, Fourier spectra, top pairs and logit effects need the "
                              f"host run {host_dir}, which is gone (no summary.json): restore it, or retrain the SAE")
        return None
    inputs.config.host_model.run_dir = str(host_dir)
    return load_activation_data(inputs.config.task, inputs.config.host_model, normalize=False, device=device)


def protein_cache(inputs: RunInputs) -> ProteinCache | None:
    cache_dir = saved_path(inputs.meta["activation_cache"])
    if not (cache_dir / "rows.json").is_file():
        inputs.missing.append(f"firing frequencies and every latent panel need the activation cache {cache_dir}, "
                              "which is gone: rerun the training command (it rebuilds the cache, then resumes)")
        return None
    record = json.loads((cache_dir / "record.json").read_text())
    fasta = Path(inputs.config.task.fasta)
    matches = fasta.is_file() and file_sha256(fasta) == record["fasta"]["sha256"]
    if not matches:
        what = "is gone" if not fasta.is_file() else "has changed since the cache was built"
        inputs.missing.append(f"sequence windows, amino-acid enrichment and position profiles need the FASTA file "
                              f"{fasta}, which {what}: restore it (the cache rows cannot be mapped to residues)")
    return ProteinCache(cache_dir, json.loads((cache_dir / "rows.json").read_text()), matches)
