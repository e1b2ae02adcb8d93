"""SAE step time fed from an in-memory table vs memory-mapped shards (task.stream), with and without
the prefetch thread: TopK (d_in 512, d_sae 16384, k 32), batch 4096, median of steps after 5 warm-up.

    python scripts/benchmark_streaming.py --threads 2 --rows 1048576
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from sae.saes import build_sae
from sae.saes.topk import TopKSAEConfig
from sae.activations.batches import BatchStream, ShardedTable
from sae.hardware import HardwareConfig
from sae.training.step import make_optimizer, optimisation_step

D_IN, D_SAE, K, BATCH, SHARD_ROWS = 512, 16384, 32, 4096, 65536


def write_shards(folder: Path, rows: int) -> list[Path]:
    torch.manual_seed(0)
    paths = []
    for index in range(rows // SHARD_ROWS):
        paths.append(folder / f"shard_{index:05d}.npy")
        np.save(paths[-1], torch.randn(SHARD_ROWS, 1, D_IN).numpy())
    return paths


def median_step_seconds(table, prefetch: bool, steps: int, hardware: HardwareConfig) -> float:
    torch.manual_seed(0)
    sae = build_sae(TopKSAEConfig(sparse_dim=D_SAE, k=K, k_aux=256), 1, D_IN)
    optimizer = make_optimizer(sae.parameters(), 1e-3)
    stream = BatchStream(table, BATCH, torch.Generator().manual_seed(0), "cpu", prefetch)
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        optimisation_step(sae, sae, optimizer, stream.next(), None, 0.0, 1.0, hardware)
        times.append(time.perf_counter() - started)
    stream.close()
    return float(np.median(times[5:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, default=1 << 20, help=f"table rows (a multiple of {SHARD_ROWS})")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    if args.rows < SHARD_ROWS or args.rows % SHARD_ROWS or args.threads < 1 or args.steps < 10:
        sys.exit(f"Error: --rows must be a positive multiple of {SHARD_ROWS}, --threads >= 1, --steps >= 10")
    torch.set_num_threads(args.threads)
    hardware = HardwareConfig(threads=args.threads)
    with tempfile.TemporaryDirectory() as folder:
        paths = write_shards(Path(folder), args.rows)
        cases = {"in-memory": (torch.cat([torch.from_numpy(np.load(p)) for p in paths]), False),
                 "shards, no prefetch": (ShardedTable(paths), False), "shards, prefetch": (ShardedTable(paths), True)}
        print(f"threads {args.threads}, {args.rows} rows x {D_IN} (shards in the page cache)")
        for name, (table, prefetch) in cases.items():
            seconds = median_step_seconds(table, prefetch, args.steps, hardware)
            print(f"{name:22s} {seconds * 1000:7.1f} ms/step  {BATCH / seconds:7.0f} tokens/s", flush=True)


if __name__ == "__main__":
    main()
