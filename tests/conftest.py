"""Shared fixtures. One thread: on a 2-core box two threads made small runs several times slower."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
torch.set_num_threads(1)

from sae.config import TrainConfig  # noqa: E402
from sae.host_models.config import HostModelConfig  # noqa: E402
from sae.saes.topk import TopKSAEConfig  # noqa: E402
from sae.tasks.modular import ModularTaskConfig, Operation  # noqa: E402
from sae.hardware import HardwareConfig  # noqa: E402
from sae.host_models.training import HostRecipe  # noqa: E402
from sae.training.schedules import SchedulerConfig  # noqa: E402
from sae.tracking import TrackingConfig, WandbMode  # noqa: E402

TINY_P = 23


def tiny_task(**overrides) -> ModularTaskConfig:
    keys = dict(name="addition", operations=[Operation.addition], p=TINY_P, train_fraction=0.6, seed=0)
    return ModularTaskConfig(**{**keys, **overrides})


def tiny_host(cache_dir: Path, **overrides) -> HostModelConfig:
    keys = dict(n_layers=2, d_model=32, n_heads=2, kv_heads=2, d_mlp=64, cache_dir=str(cache_dir),
                train=HostRecipe(lr=1e-2, num_steps=60, eval_every=10, steps_after_grok=None))
    return HostModelConfig(**{**keys, **overrides})


def tiny_train_config(cache_dir: Path, sae=None, **overrides) -> TrainConfig:
    keys = dict(
        task=tiny_task(), host_model=tiny_host(cache_dir), sae=sae or TopKSAEConfig(sparse_dim=64, k=4, k_aux=16),
        scheduler=SchedulerConfig(warmup_steps=5), hardware=HardwareConfig(threads=1),
        tracking=TrackingConfig(mode=WandbMode.disabled), lr=3e-3, batch_size=64, num_steps=40,
        log_every=10, eval_every=20,
    )
    return TrainConfig(**{**keys, **overrides})


@pytest.fixture(scope="session")
def host_cache(tmp_path_factory) -> Path:
    """A cache dir shared by the session, so the tiny host is trained once."""
    return tmp_path_factory.mktemp("hosts")


DATA = ROOT / "tests" / "data"
PROTEINS_FASTA = DATA / "proteins.fasta"
TINY_ESM2 = dict(num_layers=3, embed_dim=32, attention_heads=4)


def build_tiny_esm2(seed: int):
    import esm

    torch.manual_seed(seed)
    return esm.model.esm2.ESM2(**TINY_ESM2, alphabet="ESM-1b", token_dropout=True).eval()


@pytest.fixture(scope="session")
def tiny_esm2_files(tmp_path_factory) -> list[Path]:
    """Two tiny ESM-2s of one width, saved in the format fair-esm's local loader reads (the tests
    load them through that real code path; no weights can be downloaded here)."""
    from sae.host_models.esm2 import save_fair_esm_checkpoint

    folder = tmp_path_factory.mktemp("esm2")
    return [save_fair_esm_checkpoint(build_tiny_esm2(seed), folder / f"esm2_tiny_seed{seed}.pt") for seed in (0, 1)]


def tiny_protein_config(tmp_path: Path, checkpoints: list[Path], layers=(2,), sae=None, **overrides) -> TrainConfig:
    from sae.host_models.config import ESM2HostConfig
    from sae.tasks.protein import ProteinTaskConfig

    task = ProteinTaskConfig(fasta=str(PROTEINS_FASTA), max_length=200, tokens_per_batch=2048, test_fraction=0.2,
                             max_train_tokens=4000, max_test_tokens=1500, eval_sequences=6,
                             activation_cache=str(tmp_path / "cache"))
    host = ESM2HostConfig(checkpoints=[str(c) for c in checkpoints], layers=list(layers))
    return tiny_train_config(tmp_path, sae=sae, task=task, host_model=host, **overrides)


@pytest.fixture(scope="module")
def compose_train():
    """compose_train(overrides) -> the TrainConfig scripts/train.py would run (ConfigError on bad input)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from sae.config import register_configs, to_dataclass

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        yield lambda overrides: to_dataclass(compose(config_name="config", overrides=overrides))
