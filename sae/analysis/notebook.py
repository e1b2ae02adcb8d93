"""What every experimental/ notebook does first: pick its profile and output folder, and build
overrides that train into the shared host cache.

    SAE_NOTEBOOK_PROFILE   small (default: CI-sized, minutes on 2 cores) | full (the README numbers)
    SAE_NOTEBOOK_OUT       where runs, figures and results.json go (default outputs/experimental)
    SAE_NOTEBOOK_THREADS   torch threads (default 1: notebooks run two at a time in CI)
`scripts/run_notebooks.py` sets these and executes notebooks top to bottom with nbclient.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from sae.errors import UserInputError
from sae.atomic_io import write_json

REPO = Path(__file__).resolve().parents[2]
PROFILES = ("small", "full")


@dataclass
class NotebookSetup:
    name: str
    profile: str
    out_dir: Path

    def pick(self, small, full):
        """The value for this profile."""
        return small if self.profile == "small" else full

    def overrides(self, *extra: str) -> list[str]:
        """Command-line overrides for sae.analysis.runs.train_or_reuse; hosts go to the repo's shared
        cache (outputs/hosts) so notebooks and `make train` reuse each other's hosts."""
        threads = torch.get_num_threads()
        return [f"host_model.cache_dir={REPO / 'outputs' / 'hosts'}", "tracking=disabled",
                f"hardware.threads={threads}", *extra]

    def figure(self, stem: str) -> Path:
        return self.out_dir / f"{stem}.png"

    def save_results(self, results: dict) -> None:
        """results.json beside the figures (scripts/run_notebooks.py tabulates it)."""
        write_json(self.out_dir / "results.json", {"notebook": self.name, "profile": self.profile, **results})
        print(json.dumps(results, default=str)[:3000])


def setup(name: str) -> NotebookSetup:
    profile = os.environ.get("SAE_NOTEBOOK_PROFILE", "small")
    if profile not in PROFILES:
        raise UserInputError(f"SAE_NOTEBOOK_PROFILE must be one of {', '.join(PROFILES)}, got '{profile}'")
    threads = os.environ.get("SAE_NOTEBOOK_THREADS", "1")
    if not threads.isdigit() or int(threads) < 1:
        raise UserInputError(f"SAE_NOTEBOOK_THREADS must be a positive integer, got '{threads}'")
    torch.set_num_threads(int(threads))
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # the library's progress lines, in the notebook
    out_dir = Path(os.environ.get("SAE_NOTEBOOK_OUT", REPO / "outputs" / "experimental")) / name
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"notebook {name}: profile={profile}, outputs in {out_dir}")
    return NotebookSetup(name, profile, out_dir)


def show(path: str | Path):
    """Display a saved PNG inline (the figure file is what the README links)."""
    from IPython.display import Image, display

    display(Image(filename=str(path)))
