"""Train an SAE or crosscoder: `python scripts/train.py task=division sae=topk sae.k=50`."""

import hydra
from omegaconf import DictConfig

from sae.config import register_configs
from sae.launch import run_cli, run_job
from sae.jobs import run_training

register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> dict:
    return run_job(cfg, run_training)


if __name__ == "__main__":
    run_cli(main)
