"""The corrections store: one zarr v3 folder (``NAME.pvs.zarr``) that never loses a correction.

Layout (format version 1)::

    NAME.pvs.zarr/
      zarr.json                      root group; attributes["napari_pvs"] = format, version, created
      events.jsonl                   append-only corrections event log (one JSON object a line)
      .lock                          advisory write lock (fcntl.flock); holds the writer's PID
      models/                        model registry (napari_pvs.model.ModelRegistry)
      subjects/<id>/                 group; attributes: site, modality, shape, affine, qform,
                                     sform_code, qform_code, spacing, image_sha256, source,
                                     status, latest
        image                        float32 array, written once at import, never again
        regions                      uint8 region mask (0 other, 1 WM, 2 BG), optional
        labels/v0001, v0002, ...     uint8 label versions, immutable; attributes: version,
                                     author, time, parent, source, summary, sha256
        predictions/<model id>/      probability, uncertainty (float32), labels (uint8)

Guarantees
----------
* A label version is written in full under a hidden temporary name and then renamed
  to ``vNNNN`` (an atomic directory rename), so a version is either complete or absent,
  also when the writer is killed; readers list only ``vNNNN`` entries.  An existing
  version is never written to again.
* One writer at a time: writers take an exclusive ``flock`` on ``.lock`` (released by
  the kernel if the process dies).  A second writer gets :class:`StoreLockedError`
  naming the PID, or waits up to ``wait`` seconds.  Readers need no lock.
* The ``latest`` pointer is written after the rename; if a writer dies in between,
  the newest complete version still wins and the next writer repairs the pointer.
* Labels whose shape, affine or image hash differ from the subject are refused.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from ._errors import PVSInputError

__all__ = ["FORMAT_VERSION", "STATUSES", "CorrectionsStore", "StoreLockedError", "check_subject_id"]

FORMAT = "napari-pvs-store"
FORMAT_VERSION = 1
STATUSES = ("unlabelled", "predicted", "in-review", "corrected")
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_VERSION = re.compile(r"^v(\d{4,})$")
_CHUNKS = (64, 64, 64)


class StoreLockedError(PVSInputError):
    """Another process holds the store's write lock."""


def model_registry(path: str | os.PathLike[str]):
    """The model registry of the store folder ``path``, without opening (or locking) it."""
    from .model import ModelRegistry

    return ModelRegistry(Path(path) / "models")


def check_subject_id(subject: str) -> str:
    """Return ``subject`` if it is a safe id: letters, digits, ``.``, ``_``, ``-``; no ``..``."""
    if not isinstance(subject, str) or not _ID.match(subject) or ".." in subject:
        raise PVSInputError(
            f"invalid subject id {subject!r}: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit, without '..', path separators or control characters"
        )
    return subject


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _sha256(a: np.ndarray) -> str:
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


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
        except Exception as exc:  # zarr raises several error types for broken metadata
            raise PVSInputError(f"{self.path}: cannot open the zarr store ({exc})") from None
        info = dict(self.root.attrs).get("napari_pvs", {})
        if info.get("format") != FORMAT:
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
        """Create an empty store (refuses an existing folder that is not empty)."""
        import zarr

        path = Path(path)
        if path.exists() and any(path.iterdir()):
            raise PVSInputError(f"{path} exists and is not empty; choose a new store folder")
        root = zarr.open_group(str(path), mode="w")
        root.attrs["napari_pvs"] = {"format": FORMAT, "format_version": FORMAT_VERSION,
                                    "created": _now()}
        root.create_group("subjects")
        (path / "models").mkdir(exist_ok=True)
        (path / "events.jsonl").touch()
        return cls(path, writable=True, wait=0.0)

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, writable: bool = False,
             wait: float = 0.0) -> CorrectionsStore:
        """Open a store; ``writable`` takes the write lock, waiting up to ``wait`` seconds."""
        path = Path(path)
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
        fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + max(wait, 0.0)
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
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def _require_writable(self) -> None:
        if not self.writable or self._lock_fd is None:
            raise PVSInputError(f"store {self.path} was opened read-only; open it with writable=True")

    def _recover(self) -> None:
        """Remove temporary leftovers of killed writers and repair latest pointers."""
        for tmp in self.path.glob("subjects/*/labels/.tmp-*"):
            shutil.rmtree(tmp, ignore_errors=True)
        for tmp in self.path.glob("subjects/*/.tmp-*"):
            shutil.rmtree(tmp, ignore_errors=True)
        for sid in self.subjects():
            latest = self.latest_version(sid)
            group = self._subject(sid, "r+")
            if group.attrs.get("latest") != latest:
                group.attrs["latest"] = latest

    # ------------------------------------------------------------------ subjects
    def subjects(self) -> list[str]:
        """Subject ids, sorted."""
        folder = self.path / "subjects"
        return sorted(p.name for p in folder.iterdir() if (p / "zarr.json").is_file() and _ID.match(p.name))

    def _subject(self, subject: str, mode: str = "r"):
        import zarr

        check_subject_id(subject)
        if not (self.path / "subjects" / subject / "zarr.json").is_file():
            raise PVSInputError(f"no subject {subject!r} in {self.path} (see `napari-pvs store ls`)")
        return zarr.open_group(str(self.path / "subjects" / subject), mode=mode)

    def info(self, subject: str) -> dict[str, Any]:
        """The subject's attributes (site, modality, geometry, status, latest ...)."""
        attrs = dict(self._subject(subject).attrs)
        attrs["latest"] = self.latest_version(subject)
        return attrs

    def add_subject(self, subject: str, image, *, site: str = "unknown", modality: str = "T2w",
                    regions: np.ndarray | None = None, source: str | None = None) -> None:
        """Import a subject's image (a :class:`napari_pvs.io.Volume`) and region mask."""
        import zarr

        self._require_writable()
        check_subject_id(subject)
        final = self.path / "subjects" / subject
        if final.exists():
            raise PVSInputError(f"subject {subject!r} already exists in {self.path}; images are "
                                "read-only after import")
        if regions is not None and regions.shape != image.shape:
            raise PVSInputError(f"regions shape {regions.shape} does not match image {image.shape}")
        tmp = self.path / "subjects" / f".tmp-{subject}-{uuid.uuid4().hex[:8]}"
        group = zarr.open_group(str(tmp), mode="w")
        hdr = image.header
        group.attrs.update({
            "site": site, "modality": modality, "shape": list(image.shape),
            "affine": np.asarray(image.affine).tolist(), "spacing": list(image.spacing),
            "qform": None if hdr is None else np.asarray(hdr.get_qform()).tolist(),
            "sform_code": image.sform_code, "qform_code": image.qform_code,
            "image_sha256": image.sha256, "source": str(source or image.path or ""),
            "status": "unlabelled", "latest": None, "imported": _now(),
        })
        group.create_array("image", data=np.asarray(image.data, dtype=np.float32), chunks=_CHUNKS)
        if regions is not None:
            group.create_array("regions", data=np.asarray(regions, dtype=np.uint8), chunks=_CHUNKS)
        group.create_group("labels")
        group.create_group("predictions")
        os.rename(tmp, final)
        self.log_event(subject, "import", {"site": site, "modality": modality})

    def image(self, subject: str):
        """The image as a read-only zarr array (lazy)."""
        return self._subject(subject)["image"]

    def regions(self, subject: str):
        """The region mask as a read-only zarr array, or None."""
        group = self._subject(subject)
        return group["regions"] if "regions" in group else None

    def set_status(self, subject: str, status: str) -> None:
        self._require_writable()
        if status not in STATUSES:
            raise PVSInputError(f"status must be one of {STATUSES}, got {status!r}")
        self._subject(subject, "r+").attrs["status"] = status
        self.log_event(subject, "status", {"status": status})

    # ------------------------------------------------------------------ versions
    def _labels_dir(self, subject: str) -> Path:
        return self.path / "subjects" / check_subject_id(subject) / "labels"

    def version_numbers(self, subject: str) -> list[int]:
        """Numbers of the complete label versions, ascending."""
        folder = self._labels_dir(subject)
        if not folder.is_dir():
            return []
        return sorted(int(m.group(1)) for p in folder.iterdir()
                      if (m := _VERSION.match(p.name)) and (p / "zarr.json").is_file())

    def latest_version(self, subject: str) -> int | None:
        nums = self.version_numbers(subject)
        return nums[-1] if nums else None

    def versions(self, subject: str) -> list[dict[str, Any]]:
        """Attributes of every complete version (author, time, parent, source, summary)."""
        return [dict(self.labels(subject, n).attrs) for n in self.version_numbers(subject)]

    def labels(self, subject: str, version: int | None = None):
        """A label version (default: the latest) as a read-only zarr array."""
        import zarr

        version = self.latest_version(subject) if version is None else int(version)
        if version is None or version not in self.version_numbers(subject):
            raise PVSInputError(f"subject {subject!r} has no label version {version}")
        return zarr.open_array(str(self._labels_dir(subject) / f"v{version:04d}"), mode="r")

    def commit_labels(self, subject: str, labels: np.ndarray, *, author: str,
                      source: str = "manual", affine: np.ndarray | None = None,
                      image_sha256: str | None = None, summary: dict | None = None,
                      events: list[dict] | None = None) -> int:
        """Add a new, immutable label version; returns its number.

        ``affine`` and ``image_sha256`` (of the image the labels were drawn on), when
        given, must match the subject.  The edit summary records voxels painted and
        erased against the parent version, merged with ``summary`` (e.g. clusters
        accepted / rejected); ``events`` (review decisions) go to the event log.
        """
        import zarr

        self._require_writable()
        info = self.info(subject)
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
        if labels.size and (labels.min() < 0 or labels.max() > 255):
            raise PVSInputError("label values must lie in 0..255")
        labels = labels.astype(np.uint8)
        parent = info["latest"]
        diff = {"voxels_painted": int(labels.astype(bool).sum()), "voxels_erased": 0}
        if parent is not None:
            old = np.asarray(self.labels(subject, parent)[...]) > 0
            new = labels > 0
            diff = {"voxels_painted": int((new & ~old).sum()), "voxels_erased": int((old & ~new).sum())}
        number = (parent or 0) + 1
        folder = self._labels_dir(subject)
        final = folder / f"v{number:04d}"
        if final.exists():
            raise PVSInputError(f"{final} exists; versions are never overwritten")
        attrs = {"version": number, "author": str(author), "time": _now(), "parent": parent,
                 "source": str(source), "summary": {**diff, **(summary or {})},
                 "sha256": _sha256(labels)}
        tmp = folder / f".tmp-v{number:04d}-{uuid.uuid4().hex[:8]}"
        arr = zarr.create_array(str(tmp), shape=labels.shape, dtype=np.uint8, chunks=_CHUNKS,
                                fill_value=0, attributes=attrs)
        arr[...] = labels
        os.rename(tmp, final)  # the commit point: complete or absent
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        group = self._subject(subject, "r+")
        group.attrs.update({"latest": number, "status": "corrected"})
        self.log_event(subject, "commit", {"version": number, "parent": parent, "author": author,
                                           "source": source, "summary": attrs["summary"]})
        for event in events or []:
            self.log_event(subject, event.get("kind", "review"), event)
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
        for name, a in (("probability", probability), ("uncertainty", uncertainty), ("labels", labels)):
            if np.shape(a) != shape:
                raise PVSInputError(f"prediction {name} shape {np.shape(a)} != subject shape {shape}")
        if not re.fullmatch(r"[A-Za-z0-9._-]+", model_id):
            raise PVSInputError(f"invalid model id {model_id!r}")
        base = self.path / "subjects" / subject / "predictions"
        tmp = base / f".tmp-{model_id}-{uuid.uuid4().hex[:8]}"
        group = zarr.open_group(str(tmp), mode="w")
        group.attrs.update({"model_id": model_id, "time": _now(), "stats": dict(stats or {})})
        group.create_array("probability", data=np.asarray(probability, np.float32), chunks=_CHUNKS)
        group.create_array("uncertainty", data=np.asarray(uncertainty, np.float32), chunks=_CHUNKS)
        group.create_array("labels", data=np.asarray(labels, np.uint8), chunks=_CHUNKS)
        final = base / model_id
        old = base / f".tmp-old-{model_id}-{uuid.uuid4().hex[:8]}"
        if final.exists():
            os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
        if info["status"] == "unlabelled":
            self._subject(subject, "r+").attrs["status"] = "predicted"
        self.log_event(subject, "prediction", {"model_id": model_id})

    def predictions(self, subject: str) -> list[str]:
        base = self.path / "subjects" / check_subject_id(subject) / "predictions"
        return sorted(p.name for p in base.iterdir() if (p / "zarr.json").is_file()) if base.is_dir() else []

    def prediction(self, subject: str, model_id: str):
        """The zarr group of a model's prediction (probability, uncertainty, labels)."""
        import zarr

        if model_id not in self.predictions(subject):
            raise PVSInputError(f"subject {subject!r} has no prediction of model {model_id!r}")
        return zarr.open_group(str(self.path / "subjects" / subject / "predictions" / model_id), mode="r")

    # ------------------------------------------------------------------ events, models
    def log_event(self, subject: str | None, kind: str, details: dict | None = None) -> None:
        """Append one event to ``events.jsonl`` (flushed and fsynced)."""
        self._require_writable()
        line = json.dumps({"time": _now(), "pid": os.getpid(), "subject": subject, "kind": kind,
                           **(details or {})}, default=str) + "\n"
        fd = os.open(self.path / "events.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
            os.fsync(fd)
        finally:
            os.close(fd)

    def events(self, subject: str | None = None) -> list[dict]:
        """The event log (a torn last line of a killed writer is skipped)."""
        out = []
        path = self.path / "events.jsonl"
        if not path.is_file():
            return out
        for line in path.read_text().splitlines():
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            if subject is None or event.get("subject") == subject:
                out.append(event)
        return out

    @property
    def models(self):
        """The store's model registry."""
        return model_registry(self.path)
