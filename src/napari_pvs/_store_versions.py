"""Label versions of a corrections store: immutable, numbered 1..latest, each checked
against the checksum recorded when it was committed (see :mod:`napari_pvs.store`).

A version is ``full`` (every voxel's label is known: a correction, an import) or
``review`` (only the voxels of its ``reviewed`` mask are known: the clusters a reviewer
accepted or rejected and the voxels painted; the rest is what the reviewer was shown).
Versions written before kinds existed are full.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ._errors import PVSInputError
from ._store_base import StoreBase, _now
from ._store_checks import REVIEWED, StoreCorruptError, _sha256, _write_labels

__all__ = ["KINDS", "LabelVersions"]

KINDS = ("full", "review")


class LabelVersions(StoreBase):
    """Reading and committing label versions."""

    def versions(self, subject: str) -> list[dict[str, Any]]:
        """Attributes of every version (author, time, parent, source, summary, kind)."""
        return [{"kind": "full", **self.labels(subject, n).attrs}
                for n in range(1, (self.latest_version(subject) or 0) + 1)]

    def version_kind(self, subject: str, version: int | None = None) -> str:
        """``"full"`` or ``"review"``: the kind of a version (default: the latest); versions
        written before kinds existed are full."""
        return str(self.labels(subject, version).attrs.get("kind", "full"))

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

    def labels_kind(self, subject: str) -> str:
        """What the subject's latest labels are, for listings: ``"full"``, ``"review"``
        (review-only), ``"none"`` (no version yet) or ``"damaged"`` (the latest version's
        metadata is unreadable; ``napari-pvs store verify`` says more)."""
        if self.info(subject)["latest"] is None:
            return "none"
        try:
            return self.version_kind(subject)
        except StoreCorruptError:
            return "damaged"

    def read_reviewed(self, subject: str, version: int | None = None) -> np.ndarray:
        """Which voxels of a version (default: the latest) have a known label, as bool.

        All True for a full version; for a review-only version its ``reviewed`` mask,
        checked against the checksum recorded with the version.  Raises
        :class:`StoreCorruptError` naming the version when the mask is damaged or missing.
        """
        number, path, where = self._version_path(subject, version)
        arr = self._open_array(path, where)
        if arr.attrs.get("kind", "full") != "review":
            return np.ones(arr.shape, bool)
        where = f"{where} reviewed mask"
        mask = self._read_verified(path / REVIEWED, where)
        if _sha256(mask) != arr.attrs.get("reviewed_sha256") or mask.shape != arr.shape:
            raise StoreCorruptError(self.path, where, "it does not match the mask recorded with "
                                    f"label version v{number:04d} (replaced or altered)")
        return mask != 0

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
    def _version_attrs(number, parent, author, source, summary, labels,
                       reviewed: np.ndarray | None = None) -> dict[str, Any]:
        attrs = {"version": number, "author": str(author), "time": _now(), "parent": parent,
                 "source": str(source), "summary": summary, "sha256": _sha256(labels),
                 "kind": "full" if reviewed is None else "review"}
        if reviewed is not None:
            attrs["reviewed_sha256"] = _sha256(reviewed)
            attrs["reviewed_voxels"] = int(np.count_nonzero(reviewed))
        return attrs

    def _check_reviewed(self, subject: str, reviewed, shape) -> np.ndarray:
        reviewed = np.asarray(reviewed)
        if reviewed.shape != tuple(shape):
            raise PVSInputError(f"reviewed mask shape {reviewed.shape} does not match subject "
                                f"{subject!r} shape {tuple(shape)}; build it on the labels' grid")
        if reviewed.dtype != bool and not (np.issubdtype(reviewed.dtype, np.integer)
                                           and reviewed.size and reviewed.min() >= 0
                                           and reviewed.max() <= 1):
            raise PVSInputError(f"reviewed mask of subject {subject!r} must be bool or 0/1 "
                                f"integers, got {reviewed.dtype}; 1 marks a voxel whose label "
                                "the reviewer decided")
        return reviewed.astype(np.uint8)

    def commit_labels(self, subject: str, labels: np.ndarray, *, author: str,
                      source: str = "manual", affine: np.ndarray | None = None,
                      image_sha256: str | None = None, summary: dict | None = None,
                      events: list[dict] | None = None,
                      reviewed: np.ndarray | None = None) -> int:
        """Add a new, immutable label version; returns its number.

        Parameters
        ----------
        subject : str
        labels : ndarray
            The labels on the subject's grid (integers 0..255).
        author, source : str
            Who made them, and how (``manual``, ``review``, ``import``, ``model:<id>``).
        affine, image_sha256 : optional
            Of the image the labels were drawn on; when given, they must match the subject.
        summary : dict, optional
            Merged into the edit summary, which records voxels painted and erased against
            the parent version (e.g. clusters accepted / rejected).
        events : list of dict, optional
            Review decisions, for the event log.
        reviewed : ndarray of bool or 0/1, optional
            Makes the version review-only (``kind: "review"``): 1 marks the voxels whose
            label is known (accepted and rejected clusters, painted voxels); training
            ignores the others.  Stored with its checksum inside the version, in the
            same atomic step.  A review-only commit marks the subject ``reviewed``
            (``corrected`` stays ``corrected``); a full one (the default) ``corrected``.

        Raises :class:`StoreWriteError` (and saves nothing) when writing fails; a
        failure after the commit point is a :class:`StoreWarning`.
        """
        self._require_writable()
        info = self.info(subject)
        labels = self._check_labels(subject, info, labels, affine, image_sha256)
        if reviewed is not None:
            reviewed = self._check_reviewed(subject, reviewed, info["shape"])
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
                                    labels, reviewed)
        folder.mkdir(exist_ok=True)
        what = f"label version v{number:04d} of subject {subject}"
        self._write_dir(final, lambda t: _write_labels(t, labels, attrs, reviewed), what)
        status = ("corrected" if reviewed is None or info.get("status") == "corrected"
                  else "reviewed")

        def pointer():
            self._subject(subject, "r+").attrs.update({"latest": number, "status": status})

        self._after_commit(what, pointer, lambda: self.log_event(subject, "commit", {
            "version": number, "parent": parent, "author": author, "source": source,
            "labels_kind": attrs["kind"], "summary": attrs["summary"]}),
            *[(lambda e=e: self.log_event(subject, e.get("kind", "review"), e))
              for e in events or []])
        return number
