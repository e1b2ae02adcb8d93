"""Peak memory of ESM-2 activation extraction as the FASTA grows: builds the activation cache for
FASTA files of 1x and 10x (by default) the data, each in a fresh process, and reports peak RSS.

    python scripts/benchmark_esm2_memory.py                     # t6_8M architecture, random weights
    python scripts/benchmark_esm2_memory.py --multiples 1,10,30 --layers 3,6

The data is tests/data/proteins.fasta repeated (each copy's ids suffixed, so ids stay unique).
Extraction streams records, so peak RSS should not grow with the file: the cache holds at most
one shard (65,536 rows) plus one batch in memory before writing. max_train_tokens is raised so
that every residue is extracted. Weights do not change memory, so the t6_8M architecture is saved
with random weights in fair-esm's format and loaded through the real code path.
"""
import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
from sae.host_models.config import ESM2HostConfig
from sae.host_models.esm2 import random_esm2, save_fair_esm_checkpoint
from sae.tasks.protein import ProteinTaskConfig
from sae.activations.protein import (
    build_cache, cache_record, check_protein_inputs, load_alphabet,
)

EVERYTHING = 10 ** 12  # max_*_tokens: keep every residue


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def write_repeated_fasta(source: Path, copies: int, out: Path) -> None:
    text = source.read_text()
    with open(out, "w") as handle:
        for copy in range(copies):
            handle.write(text.replace(">", f">c{copy}_") if copy else text)  # ">" only starts headers


def extract(checkpoint: str, fasta: str, layers: list[int], cache_dir: str) -> dict:
    """The child process: validate, load, build the cache; report peak RSS before and after."""
    task = ProteinTaskConfig(fasta=fasta, max_train_tokens=EVERYTHING, max_test_tokens=EVERYTHING,
                             activation_cache=cache_dir)
    host = ESM2HostConfig(checkpoints=[checkpoint], layers=layers)
    checked = check_protein_inputs(task, host, "cpu", torch.float32)
    after_load = peak_rss_mib()
    started = time.perf_counter()
    build_cache(checked.sources, task, load_alphabet(), Path(cache_dir),
                cache_record(task, host, checked.scan, torch.float32))
    rows = json.loads((Path(cache_dir) / "rows.json").read_text())
    return {"rows": rows["train"] + rows["test"],
            "peak_rss_after_load_mib": after_load, "peak_rss_mib": peak_rss_mib(),
            "seconds": time.perf_counter() - started}


def run_child(checkpoint: Path, fasta: Path, layers: str, cache_dir: Path, threads: int) -> dict:
    command = [sys.executable, __file__, "--child", str(checkpoint), str(fasta), layers, str(cache_dir),
               "--threads", str(threads)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fasta", default=str(ROOT / "tests/data/proteins.fasta"))
    parser.add_argument("--multiples", default="1,10", help="comma-separated copies of the FASTA")
    parser.add_argument("--layers", default="3", help="comma-separated layers captured in one pass")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child", nargs=4, metavar=("CHECKPOINT", "FASTA", "LAYERS", "CACHE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        checkpoint, fasta, layers, cache_dir = args.child
        print(json.dumps(extract(checkpoint, fasta, [int(x) for x in layers.split(",")], cache_dir)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        checkpoint = save_fair_esm_checkpoint(random_esm2("esm2_t6_8M_UR50D"), tmp / "esm2_t6_8M_random.pt")
        print(f"t6_8M architecture (random weights), layers [{args.layers}], {args.threads} thread(s)")
        print("| data | FASTA size | residues extracted | peak RSS after model load (MiB) "
              "| peak RSS after extraction (MiB) | extraction time |")
        print("| --- | --- | --- | --- | --- | --- |")
        for multiple in (int(x) for x in args.multiples.split(",")):
            fasta = tmp / f"proteins_x{multiple}.fasta"
            write_repeated_fasta(Path(args.fasta), multiple, fasta)
            report = run_child(checkpoint, fasta, args.layers, tmp / f"cache_x{multiple}", args.threads)
            print(f"| {multiple}x | {fasta.stat().st_size / 1e3:,.0f} kB | {report['rows']:,} | "
                  f"{report['peak_rss_after_load_mib']:,.0f} | {report['peak_rss_mib']:,.0f} | "
                  f"{report['seconds']:.0f} s |", flush=True)


if __name__ == "__main__":
    main()
