"""Files a killed job, a full disk or a flipped byte cannot turn into a wrong result.

- `atomic_dir` / `atomic_file`: write under a temp name beside the target, then one rename; a
  killed job leaves only a temp (`.<name>.tmp-*`), which `remove_stale_temps` deletes at the next
  start of whoever owns the dir (holding its lock, so no live writer loses its temp).
- A full disk surfaces as `DiskFullError` naming the dir (torch.save says only "unexpected pos");
  the target is untouched, so the previous checkpoint stays valid.
- Outputs get the user's normal permissions (mkdtemp/mkstemp would leave 0700/0600).
- `write_manifest` / `verify_manifest`: sizes and sha256 of a dir's files, written last, so a
  truncated or corrupted file is found before it is loaded.

No project imports: every layer may use this module.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from sae.errors import ReportedError

TEMP_MARK = ".tmp-"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
# After a failed write, less free space than this means the disk filled up (torch.save and
# safetensors do not always pass ENOSPC on).
FULL_DISK_FREE_BYTES = 1 << 20


class DiskFullError(ReportedError):
    """No space left where a run writes; what was there before is untouched."""


def current_umask() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # no /proc: read it by setting it (not thread-safe, hence the fallback only)
    os.umask(mask)
    return mask


def _temp_prefix(final: Path) -> str:
    return f".{final.name}{TEMP_MARK}"


@contextlib.contextmanager
def disk_full_as_one_line(where: Path) -> Iterator[None]:
    """Turn a write that failed for lack of space into DiskFullError (before the temp is removed,
    so the free space seen is the one the write ran into)."""
    try:
        yield
    except ReportedError:
        raise
    except Exception as error:
        if _is_disk_full(error, where):
            raise DiskFullError(f"no space left on device in {where} (writing failed: "
                                f"{str(error).splitlines()[0][:120]}); free space and rerun the same command to "
                                "resume from the last checkpoint") from error
        raise


def _is_disk_full(error: BaseException, where: Path) -> bool:
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        error = error.__cause__ or error.__context__
    try:
        return shutil.disk_usage(where).free < FULL_DISK_FREE_BYTES
    except OSError:
        return False


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temp dir beside `final`; on success it replaces `final` in one rename."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(final), dir=final.parent))
    try:
        os.chmod(tmp, 0o777 & ~current_umask())
        with disk_full_as_one_line(final.parent):
            yield tmp
        _give_normal_permissions(tmp)
        if final.exists():  # rename over a non-empty dir is not allowed: move the old one aside
            old = final.with_name(f"{_temp_prefix(final)}old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _give_normal_permissions(tmp: Path) -> None:
    """Files some writers create private (safetensors: 0600) get what the user's umask gives."""
    mask = current_umask()
    for path in tmp.rglob("*"):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


@contextlib.contextmanager
def atomic_file(final: Path) -> Iterator[Path]:
    """Yield a temp path beside `final`; on success it replaces `final`."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=_temp_prefix(final), dir=final.parent)
    os.close(fd)
    try:
        os.chmod(name, 0o666 & ~current_umask())
        with disk_full_as_one_line(final.parent):
            yield Path(name)
        os.replace(name, final)
    finally:
        if os.path.exists(name):
            os.unlink(name)


def write_json(path: Path, data: Any) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")


def remove_stale_temps(directory: Path, name: str = "*") -> list[Path]:
    """Delete temps that killed writers left in `directory` (for targets matching `name`).
    Call only while holding the lock of whatever writes there."""
    removed = []
    for path in Path(directory).glob(f".{name}{TEMP_MARK}*"):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


# -- manifests ---------------------------------------------------------------------------------

def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(directory: Path) -> None:
    """Record the size and sha256 of every file in `directory`; write it after all of them."""
    directory = Path(directory)
    files = {p.name: {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
             for p in sorted(directory.iterdir()) if p.is_file() and p.name != MANIFEST}
    (directory / MANIFEST).write_text(json.dumps({"format": MANIFEST_FORMAT, "files": files}, indent=2) + "\n")


def verify_manifest(directory: Path) -> str | None:
    """None when every file the manifest lists is there with its size and sha256, else what is wrong."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return f"no {MANIFEST}"
    try:
        files = json.loads(path.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return f"unreadable {MANIFEST}"
    for name, expected in files.items():
        file = Path(directory) / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != expected["bytes"]:
            return f"{name} has {file.stat().st_size} bytes, the manifest says {expected['bytes']} (truncated?)"
        if file_sha256(file) != expected["sha256"]:
            return f"{name} does not match its sha256 in the manifest (corrupted)"
    return None
