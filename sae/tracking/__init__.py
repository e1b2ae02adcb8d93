"""Build the tracker for a run: metrics.jsonl always, plus W&B unless tracking.mode=disabled."""
from __future__ import annotations

import json
from pathlib import Path

from sae.atomic_io import atomic_file
from sae.tracking.base import JsonlTracker, MultiTracker, NullTracker, Tracker
from sae.tracking.wandb_tracker import TrackingConfig, WandbMode, WandbTracker, check_tracking


def make_tracker(cfg: TrackingConfig, run_dir: Path, config: dict) -> Tracker:
    """Resuming in the same run dir continues the same W&B run (its id is kept in wandb_id.txt)."""
    run_dir = Path(run_dir)
    jsonl = JsonlTracker(run_dir / "metrics.jsonl")
    if cfg.mode is WandbMode.disabled:
        return jsonl
    id_file = run_dir / "wandb_id.txt"
    resume_id = id_file.read_text().strip() if id_file.is_file() else None
    wandb_tracker = WandbTracker(cfg, run_dir, config, resume_id)
    id_file.write_text(wandb_tracker.run_id + "\n")
    return MultiTracker(jsonl, wandb_tracker)


def truncate_jsonl(path: Path, after_step: int) -> None:
    """Drop records logged after `after_step` (a resumed run logs those steps again), and a torn
    last line (a job killed mid-write), so the file is whole JSON lines again."""
    path = Path(path)
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a partial line: only the last write of a killed job can be one
        if record["step"] <= after_step:
            kept.append(line)
    with atomic_file(path) as tmp:
        tmp.write_text("".join(line + "\n" for line in kept))


__all__ = ["Tracker", "NullTracker", "JsonlTracker", "MultiTracker", "TrackingConfig", "WandbMode",
           "make_tracker", "check_tracking", "truncate_jsonl"]
