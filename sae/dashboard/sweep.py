"""A sweep's page: the summary table and FVU-vs-L0 frontier that summarize.py makes, each completed
job linked to its own dashboard (built into <job dir>/dashboard when missing or older than the job's
newest checkpoint), and the jobs that did not complete with their one-line error and log tail.
Links are relative, so the sweep dir can be copied whole and opened anywhere."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from sae.analysis.sweep_summary import JobResult, plot_frontier, summarise, summary_table, varying_keys
from sae.atomic_io import atomic_dir
from sae.dashboard.build import DEFAULT_OUT, build_run_dashboard, check_not_inside
from sae.dashboard.site import MARKER, check_out, copy_assets, html_escape, marker
from sae.errors import ReportedError
from sae.training.checkpoint import latest_checkpoint

log = logging.getLogger(__name__)


def job_dashboard(job_dir: Path) -> tuple[Path | None, str]:
    """(the job's dashboard index.html, "") built if needed, or (None, why there is none)."""
    out = job_dir / DEFAULT_OUT
    newest = latest_checkpoint(job_dir)
    if newest is None:
        return None, "no valid checkpoint"
    try:
        found = json.loads((out / MARKER).read_text())
        if found.get("checkpoint") == newest.name and (out / "index.html").is_file():
            return out / "index.html", ""
    except (OSError, ValueError):
        pass
    log.info("Building the dashboard of %s", job_dir)
    try:
        return build_run_dashboard(job_dir, out, force=True), ""
    except ReportedError as error:
        return None, str(error).splitlines()[0]


def build_sweep_dashboard(sweep_dir: Path, out: Path | None = None, force: bool = False) -> Path:
    sweep_dir = Path(sweep_dir)
    out = Path(out) if out is not None else sweep_dir / DEFAULT_OUT
    check_not_inside(out, sweep_dir)
    identity = marker("sweep", sweep_dir)
    check_out(out, identity, force)
    jobs = summarise(sweep_dir)
    links = {}
    for job in jobs:
        if job.status == "completed":
            links[job.name] = job_dashboard(sweep_dir / job.name)
    with atomic_dir(out) as tmp:
        copy_assets(tmp)
        has_frontier = any(j.status == "completed" and j.sae_type for j in jobs)
        if has_frontier:
            plot_frontier(jobs, tmp / "frontier.png", [k for k in varying_keys(jobs) if k != "sae"])
        (tmp / "index.html").write_text(sweep_page(sweep_dir, jobs, links, out, has_frontier))
        (tmp / MARKER).write_text(json.dumps({**identity, "jobs": len(jobs)}, indent=2) + "\n")
    return out / "index.html"


def sweep_page(sweep_dir: Path, jobs: list[JobResult], links: dict, out: Path, has_frontier: bool) -> str:
    header, rows = summary_table(jobs)
    head = "".join(f"<th>{html_escape(h)}</th>" for h in [*header, "dashboard"])
    body = []
    for job, row in zip(jobs, rows):
        index, why = links.get(job.name, (None, "" if job.status == "completed" else job.status))
        cell = (f'<a href="{html_escape(os.path.relpath(index, out))}">open</a>' if index is not None
                else html_escape(why))
        cells = "".join(f"<td>{html_escape(_fmt(v))}</td>" for v in row)
        body.append(f'<tr class="{html_escape(job.status)}">{cells}<td>{cell}</td></tr>')
    failed = [j for j in jobs if j.status != "completed"]
    failures = "".join(f"<h3>{html_escape(j.name)} ({html_escape(j.status)})</h3>"
                       f"<p>{html_escape(j.error or 'no error recorded')}</p>"
                       f"<pre>{html_escape(j.log_tail.strip())}</pre>" for j in failed)
    done = sum(j.status == "completed" for j in jobs)
    frontier = ('<img src="frontier.png" alt="FVU vs L0 per SAE type">' if has_frontier
                else "<p>No completed job yet.</p>")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>sweep {html_escape(sweep_dir.name)}</title>
<link rel="icon" href="data:,"><link rel="stylesheet" href="assets/dashboard.css"></head>
<body><h1>Sweep {html_escape(str(sweep_dir.resolve()))}</h1>
<p>{done} of {len(jobs)} jobs completed.</p>
<h2>FVU vs L0 (test rows)</h2>{frontier}
<h2>Jobs</h2><table id="jobs" class="small"><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>
{f'<h2>{len(failed)} job(s) did not complete</h2>{failures}' if failed else ''}
</body></html>
"""


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
