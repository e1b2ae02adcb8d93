"""Summarise a --multirun sweep: `python scripts/summarize.py outputs/sweeps/<date>/<time>`.

Writes summary.csv, summary.md (with failed jobs and their log tails) and frontier.png
(FVU vs L0 per SAE type) into the sweep dir, and prints the Markdown table.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sae.analysis.sweep_summary import summarise, write_reports  # noqa: E402


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.strip().splitlines()[0], file=sys.stderr)
        return 2
    try:
        jobs = summarise(Path(argv[0]))
    except FileNotFoundError as error:
        print(f"Error: {error}", file=sys.stderr)
        return 1
    paths = write_reports(jobs, Path(argv[0]))
    print(paths["markdown"].read_text())
    completed = sum(j.status == "completed" for j in jobs)
    print(f"{completed}/{len(jobs)} jobs completed; wrote {', '.join(str(p) for p in paths.values())}")
    return 0 if completed == len(jobs) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
