"""Training runs as analysis inputs: compose a config in Python as on the command line, train it
(or reuse it), and load a finished run's SAE with its host activations.

Notebooks use these so that a figure is always made from a run that `scripts/train.py` could have
made with the same overrides, and so that a run dir lacking what an analysis needs (no SAE, a
one-source SAE where a crosscoder is needed, another task, a deleted host run) stops with a message
saying what to run first.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from hydra import compose, initialize_config_dir

from sae.config import config_from_dict, register_configs, to_dataclass
from sae.errors import UserInputError
from sae.saes import SparseCoder, load
from sae.activations.modular import ActivationData, load_activation_data
from sae.training.checkpoint import latest_checkpoint
from sae.jobs import check_resumable, run_training

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
TRAIN_COMMAND = "python scripts/train.py"


class RunDirError(UserInputError):
    """A run dir that lacks what an analysis needs; the message says what to run first."""


def compose_train_config(overrides: list[str]):
    """The TrainConfig that `python scripts/train.py <overrides>` would run, checked the same way."""
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return to_dataclass(compose(config_name="config", overrides=list(overrides)))


def train_or_reuse(overrides: list[str], run_dir: str | Path) -> Path:
    """Train `scripts/train.py <overrides>` into run_dir, or reuse it if it already finished with this
    config (an unfinished one resumes; one with another config is refused by the resume check)."""
    run_dir = Path(run_dir)
    cfg = compose_train_config(overrides)
    finished = run_dir / "final_metrics.json"
    checkpoint = latest_checkpoint(run_dir)
    if finished.is_file() and checkpoint is not None and json.loads(finished.read_text())["step"] == cfg.num_steps:
        check_resumable(checkpoint, cfg)  # same config, or a one-line refusal naming the key that differs
        return run_dir
    run_training(cfg, run_dir)
    return run_dir


@dataclass
class SaeRun:
    """A finished SAE/crosscoder run: its config, SAE (raw activation units) and host activations
    (raw, scale 1, so `sae.encode(data.train)` is what the saved SAE computes)."""

    run_dir: Path
    config: object  # sae.config.TrainConfig
    sae: SparseCoder
    data: ActivationData
    metrics: dict
    input_scale: list[float]  # per source, what training multiplied raw activations by (sae.json)


def load_sae_run(run_dir: str | Path, task: str | None = None, crosscoder: bool = False,
                 device: str = "cpu") -> SaeRun:
    """Load a run written by scripts/train.py (or train_or_reuse). task: refuse a run of another
    task; crosscoder: refuse a one-source SAE (model diffing needs pre and post sources)."""
    run_dir = Path(run_dir)
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise RunDirError(f"{run_dir} holds no SAE training run (no config.json): train one first with "
                          f"`{TRAIN_COMMAND} hydra.run.dir={run_dir}`")
    saved = json.loads(config_path.read_text())
    if "fasta" in saved.get("task", {}):
        raise RunDirError(f"{run_dir} is a protein run (task=protein_mlm); these analyses need a modular-arithmetic "
                          f"run, e.g. `{TRAIN_COMMAND} task=addition hydra.run.dir=...`")
    saved_task = saved["task"]["name"]
    if task is not None and saved_task != task:
        raise RunDirError(f"{run_dir} was trained on task={saved_task}, not task={task}: pass a run of "
                          f"task={task} or train one with `{TRAIN_COMMAND} task={task} hydra.run.dir=...`")
    finished = run_dir / "final_metrics.json"
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None or not finished.is_file():
        raise RunDirError(f"{run_dir} holds no finished SAE (no final checkpoint): finish it with "
                          f"`{TRAIN_COMMAND} hydra.run.dir={run_dir}` and the overrides in its config.json")
    meta = json.loads((checkpoint / "sae.json").read_text())
    if crosscoder and meta["n_sources"] < 2:
        raise RunDirError(f"{run_dir} holds a one-source SAE ({meta['sources'][0]['name']}); model diffing needs a "
                          f"crosscoder over the host before and after grokking: run `{TRAIN_COMMAND} "
                          f"experiment=crosscoder_pre_post_grok task={saved_task} hydra.run.dir=...`")
    config = config_from_dict(saved)
    config.host_model.run_dir = _host_run_dir(meta, run_dir)
    data = load_activation_data(config.task, config.host_model, normalize=False, device=device)
    return SaeRun(run_dir, config, load(checkpoint, device), data, json.loads(finished.read_text()),
                  meta["input_scale"])


def saved_path(path: str) -> Path:
    """A path a run recorded (sae.json: host run, activation cache), relative to where training ran
    when not absolute: usually the repo root."""
    path = Path(path)
    return CONF_DIR.parent / path if not path.is_absolute() and not path.exists() else path


def _host_run_dir(meta: dict, run_dir: Path) -> str:
    """The host run the SAE was trained on; it must still exist (retraining could differ)."""
    host_dir = saved_path(meta["host_run_dir"])
    summary = host_dir / "summary.json"
    if not summary.is_file():
        raise RunDirError(f"{run_dir} was trained on the host run {host_dir}, which is gone (no summary.json): "
                          f"retrain the SAE with `{TRAIN_COMMAND} ...` (it retrains the host) or restore that dir")
    return str(host_dir)
