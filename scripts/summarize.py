"""Summarise a --multirun sweep: every planned job, its status and final metrics.

Writes summary.csv, summary.md (with the jobs that did not complete, their one-line error and log
tail) and frontier.png (FVU vs L0 per SAE type, only when some job completed) into the sweep dir,
prints the Markdown table, and exits 1 unless every planned job completed.
"""
import argparse
import logging
import sys
from collections import Counter
from pathlib import Path

from sae.analysis.sweep_summary import log_sweep_to_wandb, summarise, write_reports


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", type=Path, help="a sweep dir, e.g. outputs/sweeps/<date>/<time>")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="Warning: %(message)s")
    try:
        jobs = summarise(args.sweep_dir)
    except FileNotFoundError as error:
        print(f"Error: {error}", file=sys.stderr)
        return 1
    paths = write_reports(jobs, args.sweep_dir)
    logged = log_sweep_to_wandb(args.sweep_dir, paths)  # the frontier beside the jobs' runs in W&B
    print(paths["markdown"].read_text())
    counts = Counter(j.status for j in jobs)
    others = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()) if status != "completed")
    print(f"{counts['completed']}/{len(jobs)} jobs completed{f' ({others})' if others else ''}; "
          f"wrote {', '.join(str(p) for p in paths.values())}" + (f"; W&B summary run in {logged}" if logged else ""))
    return 0 if counts["completed"] == len(jobs) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
