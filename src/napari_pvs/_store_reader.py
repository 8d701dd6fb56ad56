"""npe2 reader for corrections stores (``*.pvs.zarr`` folders).

Every subject's image and, when the store holds one, the uncertainty of the newest
prediction open lazily from their zarr arrays (nothing is copied into memory).  The
latest label version is read in full and checked against the checksum recorded at
commit: a damaged version is refused by name (a napari warning) and never shown as
empty labels.  Only the first subject is visible; the others are listed, hidden.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ._errors import PVSInputError
from ._reader import _report
from .io import Volume
from .store import CorrectionsStore

__all__ = ["get_store_reader", "read_store", "subject_layer_kwargs"]


def _is_store(path: Any) -> bool:
    if not isinstance(path, (str, os.PathLike)):
        return False
    p = Path(path)
    return p.name.endswith(".pvs.zarr") and p.is_dir() and (p / "zarr.json").is_file()


def get_store_reader(path):
    """Return :func:`read_store` for a ``*.pvs.zarr`` folder, else None."""
    return read_store if _is_store(path) else None


def subject_layer_kwargs(store, subject: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(geometry, metadata)`` layer kwargs of a store subject: ``scale`` and ``affine``
    that put its voxels in world millimetres, and the store / subject / geometry
    metadata the widgets read."""
    info = store.info(subject)
    affine = np.asarray(info["affine"], dtype=float)
    scale, napari_affine = Volume(None, affine, tuple(info["spacing"])).napari_transform()
    meta = {"store": str(store.path), "subject": subject, "nifti_affine": affine.tolist(),
            "image_sha256": info.get("image_sha256"), "site": info.get("site"),
            "modality": info.get("modality", "T2w")}
    return {"scale": scale, "affine": napari_affine}, meta


def read_store(path) -> list[tuple] | None:
    """Layers of every subject of a store: image, latest labels, uncertainty."""
    try:
        store = CorrectionsStore.open(path)
    except PVSInputError as exc:
        _report(str(exc))
        return None
    layers = []
    for k, sid in enumerate(store.subjects()):
        try:
            layers.extend(_subject_layers(store, sid, visible=k == 0))
        except PVSInputError as exc:  # StoreCorruptError names the subject and version
            _report(str(exc))
    return layers or None


def _subject_layers(store, sid: str, visible: bool) -> list[tuple]:
    info = store.info(sid)
    geo, meta = subject_layer_kwargs(store, sid)
    geo["visible"] = visible
    layers = [(store.image(sid), {"name": f"{sid} image", "colormap": "gray",
                                  "metadata": meta, **geo}, "image")]
    if info["latest"] is not None:
        layers.append((store.read_labels(sid), {"name": f"{sid} labels v{info['latest']}",
                                                "metadata": {**meta, "version": info["latest"]},
                                                **geo}, "labels"))
    preds = store.predictions(sid)
    if preds:
        newest = max(preds, key=lambda m: store.prediction(sid, m).attrs.get("time", ""))
        unc = store.prediction(sid, newest)["uncertainty"]
        layers.append((unc, {"name": f"{sid} uncertainty ({newest})", "colormap": "magma",
                             "contrast_limits": (0.0, 1.0), "blending": "additive",
                             "metadata": {**meta, "model_id": newest},
                             **{**geo, "visible": False}}, "image"))
    return layers
