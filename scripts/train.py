"""Train an SAE or crosscoder: `python scripts/train.py task=division sae=topk sae.k=50`."""
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sae.config import TrainConfig, register_configs, to_dataclass  # noqa: E402
from sae.errors import UserInputError  # noqa: E402
from sae.training.run import run_training  # noqa: E402

register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> dict:
    try:
        train_cfg: TrainConfig = to_dataclass(cfg)
        return run_training(train_cfg, Path(HydraConfig.get().runtime.output_dir))
    except UserInputError as error:
        sys.exit(f"Error: {error}")


if __name__ == "__main__":
    main()
