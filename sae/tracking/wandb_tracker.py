"""Weights & Biases tracking. Offline by default: no account, no network, no prompt; sync later
with `wandb sync <run_dir>/wandb/offline-run-*`."""
from __future__ import annotations

import os
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Optional

from sae.errors import UserInputError


class WandbMode(str, Enum):
    offline = "offline"
    online = "online"
    disabled = "disabled"


@dataclass
class TrackingConfig:
    mode: WandbMode = WandbMode.offline
    project: str = "train-sae"
    entity: Optional[str] = None
    name: Optional[str] = None  # run name; null = the run dir's name
    group: Optional[str] = None  # sweeps put every job of one sweep in one group


def check_tracking(cfg: TrackingConfig) -> None:
    """Online mode needs credentials: say so before any work, instead of wandb raising mid-run."""
    if cfg.mode is not WandbMode.online:
        return
    if os.environ.get("WANDB_API_KEY"):
        return
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    if netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore"):
        return
    raise UserInputError("tracking.mode=online needs W&B credentials: run `wandb login` or set WANDB_API_KEY, "
                     "or use tracking=offline (the default) and `wandb sync` later")


class WandbTracker:
    def __init__(self, cfg: TrackingConfig, run_dir: Path, config: dict, resume_id: Optional[str] = None):
        import wandb

        self._wandb = wandb
        try:
            self.run = wandb.init(
                mode=cfg.mode.value, project=cfg.project, entity=cfg.entity, group=cfg.group,
                name=cfg.name or Path(run_dir).name, dir=str(run_dir), config=config,
                id=resume_id, resume="allow" if resume_id else None,
            )
        except Exception as error:  # wandb raises several types (CommError, UsageError, ...)
            raise UserInputError(f"W&B init failed (tracking.mode={cfg.mode.value}): {error}. "
                               "Use tracking=offline to train without a connection.") from error

    @property
    def run_id(self) -> str:
        return self.run.id

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def finish(self) -> None:
        self.run.finish()
