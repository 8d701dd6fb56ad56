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
                                     author, time, parent, source, summary, sha256
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
* Labels whose shape, affine or image hash differ from the subject are refused;
  subject ids and sites are 1-128 letters, digits, ``.``, ``_``, ``-`` (whole-string
  match), modality is T2w or T1w.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import time
import uuid
import warnings
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from ._errors import PVSInputError
from ._nifti_checks import one_line
from ._store_checks import (_CHUNKS, _ID, _RESTORE, StoreCorruptError, StoreLockedError,
                            StoreWarning, StoreWriteError, _fsync_dir, _sha256,
                            _write_labels, check_site, check_subject_id, check_wait, open_array,
                            read_verified)

__all__ = ["FORMAT_VERSION", "MODALITIES", "STATUSES", "CorrectionsStore", "StoreCorruptError",
           "StoreLockedError", "StoreWarning", "StoreWriteError", "check_site", "check_subject_id"]

FORMAT = "napari-pvs-store"
FORMAT_VERSION = 1
STATUSES = ("unlabelled", "predicted", "in-review", "corrected")
MODALITIES = ("T2w", "T1w")
PREDICTION_MAPS = ("probability", "uncertainty", "labels")
_VERSION = re.compile(r"v(\d{4,})")
_READ = object()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def model_registry(path: str | os.PathLike[str]):
    """The model registry of the store folder ``path``, without opening (or locking) it."""
    from .model import ModelRegistry

    return ModelRegistry(Path(path) / "models")


class CorrectionsStore:
    """A corrections store folder.

    Open it with :meth:`create` or :meth:`open`; ``writable=True`` takes the write lock
    (use the store as a context manager, or call :meth:`close`, to release it).
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
            self._acquire(wait)
            self._recover()

    # ------------------------------------------------------------------ opening
    @classmethod
    def create(cls, path: str | os.PathLike[str]) -> CorrectionsStore:
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
             wait: float = 0.0) -> CorrectionsStore:
        """Open a store; ``writable`` takes the write lock, waiting up to ``wait`` seconds."""
        wait = check_wait(wait)
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise PVSInputError(f"{path} is a file, not a napari-pvs store (a NAME.pvs.zarr "
                                "folder); pass the store folder")
        if not path.is_dir():
            raise PVSInputError(f"store {path} does not exist; create it with `napari-pvs store init`")
        return cls(path, writable, wait)

    def __enter__(self) -> CorrectionsStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Release the write lock."""
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def _acquire(self, wait: float) -> None:
        wait = check_wait(wait)
        fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = (self.path / ".lock").read_text().strip() or "unknown"
                    os.close(fd)
                    raise StoreLockedError(
                        f"store {self.path} is locked by PID {holder}; wait for that process to "
                        "finish (or pass --wait SECONDS), then try again"
                    ) from None
                time.sleep(0.05)
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            pass  # the PID is only informative
        self._lock_fd = fd

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
        log = self.path / "events.jsonl"
        try:
            raw = log.read_bytes() if log.is_file() else b""
            if raw and not raw.endswith(b"\n"):
                os.truncate(log, raw.rfind(b"\n") + 1)
        except OSError as exc:
            warnings.warn(f"{log}: cannot remove a torn last line ({one_line(exc)})", StoreWarning,
                          stacklevel=3)
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

    def _write_dir(self, tmp: Path, final: Path, write: Callable[[Path], None], what: str,
                   replace: bool = False) -> None:
        """Write ``tmp`` with ``write`` and rename it to ``final`` (with ``replace``, an
        existing ``final`` is swapped out only once ``tmp`` is complete); on failure
        nothing is left and ``final`` is as it was."""
        old = final.with_name(f".tmp-old-{final.name}-{uuid.uuid4().hex[:8]}") if replace else None
        try:
            write(tmp)
            if old is not None and final.exists():
                os.rename(final, old)
            os.rename(tmp, final)  # the commit point: complete or absent
        except BaseException as exc:
            if old is not None and old.exists() and not final.exists():
                os.rename(old, final)
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(exc, PVSInputError) or not isinstance(exc, Exception):
                raise
            raise StoreWriteError(f"could not write {what} to store {self.path} "
                                  f"({one_line(exc)}); nothing was saved: free disk space (or "
                                  "fix the error) and try again") from None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        self._after_commit(what, lambda: _fsync_dir(final.parent))

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

    def info(self, subject: str) -> dict[str, Any]:
        """The subject's attributes (site, modality, geometry, status, latest ...)."""
        attrs = dict(self._subject(subject).attrs)
        attrs["latest"] = self.latest_version(subject, attrs.get("latest"))
        return attrs

    def add_subject(self, subject: str, image, *, site: str = "unknown", modality: str = "T2w",
                    regions: np.ndarray | None = None, source: str | None = None,
                    labels: np.ndarray | None = None, labels_affine: np.ndarray | None = None,
                    author: str = "import") -> None:
        """Import a subject's image (a :class:`napari_pvs.io.Volume`), region mask and,
        optionally, its first label version, all in one atomic step."""
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
                group.create_array("regions", data=reg, chunks=_CHUNKS,
                                   attributes={"sha256": _sha256(reg)})
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

        tmp = self.path / "subjects" / f".tmp-{subject}-{uuid.uuid4().hex[:8]}"
        self._write_dir(tmp, final, write, f"subject {subject}")
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

    # ------------------------------------------------------------------ reading arrays
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
        tmp = folder / f".tmp-v{number:04d}-{uuid.uuid4().hex[:8]}"
        folder.mkdir(exist_ok=True)
        what = f"label version v{number:04d} of subject {subject}"
        self._write_dir(tmp, final, lambda t: _write_labels(t, labels, attrs), what)

        def pointer():
            self._subject(subject, "r+").attrs.update({"latest": number, "status": "corrected"})

        self._after_commit(what, pointer, lambda: self.log_event(subject, "commit", {
            "version": number, "parent": parent, "author": author, "source": source,
            "summary": attrs["summary"]}), *[(lambda e=e: self.log_event(
                subject, e.get("kind", "review"), e)) for e in events or []])
        return number

    # ------------------------------------------------------------------ predictions
    def save_prediction(self, subject: str, model_id: str, *, probability: np.ndarray,
                        uncertainty: np.ndarray, labels: np.ndarray,
                        stats: dict | None = None) -> None:
        """Store a model's maps for a subject (replacing that model's earlier maps).

        ``stats`` (JSON numbers, e.g. the mean uncertainty) go to the group's attributes.
        """
        import zarr

        self._require_writable()
        info = self.info(subject)
        shape = tuple(info["shape"])
        maps = {"probability": np.asarray(probability, np.float32),
                "uncertainty": np.asarray(uncertainty, np.float32),
                "labels": np.asarray(labels, np.uint8)}
        for name, a in maps.items():
            if a.shape != shape:
                raise PVSInputError(f"prediction {name} shape {a.shape} != subject shape {shape}")
        if not re.fullmatch(r"[A-Za-z0-9._-]+", model_id) or model_id.startswith("."):
            raise PVSInputError(f"invalid model id {model_id!r}")

        def write(tmp: Path) -> None:
            group = zarr.open_group(str(tmp), mode="w")
            group.attrs.update({"model_id": model_id, "time": _now(), "stats": dict(stats or {})})
            for name, a in maps.items():
                group.create_array(name, data=a, chunks=_CHUNKS, attributes={"sha256": _sha256(a)})

        base = self.path / "subjects" / subject / "predictions"
        base.mkdir(exist_ok=True)
        what = f"the prediction of model {model_id} for {subject}"
        self._write_dir(base / f".tmp-{model_id}-{uuid.uuid4().hex[:8]}", base / model_id, write,
                        what, replace=True)

        def status():
            if info["status"] == "unlabelled":
                self._subject(subject, "r+").attrs["status"] = "predicted"

        self._after_commit(what, status,
                           lambda: self.log_event(subject, "prediction", {"model_id": model_id}))

    def predictions(self, subject: str) -> list[str]:
        base = self.path / "subjects" / check_subject_id(subject) / "predictions"
        return sorted(p.name for p in base.iterdir() if (p / "zarr.json").is_file()
                      and not p.name.startswith(".")) if base.is_dir() else []

    def prediction(self, subject: str, model_id: str):
        """The zarr group of a model's prediction (lazy, unchecked: for its attributes and
        display; use :meth:`read_prediction` for data)."""
        import zarr

        if model_id not in self.predictions(subject):
            raise PVSInputError(f"subject {subject!r} has no prediction of model {model_id!r}")
        return zarr.open_group(str(self.path / "subjects" / subject / "predictions" / model_id), mode="r")

    def read_prediction(self, subject: str, model_id: str, name: str) -> np.ndarray:
        """One map (``probability``, ``uncertainty`` or ``labels``) of a model's prediction,
        checked against its checksum."""
        if name not in PREDICTION_MAPS:
            raise PVSInputError(f"prediction map must be one of {PREDICTION_MAPS}, got {name!r}")
        if model_id not in self.predictions(subject):
            raise PVSInputError(f"subject {subject!r} has no prediction of model {model_id!r}")
        folder = self.path / "subjects" / subject / "predictions" / model_id
        return self._read_verified(folder / name, f"subject {subject} prediction {model_id} {name}",
                                   "predict the subject again with that model")

    # ------------------------------------------------------------------ events, models
    def log_event(self, subject: str | None, kind: str, details: dict | None = None) -> None:
        """Append one event to ``events.jsonl`` (flushed and fsynced; a failed append is
        cut back, so no torn line is left behind)."""
        self._require_writable()
        line = json.dumps({"time": _now(), "pid": os.getpid(), "subject": subject, "kind": kind,
                           **(details or {})}, default=str) + "\n"
        fd = os.open(self.path / "events.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
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

    def events(self, subject: str | None = None) -> list[dict]:
        """The event log (a torn last line of a killed writer is skipped)."""
        out = []
        path = self.path / "events.jsonl"
        if not path.is_file():
            return out
        for line in path.read_text(errors="replace").splitlines():
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(event, dict) and (subject is None or event.get("subject") == subject):
                out.append(event)
        return out

    def verify(self) -> tuple[list[str], dict[str, int]]:
        """Check everything; returns ``(problems, counts)``
        (see :mod:`napari_pvs._store_verify`)."""
        from ._store_verify import verify_store

        return verify_store(self)

    @property
    def models(self):
        """The store's model registry."""
        return model_registry(self.path)

    def remove_model(self, model_id: str) -> None:
        """Remove a registered model (one file: the unlink is atomic) and log it."""
        self._require_writable()
        path = self.models.path(model_id)  # refuses an unknown or malformed id
        path.unlink()
        self.log_event(None, "model_removed", {"model_id": model_id})
