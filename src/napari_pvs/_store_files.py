"""The plain files of a corrections store (see :mod:`napari_pvs.store`): the write lock
``.lock`` and the append-only event log ``events.jsonl``."""

from __future__ import annotations

import fcntl
import json
import os
import time
import warnings
from pathlib import Path

from ._nifti_checks import one_line
from ._store_checks import StoreLockedError, StoreWarning, check_wait

__all__ = ["acquire_lock", "append_event", "cut_torn_line", "read_events", "release_lock"]


def acquire_lock(store: Path, wait: float) -> int:
    """Take the exclusive ``flock`` on ``store/.lock``, waiting up to ``wait`` seconds;
    returns the open descriptor.  Raises :class:`StoreLockedError` naming the holder's
    PID when the time is up."""
    wait = check_wait(wait)
    fd = os.open(store / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() >= deadline:
                holder = (store / ".lock").read_text().strip() or "unknown"
                os.close(fd)
                raise StoreLockedError(
                    f"store {store} is locked by PID {holder}; wait for that process to "
                    "finish (or pass --wait SECONDS), then try again"
                ) from None
            time.sleep(0.05)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError:
        pass  # the PID is only informative
    return fd


def release_lock(fd: int) -> None:
    """Release the lock taken by :func:`acquire_lock` and close its descriptor."""
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


def append_event(log: Path, line: str) -> None:
    """Append one line to the event log, flushed and fsynced; a failed append is cut
    back, so no torn line is left behind."""
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        try:
            data = line.encode()
            if os.write(fd, data) != len(data):
                raise OSError(28, "short write to the event log")
            os.fsync(fd)
        except OSError:
            os.ftruncate(fd, size)
            raise
    finally:
        os.close(fd)


def cut_torn_line(log: Path) -> None:
    """Cut a torn last line (of a killed writer) off the event log; a failure is a
    :class:`StoreWarning`."""
    try:
        raw = log.read_bytes() if log.is_file() else b""
        if raw and not raw.endswith(b"\n"):
            os.truncate(log, raw.rfind(b"\n") + 1)
    except OSError as exc:
        warnings.warn(f"{log}: cannot remove a torn last line ({one_line(exc)})", StoreWarning,
                      stacklevel=4)


def read_events(log: Path, subject: str | None = None) -> list[dict]:
    """The events of the log (of one subject), skipping a torn last line."""
    out: list[dict] = []
    if not log.is_file():
        return out
    for line in log.read_text(errors="replace").splitlines():
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(event, dict) and (subject is None or event.get("subject") == subject):
            out.append(event)
    return out
