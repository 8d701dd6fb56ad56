"""``napari-pvs store verify``: check every byte of a corrections store that can be checked.

Read-only and lock-free (everything checked is immutable once renamed into place).
Each problem is one line ``<where>: <what is wrong>``; :func:`verify_store` returns
them with counts of what was checked.  Checked:

* every subject folder has readable metadata with shape, affine and spacing;
* the image, the region map, every label version and every prediction map decode in
  full, have the subject's shape, and match the sha256 recorded when they were written
  (arrays of stores written before checksums existed are decoded and counted as
  ``not checksummed``; they are not damage);
* label versions run 1..latest without a gap, each folder has its ``zarr.json``, and
  the ``latest`` attribute does not point past the newest version; a review-only
  version's ``reviewed`` mask decodes and matches its checksum;
* every registered model loads (metadata, weights that match the architecture, all
  finite) and names itself by its file name;
* ``events.jsonl``: every line is a JSON object, except a torn last line.

``.tmp-*`` folders are leftovers of a killed writer (the next writer removes them);
they are counted, not damage.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np

from ._errors import PVSInputError
from ._store_checks import _ID, PREDICTION_MAPS, StoreCorruptError
from .model import load_checkpoint

__all__ = ["verify_store"]


def verify_store(store) -> tuple[list[str], dict[str, int]]:
    """Check a :class:`~napari_pvs.store.CorrectionsStore`; returns ``(problems, counts)``."""
    problems: list[str] = []
    counts: Counter = Counter()

    def damage(where: str, detail: str) -> None:
        problems.append(f"{where}: {detail}")

    folder = store.path / "subjects"
    if not folder.is_dir():
        damage("subjects", "the subjects folder is missing")
    else:
        for p in sorted(folder.iterdir()):
            if p.name == "zarr.json":
                continue
            if p.name.startswith(".tmp-"):
                counts["leftovers"] += 1
            elif not p.is_dir() or not _ID.fullmatch(p.name):
                damage(f"subjects/{p.name}", "not a subject folder (unexpected entry)")
            elif not (p / "zarr.json").is_file():
                damage(f"subject {p.name}", "its metadata file zarr.json is missing")
            else:
                counts["subjects"] += 1
                _verify_subject(store, p.name, damage, counts)
    _verify_models(store.path / "models", damage, counts)
    _verify_events(store.path / "events.jsonl", damage, counts)
    return problems, dict(counts)


def _checked(data, shape, where: str, damage, counts, lazy) -> None:
    """Shape of a decoded array against the subject; count arrays without a checksum."""
    if shape is not None and tuple(data.shape) != shape:
        damage(where, f"shape {tuple(data.shape)} differs from the subject's {shape}")
    if lazy.attrs.get("sha256") is None:
        counts["not checksummed"] += 1


def _verify_subject(store, sid: str, damage, counts) -> None:
    try:
        info = store.info(sid)
    except StoreCorruptError as exc:
        damage(exc.where, exc.detail)
        return
    try:
        shape = tuple(int(n) for n in info["shape"])
        if np.asarray(info["affine"], dtype=float).shape != (4, 4) or len(info["spacing"]) != 3:
            raise ValueError("affine or spacing malformed")
    except (KeyError, TypeError, ValueError) as exc:
        damage(f"subject {sid} metadata", f"geometry attributes are missing or malformed ({exc})")
        shape = None
    for name, read, lazy in (("image", store.read_image, store.image),
                             ("regions", store.read_regions, store.regions)):
        where = f"subject {sid} {name}"
        if name == "image" and not (store.path / "subjects" / sid / "image").exists():
            damage(where, "the image array is missing")
            continue
        try:
            data = read(sid)
            if data is not None:
                _checked(data, shape, where, damage, counts, lazy(sid))
        except StoreCorruptError as exc:
            damage(exc.where, exc.detail)
    labels = store.path / "subjects" / sid / "labels"
    if labels.is_dir():
        counts["leftovers"] += sum(1 for p in labels.iterdir() if p.name.startswith(".tmp-"))
    for n in range(1, (info["latest"] or 0) + 1):
        try:
            data = store.read_labels(sid, n)
            counts["label versions"] += 1
            _checked(data, shape, f"subject {sid} labels v{n:04d}", damage, counts,
                     store.labels(sid, n))
            store.read_reviewed(sid, n)  # a review-only version's mask, against its checksum
        except StoreCorruptError as exc:
            damage(exc.where, exc.detail)
    preds = store.path / "subjects" / sid / "predictions"
    for p in sorted(preds.iterdir()) if preds.is_dir() else []:
        if p.name == "zarr.json":
            continue
        if p.name.startswith(".tmp-"):
            counts["leftovers"] += 1
            continue
        where = f"subject {sid} prediction {p.name}"
        if not (p / "zarr.json").is_file():
            damage(where, "its metadata file zarr.json is missing")
            continue
        counts["predictions"] += 1
        for name in PREDICTION_MAPS:
            try:
                data = store.read_prediction(sid, p.name, name)
                _checked(data, shape, f"{where} {name}", damage, counts,
                         store.prediction(sid, p.name)[name])
            except StoreCorruptError as exc:
                damage(exc.where, exc.detail)


def _verify_models(folder: Path, damage, counts) -> None:
    if not folder.is_dir():
        damage("models", "the model registry folder is missing")
        return
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            counts["leftovers"] += path.name.endswith(".tmp")
            continue
        if path.suffix != ".safetensors":
            continue
        where = f"model {path.stem}"
        try:
            _, meta = load_checkpoint(path)
        except PVSInputError as exc:
            damage(where, str(exc))
            continue
        except Exception as exc:  # anything a broken file can raise while loading
            damage(where, f"cannot be loaded ({type(exc).__name__}: {exc})")
            continue
        counts["models"] += 1
        if meta.get("id") != path.stem:
            damage(where, f"its metadata names it {meta.get('id')!r}, not its file name")


def _verify_events(path: Path, damage, counts) -> None:
    if not path.is_file():
        damage("events.jsonl", "the event log is missing")
        return
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    torn = lines.pop()  # b"" when the log ends with a newline
    for k, line in enumerate(lines, 1):
        try:
            ok = isinstance(json.loads(line), dict)
        except (json.JSONDecodeError, UnicodeDecodeError):
            ok = False
        if not ok:
            damage(f"events.jsonl line {k}", "not a JSON object (a torn or garbled line that is "
                   "not the last one)")
        counts["events"] += 1
    if torn:
        counts["torn last event line"] += 1
