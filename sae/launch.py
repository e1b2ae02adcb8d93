"""From the command line to a job: one-line errors, the job's records, the sweep's tally.

- `run_cli` calls a script's @hydra.main function so that a composition error (`sae.kk=50`,
  `sae=topkk`, `hardware.device=gpu`, `sae.k=fifty`) is one line and exit status 1;
  `HYDRA_FULL_ERROR=1` still shows Hydra's full report.
- `run_job` is the scripts' body: typed config, then the job. Nothing is written to the run dir
  until the job has passed its checks (`JobRecords.start`): Hydra's own `.hydra/` files and its
  log file are held back until then (`hydra.output_subdir: null`, a delayed, detached file
  handler), so a refused run leaves an existing run dir byte for byte as it was. A sweep job
  refused in a new dir still leaves `.hydra/` and a failed job.json there for the summary.
- `tally_sweep` prints the one-line count a sweep ends with (the launchers in
  hydra_plugins/train_sae_launcher call it once every job has finished).
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from sae.atomic_io import atomic_file, write_json
from sae.config import to_dataclass
from sae.errors import ReportedError
from sae.signals import StopRequested
from sae.world import launched_world

log = logging.getLogger(__name__)


# -- sweep job dirs: hydra.sweep.subdir -------------------------------------------------------------

SUBDIR_MAX_CHARS = 120


SWEEP_SYNTAX = re.compile(r"^[^=]+=(.*,.*|(range|choice|glob|interval)\(.*)$")


def swept_keys(sweep_dir: str) -> list[str]:
    """Keys the sweep varies: command-line overrides with sweep syntax (`a,b`, `range(...)`,
    ...) and `hydra.sweeper.params` of presets, read from the multirun.yaml Hydra writes first."""
    path = Path(sweep_dir) / "multirun.yaml"
    if not path.is_file():
        return []
    saved = OmegaConf.load(path)
    keys = [o.split("=", 1)[0].lstrip("+~") for o in saved.hydra.overrides.task
            if SWEEP_SYNTAX.match(o) and not re.search(r"=\[.*\]$", o)]
    params = OmegaConf.select(saved, "hydra.sweeper.params") or {}
    return keys + [k for k in params if k not in keys]


def sweep_subdir(job_num: int, overrides: list[str], sweep_dir: str) -> str:
    """`<num>_<swept key=value,...>` for a sweep job's dir: readable (only what the sweep varies),
    unique (the job number), and short enough for the filesystem (cut and hashed when long)."""
    swept = set(swept_keys(sweep_dir))
    items = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") in swept] or list(overrides)
    name = ",".join(items).replace("/", "%2F") or "defaults"
    if len(name) > SUBDIR_MAX_CHARS:
        name = f"{name[:SUBDIR_MAX_CHARS]}..{hashlib.sha256(name.encode()).hexdigest()[:8]}"
    return f"{int(job_num):03d}_{name}"


# Registered at import: a SLURM job unpickles the task function, imports this module (through
# scripts/train.py), and only then resolves hydra.sweep.subdir.
OmegaConf.register_new_resolver("sweep_subdir", sweep_subdir, replace=True)


# -- one-line composition errors -------------------------------------------------------------------

def run_cli(main: Callable[[], Any]) -> None:
    """Run a @hydra.main function; Hydra's multi-line error reports become one line."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        main()
        return
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises instead of printing; we print one line
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C while Hydra composes, before any job
        print("Stopped: Ctrl-C (SIGINT) before the run started", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)
    except Exception as error:
        from hydra.errors import HydraException
        from omegaconf.errors import OmegaConfBaseException

        if not isinstance(error, (HydraException, OmegaConfBaseException)):
            raise
        sys.exit(f"Error: {one_line(error)}")


def one_line(error: BaseException) -> str:
    """The essential line of a Hydra/OmegaConf error and of each of its causes, with the full key:
    `Error merging override sae.k=fifty: Value 'fifty' ... could not be converted to Integer (full key: sae.k)`."""
    texts, full_key = [], None
    while error is not None:
        text, options = str(error), _available_options(str(error))
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        full_key = full_key or next((line.split(":", 1)[1].strip() for line in lines
                                     if line.startswith("full_key:")), None)
        essential = [line for line in lines if line not in options and not NOISE.match(line)]
        if essential:
            texts.append(essential[0].removeprefix("In 'config': ").rstrip("."))
        if options:
            texts[-1] += f" (available options: {', '.join(options)})"
        error = error.__cause__
    message = ": ".join(dict.fromkeys(texts)) or "invalid command line"
    return message + (f" (full key: {full_key})" if full_key else "")


NOISE = re.compile(r"^(full_key:|reference_type=|object_type=|To append to your config|See https://|"
                   r"Available options|Config search path|provider=)")


def _available_options(text: str) -> list[str]:
    match = re.search(r"Available options in '[^']*':\n((?:\t[^\n]*\n?)+)", text)
    return [line.strip() for line in match.group(1).splitlines() if line.strip()] if match else []


# -- a job and its records -------------------------------------------------------------------------

class JobFailedError(Exception):
    """A sweep job refused or stopped for a reported reason (its message is the one line). Raised
    instead of exiting so the launcher records the job as failed and runs the others."""


def slurm_job_id() -> str | None:
    """`<array>_<task>` for an array task (submitit submits sweeps as arrays; that is the name of
    its .submitit folder and what sacct/scontrol take), the plain job id otherwise."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{array}_{task}" if array and task else os.environ.get("SLURM_JOB_ID")


class JobRecords:
    """job.json (status for scripts/summarize.py), `.hydra/` and the job log of one run dir."""

    def __init__(self, output_dir: Path, task_cfg: DictConfig, hydra_cfg: Any):
        self.output_dir, self.task_cfg, self.hydra_cfg = Path(output_dir), task_cfg, hydra_cfg
        self.record = {"status": "running", "slurm_job_id": slurm_job_id(), "pid": os.getpid(),
                       "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
        self.started = False
        self.held_log_handlers = _detach_file_handlers(self.output_dir)

    def start(self) -> None:
        """The job passed its checks: from here on it owns the run dir and says so."""
        self.started = True
        for handler in self.held_log_handlers:
            logging.getLogger().addHandler(handler)
        self.write_hydra_files()
        write_json(self.output_dir / "job.json", self.record)

    def write_hydra_files(self) -> None:
        """What Hydra writes at job start (we set hydra.output_subdir: null to hold it back)."""
        from hydra.core.hydra_config import HydraConfig

        files = {"config.yaml": self.task_cfg, "hydra.yaml": HydraConfig.instance().cfg,
                 "overrides.yaml": self.hydra_cfg.overrides.task}
        for name, node in files.items():
            with atomic_file(self.output_dir / ".hydra" / name) as tmp:
                tmp.write_text(OmegaConf.to_yaml(node))

    def finish(self, status: str, error: str | None = None) -> None:
        try:
            write_json(self.output_dir / "job.json", {**self.record, "status": status,
                                                      **({"error": error} if error else {})})
        except (OSError, ReportedError) as failure:  # a full disk must not hide the job's own error
            log.warning(f"could not record status {status} in {self.output_dir / 'job.json'}: {failure}")

    def discard_if_empty(self, is_sweep_job: bool) -> None:
        """A single run stopped before start(): the empty dir Hydra created goes (as for a refusal)."""
        if not is_sweep_job and self.output_dir.is_dir() and not any(self.output_dir.iterdir()):
            self.output_dir.rmdir()

    def refused(self, error: str, is_sweep_job: bool) -> None:
        """A job stopped before start(): leave an existing dir untouched; a new sweep job dir gets a
        record for the summary; a new single-run dir (created empty by Hydra) is removed."""
        if is_sweep_job and not any(self.output_dir.iterdir()):
            self.write_hydra_files()
            self.finish("failed", error)
        self.discard_if_empty(is_sweep_job)


def _detach_file_handlers(output_dir: Path) -> list[logging.Handler]:
    """Hydra's file log handler(s) in the run dir, held back until the job starts."""
    root = logging.getLogger()
    held = [h for h in root.handlers if isinstance(h, logging.FileHandler)
            and Path(h.baseFilename).parent == Path(output_dir).resolve()]
    for handler in held:
        root.removeHandler(handler)
    return held


def _say(line: str, in_run_log: bool) -> None:
    """The job's last word: one line on stderr (the scripts' contract); a job that started also keeps it
    in its run dir's train.log (a refused one writes nothing there). Straight to the file handlers,
    since Hydra's console handler writes to stdout and would print the line twice."""
    print(line, file=sys.stderr, flush=True)
    if not in_run_log:
        return
    record = logging.getLogger(__name__).makeRecord(__name__, logging.ERROR, __file__, 0, line, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def run_job(cfg: DictConfig, job: Callable[..., dict]) -> dict:
    """The scripts' body: typed config, then `job(config, output_dir, on_start)`.

    A reported error (bad input, a busy run dir, divergence, a full disk) is one line on stderr
    and exit status 1 (in a sweep: the job is marked failed and the sweep goes on). SIGTERM ends
    the job as cancelled after its checkpoint; the jobs of one --multirun share a W&B group.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hydra_cfg = HydraConfig.get()
    is_sweep_job = hydra_cfg.mode == RunMode.MULTIRUN
    if not launched_world().is_main:
        return run_follower_job(cfg, Path(hydra_cfg.runtime.output_dir), job)
    records = JobRecords(Path(hydra_cfg.runtime.output_dir), cfg, hydra_cfg)
    try:
        typed = to_dataclass(cfg)
        if is_sweep_job and typed.tracking.group is None:
            typed.tracking.group = hydra_cfg.sweep.dir.replace("/", "_")
        result = job(typed, records.output_dir, on_start=records.start)
    except ReportedError as error:
        if records.started:
            records.finish("failed", str(error))
        else:
            records.refused(str(error), is_sweep_job)
        _say(f"Error: {error}", in_run_log=records.started)
        if is_sweep_job:
            raise JobFailedError(str(error)) from None
        sys.exit(1)
    except StopRequested as stop:  # SIGTERM or Ctrl-C: the step was checkpointed, or nothing had started
        records.finish(stop.status, stop.message)
        _say(f"Stopped: {stop.message}", in_run_log=True)
        raise
    except KeyboardInterrupt:  # Ctrl-C outside the job's signal handling (its checks, or its very end)
        message = INTERRUPTED if records.started else INTERRUPTED_BEFORE_START
        if records.started:
            records.finish("cancelled", message)
        records.discard_if_empty(is_sweep_job)
        _say(f"Stopped: {message}", in_run_log=records.started)
        raise StopRequested(message, signum=signal.SIGINT) from None
    except SystemExit as stop:  # submitit's requeue after a time-limit/preemption signal
        records.finish("requeued", f"SystemExit: {stop.code}")
        raise
    except BaseException as error:
        if records.started:
            records.finish("failed", f"{type(error).__name__}: {error}")
        raise
    records.finish("completed")
    return result


INTERRUPTED_BEFORE_START = "Ctrl-C (SIGINT) before the run started: nothing was written"
INTERRUPTED = "Ctrl-C (SIGINT); rerun the same command to resume from the last checkpoint"


def run_follower_job(cfg: DictConfig, output_dir: Path, job: Callable[..., dict]) -> dict:
    """Rank > 0 of a multi-process run: rank 0 keeps the records and the log; this one only says
    what went wrong (warnings and errors), and leaves no dir of its own behind."""
    logging.getLogger().setLevel(logging.WARNING)
    _detach_file_handlers(output_dir)
    try:
        return job(to_dataclass(cfg), output_dir, on_start=None)
    except ReportedError as error:
        print(f"Error: {error}", file=sys.stderr, flush=True)
        sys.exit(1)
    finally:
        if output_dir.is_dir() and not any(output_dir.iterdir()):
            output_dir.rmdir()  # torchrun: a rank that composed another timestamp than rank 0


# -- the end of a sweep ----------------------------------------------------------------------------

def tally_sweep(statuses: list[str], sweep_dir: str) -> None:
    """Print `Sweep finished: N completed, M failed, C cancelled (of T jobs)`; exit 1 unless all completed."""
    counts = {name: statuses.count(name) for name in ("completed", "failed", "cancelled")}
    line = (f"Sweep finished: {counts['completed']} completed, {counts['failed']} failed, {counts['cancelled']} "
            f"cancelled (of {len(statuses)} jobs) in {sweep_dir}")
    if counts["completed"] == len(statuses):
        print(line, flush=True)
        return
    sys.exit(f"{line}; see python scripts/summarize.py {sweep_dir}")
