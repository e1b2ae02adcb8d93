"""Serving SAE training batches: from an in-memory table (one index per batch, no copies beyond the
gather) or from a table of memory-mapped shards larger than memory, gathered in a background
thread while the SAE step runs.

Row indices are always drawn in the main thread in step order, so prefetching never changes which
rows a step sees, and `BatchStream.generator_state()` is the generator state after the last
*consumed* batch: what a resumed run must continue from (the prefetched batch is drawn again).
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import numpy as np
import torch


class ShardedTable:
    """A [rows, n_sources, d_in] float32 table over .npy shards that stay on disk (memory-mapped,
    copy-on-write so torch can view them): indexing reads only the rows asked for, times `scale`."""

    def __init__(self, paths: list[Path], scale: torch.Tensor | None = None):
        if not paths:
            raise ValueError("ShardedTable needs at least one shard")
        self.paths = list(paths)
        self.shards = [torch.from_numpy(np.load(path, mmap_mode="c")) for path in self.paths]
        lengths = torch.tensor([len(shard) for shard in self.shards])
        self.starts = torch.cumsum(lengths, 0) - lengths
        self.shape = torch.Size([int(lengths.sum()), *self.shards[0].shape[1:]])
        self.scale = torch.ones(self.shape[1]) if scale is None else scale.cpu()

    def __len__(self) -> int:
        return self.shape[0]

    def with_scale(self, scale: torch.Tensor) -> "ShardedTable":
        return ShardedTable(self.paths, scale)

    def __getitem__(self, rows: torch.Tensor) -> torch.Tensor:
        """rows: [n] int64 -> [n, n_sources, d_in], in the order asked."""
        rows = rows.cpu()
        shard_ids = torch.searchsorted(self.starts, rows, right=True) - 1
        out = torch.empty(len(rows), *self.shape[1:])
        for shard in shard_ids.unique().tolist():
            chosen = shard_ids == shard
            out[chosen] = self.shards[shard][rows[chosen] - self.starts[shard]]
        return out * self.scale[:, None]

    def chunks(self, rows_per_chunk: int = 1 << 16) -> Iterator[torch.Tensor]:
        """The whole table in order, scaled, a chunk at a time."""
        for shard in self.shards:
            for chunk in shard.split(rows_per_chunk):
                yield chunk * self.scale[:, None]

    def head(self, n: int) -> torch.Tensor:
        """The first n rows in memory (e.g. a fixed evaluation sample)."""
        return self[torch.arange(min(n, len(self)))]


CALIBRATION_ROWS = 4096


def calibration_sample(table: torch.Tensor | ShardedTable, n: int = CALIBRATION_ROWS) -> torch.Tensor:
    """n rows of the table drawn without replacement by a fixed generator (the same rows on every
    rank and every run of this table), in table order; for data-dependent initialisation."""
    rows = torch.randperm(len(table), generator=torch.Generator().manual_seed(0))[:n].sort().values
    return table[rows]


def column_mean(table: torch.Tensor | ShardedTable) -> torch.Tensor:
    """[n_sources, d_in] mean row; one streaming pass (float64 sums) for a sharded table."""
    if isinstance(table, torch.Tensor):
        return table.mean(dim=0)
    total = torch.zeros(table.shape[1:], dtype=torch.float64)
    for chunk in table.chunks():
        total += chunk.double().sum(dim=0)
    return (total / len(table)).float()


def mean_squared_norm(table: torch.Tensor | ShardedTable) -> torch.Tensor:
    """[n_sources] E||x_s||^2 over the rows; streaming for a sharded table."""
    if isinstance(table, torch.Tensor):
        return table.pow(2).sum(dim=-1).mean(dim=0)
    total = torch.zeros(table.shape[1], dtype=torch.float64)
    for chunk in table.chunks():
        total += chunk.double().pow(2).sum(dim=-1).sum(dim=0)
    return (total / len(table)).float()


class BatchStream:
    """Uniformly random batches of rows (with replacement), the next one prefetched when asked.

    part: this process's slice of each batch in a data-parallel run (every process draws the same
    global batch from the same generator and keeps its slice, so the generator state, and a
    checkpoint, do not depend on the world size)."""

    def __init__(self, table: torch.Tensor | ShardedTable, batch_size: int, generator: torch.Generator,
                 device: str, prefetch: bool = False, part: slice = slice(None)):
        self.table, self.batch_size, self.generator, self.device = table, batch_size, generator, device
        self.part = part
        self._consumed_state = generator.get_state()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="prefetch") if prefetch else None
        self._pending: tuple[Future | torch.Tensor, torch.Tensor] | None = None

    def _gather(self, rows: torch.Tensor) -> torch.Tensor:
        if isinstance(self.table, torch.Tensor):
            return self.table[rows.to(self.device)]
        return self.table[rows].to(self.device, non_blocking=True)

    def _submit(self) -> tuple[Future | torch.Tensor, torch.Tensor]:
        rows = torch.randint(len(self.table), (self.batch_size,), generator=self.generator)[self.part]
        state = self.generator.get_state()
        return (self._pool.submit(self._gather, rows) if self._pool else self._gather(rows)), state

    def next(self) -> torch.Tensor:
        batch, state = self._pending if self._pending is not None else self._submit()
        self._pending = None
        x = batch.result() if isinstance(batch, Future) else batch
        self._consumed_state = state
        if self._pool is not None:
            self._pending = self._submit()  # gathered while the caller's step runs
        return x

    def generator_state(self) -> torch.Tensor:
        return self._consumed_state

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)


def normalisation_scale(x) -> torch.Tensor:
    """One factor per source so that E||c_s x_s||^2 = d_in on the training rows (dataset-wide,
    not per token, so relative norms between tokens are kept). x: a tensor or a ShardedTable."""
    return (x.shape[-1] / mean_squared_norm(x).clamp_min(1e-12)).sqrt()
