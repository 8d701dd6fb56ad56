"""Label versions of a corrections store: immutable, numbered 1..latest, each checked
against the checksum recorded when it was committed (see :mod:`napari_pvs.store`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ._errors import PVSInputError
from ._store_base import StoreBase, _now
from ._store_checks import StoreCorruptError, _sha256, _write_labels

__all__ = ["LabelVersions"]


class LabelVersions(StoreBase):
    """Reading and committing label versions."""

    def versions(self, subject: str) -> list[dict[str, Any]]:
        """Attributes of every version (author, time, parent, source, summary)."""
        return [dict(self.labels(subject, n).attrs) for n in range(1, (self.latest_version(subject)
                                                                      or 0) + 1)]

    def _version_path(self, subject: str, version: int | None) -> tuple[int, Path, str]:
        latest = self.latest_version(subject)
        number = latest if version is None else int(version)
        if number is None or number < 1 or number > (latest or 0):
            present = ", ".join(map(str, self.version_numbers(subject))) or "none"
            raise PVSInputError(f"subject {subject!r} has no label version {version} "
                                f"(versions: {present})")
        path = self._labels_dir(subject) / f"v{number:04d}"
        where = f"subject {subject} labels v{number:04d}"
        if not path.is_dir():
            raise StoreCorruptError(self.path, where, f"the version folder is missing (latest is "
                                    f"v{latest:04d}, present: {self.version_numbers(subject)})")
        return number, path, where

    def labels(self, subject: str, version: int | None = None):
        """A label version (default: the latest) as a lazy, read-only zarr array, NOT
        checked against its checksum: for attributes; use :meth:`read_labels` for data."""
        _, path, where = self._version_path(subject, version)
        return self._open_array(path, where)

    def read_labels(self, subject: str, version: int | None = None) -> np.ndarray:
        """A label version (default: the latest) as uint8, checked against its checksum.

        Raises :class:`StoreCorruptError` naming the version when it is damaged or missing.
        """
        _, path, where = self._version_path(subject, version)
        return self._read_verified(path, where)

    def _check_labels(self, subject: str, info: dict, labels, affine, image_sha256) -> np.ndarray:
        labels = np.asarray(labels)
        if labels.shape != tuple(info["shape"]):
            raise PVSInputError(f"labels shape {labels.shape} does not match subject {subject!r} "
                                f"shape {tuple(info['shape'])}; were they drawn on another image?")
        if affine is not None and not np.allclose(np.asarray(affine), info["affine"], atol=1e-3):
            raise PVSInputError(f"labels affine does not match subject {subject!r}; they are on "
                                "another grid (resample them to the subject's image)")
        if image_sha256 is not None and info.get("image_sha256") not in (None, image_sha256):
            raise PVSInputError(f"labels were drawn on an image (sha256 {image_sha256[:12]}...) "
                                f"that is not subject {subject!r}'s ({info['image_sha256'][:12]}...)")
        if labels.dtype != bool and not np.issubdtype(labels.dtype, np.integer):
            raise PVSInputError(f"labels must be integers, got {labels.dtype}")
        if labels.dtype not in (np.uint8, np.bool_) and labels.size and (
                labels.min() < 0 or labels.max() > 255):
            raise PVSInputError("label values must lie in 0..255")
        return labels.astype(np.uint8, copy=False)

    @staticmethod
    def _version_attrs(number, parent, author, source, summary, labels) -> dict[str, Any]:
        return {"version": number, "author": str(author), "time": _now(), "parent": parent,
                "source": str(source), "summary": summary, "sha256": _sha256(labels)}

    def commit_labels(self, subject: str, labels: np.ndarray, *, author: str,
                      source: str = "manual", affine: np.ndarray | None = None,
                      image_sha256: str | None = None, summary: dict | None = None,
                      events: list[dict] | None = None) -> int:
        """Add a new, immutable label version; returns its number.

        ``affine`` and ``image_sha256`` (of the image the labels were drawn on), when
        given, must match the subject.  The edit summary records voxels painted and
        erased against the parent version, merged with ``summary`` (e.g. clusters
        accepted / rejected); ``events`` (review decisions) go to the event log.
        Raises :class:`StoreWriteError` (and saves nothing) when writing fails; a
        failure after the commit point is a :class:`StoreWarning`.
        """
        self._require_writable()
        info = self.info(subject)
        labels = self._check_labels(subject, info, labels, affine, image_sha256)
        parent = info["latest"]
        diff = {"voxels_painted": int(np.count_nonzero(labels)), "voxels_erased": 0}
        if parent is not None:
            try:
                old = self.read_labels(subject, parent) != 0
                new = labels != 0
                changed = old ^ new
                painted = int(np.count_nonzero(changed & new))
                diff = {"voxels_painted": painted,
                        "voxels_erased": int(np.count_nonzero(changed)) - painted}
            except StoreCorruptError as exc:  # a new version is how damage gets repaired
                diff = {"voxels_painted": diff["voxels_painted"], "voxels_erased": None,
                        "parent_damaged": exc.detail}
        number = (parent or 0) + 1
        folder = self._labels_dir(subject)
        final = folder / f"v{number:04d}"
        if final.exists():
            raise PVSInputError(f"{final} exists; versions are never overwritten")
        attrs = self._version_attrs(number, parent, author, source, {**diff, **(summary or {})},
                                    labels)
        folder.mkdir(exist_ok=True)
        what = f"label version v{number:04d} of subject {subject}"
        self._write_dir(final, lambda t: _write_labels(t, labels, attrs), what)

        def pointer():
            self._subject(subject, "r+").attrs.update({"latest": number, "status": "corrected"})

        self._after_commit(what, pointer, lambda: self.log_event(subject, "commit", {
            "version": number, "parent": parent, "author": author, "source": source,
            "summary": attrs["summary"]}), *[(lambda e=e: self.log_event(
                subject, e.get("kind", "review"), e)) for e in events or []])
        return number
