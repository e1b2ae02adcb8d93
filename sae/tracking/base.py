"""Trackers: `log(metrics, step)` and `finish()`. The loop never checks whether tracking is on."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

from sae.atomic_io import disk_full_as_one_line


class Tracker(Protocol):
    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def log_image(self, key: str, path: Path, step: int) -> None: ...

    def log_table(self, key: str, rows: list[dict], step: int) -> None: ...

    def summarize(self, values: dict) -> None: ...

    def finish(self) -> None: ...


class NullTracker:
    """Also the base of trackers that keep only numbers: images, tables and summaries are W&B's."""

    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_image(self, key: str, path: Path, step: int) -> None:
        pass

    def log_table(self, key: str, rows: list[dict], step: int) -> None:
        pass

    def summarize(self, values: dict) -> None:
        pass

    def finish(self) -> None:
        pass


class JsonlTracker(NullTracker):
    """Appends one JSON object per log call to `path` (always on: the local record of a run)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a")

    def log(self, metrics: dict[str, float], step: int) -> None:
        with disk_full_as_one_line(self.path.parent):
            self._file.write(json.dumps({"step": step, **metrics}) + "\n")
            self._file.flush()

    def finish(self) -> None:
        self._file.close()


class MultiTracker:
    def __init__(self, *trackers: Tracker):
        self.trackers = trackers

    def log(self, metrics: dict[str, float], step: int) -> None:
        for tracker in self.trackers:
            tracker.log(metrics, step)

    def log_image(self, key: str, path: Path, step: int) -> None:
        for tracker in self.trackers:
            tracker.log_image(key, path, step)

    def log_table(self, key: str, rows: list[dict], step: int) -> None:
        for tracker in self.trackers:
            tracker.log_table(key, rows, step)

    def summarize(self, values: dict) -> None:
        for tracker in self.trackers:
            tracker.summarize(values)

    def finish(self) -> None:
        for tracker in self.trackers:
            tracker.finish()
