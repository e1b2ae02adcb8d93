"""Stop at a step boundary when the scheduler asks: a checkpoint first, then the original handler.

SLURM (through submitit's `--signal=USR2@...`) warns a job before its time limit or when it is
preempted; submitit's handler then requeues the job and exits at once, wherever the training
loop happens to be. Deferring the signal to the end of the current step lets the loop save a
consistent checkpoint of exactly that step, so the requeued job loses nothing.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)


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
