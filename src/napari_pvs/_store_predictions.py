"""Model predictions of a corrections store: probability, uncertainty and labels per
subject and model, replaced as a whole (see :mod:`napari_pvs.store`)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ._errors import PVSInputError
from ._store_base import StoreBase, _now
from ._store_checks import _CHUNKS, PREDICTION_MAPS, _sha256, check_subject_id

__all__ = ["Predictions"]


class Predictions(StoreBase):
    """Saving and reading the prediction maps of a model."""

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
        self._write_dir(base / model_id, write, what, replace=True)

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
