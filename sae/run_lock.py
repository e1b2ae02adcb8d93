"""One process per run dir (and per shared cache): a `filelock` lock held for the whole run.

Two processes in one dir (the same command started twice, a requeue racing a manual rerun) would
both train, interleave their metrics and overwrite each other's checkpoints. The second one is
refused before any work, in one line naming the dir and the holder. The lock is the kernel's
(flock through filelock), so a holder killed with SIGKILL releases it. It lives beside the run dir
(`.<name>.lock` in its parent), never inside it, so that a refused run leaves the run dir byte for
byte as it was; the holder record (`.<name>.lock.holder`: pid, host, start time) is written once
the run has passed its checks and removed when it ends.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Iterator

from filelock import FileLock, Timeout

from sae.errors import ReportedError



class RunDirBusyError(ReportedError):
    """Another process holds the run dir."""


class RunDirLock:
    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir).resolve()
        self.lock_file = self.run_dir.parent / f".{self.run_dir.name}.lock"
        self.holder_file = self.run_dir.parent / f".{self.run_dir.name}.lock.holder"

    def claim(self) -> None:
        """Say who holds the dir (call once the run's checks passed: a refused run writes nothing)."""
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S"),
                  "command": " ".join(sys.argv)[:500]}
        self.holder_file.write_text(json.dumps(holder) + "\n")

    def describe_holder(self) -> str:
        try:
            holder = json.loads(self.holder_file.read_text())
            return f"pid {holder['pid']} on {holder['host']} (since {holder['since']})"
        except (OSError, ValueError, KeyError):
            return "another process (still checking its inputs)"


@contextlib.contextmanager
def exclusive_dir(directory: Path, what: str = "run dir") -> Iterator[RunDirLock]:
    """Hold `directory`'s lock for the body; RunDirBusyError at once if someone else holds it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lock = RunDirLock(directory)
    file_lock = FileLock(str(lock.lock_file), timeout=0)
    try:
        file_lock.acquire()
    except Timeout:
        raise RunDirBusyError(f"{what} {directory} is in use by {lock.describe_holder()}: wait for it to finish, "
                              "or pick another output dir (hydra.run.dir=...)") from None
    try:
        yield lock
    finally:
        with contextlib.suppress(OSError, ValueError):
            if lock.holder_file.is_file() and json.loads(lock.holder_file.read_text()).get("pid") == os.getpid():
                lock.holder_file.unlink()
        file_lock.release()


@contextlib.contextmanager
def waiting_lock(lock_file: Path) -> Iterator[None]:
    """Wait for `lock_file` (concurrent sweep jobs sharing a cache: one builds, the others wait and reuse)."""
    Path(lock_file).parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(lock_file)):
        yield
