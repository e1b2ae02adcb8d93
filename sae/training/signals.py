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
    """Stop signals of a job: before `deferring` is set (set-up, host training, data loading) SIGTERM
    stops the job at once (nothing trained, nothing to save) and USR1/USR2 go to the original
    handler; from then on (the training loop) they are recorded for the loop to act on at the end
    of the current step."""

    def __init__(self) -> None:
        self.received: list[int] = []
        self.previous: dict[int, object] = {}
        self.deferring = False

    def __bool__(self) -> bool:
        return bool(self.received)

    def record(self, signum: int, frame) -> None:
        if self.deferring:
            self.received.append(signum)
        elif signum == signal.SIGTERM:
            raise StopRequested("SIGTERM before the first training step: nothing to save; rerun the same "
                                "command to start again")
        else:
            self.restore()
            signal.raise_signal(signum)  # as if we were not here: submitit requeues, or the default action

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
    """Hold the stop signals for a job's lifetime (see PendingSignals)."""
    pending = PendingSignals()
    if threading.current_thread() is threading.main_thread():  # handlers can only be set there
        for signum in STOP_SIGNALS:
            pending.previous[signum] = signal.signal(signum, pending.record)
    try:
        yield pending
    finally:
        pending.restore()
