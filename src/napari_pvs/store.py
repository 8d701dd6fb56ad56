"""The corrections store: one zarr v3 folder (``NAME.pvs.zarr``) that never loses a correction.

Layout (format version 1)::

    NAME.pvs.zarr/
      zarr.json                      root group; attributes["napari_pvs"] = format, version, created
      events.jsonl                   append-only corrections event log (one JSON object a line)
      .lock                          advisory write lock (fcntl.flock); holds the writer's PID
      models/                        model registry (napari_pvs.model.ModelRegistry)
      subjects/<id>/                 group; attributes: site, modality, shape, affine, qform,
                                     sform_code, qform_code, spacing, image_sha256 (of the
                                     source file), source, status, latest
        image                        float32 array, written once at import, never again
        regions                      uint8 region mask (0 other, 1 WM, 2 BG), optional
        labels/v0001, v0002, ...     uint8 label versions, immutable; attributes: version,
                                     author, time, parent, source, summary, sha256, kind
                                     ("full"; "review" for review-only versions; absent in
                                     versions written before kinds existed: full)
        labels/v0003/reviewed        a review-only version's mask (uint8 0/1) of the voxels
                                     whose label is known; attributes: sha256 (also kept
                                     as the version's reviewed_sha256)
        predictions/<model id>/      probability, uncertainty (float32), labels (uint8)

Every array carries ``attributes["sha256"]``: the SHA-256 of its content (C-order bytes in
its stored dtype), taken from the data in memory before it was written.

Guarantees
----------
* Nothing is half-written.  A label version, a whole imported subject (image, regions
  and its imported label version) and a model's prediction maps are each written in
  full under a hidden ``.tmp-*`` name and renamed into place in one step (an atomic
  directory rename), so each is complete or absent, also when the writer is killed.
  The next writer removes ``.tmp-*`` leftovers.  An existing version is never written
  to again; version numbers only grow, also past a damaged version.  (zarr does not
  fsync chunk files: this holds for killed processes; after a power failure, the
  checksums below find a version whose chunks did not reach the disk.)
* A commit reports the truth.  If writing fails before the rename (e.g. the disk is
  full), the temporary folder is removed and :class:`StoreWriteError` is raised: no
  version exists.  Once the rename is done the version is saved: a failure to update
  the ``latest`` attribute or to append ``events.jsonl`` afterwards is a
  :class:`StoreWarning`, and the commit returns the version number.  The same holds
  for importing a subject and saving a prediction (a replaced prediction is swapped
  out only once the new one is complete).  A failed append to ``events.jsonl`` is
  cut back, and a writer cuts a torn last line left by a killed one, so no torn line
  sits in the middle of the log.
* Damage is detected, never read as "no PVS".  zarr does not write chunks that hold
  only zeros, so a deleted chunk would read back as background: every read of data
  (:meth:`CorrectionsStore.read_labels`, :meth:`~CorrectionsStore.read_image`,
  :meth:`~CorrectionsStore.read_regions`, :meth:`~CorrectionsStore.read_prediction`)
  decodes the whole array and compares its SHA-256 with the recorded one.  A
  mismatch, a chunk that does not decode (truncated, overwritten), a version folder
  without its ``zarr.json``, a version missing from the sequence 1..latest, or a
  ``latest`` attribute past the newest version folder raises
  :class:`StoreCorruptError`, which names the store, subject and version and says
  what to do.  Reading "the latest" never falls back to an older version.
  ``napari-pvs store verify`` checks all of it (see :mod:`napari_pvs._store_verify`).
  The lazy accessors :meth:`~CorrectionsStore.labels`, :meth:`~CorrectionsStore.image`,
  :meth:`~CorrectionsStore.regions` and :meth:`~CorrectionsStore.prediction` are not
  checked: they serve attributes and lazy display (the napari reader shows images and
  uncertainty lazily, but reads and checks the labels in full).
* Stores written before checksums existed still open.  Their images, region maps and
  predictions carry no ``sha256``: they are decoded in full (a truncated or garbled
  chunk is still found) but a deleted chunk cannot be told from zeros; ``verify``
  counts them as "not checksummed" without calling them damaged.  Label versions have
  always carried their checksum.
* One writer at a time: writers take an exclusive ``flock`` on ``.lock`` (released by
  the kernel if the process dies).  A second writer gets :class:`StoreLockedError`
  naming the PID, or waits up to ``wait`` seconds (a finite number >= 0).  Readers
  need no lock: images, regions and label versions are immutable once renamed into
  place.
* A review-only version (``commit_labels(..., reviewed=mask)``) holds the labels the
  reviewer saw and decided on, and the mask of the voxels they decided (accepted and
  rejected clusters, painted voxels); :meth:`CorrectionsStore.read_reviewed` reads the
  mask, checked like the labels (all True for a full version).  It marks the subject
  ``reviewed``, not ``corrected`` (a corrected subject stays corrected); training learns
  from its reviewed voxels only (see :mod:`napari_pvs.training.data`).
* Labels whose shape, affine or image hash differ from the subject are refused;
  subject ids and sites are 1-128 letters, digits, ``.``, ``_``, ``-`` (whole-string
  match), modality is T2w or T1w.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ._errors import PVSInputError
from ._store_base import FORMAT, FORMAT_VERSION, MODALITIES, STATUSES, _now, model_registry
from ._store_checks import (
    _CHUNKS,
    _RESTORE,
    PREDICTION_MAPS,
    StoreCorruptError,
    StoreLockedError,
    StoreWarning,
    StoreWriteError,
    _sha256,
    _write_labels,
    check_site,
    check_subject_id,
)
from ._store_checks import _ID as _ID  # re-exported: the subject id rule
from ._store_predictions import Predictions
from ._store_versions import LabelVersions

__all__ = ["FORMAT", "FORMAT_VERSION", "MODALITIES", "PREDICTION_MAPS", "STATUSES",
           "CorrectionsStore", "StoreCorruptError", "StoreLockedError", "StoreWarning",
           "StoreWriteError", "check_site", "check_subject_id", "model_registry"]


class CorrectionsStore(LabelVersions, Predictions):
    """A corrections store folder.

    Open it with :meth:`create` or :meth:`open`; ``writable=True`` takes the write lock
    (use the store as a context manager, or call :meth:`close`, to release it).  The
    plumbing lives in :mod:`napari_pvs._store_base`, label versions in
    :mod:`napari_pvs._store_versions` and predictions in
    :mod:`napari_pvs._store_predictions`.
    """

    # ------------------------------------------------------------------ subjects
    def add_subject(self, subject: str, image, *, site: str = "unknown", modality: str = "T2w",
                    regions: np.ndarray | None = None, source: str | None = None,
                    labels: np.ndarray | None = None, labels_affine: np.ndarray | None = None,
                    author: str = "import", regions_meta: dict | None = None) -> None:
        """Import a subject's image (a :class:`napari_pvs.io.Volume`), region mask and,
        optionally, its first label version, all in one atomic step.

        ``regions_meta`` (JSON-serialisable: where the region map came from, e.g. the
        segmentation and table of :func:`napari_pvs.regions.from_segmentation`) is kept in
        the regions array's ``provenance`` attribute."""
        import zarr

        self._require_writable()
        check_subject_id(subject)
        check_site(site)
        if modality not in MODALITIES:
            raise PVSInputError(f"modality must be one of {MODALITIES}, got {modality!r}")
        final = self.path / "subjects" / subject
        if final.exists():
            raise PVSInputError(f"subject {subject!r} already exists in {self.path}; images are "
                                "read-only after import")
        if regions is not None and regions.shape != image.shape:
            raise PVSInputError(f"regions shape {regions.shape} does not match image {image.shape}")
        data = np.asarray(image.data, dtype=np.float32)
        geometry = {"shape": list(image.shape), "affine": np.asarray(image.affine).tolist(),
                    "image_sha256": image.sha256}
        version = None
        if labels is not None:
            labels = self._check_labels(subject, geometry, labels, labels_affine, None)
            version = self._version_attrs(1, None, author, "import",
                                          {"voxels_painted": int((labels > 0).sum()),
                                           "voxels_erased": 0}, labels)
        hdr = image.header

        def write(tmp: Path) -> None:
            group = zarr.open_group(str(tmp), mode="w")
            group.create_array("image", data=data, chunks=_CHUNKS,
                               attributes={"sha256": _sha256(data)})
            if regions is not None:
                reg = np.asarray(regions, dtype=np.uint8)
                attrs = {"sha256": _sha256(reg)}
                if regions_meta:
                    attrs["provenance"] = regions_meta
                group.create_array("regions", data=reg, chunks=_CHUNKS, attributes=attrs)
            group.create_group("labels")
            group.create_group("predictions")
            if version is not None:
                _write_labels(tmp / "labels" / "v0001", labels, version)
            group.attrs.update({
                "site": site, "modality": modality, **geometry, "spacing": list(image.spacing),
                "qform": None if hdr is None else np.asarray(hdr.get_qform()).tolist(),
                "sform_code": image.sform_code, "qform_code": image.qform_code,
                "source": str(source or image.path or ""),
                "status": "unlabelled" if version is None else "corrected",
                "latest": None if version is None else 1, "imported": _now(),
            })

        self._write_dir(final, write, f"subject {subject}")
        steps = [lambda: self.log_event(subject, "import", {"site": site, "modality": modality})]
        if version is not None:
            steps.append(lambda: self.log_event(subject, "commit", {
                "version": 1, "parent": None, "author": author, "source": "import",
                "summary": version["summary"]}))
        self._after_commit(f"subject {subject}", *steps)

    def image(self, subject: str):
        """The image as a lazy, read-only zarr array, NOT checked against its checksum
        (for display); use :meth:`read_image` to read the data."""
        return self._open_array(self.path / "subjects" / check_subject_id(subject) / "image",
                                f"subject {subject} image", _RESTORE)

    def regions(self, subject: str):
        """The region mask as a lazy zarr array (unchecked, see :meth:`image`), or None."""
        if not (self.path / "subjects" / check_subject_id(subject) / "regions").exists():
            return None
        return self._open_array(self.path / "subjects" / subject / "regions",
                                f"subject {subject} regions", _RESTORE)

    def read_image(self, subject: str) -> np.ndarray:
        """The image (float32), checked against the checksum recorded at import."""
        self._subject(subject)
        return self._read_verified(self.path / "subjects" / subject / "image",
                                   f"subject {subject} image", _RESTORE)

    def read_regions(self, subject: str) -> np.ndarray | None:
        """The region mask (uint8), checked like :meth:`read_image`; None without one."""
        self._subject(subject)
        if not (self.path / "subjects" / subject / "regions").exists():
            return None
        return self._read_verified(self.path / "subjects" / subject / "regions",
                                   f"subject {subject} regions", _RESTORE)

    def set_status(self, subject: str, status: str) -> None:
        self._require_writable()
        if status not in STATUSES:
            raise PVSInputError(f"status must be one of {STATUSES}, got {status!r}")
        self._subject(subject, "r+").attrs["status"] = status
        self.log_event(subject, "status", {"status": status})

    def remove_model(self, model_id: str) -> None:
        """Remove a registered model (one file: the unlink is atomic) and log it."""
        self._require_writable()
        path = self.models.path(model_id)  # refuses an unknown or malformed id
        path.unlink()
        self.log_event(None, "model_removed", {"model_id": model_id})
