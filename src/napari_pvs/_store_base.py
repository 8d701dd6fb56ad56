"""The plumbing of :class:`napari_pvs.store.CorrectionsStore`: opening and creating a
store, its write lock, recovery after a killed writer, the atomic folder write every
commit goes through, and the event log (see :mod:`napari_pvs.store` for the format and
its guarantees)."""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ._errors import PVSInputError
from ._fs import atomic_dir, fsync_dir
from ._nifti_checks import one_line
from ._store_checks import (
    _ID,
    _RESTORE,
    StoreCorruptError,
    StoreWarning,
    StoreWriteError,
    check_subject_id,
    check_wait,
    open_array,
    read_verified,
)
from ._store_files import acquire_lock, append_event, cut_torn_line, read_events, release_lock
from ._store_verify import verify_store
from .model import ModelRegistry

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["FORMAT", "FORMAT_VERSION", "MODALITIES", "STATUSES", "StoreBase", "model_registry"]

FORMAT = "napari-pvs-store"
FORMAT_VERSION = 1
STATUSES = ("unlabelled", "predicted", "in-review", "reviewed", "corrected")
MODALITIES = ("T2w", "T1w")
_VERSION = re.compile(r"v(\d{4,})")
_READ = object()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def model_registry(path: str | os.PathLike[str]) -> ModelRegistry:
    """The model registry of the store folder ``path``, without opening (or locking) it."""
    return ModelRegistry(Path(path) / "models")


class StoreBase:
    """Opening, locking, recovery, atomic folder writes, subject folders, the event log.

    :class:`~napari_pvs.store.CorrectionsStore` adds subjects, label versions and
    predictions on top.
    """

    def __init__(self, path: Path, writable: bool, wait: float):
        import zarr

        self.path = Path(path)
        self.writable = writable
        self._lock_fd: int | None = None
        if not (self.path / "zarr.json").is_file():
            raise PVSInputError(f"{self.path} is not a napari-pvs store (no zarr.json); create one "
                                "with `napari-pvs store init`")
        try:
            self.root = zarr.open_group(str(self.path), mode="r+" if writable else "r")
            info = dict(self.root.attrs).get("napari_pvs", {})
        except Exception as exc:  # zarr raises several error types for broken metadata
            raise PVSInputError(f"{self.path}: cannot open the zarr store ({one_line(exc)}); "
                                f"{_RESTORE}") from None
        if not isinstance(info, dict) or info.get("format") != FORMAT:
            raise PVSInputError(f"{self.path} is a zarr store but not a napari-pvs store")
        if int(info.get("format_version", 0)) > FORMAT_VERSION:
            raise PVSInputError(f"{self.path} has store format {info['format_version']}; this "
                                f"napari-pvs reads up to {FORMAT_VERSION}: upgrade napari-pvs")
        if writable:
            self._lock_fd = acquire_lock(self.path, wait)
            self._recover()

    # ------------------------------------------------------------------ opening
    @classmethod
    def create(cls, path: str | os.PathLike[str]) -> Self:
        """Create an empty store (refuses a file, or a folder that is not empty)."""
        import zarr

        path = Path(path)
        if path.exists() and not path.is_dir():
            raise PVSInputError(f"{path} is a file, not a folder; choose a new store folder "
                                "(e.g. NAME.pvs.zarr)")
        if path.is_dir() and any(path.iterdir()):
            what = ("is already a napari-pvs store; use it as it is"
                    if (path / "zarr.json").is_file() and (path / "subjects").is_dir()
                    else "exists and is not empty; choose a new store folder")
            raise PVSInputError(f"{path} {what}")
        try:
            root = zarr.open_group(str(path), mode="w")
            root.attrs["napari_pvs"] = {"format": FORMAT, "format_version": FORMAT_VERSION,
                                        "created": _now()}
            root.create_group("subjects")
            (path / "models").mkdir(exist_ok=True)
            (path / "events.jsonl").touch()
        except OSError as exc:
            raise StoreWriteError(f"cannot create the store {path} ({one_line(exc)})") from None
        return cls(path, writable=True, wait=0.0)

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, writable: bool = False,
             wait: float = 0.0) -> Self:
        """Open a store; ``writable`` takes the write lock, waiting up to ``wait`` seconds."""
        wait = check_wait(wait)
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise PVSInputError(f"{path} is a file, not a napari-pvs store (a NAME.pvs.zarr "
                                "folder); pass the store folder")
        if not path.is_dir():
            raise PVSInputError(f"store {path} does not exist; create it with `napari-pvs store init`")
        return cls(path, writable, wait)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Release the write lock."""
        if self._lock_fd is not None:
            release_lock(self._lock_fd)
            self._lock_fd = None

    def _require_writable(self) -> None:
        if not self.writable or self._lock_fd is None:
            raise PVSInputError(f"store {self.path} was opened read-only; open it with writable=True")

    def _recover(self) -> None:
        """Remove leftovers of killed writers: ``.tmp-*`` folders, a torn last event line,
        a ``latest`` attribute behind the newest version."""
        for pattern in ("subjects/*/labels/.tmp-*", "subjects/*/predictions/.tmp-*",
                        "subjects/*/.tmp-*", "subjects/.tmp-*"):
            for tmp in self.path.glob(pattern):
                shutil.rmtree(tmp, ignore_errors=True)
        cut_torn_line(self.path / "events.jsonl")
        for sid in self.subjects():
            try:
                latest = self.latest_version(sid)
                group = self._subject(sid, "r+")
                if group.attrs.get("latest") != latest:
                    group.attrs["latest"] = latest
            except (OSError, PVSInputError):
                continue  # damage is reported on reading and by `store verify`

    def _after_commit(self, what: str, *steps: Callable[[], Any]) -> None:
        """Run the steps after a commit point; a failure is a warning (the data is saved)."""
        for step in steps:
            try:
                step()
            except Exception as exc:  # ENOSPC, EIO ...: the committed data is complete
                warnings.warn(f"{what} is saved, but updating the store afterwards failed "
                              f"({one_line(exc)}); the next writer repairs the latest pointer",
                              StoreWarning, stacklevel=3)

    def _write_dir(self, final: Path, write: Callable[[Path], None], what: str,
                   replace: bool = False) -> None:
        """Write a folder with ``write`` and rename it to ``final`` (see
        :func:`napari_pvs._fs.atomic_dir`); on failure nothing is left, ``final`` is as
        it was and :class:`StoreWriteError` says so."""
        try:
            with atomic_dir(final, replace=replace) as tmp:
                write(tmp)
        except BaseException as exc:
            if isinstance(exc, PVSInputError) or not isinstance(exc, Exception):
                raise
            raise StoreWriteError(f"could not write {what} to store {self.path} "
                                  f"({one_line(exc)}); nothing was saved: free disk space (or "
                                  "fix the error) and try again") from None
        self._after_commit(what, lambda: fsync_dir(final.parent))

    # ------------------------------------------------------------------ subjects
    def subjects(self) -> list[str]:
        """Subject ids, sorted."""
        folder = self.path / "subjects"
        return sorted(p.name for p in folder.iterdir()
                      if (p / "zarr.json").is_file() and _ID.fullmatch(p.name))

    def _subject(self, subject: str, mode: str = "r"):
        import zarr

        check_subject_id(subject)
        if not (self.path / "subjects" / subject / "zarr.json").is_file():
            raise PVSInputError(f"no subject {subject!r} in {self.path} (see `napari-pvs store ls`)")
        try:
            return zarr.open_group(str(self.path / "subjects" / subject), mode=mode)
        except Exception as exc:
            raise StoreCorruptError(self.path, f"subject {subject} metadata",
                                    f"unreadable: {one_line(exc)}", _RESTORE) from None

    # ------------------------------------------------------------------ reading arrays
    def info(self, subject: str) -> dict[str, Any]:
        """The subject's attributes (site, modality, geometry, status, latest ...)."""
        attrs = dict(self._subject(subject).attrs)
        attrs["latest"] = self.latest_version(subject, attrs.get("latest"))
        return attrs

    def _open_array(self, path: Path, where: str, remedy: str | None = None):
        return open_array(self.path, path, where, remedy)

    def _read_verified(self, path: Path, where: str, remedy: str | None = None) -> np.ndarray:
        return read_verified(self.path, path, where, remedy)

    # ------------------------------------------------------------------ versions
    def _labels_dir(self, subject: str) -> Path:
        return self.path / "subjects" / check_subject_id(subject) / "labels"

    def version_numbers(self, subject: str) -> list[int]:
        """Numbers of the label version folders present, ascending (a damaged one
        raises :class:`StoreCorruptError` when read)."""
        folder = self._labels_dir(subject)
        if not folder.is_dir():
            return []
        return sorted(int(m.group(1)) for p in folder.iterdir()
                      if (m := _VERSION.fullmatch(p.name)) and p.is_dir())

    def latest_version(self, subject: str, pointer: Any = _READ) -> int | None:
        """The newest version: the highest version folder, or the subject's ``latest``
        attribute if that is higher (then that version is missing: damage)."""
        nums = self.version_numbers(subject)
        if pointer is _READ:
            pointer = dict(self._subject(subject).attrs).get("latest")
        newest = nums[-1] if nums else None
        if isinstance(pointer, int) and not isinstance(pointer, bool) and pointer > (newest or 0):
            return pointer
        return newest

    # ------------------------------------------------------------------ events, models
    def log_event(self, subject: str | None, kind: str, details: dict | None = None) -> None:
        """Append one event to ``events.jsonl`` (flushed and fsynced; a failed append is
        cut back, so no torn line is left behind)."""
        self._require_writable()
        line = json.dumps({"time": _now(), "pid": os.getpid(), "subject": subject, "kind": kind,
                           **(details or {})}, default=str) + "\n"
        append_event(self.path / "events.jsonl", line)

    def events(self, subject: str | None = None) -> list[dict]:
        """The event log (a torn last line of a killed writer is skipped)."""
        return read_events(self.path / "events.jsonl", subject)

    def verify(self) -> tuple[list[str], dict[str, int]]:
        """Check everything; returns ``(problems, counts)``
        (see :mod:`napari_pvs._store_verify`)."""
        return verify_store(self)

    @property
    def models(self) -> ModelRegistry:
        """The store's model registry."""
        return model_registry(self.path)
