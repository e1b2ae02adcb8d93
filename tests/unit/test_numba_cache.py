"""`import sae` where numba cannot write its cache (a read-only shared install, no writable HOME):
numba raised "no locator available" at import; a cache is an optimisation, so the import must
work, with one warning, and the kernel must still be exact.

The failure is made for real, for any user (root included): the package is a copy whose
`sae/saes/__pycache__` is a regular file, and HOME is /dev/null, so numba's in-tree and user-wide
locators both fail to create their dirs, as they do for a non-root user without write access."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("numba")
ROOT = Path(__file__).resolve().parents[2]

CHECK = """
import logging, sys, torch
logging.basicConfig(level=logging.WARNING, format="WARNING %(message)s")
import sae.saes.row_topk as row_topk
assert row_topk.__file__.startswith(sys.argv[1]), row_topk.__file__
torch.set_num_threads(1)
pre = torch.randn(64, 512, generator=torch.Generator().manual_seed(0))
values, indices = row_topk.row_topk(pre, 16)
assert torch.equal(values.sort(dim=1, descending=True).values, pre.topk(16, dim=1).values)
assert torch.equal(pre.gather(1, indices), values)
print("kernel exact")
"""


def read_only_install(tmp_path: Path) -> Path:
    """A copy of the package where nothing can be cached beside the sources."""
    install = tmp_path / "install"
    shutil.copytree(ROOT / "sae", install / "sae", ignore=shutil.ignore_patterns("__pycache__"))
    (install / "sae" / "saes" / "__pycache__").write_text("not a directory")
    return install


def import_in(install: Path, **env_changes: str) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key not in ("NUMBA_CACHE_DIR", "XDG_CACHE_HOME")}
    env.update(PYTHONPATH=str(install), HOME="/dev/null", PYTHONDONTWRITEBYTECODE="1", **env_changes)
    return subprocess.run([sys.executable, "-c", CHECK, str(install)], env=env, cwd=install, capture_output=True, text=True,
                          timeout=300)


def warnings_of(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("WARNING")]


def test_without_a_writable_cache_location_the_kernel_caches_in_a_temp_dir(tmp_path):
    temp = tmp_path / "tmp"
    temp.mkdir()
    result = import_in(read_only_install(tmp_path), TMPDIR=str(temp))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "kernel exact" in result.stdout
    cache = temp / f"numba-cache-{os.getuid()}"
    (warning,) = warnings_of(result)
    assert "numba cannot write its cache beside" in warning and f"caching the top-k kernel in {cache}" in warning
    assert list(cache.rglob("*.nbi"))  # the cache was written there


def test_an_unwritable_numba_cache_dir_compiles_without_a_cache(tmp_path):
    """NUMBA_CACHE_DIR is the user's choice, so no temp dir replaces it; the kernel compiles uncached."""
    result = import_in(read_only_install(tmp_path), NUMBA_CACHE_DIR="/dev/null/numba")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "kernel exact" in result.stdout
    (warning,) = warnings_of(result)
    assert "compiles without a cache" in warning and "NUMBA_CACHE_DIR=/dev/null/numba" in warning
