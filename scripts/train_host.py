"""Train a grokking host model: `python scripts/train_host.py task=division`.

Writes checkpoints (log-spaced, plus the memorisation and grokking steps), summary.json and
curves.png into the run dir; `scripts/train.py host_model.run_dir=<that dir>` then reads it.
"""

import hydra
from omegaconf import DictConfig

from sae.config import register_configs
from sae.launch import run_cli, run_job
from sae.host_models.training import run_host_job

register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="train_host")
def main(cfg: DictConfig) -> dict:
    return run_job(cfg, run_host_job)


if __name__ == "__main__":
    run_cli(main)
