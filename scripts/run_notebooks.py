"""Execute the experimental/ notebooks top to bottom (nbclient), as CI does, and tabulate their results.

    python scripts/run_notebooks.py                         # every notebook, small profile, 2 at a time
    python scripts/run_notebooks.py cc_first-division --profile full --threads 2
    python scripts/run_notebooks.py --profile full --publish  # copy figures + results to experimental/results/

The notebooks in git stay without outputs; the executed copies go to <out>/<name>/<name>.ipynb
next to the figures and results.json each notebook writes.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "experimental"
PUBLISHED = NOTEBOOKS / "results"


def available() -> list[str]:
    return sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb"))


def execute(name: str, profile: str, out: Path, threads: int, timeout: int) -> tuple[str, float, str | None]:
    """Run one notebook in a fresh kernel; returns (name, seconds, error or None)."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    os.environ.update(SAE_NOTEBOOK_PROFILE=profile, SAE_NOTEBOOK_OUT=str(out), SAE_NOTEBOOK_THREADS=str(threads),
                      OMP_NUM_THREADS=str(threads), WANDB_SILENT="true", MPLBACKEND="Agg",
                      TQDM_DISABLE="1")  # progress bars would fill the saved notebooks
    notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    client = NotebookClient(notebook, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOKS)}})
    started, error = time.time(), None
    try:
        client.execute()
    except CellExecutionError as failure:
        error = str(failure).strip().splitlines()[-1] if str(failure).strip() else repr(failure)
    finally:
        (out / name).mkdir(parents=True, exist_ok=True)
        nbformat.write(notebook, out / name / f"{name}.ipynb")
    return name, time.time() - started, error


def spread(values) -> str:
    """mean [min, max] over seeds."""
    values = [v for v in values if v is not None]
    return f"{sum(values) / len(values):.3f} [{min(values):.3f}, {max(values):.3f}]" if values else "-"


def results_table(out: Path, names: list[str]) -> str:
    """Markdown tables of the cc_first study notebooks (experimental/README): training-time clamps,
    evaluation-time clamps and projections, and the per-operation targeting of the mixed host."""
    training, evaluation, targeting = [], [], []
    for name in names:
        path = out / name / "results.json"
        if not name.startswith("cc_first") or not path.is_file():
            continue
        r = json.loads(path.read_text())
        for key, row in r.get("verdicts", {}).items():  # cc_first-mixed
            targeting.append(f"| {key.split('/')[0]} | {spread(row['index'])} | {spread(row['control_index_mean'])} | "
                             f"{', '.join(f'{p:.2f}' for p in row['p_values'])} | {row['combined_p']:.3f} | "
                             f"{row['verdict']} |")
        for row in r.get("summary", []):
            arm = f"{row['arm']} ({row['intervention']})"
            if not row["seeds"]:
                training.append(f"| {r['task']} | {row['arm']} | 0 | no latents in any seed | | | | | | "
                                f"{row['verdict']} |")
            elif row["when"] == "training":
                training.append(f"| {r['task']} | {arm} | {row['seeds']} | {spread(row['test_auc'])} | "
                                f"{spread(row['control_test_auc_mean'])} | {spread(row['none_test_auc'])} | "
                                f"{spread(row['train_auc'])} | {spread(row['control_train_auc_mean'])} | "
                                f"{row['combined_p']:.3f} | {row['verdict']} |")
            else:
                evaluation.append(f"| {r['task']} | {arm} | {row['seeds']} | {spread(row['test_acc'])} | "
                                  f"{spread(row['control_test_acc_mean'])} | {spread(row['train_acc'])} | "
                                  f"{spread(row['control_train_acc_mean'])} | "
                                  f"{', '.join(f'{p:.2f}' for p in row['p_values'])} | {row['combined_p']:.2g} |")
    tables = []
    if training:
        tables.append("| task | arm | seeds | test AUC, arm | test AUC, matched controls | test AUC, none | "
                      "train AUC, arm "
                      "| train AUC, controls | combined p | verdict |\n|---|---|---|---|---|---|---|---|---|---|\n"
                      + "\n".join(training))
    if evaluation:
        tables.append("| task | arm | seeds | test acc, arm | test acc, matched controls (mean) | train acc, arm | "
                      "train acc, controls | p per seed | combined p |\n|---|---|---|---|---|---|---|---|---|\n"
                      + "\n".join(evaluation))
    if targeting:
        tables.append("| arm chosen for | targeting index, arm | targeting index, matched controls | p per seed | "
                      "combined p | verdict |\n|---|---|---|---|---|---|\n" + "\n".join(targeting))
    return "\n\n".join(tables)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help=f"notebooks to run (default: all of {', '.join(available())})")
    parser.add_argument("--profile", default="small", help="small (CI size) | full (README numbers)")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "experimental")
    parser.add_argument("--jobs", type=int, default=2, help="notebooks executed at once")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per notebook")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per cell")
    parser.add_argument("--publish", action="store_true", help="copy figures and results.json to experimental/results/")
    args = parser.parse_args()
    names = args.names or available()
    unknown = [n for n in names if n not in available()]
    if unknown:
        sys.exit(f"Error: no notebook experimental/{unknown[0]}.ipynb; available: {', '.join(available())}")
    if args.profile not in ("small", "full"):
        sys.exit(f"Error: --profile must be small or full, got '{args.profile}'")
    if args.jobs < 1 or args.threads < 1:
        sys.exit("Error: --jobs and --threads must be >= 1")
    args.out = args.out.resolve()  # the kernels run in experimental/: a relative path would land there
    args.out.mkdir(parents=True, exist_ok=True)
    # cc_first notebooks first: they train the hosts the others reuse
    names.sort(key=lambda n: (not n.startswith("cc_first"), n))
    failures = 0
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(execute, n, args.profile, args.out, args.threads, args.timeout) for n in names]
        for future in futures:
            name, seconds, error = future.result()
            print(f"{name}: {'FAILED: ' + error if error else 'ok'} ({seconds:.0f} s)", flush=True)
            failures += error is not None
    table = results_table(args.out, names)
    if table:
        print("\n" + table)
    if args.publish:
        for name in names:
            target = PUBLISHED / name
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir(parents=True)
            for path in [*(args.out / name).glob("*.png"), args.out / name / "results.json"]:
                if path.is_file():
                    shutil.copy(path, target / path.name)
        print(f"published figures and results to {PUBLISHED}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
