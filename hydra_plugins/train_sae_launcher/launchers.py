"""`hydra.launcher._target_` of conf/config.yaml (basic) and of the submitit hardware presets."""
from __future__ import annotations

import logging
from typing import Sequence

from hydra._internal.core_plugins.basic_launcher import BasicLauncher
from hydra.core.utils import JobReturn, JobStatus
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher, SlurmLauncher

from sae.launch import tally_sweep

log = logging.getLogger(__name__)


def job_status(job_return: JobReturn) -> str:
    return "completed" if job_return.status == JobStatus.COMPLETED else "failed"


class WaitingBasicLauncher(BasicLauncher):
    """Hydra's basic launcher (jobs one after another in this process), with the tally."""

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        returns = super().launch(job_overrides, initial_job_idx)
        tally_sweep([job_status(r) for r in returns], str(self.config.hydra.sweep.dir))
        return returns


class WaitingSubmititMixin:
    """Wait for every submitit job; a job that produced no result (cancelled, killed, out of
    requeues) is counted by its scheduler state instead of stopping the wait."""

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        jobs = self.submit(job_overrides, initial_job_idx)
        statuses, returns = [], []
        for job in jobs:
            job.wait()
            try:
                job_return = job.results()[0]
                statuses.append(job_status(job_return))
                returns.append(job_return)
            except Exception as error:  # submitit: the job wrote no result
                state = str(job.state)
                statuses.append("cancelled" if state.startswith("CANCELLED") else "failed")
                log.warning("Job %s (%s): %s", job.job_id, state, str(error).strip().splitlines()[0][:200])
        tally_sweep(statuses, str(self.config.hydra.sweep.dir))
        return returns

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
    pass


class WaitingLocalLauncher(WaitingSubmititMixin, LocalLauncher):
    pass
