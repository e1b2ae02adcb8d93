"""Exact per-row top-k on CPU, about 2.5x cheaper than torch.topk for a TopK SAE's shapes.

torch.topk copies every entry of a row into (value, index) pairs and partially sorts them. Here a
row is first reduced to G strided group maxima (g_q = max_j row[q + j * G]; a vectorised
elementwise max of contiguous slices), tau = the k-th largest of them is a lower bound on the
row's k-th largest value (k distinct entries reach it), and only the groups whose maximum reaches
tau can hold entries >= tau. Those few groups are scanned into a size-k heap. The selected values
are exactly torch.topk's; among entries tied at the cut either may be kept, as with torch.topk.

A row with NaN (a diverging run) takes torch.topk, so NaN ranks as torch ranks it. Other
devices and dtypes (CUDA, bfloat16) take torch.topk; so does everything when numba is missing.
"""
from __future__ import annotations

import logging
import os
import tempfile

import torch

log = logging.getLogger(__name__)

try:
    import numba
    import numpy as np
except ImportError:  # pragma: no cover - numba is an install requirement; keep working without it
    numba = None

KERNEL_DTYPES = (torch.float32, torch.float64)
CACHE_HINT = "set NUMBA_CACHE_DIR to a writable dir to choose where"
# fastmath without 'nnan'/'ninf': -inf and NaN must compare as IEEE says
_FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}


def _writable_temp_cache() -> str | None:
    """A per-user numba cache dir under the temp dir, or None where even that cannot be written."""
    try:
        path = os.path.join(tempfile.gettempdir(), f"numba-cache-{os.getuid()}")
        os.makedirs(path, mode=0o700, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
        return path
    except OSError:  # gettempdir raises FileNotFoundError when no temp dir is writable
        return None


def _cached_njit(**options):
    """numba.njit(cache=True, **options), falling back where numba has no writable cache location
    (a read-only install and no writable HOME: numba raises "no locator available" at decoration).
    The cache only saves the compile at a process's first call, so it never fails the import:
    a per-user temp dir takes the cache (one warning), or the kernel compiles without one."""
    def decorate(function):
        try:
            return numba.njit(cache=True, **options)(function)
        except RuntimeError as error:
            if "no locator available" not in str(error):
                raise
        where = f"beside {__file__} or in the user's cache dir"
        if not numba.config.CACHE_DIR:  # NUMBA_CACHE_DIR, when set, is the user's choice: keep it
            fallback = _writable_temp_cache()
            if fallback is not None:
                numba.config.CACHE_DIR = fallback  # read when each cached function is decorated
                _warn_once(f"numba cannot write its cache {where}; caching the top-k kernel in {fallback} "
                           f"instead ({CACHE_HINT})")
                return numba.njit(cache=True, **options)(function)
        _warn_once(f"numba cannot write its cache {where} (NUMBA_CACHE_DIR={numba.config.CACHE_DIR or 'unset'}); "
                   f"the top-k kernel compiles without a cache at each process's first TopK step ({CACHE_HINT})")
        return numba.njit(cache=False, **options)(function)
    return decorate


_cache_warning_given = False


def _warn_once(message: str) -> None:
    """One warning per process: both kernels fall back the same way."""
    global _cache_warning_given
    if not _cache_warning_given:
        log.warning(message)
    _cache_warning_given = True


def group_count(n: int, k: int) -> int:
    """G: 4k groups measured fastest at (2048, 16) and (16384, 32) on a 2-core EPYC (G >= k needed)."""
    return min(n, max(4 * k, 16))


if numba is not None:
    @numba.njit(inline="always")
    def _sift_down(heap_values, heap_indices, k, p):
        """Restore the min-heap property below position p."""
        value, index = heap_values[p], heap_indices[p]
        while True:
            child = 2 * p + 1
            if child >= k:
                break
            if child + 1 < k and heap_values[child + 1] < heap_values[child]:
                child += 1
            if heap_values[child] < value:
                heap_values[p] = heap_values[child]
                heap_indices[p] = heap_indices[child]
                p = child
            else:
                break
        heap_values[p] = value
        heap_indices[p] = index

    @numba.njit(inline="always")
    def _heapify(heap_values, heap_indices, k):
        for p in range(k // 2 - 1, -1, -1):
            _sift_down(heap_values, heap_indices, k, p)

    @numba.njit(inline="always", fastmath=_FASTMATH)
    def _topk_row(row, k, n_groups, group_max, values, indices):
        """values, indices <- row's k largest entries; False if the row needs torch.topk (NaN, or
        fewer than k entries reached tau, which cannot happen without NaN)."""
        n = len(row)
        whole = n - n % n_groups
        group_max[:] = row[:n_groups]
        for start in range(n_groups, whole, n_groups):
            np.maximum(group_max, row[start:start + n_groups], group_max)
        for j in range(whole, n):
            if row[j] > group_max[j - whole]:
                group_max[j - whole] = row[j]
        has_nan = False  # np.maximum propagates NaN into its group's maximum
        for q in range(n_groups):
            has_nan |= group_max[q] != group_max[q]
        # tau: the k-th largest group maximum
        for q in range(k):
            values[q] = group_max[q]
            indices[q] = q
        _heapify(values, indices, k)
        for q in range(k, n_groups):
            if group_max[q] > values[0]:
                values[0] = group_max[q]
                indices[0] = q
                _sift_down(values, indices, k, 0)
        tau = values[0]
        found = 0
        for q in range(n_groups):
            if not group_max[q] >= tau:
                continue
            for j in range(q, n, n_groups):
                value = row[j]
                if not value >= tau:
                    continue
                if found < k:
                    values[found] = value
                    indices[found] = j
                    if found == k - 1:
                        _heapify(values, indices, k)
                elif value > values[0]:
                    values[0] = value
                    indices[0] = j
                    _sift_down(values, indices, k, 0)
                found += 1
        return found >= k and not has_nan

    # Two builds of the row loop. The parallel one starts an OpenMP pool whose idle threads spin:
    # with one torch thread per process (SLURM tasks, notebooks side by side) they took the other
    # processes' cores, and small runs went 10x slower. One torch thread takes the serial build.
    @_cached_njit(fastmath=_FASTMATH, nogil=True)
    def _topk_rows_serial(pre, k, n_groups, out_values, out_indices, complete):
        maxima = np.empty(n_groups, pre.dtype)
        for r in range(len(pre)):
            complete[r] = _topk_row(pre[r], k, n_groups, maxima, out_values[r], out_indices[r])

    @_cached_njit(parallel=True, fastmath=_FASTMATH, nogil=True)
    def _topk_rows_parallel(pre, k, n_groups, out_values, out_indices, complete):
        maxima = np.empty((len(pre), n_groups), pre.dtype)
        for r in numba.prange(len(pre)):
            complete[r] = _topk_row(pre[r], k, n_groups, maxima[r], out_values[r], out_indices[r])


def kernel_applies(pre: torch.Tensor, k: int) -> bool:
    return (numba is not None and pre.device.type == "cpu" and pre.dtype in KERNEL_DTYPES and pre.dim() == 2
            and 0 < k <= pre.shape[1])


def row_topk(pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) [rows, k] of each row's k largest entries, in no particular order: torch.topk's
    values (sorted=False), through the kernel above where it applies."""
    if not kernel_applies(pre, k):
        return pre.topk(k, dim=-1, sorted=False)
    if pre.requires_grad:  # select on the data, then gather: the values' gradient flows as torch.topk's
        indices = row_topk(pre.detach(), k)[1]
        return pre.gather(1, indices), indices
    pre = pre.contiguous()
    values = torch.empty(len(pre), k, dtype=pre.dtype)
    indices = torch.empty(len(pre), k, dtype=torch.long)
    complete = torch.empty(len(pre), dtype=torch.bool)
    _kernel()(pre.numpy(), k, group_count(pre.shape[1], k), values.numpy(), indices.numpy(), complete.numpy())
    broken = torch.nonzero(~complete).flatten()  # CPU only: this sync costs nothing
    if broken.numel():
        values[broken], indices[broken] = pre[broken].topk(k, dim=-1, sorted=False)
    return values, indices


def _kernel():
    """The build for torch's thread count (hardware.threads sets it), with as many threads as torch."""
    wanted = min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)
    if wanted == 1:
        return _topk_rows_serial
    if numba.get_num_threads() != wanted:
        numba.set_num_threads(wanted)
    return _topk_rows_parallel
