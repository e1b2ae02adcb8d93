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


LOWER_IS_BETTER = ("loss", "fvu", "mse", "ce_", "dead_frac", "aux", "sparsity")
HIGHER_IS_BETTER = ("acc", "loss_recovered")


def summary_rule(key: str) -> str | None:
    """W&B summary of a metric: "max" for accuracies and loss recovered, "min" for losses and
    FVU, None (W&B's default: the last value) for the rest (lr, l0, steps)."""
    name = key.rsplit("/", 1)[-1]
    if any(name.startswith(h) or name == h for h in HIGHER_IS_BETTER):
        return "max"
    if any(name.startswith(m) or name.endswith(m) for m in LOWER_IS_BETTER):
        return "min"
    return None


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

        self._defined: set[str] = set()

    @property
    def run_id(self) -> str:
        return self.run.id

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key in metrics.keys() - self._defined:  # each key's summary: its best value, not its last
            rule = summary_rule(key)
            if rule is not None:
                self.run.define_metric(key, summary=rule)
            self._defined.add(key)
        self.run.log(metrics, step=step)

    def log_image(self, key: str, path: Path, step: int) -> None:
        self.run.log({key: self._wandb.Image(str(path))}, step=step)

    def log_table(self, key: str, rows: list[dict], step: int) -> None:
        columns = list(rows[0]) if rows else []
        table = self._wandb.Table(columns=columns, data=[[row.get(c) for c in columns] for row in rows])
        self.run.log({key: table}, step=step)

    def summarize(self, values: dict) -> None:
        self.run.summary.update(values)

    def finish(self) -> None:
        self.run.finish()
        # run.finish() returns while W&B's service process may still append to the run's
        # logs/debug-internal.log; tearing the service down waits for it, so the run dir is final
        # when the job reports done (CI saw a byte written after a finished run's return).
        self._wandb.teardown()
