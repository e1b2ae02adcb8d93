"""`hydra.launcher._target_` of conf/config.yaml (basic) and of the submitit hardware presets."""
from __future__ import annotations

import logging
import subprocess
import time
import traceback
from typing import Sequence

from hydra._internal.core_plugins.basic_launcher import BasicLauncher
from hydra.core.utils import JobReturn, JobStatus
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher, SlurmLauncher

from sae.launch import JobFailedError, tally_sweep

log = logging.getLogger(__name__)


def job_status(job_return: JobReturn) -> str:
    """completed / failed; a failure other than a reported one (printed by the job as one line) is
    a bug: its traceback is printed here, since the sweep no longer stops to raise it."""
    if job_return.status == JobStatus.COMPLETED:
        return "completed"
    error = job_return._return_value
    if isinstance(error, BaseException) and not isinstance(error, JobFailedError):
        log.error("Job %s failed:\n%s", job_return.hydra_cfg.hydra.job.num if job_return.hydra_cfg else "?",
                  "".join(traceback.format_exception(error)).rstrip())
    return "failed"


class WaitingBasicLauncher(BasicLauncher):
    """Hydra's basic launcher (jobs one after another in this process), with the tally."""

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        returns = super().launch(job_overrides, initial_job_idx)
        tally_sweep([job_status(r) for r in returns], str(self.config.hydra.sweep.dir))
        return returns


class WaitingSubmititMixin:
    """Wait for every submitit job; a job that produced no result (cancelled, killed, out of
    requeues) is counted by its scheduler state instead of stopping the wait."""

    POLL_S = 2.0

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        jobs = self.submit(job_overrides, initial_job_idx)
        outcomes: dict[int, tuple[str, JobReturn | None]] = {}
        while len(outcomes) < len(jobs):
            for index, job in enumerate(jobs):
                if index in outcomes:
                    continue
                if job.done():
                    outcomes[index] = self.outcome(job)
                elif self.vanished(job):
                    log.warning("Job %s left the queue without a trace (cancelled while pending)", job.job_id)
                    outcomes[index] = ("cancelled", None)
            time.sleep(self.POLL_S if len(outcomes) < len(jobs) else 0)
        ordered = [outcomes[i] for i in range(len(jobs))]
        tally_sweep([status for status, _ in ordered], str(self.config.hydra.sweep.dir))
        return [job_return for _, job_return in ordered if job_return is not None]

    @staticmethod
    def outcome(job) -> tuple[str, JobReturn | None]:
        try:
            job_return = job.results()[0]
            return job_status(job_return), job_return
        except Exception as error:  # submitit: the job wrote no result
            state = str(job.state)
            log.warning("Job %s (%s): %s", job.job_id, state, str(error).strip().splitlines()[0][:200])
            return ("cancelled" if state.startswith("CANCELLED") else "failed"), None

    def vanished(self, job) -> bool:
        """Whether the scheduler has forgotten a job that never ran (see the SLURM launcher)."""
        return False

    def submit(self, job_overrides, initial_job_idx) -> list:
        """The parent's launch up to submission (its executor, parameters and logging), stopped
        right after `map_array` so that the waiting is ours."""
        import submitit

        captured = {}
        original_map_array = submitit.AutoExecutor.map_array

        def map_array(executor, fn, *iterables):
            captured["jobs"] = original_map_array(executor, fn, *iterables)
            raise _Submitted()

        submitit.AutoExecutor.map_array = map_array
        try:
            super().launch(job_overrides, initial_job_idx)
        except _Submitted:
            pass
        finally:
            submitit.AutoExecutor.map_array = original_map_array
        return captured["jobs"]


class _Submitted(Exception):
    """Stops the parent's launch right after submission (it would then wait in order and raise)."""


class WaitingSlurmLauncher(WaitingSubmititMixin, SlurmLauncher):
    """An array task cancelled while pending leaves no record in sacct on some SLURM versions
    (seen with Debian's), so submitit keeps its last state (PENDING) or UNKNOWN, i.e. not done,
    forever. A job in such a state that squeue has not listed for VANISHED_AFTER_S is counted
    cancelled (a pending or running job is always in squeue)."""

    VANISHED_AFTER_S = 30.0

    def vanished(self, job) -> bool:
        if str(job.state).upper() not in ("UNKNOWN", "PENDING") or in_slurm_queue(job.job_id):
            getattr(self, "_missing_since", {}).pop(job.job_id, None)
            return False
        missing_since = self.__dict__.setdefault("_missing_since", {})
        first = missing_since.setdefault(job.job_id, time.time())
        return time.time() - first > self.VANISHED_AFTER_S


def in_slurm_queue(job_id: str) -> bool:
    """Whether squeue lists the job (an array task by its own id: -r lists them one by one)."""
    array_id = job_id.split("_")[0]
    try:
        listed = subprocess.run(["squeue", "-h", "-r", "-o", "%i", "-j", array_id], capture_output=True, text=True,
                                timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return True  # cannot tell: keep waiting
    if listed.returncode != 0:
        return "Invalid job id" not in listed.stderr  # another error: cannot tell, keep waiting
    return job_id in listed.stdout.split()


class WaitingLocalLauncher(WaitingSubmititMixin, LocalLauncher):
    pass
