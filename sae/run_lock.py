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
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Iterator

from filelock import FileLock, Timeout

from sae.errors import ReportedError

log = logging.getLogger(__name__)



class RunDirBusyError(ReportedError):
    """Another process holds the run dir."""


def holder_record() -> dict:
    """Who holds a lock: this process."""
    return {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "command": " ".join(sys.argv)[:500]}


def describe_holder(holder_file: Path, unknown: str = "another process (still checking its inputs)") -> str:
    try:
        holder = json.loads(Path(holder_file).read_text())
        return f"pid {holder['pid']} on {holder['host']} (since {holder['since']})"
    except (OSError, ValueError, KeyError):
        return unknown


def remove_own_holder_record(holder_file: Path) -> None:
    with contextlib.suppress(OSError, ValueError):
        if holder_file.is_file() and json.loads(holder_file.read_text()).get("pid") == os.getpid():
            holder_file.unlink()


class RunDirLock:
    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir).resolve()
        self.lock_file = self.run_dir.parent / f".{self.run_dir.name}.lock"
        self.holder_file = self.run_dir.parent / f".{self.run_dir.name}.lock.holder"

    def claim(self) -> None:
        """Say who holds the dir (call once the run's checks passed: a refused run writes nothing)."""
        self.holder_file.write_text(json.dumps(holder_record()) + "\n")

    def describe_holder(self) -> str:
        return describe_holder(self.holder_file)


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
        remove_own_holder_record(lock.holder_file)
        file_lock.release()


WAIT_REPORT_S = 60.0  # how often a waiting process says it is still waiting


@contextlib.contextmanager
def waiting_lock(lock_file: Path, what: str, report_every_s: float = WAIT_REPORT_S) -> Iterator[None]:
    """Hold `lock_file` for the body, waiting while another process holds it (concurrent sweep jobs
    sharing a cache: one builds, the others wait and reuse). A wait is never silent: it says what
    it waits for (`what`, e.g. "the host model cache outputs/hosts/..."), who holds it, and every
    `report_every_s` how long it has waited. The holder is recorded beside the lock
    (`<lock>.holder`) while the body runs."""
    lock_file = Path(lock_file)
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    holder_file = lock_file.with_name(lock_file.name + ".holder")
    file_lock = FileLock(str(lock_file))
    try:
        file_lock.acquire(timeout=0)
    except Timeout:
        _wait(file_lock, holder_file, what, report_every_s)
    try:
        with contextlib.suppress(OSError):  # the record is for people; the lock itself is the kernel's
            holder_file.write_text(json.dumps(holder_record()) + "\n")
        yield
    finally:
        remove_own_holder_record(holder_file)
        file_lock.release()


def _wait(file_lock: FileLock, holder_file: Path, what: str, report_every_s: float) -> None:
    holder = lambda: describe_holder(holder_file, unknown="another process")
    log.warning(f"Waiting for {what}: {holder()} holds its lock ({file_lock.lock_file}); this run goes on when "
                "it is done")
    started = time.time()
    while True:
        try:
            file_lock.acquire(timeout=report_every_s)
            log.info(f"{what}: lock acquired after {time.time() - started:.0f} s of waiting")
            return
        except Timeout:
            log.info(f"Still waiting for {what} ({time.time() - started:.0f} s so far; held by {holder()})")
