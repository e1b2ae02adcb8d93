"""Summarise a sweep dir: one row per planned job (its overrides and final metrics), the jobs that
did not complete with their one-line error and log tail, and the FVU-vs-L0 frontier per SAE type.

The planned jobs are expanded from the sweep's multirun.yaml (Hydra writes it before any job), so
a job that never started (cancelled while pending, or the sweep was stopped) is listed too. A job
dir holds `.hydra/overrides.yaml` once the job has passed its checks (or was refused in a new
dir). Status: `completed` (final_metrics.json), `failed` / `cancelled` / `requeued` (job.json
says so, with the error), `incomplete` (started, never finished: killed or still running),
`not started` (no job dir).
"""
from __future__ import annotations

import contextlib
import csv
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from sae.atomic_io import atomic_file
from sae.launch import sweep_subdir

log = logging.getLogger(__name__)

METRIC_COLUMNS = ["step", "eval/test/fvu", "eval/test/l0", "eval/test/dead_frac", "eval/train/fvu"]
# the reconstruction spliced into the host, on test pairs, averaged over the sources
DOWNSTREAM_COLUMNS = ["loss_recovered", "acc_spliced"]
LOG_TAIL_LINES = 20
ERROR_CHARS = 160  # of a job's one-line error in the table (summary.md has it whole)


@dataclass
class JobResult:
    name: str
    overrides: list[str]
    status: str
    sae_type: str | None
    metrics: dict = field(default_factory=dict)
    log_tail: str = ""
    slurm_job_id: str | None = None
    error: str = ""  # the job's one-line error (job.json)


def find_job_dirs(sweep_dir: Path) -> list[Path]:
    return sorted(p.parent.parent for p in Path(sweep_dir).glob("**/.hydra/overrides.yaml"))


def read_job(job_dir: Path, sweep_dir: Path) -> JobResult:
    import yaml

    overrides = yaml.safe_load((job_dir / ".hydra" / "overrides.yaml").read_text()) or []
    info = json.loads((job_dir / "job.json").read_text()) if (job_dir / "job.json").is_file() else {}
    config = json.loads((job_dir / "config.json").read_text()) if (job_dir / "config.json").is_file() else {}
    final = job_dir / "final_metrics.json"
    metrics = json.loads(final.read_text()) if final.is_file() else {}
    status = "completed" if metrics else info.get("status", "incomplete")
    if status == "running":
        status = "incomplete"
    result = JobResult(str(job_dir.relative_to(sweep_dir)), overrides, status,
                       config.get("sae", {}).get("type"), metrics, slurm_job_id=info.get("slurm_job_id"))
    if status != "completed":
        result.error = info.get("error", "")
        result.log_tail = log_tail(job_dir, sweep_dir, result.slurm_job_id)
    return result


def log_tail(job_dir: Path, sweep_dir: Path, slurm_job_id: str | None) -> str:
    """The job's submitit log (SLURM or local launcher) if known, else Hydra's job log."""
    candidates = []
    if slurm_job_id:
        candidates += sorted(Path(sweep_dir).glob(f".submitit/{slurm_job_id}/*_log.err"))
        candidates += sorted(Path(sweep_dir).glob(f".submitit/{slurm_job_id}/*_log.out"))
    candidates += sorted(job_dir.glob("*.log"))
    for path in candidates:
        lines = path.read_text(errors="replace").splitlines()
        if lines:
            return f"[{path.relative_to(sweep_dir)}]\n" + "\n".join(lines[-LOG_TAIL_LINES:])
    return "(no log found)"


def planned_jobs(sweep_dir: Path) -> list[tuple[str, list[str]]]:
    """(job dir name, overrides) of every job the sweep's multirun.yaml asks for, in job order;
    [] when there is no multirun.yaml or its overrides cannot be expanded here."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf


    path = Path(sweep_dir) / "multirun.yaml"
    if not path.is_file():
        return []
    saved = OmegaConf.load(path)
    params = OmegaConf.select(saved, "hydra.sweeper.params") or {}
    arguments = [f"{k}={v}" for k, v in params.items()] + list(saved.hydra.overrides.task)
    try:
        batches = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(arguments), None)
    except Exception:  # e.g. glob(...) sweeps need the config repository to expand
        return []
    jobs = [overrides for batch in batches for overrides in batch]
    return [(sweep_subdir(num, overrides, str(sweep_dir)), overrides) for num, overrides in enumerate(jobs)]


def summarise(sweep_dir: Path) -> list[JobResult]:
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"{sweep_dir} is not a directory: pass a sweep dir such as "
                                "outputs/sweeps/<date>/<time>")
    found = {str(d.relative_to(sweep_dir)): d for d in find_job_dirs(sweep_dir)}
    jobs = []
    for name, overrides in planned_jobs(sweep_dir):
        if name in found:
            jobs.append(read_job(found.pop(name), sweep_dir))
        else:
            jobs.append(JobResult(name, overrides, "not started", None,
                                  log_tail="no job dir: cancelled while pending, or the sweep was stopped first"))
    jobs += [read_job(d, sweep_dir) for d in found.values()]  # dirs the plan does not name (older sweeps)
    if not jobs:
        raise FileNotFoundError(f"{sweep_dir} holds no job dirs (no */.hydra/overrides.yaml) and no multirun.yaml: "
                                "is it a --multirun sweep dir?")
    return jobs


def write_reports(jobs: list[JobResult], sweep_dir: Path) -> dict[str, Path]:
    sweep_dir = Path(sweep_dir)
    paths = {"csv": sweep_dir / "summary.csv", "markdown": sweep_dir / "summary.md",
             "frontier": sweep_dir / "frontier.png"}
    header, rows = summary_table(jobs)
    swept = varying_keys(jobs)
    with atomic_file(paths["csv"]) as tmp, open(tmp, "w", newline="") as handle:
        csv.writer(handle).writerows([header, *rows])
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    failed = [j for j in jobs if j.status != "completed"]
    if failed:
        lines += ["", f"## {len(failed)} job(s) did not complete", ""]
        for job in failed:
            lines += [f"### {job.name} ({job.status}, SLURM job {job.slurm_job_id or '?'})", "",
                      f"Error: {job.error}" if job.error else "", "```", job.log_tail.strip(), "```"]
    with atomic_file(paths["markdown"]) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    if any(j.status == "completed" and j.sae_type for j in jobs):
        plot_frontier(jobs, paths["frontier"], [k for k in swept if k != "sae"])
    else:  # never an empty plot; never a stale one from an earlier summary either
        paths["frontier"].unlink(missing_ok=True)
        del paths["frontier"]
    return paths


def summary_table(jobs: list[JobResult]) -> tuple[list[str], list[list]]:
    """(header, one row per job): the job number, status, what was swept, final metrics, error."""
    swept = varying_keys(jobs)
    type_column = [] if "sae" in swept else ["sae_type"]  # a swept `sae` already names the type
    header = ["job", "status", *type_column, *swept, *METRIC_COLUMNS, *DOWNSTREAM_COLUMNS, "error"]
    rows = [[j.name.split("_", 1)[0], j.status, *([j.sae_type or ""] if type_column else []),
             *[override_value(j, k) for k in swept], *[j.metrics.get(c, "") for c in METRIC_COLUMNS],
             *[downstream_value(j.metrics, c) for c in DOWNSTREAM_COLUMNS], j.error[:ERROR_CHARS].replace("|", "/")]
            for j in jobs]
    return header, rows


def downstream_value(metrics: dict, name: str) -> float | str:
    """Mean over sources of eval/test/<source>/<name>; "" when the run has none (e.g. not finished)."""
    values = [v for k, v in metrics.items() if k.startswith("eval/test/") and k.count("/") == 3
              and k.endswith(f"/{name}")]
    return sum(values) / len(values) if values else ""


def override_value(job: JobResult, key: str) -> str:
    for item in job.overrides:
        name, _, value = item.partition("=")
        if name.lstrip("+~") == key:
            return value
    return ""


def varying_keys(jobs: list[JobResult]) -> list[str]:
    """The override keys whose value differs between jobs: what the sweep swept."""
    keys = sorted({item.partition("=")[0].lstrip("+~") for job in jobs for item in job.overrides})
    return [k for k in keys if len({override_value(job, k) for job in jobs}) > 1]


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points not beaten on both L0 (lower) and FVU (lower), sorted by L0."""
    front, best_fvu = [], float("inf")
    for l0, fvu in sorted(points):
        if fvu < best_fvu:
            front.append((l0, fvu))
            best_fvu = fvu
    return front


def plot_frontier(jobs: list[JobResult], path: Path, label_keys: list[str] = ()) -> None:
    """FVU vs L0 per SAE type; each point labelled with its values of label_keys (what was swept)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    types = sorted({j.sae_type for j in jobs if j.status == "completed" and j.sae_type})
    for sae_type in types:
        done = [j for j in jobs if j.status == "completed" and j.sae_type == sae_type]
        points = [(j.metrics["eval/test/l0"], j.metrics["eval/test/fvu"]) for j in done]
        ax.scatter(*zip(*points), label=sae_type, alpha=0.7)
        for job, point in zip(done, points):
            label = ", ".join(f"{key.split('.')[-1]}={override_value(job, key)}" for key in label_keys)
            if label:
                ax.annotate(label, point, fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.plot(*zip(*pareto_front(points)), linestyle="--")
    ax.set_xlabel("L0 (test pairs)")
    ax.set_ylabel("FVU (test pairs)")
    ax.set_yscale("log")
    ax.set_title("FVU vs L0 per SAE type (dashed: Pareto frontier)")
    if types:
        ax.legend()
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def sweep_group(sweep_dir: Path) -> str:
    """The W&B group the sweep's jobs logged to: what a job's config.json recorded (the job resolved
    hydra.sweep.dir, e.g. its `${now:...}`, which only Hydra can), else the dir as the jobs name it."""
    for config in sorted(Path(sweep_dir).glob("*/config.json")):
        with contextlib.suppress(OSError, ValueError, AttributeError):
            group = json.loads(config.read_text()).get("tracking", {}).get("group")
            if group:
                return group
    return str(sweep_dir).rstrip("/").replace("/", "_")


def log_sweep_to_wandb(sweep_dir: Path, paths: dict[str, Path]) -> Path | None:
    """The frontier plot and the summary table as a "sweep-summary" W&B run in the sweep's group
    (the group its jobs logged to), with the sweep's tracking settings; None when tracking is off.
    W&B failing (no service, no credentials, a full disk) is a warning: the summary files stand."""
    try:
        return _log_sweep_to_wandb(sweep_dir, paths)
    except Exception as error:  # noqa: BLE001 - W&B is optional here; any failure of it must not end the summary
        first = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
        log.warning(f"W&B summary run not written ({type(error).__name__}: {first}); the summary files in "
                    f"{sweep_dir} are complete")
        return None


def _log_sweep_to_wandb(sweep_dir: Path, paths: dict[str, Path]) -> Path | None:
    from omegaconf import OmegaConf

    from sae.tracking import TrackingConfig, WandbMode
    from sae.tracking.wandb_tracker import WandbTracker

    plan = Path(sweep_dir) / "multirun.yaml"
    if not plan.is_file():
        return None
    saved = OmegaConf.load(plan)
    tracking = OmegaConf.select(saved, "tracking") or {}
    mode = WandbMode(tracking.get("mode", "offline"))
    if mode is WandbMode.disabled:
        return None
    cfg = TrackingConfig(mode=mode, project=tracking.get("project", "train-sae"), entity=tracking.get("entity"),
                         name="sweep-summary", group=sweep_group(sweep_dir))
    tracker = WandbTracker(cfg, Path(sweep_dir), {"sweep_dir": str(sweep_dir)})
    if "frontier" in paths:
        tracker.log_image("sweep/frontier", paths["frontier"], step=0)
    with open(paths["csv"], newline="") as handle:
        tracker.log_table("sweep/summary", list(csv.DictReader(handle)), step=0)
    tracker.finish()
    return Path(sweep_dir) / "wandb"
