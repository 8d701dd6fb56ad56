"""Checks and low-level array I/O of the corrections store (see :mod:`napari_pvs.store`):
its error types, name rules, checksums, and reading an array in full against its
recorded sha256."""

from __future__ import annotations

import hashlib
import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from ._errors import PVSInputError
from ._nifti_checks import one_line

__all__ = ["PREDICTION_MAPS", "REVIEWED", "StoreCorruptError", "StoreLockedError", "StoreWarning",
           "StoreWriteError", "check_site", "check_subject_id", "check_wait", "open_array",
           "read_verified"]

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_CHUNKS = (64, 64, 64)
_RESTORE = "restore the store folder from a backup"
PREDICTION_MAPS = ("probability", "uncertainty", "labels")
REVIEWED = "reviewed"  # a review-only version's mask of known voxels, inside its folder


class StoreLockedError(PVSInputError):
    """Another process holds the store's write lock."""


class StoreWriteError(PVSInputError):
    """Writing to the store failed (e.g. the disk is full); nothing was saved."""


class StoreWarning(UserWarning):
    """Saved, but a step after the commit point (event log, ``latest`` attribute) failed."""


class StoreCorruptError(PVSInputError):
    """Stored data is damaged: it does not match what was written.

    ``where`` names the damaged item (``subject sub-01 labels v0002``) and ``detail``
    what is wrong; the message adds the store and what to do.
    """

    def __init__(self, store: Path | str, where: str, detail: str, remedy: str | None = None):
        self.store, self.where, self.detail = str(store), where, detail
        remedy = remedy or (f"{_RESTORE}, or commit the labels again from a NIfTI you trust "
                            "(`napari-pvs store commit`)")
        super().__init__(f"store {store}: {where} is damaged ({detail}); {remedy}; "
                         f"`napari-pvs store verify {store}` lists all damage")


def _check_name(value: str, what: str) -> str:
    if not isinstance(value, str) or not _ID.fullmatch(value) or ".." in value:
        raise PVSInputError(
            f"invalid {what} {value!r}: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit, without '..', path separators or control characters"
        )
    return value


def check_subject_id(subject: str) -> str:
    """Return ``subject`` if it is a safe id: letters, digits, ``.``, ``_``, ``-``; no ``..``."""
    return _check_name(subject, "subject id")


def check_site(site: str) -> str:
    """Return ``site`` if it is a safe site name (the same rule as subject ids)."""
    return _check_name(site, "site")


def check_wait(wait: Any) -> float:
    """Seconds to wait for the lock: a finite number >= 0."""
    try:
        value = float(wait)
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise PVSInputError(f"wait time {wait!r} is not a finite number of seconds >= 0; "
                            "pass e.g. --wait 30 (or 0 not to wait)")
    return value


def _sha256(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).data).hexdigest()


def open_array(store: Path, path: Path, where: str, remedy: str | None = None):
    """The zarr array at ``path`` (read-only); :class:`StoreCorruptError` if its metadata
    is missing or unreadable."""
    import zarr

    if not (path / "zarr.json").is_file():
        raise StoreCorruptError(store, where, f"its metadata file {path / 'zarr.json'} is missing",
                                remedy)
    try:
        return zarr.open_array(str(path), mode="r")
    except Exception as exc:
        raise StoreCorruptError(store, where, f"unreadable metadata: {one_line(exc)}",
                                remedy) from None


def read_verified(store: Path, path: Path, where: str, remedy: str | None = None) -> np.ndarray:
    """Decode the whole array at ``path`` and compare it with its recorded sha256."""
    arr = open_array(store, path, where, remedy)
    try:
        data = np.asarray(arr[...])
        recorded = arr.attrs.get("sha256")
    except MemoryError:
        raise
    except Exception as exc:  # numcodecs / zarr decode errors of a truncated or garbled chunk
        raise StoreCorruptError(store, where, f"a chunk cannot be decoded: {one_line(exc)}",
                                remedy) from None
    if recorded is not None and _sha256(data) != recorded:
        raise StoreCorruptError(store, where, "its content does not match the checksum recorded "
                                "when it was written (a chunk was deleted or altered)", remedy)
    return data


def _write_labels(path: Path, labels: np.ndarray, attrs: dict[str, Any],
                  reviewed: np.ndarray | None = None) -> None:
    """Write a label version at ``path``; a review-only version's ``reviewed`` mask (uint8
    0/1, with its own sha256) goes inside it, at ``path/reviewed``, so that one folder
    rename commits both."""
    import zarr

    arr = zarr.create_array(str(path), shape=labels.shape, dtype=np.uint8, chunks=_CHUNKS,
                            fill_value=0, attributes=attrs)
    arr[...] = labels
    if reviewed is not None:
        mask = zarr.create_array(str(path / REVIEWED), shape=reviewed.shape, dtype=np.uint8,
                                 chunks=_CHUNKS, fill_value=0,
                                 attributes={"sha256": _sha256(reviewed)})
        mask[...] = reviewed
