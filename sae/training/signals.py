"""Stop at a step boundary when asked: a checkpoint first, then the stop.

SLURM (through submitit's `--signal=USR2@...`) warns a job before its time limit or when it is
preempted; submitit's handler then requeues the job and exits at once, wherever the training
loop happens to be. `scancel`, and SLURM before a requeue, send SIGTERM, which submitit ignores
("bypass") until SIGKILL follows. Deferring these signals to the end of the current step lets the
loop save a consistent checkpoint of exactly that step, so nothing is lost either way.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)


class StopRequested(SystemExit):
    """SIGTERM (scancel, or SLURM before a requeue) during training: the step was checkpointed.
    Exits with 128 + SIGTERM, as a process killed by it would."""

    def __init__(self, message: str, status: str = "cancelled"):
        super().__init__(128 + signal.SIGTERM)
        self.message, self.status = message, status


class PendingSignals:
    def __init__(self) -> None:
        self.received: list[int] = []
        self.previous: dict[int, object] = {}

    def __bool__(self) -> bool:
        return bool(self.received)

    def record(self, signum: int, frame) -> None:
        self.received.append(signum)

    def deliver(self) -> None:
        """Restore the original handlers and re-raise what arrived (submitit requeues and exits)."""
        self.restore()
        received, self.received = self.received, []
        for signum in received:
            signal.raise_signal(signum)

    def restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous.clear()


@contextlib.contextmanager
def deferred_stop_signals() -> Iterator[PendingSignals]:
    pending = PendingSignals()
    if threading.current_thread() is threading.main_thread():  # handlers can only be set there
        for signum in STOP_SIGNALS:
            pending.previous[signum] = signal.signal(signum, pending.record)
    try:
        yield pending
    finally:
        pending.restore()
