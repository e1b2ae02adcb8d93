"""ESM-2 activation extraction throughput: our trunk (what the activation cache runs) against
fair-esm's plain forward, on the same token-budget batches, in one run.

    python scripts/benchmark_esm2.py                       # esm2_t6_8M architecture, random weights
    python scripts/benchmark_esm2.py --checkpoint esm2_t6_8M_UR50D.pt --fasta my.fasta

Weights do not change the speed, so without --checkpoint the t6_8M architecture is built with
random weights (no download). Residues/s is the median over --repeats timed passes over all
batches, after one warm-up pass; ours includes keeping only residue rows, as the cache does.
"""
import argparse
import statistics
import time
from itertools import islice
from pathlib import Path

import torch

from sae.host_models.esm2 import ESM2Host, esm2_hook_name, load_fair_esm, random_esm2, residue_mask
from sae.tasks.protein import ProteinTaskConfig, read_records, token_batches


def build_model(checkpoint: str | None):
    import esm

    if checkpoint:
        return load_fair_esm(checkpoint, "esm2_t6_8M_UR50D")
    return random_esm2("esm2_t6_8M_UR50D"), esm.data.Alphabet.from_architecture("ESM-1b")


def timed_passes(runners: dict, batches, repeats: int) -> dict[str, float]:
    """Median seconds per pass over all batches for each runner; runners alternate pass by pass,
    so drift in machine load hits both alike."""
    times: dict[str, list[float]] = {name: [] for name in runners}
    for repeat in range(repeats + 1):  # pass 0 warms up
        for name, run_batch in runners.items():
            start = time.perf_counter()
            for tokens in batches:
                run_batch(tokens)
            if repeat:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fasta", default=str(Path(__file__).resolve().parents[1] / "tests/data/proteins.fasta"))
    parser.add_argument("--checkpoint", default=None, help="a local esm2*.pt file (fair-esm format)")
    parser.add_argument("--layers", default="3,6", help="comma-separated layers to extract, one measurement each")
    parser.add_argument("--tokens-per-batch", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-records", type=int, default=None, help="read only the first N records")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, alphabet = build_model(args.checkpoint)
    model = model.to(args.device)
    host = ESM2Host(model)
    task = ProteinTaskConfig(fasta=args.fasta, max_length=1022, tokens_per_batch=args.tokens_per_batch)
    convert = alphabet.get_batch_converter()
    batches = [convert([(r.id, r.sequence) for r in batch])[2].to(args.device)
               for batch in token_batches(islice(read_records(task), args.max_records), task.tokens_per_batch)]
    residues = sum(int(residue_mask(t, alphabet).sum()) for t in batches)
    print(f"{len(batches)} batches, {residues} residues, {torch.get_num_threads()} threads, device {args.device}, "
          f"model {host.n_layers} layers x {host.d_model}")
    print("| layer | fair-esm forward (residues/s) | our trunk (residues/s) | overhead |")
    print("| --- | --- | --- | --- |")
    for layer in (int(x) for x in args.layers.split(",")):
        hook = esm2_hook_name(layer)
        with torch.no_grad():
            seconds = timed_passes({
                "fair-esm": lambda t: model(t, repr_layers=[layer])["representations"][layer],
                "ours": lambda t: host.capture(t, [hook])[hook][residue_mask(t, alphabet)],
            }, batches, args.repeats)
        theirs, ours = seconds["fair-esm"], seconds["ours"]
        overhead = ours / theirs - 1
        print(f"| {layer} | {residues / theirs:,.0f} | {residues / ours:,.0f} | {overhead:+.1%} |", flush=True)


if __name__ == "__main__":
    main()
