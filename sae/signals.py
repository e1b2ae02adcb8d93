"""Stop at a step boundary when asked: a checkpoint first, then the stop.

SLURM (through submitit's `--signal=USR2@...`) warns a job before its time limit or when it is
preempted; submitit's handler then requeues the job and exits at once, wherever the training
loop happens to be. `scancel`, and SLURM before a requeue, send SIGTERM, which submitit ignores
("bypass") until SIGKILL follows. Deferring these signals to the end of the current step lets the
loop save a consistent checkpoint of exactly that step, so nothing is lost either way.

Ctrl-C (SIGINT), the way a person stops a local run, is a stop like SIGTERM (exit status 130); a
second Ctrl-C before the stop is done ends the process at once, without that step's checkpoint.
"""
from __future__ import annotations

import contextlib
import signal
import sys
import threading
from typing import Iterator

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)
# signals that end the job as cancelled (the others hand over to the scheduler), with their name in messages
ENDING_SIGNALS = {signal.SIGINT: "Ctrl-C (SIGINT)", signal.SIGTERM: "SIGTERM"}


class StopRequested(SystemExit):
    """SIGTERM (scancel, or SLURM before a requeue) or Ctrl-C: the job stops as cancelled, after the
    current step's checkpoint when training. Exits with 128 + the signal, as a process killed by it would."""

    def __init__(self, message: str, status: str = "cancelled", signum: int = signal.SIGTERM):
        super().__init__(128 + signum)
        self.message, self.status = message, status


class PendingSignals:
    """Stop signals of a job: before `deferring` is set (set-up, host training, data loading) SIGTERM
    and Ctrl-C stop the job at once (nothing trained, nothing to save) and USR1/USR2 go to the
    original handler; from then on (the training loop) they are recorded for the loop to act on at
    the end of the current step, except a second Ctrl-C, which stops at once.

    before_work: what is under way until `deferring` is set, for the message of a stop then."""

    def __init__(self, before_work: str = "before the first training step") -> None:
        self.received: list[int] = []
        self.previous: dict[int, object] = {}
        self.deferring = False
        self.before_work = before_work

    def __bool__(self) -> bool:
        return bool(self.received)

    def record(self, signum: int, frame) -> None:
        if self.deferring and signum == signal.SIGINT and signum in self.received:
            self.restore()
            raise StopRequested("Ctrl-C again: stopped at once, without a checkpoint of this step; rerun the same "
                                "command to resume from the last checkpoint", signum=signum)
        if self.deferring:
            self.received.append(signum)
            if signum == signal.SIGINT:  # a person is waiting: say that the stop is under way
                sys.stderr.write("\nCtrl-C: stopping after this step's checkpoint (Ctrl-C again to stop at once)\n")
        elif signum in ENDING_SIGNALS:
            self.restore()
            raise StopRequested(f"{ENDING_SIGNALS[signum]} {self.before_work}: nothing to save; rerun the same "
                                "command to start again", signum=signum)
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
def deferred_stop_signals(before_work: str = "before the first training step") -> Iterator[PendingSignals]:
    """Hold the stop signals for a job's lifetime (see PendingSignals)."""
    pending = PendingSignals(before_work)
    if threading.current_thread() is threading.main_thread():  # handlers can only be set there
        for signum in STOP_SIGNALS:
            pending.previous[signum] = signal.signal(signum, pending.record)
    try:
        yield pending
    finally:
        pending.restore()
