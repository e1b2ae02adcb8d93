"""A Hydra callback for the SLURM hardware presets: before any job is submitted, check that
`sbatch` exists and that SLURM accepts the partition, and fail with SLURM's own message and a
hint instead of a traceback from deep inside submitit."""
from __future__ import annotations

import shutil
import subprocess
import sys
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf


def preflight_problem(partition: str | None) -> str | None:
    """None when a job could be submitted, else a one-line explanation."""
    if shutil.which("sbatch") is None:
        return ("hardware=slurm_*: `sbatch` not found on PATH, so nothing can be submitted to SLURM. "
                "Run on a SLURM login node, start the local cluster (make slurm-up), or sweep locally "
                "with hardware=submitit_local or hardware=cpu")
    if partition:
        result = subprocess.run(["scontrol", "show", "partition", partition], capture_output=True, text=True,
                                timeout=30)
        if result.returncode != 0:
            slurm_says = (result.stderr or result.stdout).strip().splitlines()
            return (f"SLURM rejects partition '{partition}' ({slurm_says[0] if slurm_says else 'no message'}); "
                    "set SLURM_PARTITION to one listed by `sinfo -s`, or unset it for the default partition")
    return None


class SlurmPreflight(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        partition = OmegaConf.select(config, "hydra.launcher.partition")
        problem = preflight_problem(partition)
        if problem:
            sys.exit(f"Error: {problem}")
