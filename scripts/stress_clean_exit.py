"""Count two-rank runs that abort at exit: spawns the clean-exit test's rank body N times.

    python scripts/stress_clean_exit.py --runs 300                  # tally: aborted / exited cleanly
    python scripts/stress_clean_exit.py --runs 300 --cores DIR      # keep a core dump of each abort

Each run is what tests/distributed/test_clean_exit.py spawns: two gloo processes join one group,
train a latent-sharded TopK SAE for 10 steps and exit. A rank that ends on a signal (SIGABRT:
"terminate called without an active exception") or a non-zero status is counted with its run
number. With --cores the ranks run with an unlimited core size in DIR/run_<n>/ (the kernel's
core_pattern must be a plain file name, e.g. `core`): open one with `gdb .venv/bin/python DIR/run_<n>/core*`,
then `thread apply all bt`. Exit status 1 when any run aborted.
"""
from __future__ import annotations

import argparse
import os
import resource
import signal
import sys
import time
from pathlib import Path

import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `tests` is importable from a clone
from sae.parallel.group import free_port  # noqa: E402
from tests.distributed.test_clean_exit import rank_main  # noqa: E402  (the test's own rank body)


def run_in(rank: int, core_dir: Path | None, port: int) -> None:
    if core_dir is not None:  # the kernel writes `core` into the working directory
        os.chdir(core_dir)
    rank_main(rank, port)


def one_run(core_dir: Path | None) -> list[int]:
    """The two ranks' exit codes (negative: killed by that signal)."""
    context = mp.start_processes(run_in, args=(core_dir, free_port()), nprocs=2, join=False, start_method="spawn")
    for process in context.processes:
        process.join()
    return [process.exitcode for process in context.processes]


def describe(code: int) -> str:
    return f"signal {signal.Signals(-code).name}" if code < 0 else f"exit {code}"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=300, help="spawned two-rank runs (default 300)")
    parser.add_argument("--cores", type=Path, help="keep each aborting rank's core dump in this dir")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error(f"--runs must be >= 1, got {args.runs}")
    if args.cores is not None:
        resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    failures, started = [], time.time()
    for run in range(args.runs):
        core_dir = None
        if args.cores is not None:
            core_dir = (args.cores / f"run_{run:04d}").resolve()
            core_dir.mkdir(parents=True, exist_ok=True)
        codes = one_run(core_dir)
        if any(codes):
            failures.append(run)
            print(f"run {run}: " + ", ".join(f"rank {r} {describe(c)}" for r, c in enumerate(codes) if c), flush=True)
        elif core_dir is not None:
            core_dir.rmdir()
        if (run + 1) % 25 == 0:
            print(f"{run + 1} runs, {len(failures)} aborted ({time.time() - started:.0f} s)", flush=True)
    print(f"{len(failures)} of {args.runs} two-rank runs aborted or failed at exit"
          + (f" (runs {', '.join(map(str, failures))})" if failures else "")
          + f"; {time.time() - started:.0f} s, torch threads 1 per rank, {os.cpu_count()} cores")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
