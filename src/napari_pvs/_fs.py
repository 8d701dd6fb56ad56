"""File-system helpers used everywhere: one atomic write, one file hash.

* :func:`atomic_path` writes a file under a temporary name in the target's folder,
  fsyncs it and ``os.replace``-s it into place, so the target is either the old file
  or the complete new one, also when the writer is killed.  On any error the
  temporary file is removed and the error propagates unchanged (callers turn it into
  their own message).  :func:`atomic_write_bytes` and :func:`atomic_write_text` are the
  one-call forms.
* :func:`atomic_dir` does the same for a folder (a zarr group, an export cache entry):
  it is written in full under ``.tmp-<name>-<hex>`` and renamed into place.  Readers of
  those folders clean up ``.tmp-*`` leftovers of killed writers.
* :func:`sha256_file` is the hex SHA-256 of a file, read in 1 MiB chunks.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_dir", "atomic_path", "atomic_write_bytes", "atomic_write_text", "fsync_dir",
           "sha256_file"]

_CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_dir(folder: str | os.PathLike[str]) -> None:
    """fsync a folder, so that a rename inside it survives a power failure."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tmp_name(path: Path, suffix: str) -> Path:
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp{suffix}")


@contextmanager
def atomic_path(path: str | os.PathLike[str], *, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to ``path``; write the file there.

    On a clean exit the file is fsynced and renamed over ``path`` (the commit
    point), then the folder is fsynced (best effort: the file is already in place).
    On any error the temporary file is removed and ``path`` is as it was.

    Parameters
    ----------
    path : str or os.PathLike
        The file to write.
    suffix : str, optional
        Ending of the temporary name, for writers that choose a format by it
        (``".nii.gz"`` for nibabel).
    """
    path = Path(path)
    tmp = _tmp_name(path, suffix)
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    try:
        fsync_dir(path.parent)
    except OSError:
        pass  # the new file is in place; only its survival of a power failure is unsure


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike[str], text: str, *,
                      encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_path`)."""
    atomic_write_bytes(path, text.encode(encoding))


@contextmanager
def atomic_dir(final: str | os.PathLike[str], *, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary folder path ``.tmp-<name>-<hex>`` next to ``final``; write it.

    On a clean exit the folder is renamed to ``final`` (the commit point).  With
    ``replace``, an existing ``final`` is swapped out only once the new folder is
    complete, and removed after.  On any error the temporary folder is removed,
    ``final`` is as it was, and the error propagates.  The parent is not fsynced:
    callers that need it call :func:`fsync_dir` (and decide what a failure means).
    """
    final = Path(final)
    tmp = final.with_name(f".tmp-{final.name}-{uuid.uuid4().hex[:8]}")
    old = final.with_name(f".tmp-old-{final.name}-{uuid.uuid4().hex[:8]}") if replace else None
    try:
        yield tmp
        if old is not None and final.exists():
            os.rename(final, old)
        os.rename(tmp, final)  # the commit point: complete or absent
    except BaseException:
        if old is not None and old.exists() and not final.exists():
            os.rename(old, final)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
