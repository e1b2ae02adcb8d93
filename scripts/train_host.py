"""Train a grokking host model: `python scripts/train_host.py task=division`.

Writes checkpoints (log-spaced, plus the memorisation and grokking steps), summary.json and
curves.png into the run dir. `scripts/train.py host_model.run_dir=<that dir>` then reads it.
"""
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sae.config import HostTrainConfig, register_configs, to_dataclass  # noqa: E402
from sae.errors import UserInputError  # noqa: E402
from sae.training.host import run_host_job  # noqa: E402

register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="train_host")
def main(cfg: DictConfig) -> dict:
    try:
        host_cfg: HostTrainConfig = to_dataclass(cfg)
        return run_host_job(host_cfg, Path(HydraConfig.get().runtime.output_dir))
    except UserInputError as error:
        sys.exit(f"Error: {error}")


if __name__ == "__main__":
    main()
