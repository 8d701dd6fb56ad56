"""Learned false-positive triage of predicted clusters, and temperature scaling.

A model trained by the package carries, in its metadata, what was fitted on its
validation subjects after training (:mod:`napari_pvs.training.triage`):

``meta["calibration"] = {"temperature": T, ...}``
    The voxel probabilities become ``sigmoid(logit(p) / T)``.  The labels do not change
    (``p >= 0.5`` is ``logit(p) >= 0`` for every ``T > 0``); the probability and
    uncertainty maps, and the cluster columns made from them, do.
``meta["triage"] = {"features": [...], "mean": [...], "scale": [...], "coef": [...],
"intercept": b, ...}``
    A logistic regression on standardised cluster features (:data:`FEATURES`):
    ``P(false positive) = sigmoid(((x - mean) / scale) @ coef + b)``.

The cluster table then has a ``p_false_positive`` column and the review ``priority``
is that probability; a model without a classifier (and the Frangi baseline) keeps the
heuristic priority, and ``p_false_positive`` is empty.  Applying the classifier needs
numpy only; fitting it needs scikit-learn (the ``train`` extra).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ._errors import PVSInputError

__all__ = ["FEATURES", "apply_temperature", "check_triage", "feature_matrix",
           "p_false_positive", "temperature_of"]

#: Cluster features of the classifier, computed from the cluster table's columns.
FEATURES = ("prob_mean", "prob_max", "unc_mean", "log_volume_mm3", "log_length_mm",
            "linearity", "in_bg")


def feature_matrix(columns: Mapping[str, np.ndarray]) -> np.ndarray:
    """The (clusters, len(FEATURES)) matrix of a cluster table's columns.

    Maps the table lacks (no uncertainty map) give NaN columns: the classifier then
    cannot score the clusters (:func:`p_false_positive` returns NaN for them).
    """
    n = len(columns["id"])
    get = {k: np.asarray(columns.get(k, np.full(n, np.nan)), dtype=np.float64)
           for k in ("prob_mean", "prob_max", "unc_mean", "volume_mm3", "length_mm", "linearity")}
    region = np.asarray(columns.get("region", np.full(n, "other")), dtype=object)
    x = {
        "prob_mean": get["prob_mean"], "prob_max": get["prob_max"], "unc_mean": get["unc_mean"],
        "log_volume_mm3": np.log(np.maximum(get["volume_mm3"], 1e-3)),
        "log_length_mm": np.log(np.maximum(get["length_mm"], 1e-3)),
        "linearity": get["linearity"],
        "in_bg": (region == "BG").astype(np.float64),
    }
    return np.stack([x[f] for f in FEATURES], 1) if n else np.zeros((0, len(FEATURES)))


def check_triage(triage: Any, where: str = "the model's metadata") -> dict:
    """``triage`` as a checked dict; a clear error names what is wrong with it."""
    if not isinstance(triage, Mapping):
        raise PVSInputError(f"the triage classifier in {where} is not a mapping; refit it with "
                            "python -m napari_pvs.training.triage")
    feats = list(triage.get("features") or [])
    unknown = sorted(set(feats) - set(FEATURES))
    if not feats or unknown:
        raise PVSInputError(f"the triage classifier in {where} uses unknown features {unknown} "
                            f"(known: {', '.join(FEATURES)}); refit it")
    k = len(feats)
    try:
        arrays = {key: np.asarray(triage[key], dtype=np.float64).reshape(-1)
                  for key in ("mean", "scale", "coef")}
        intercept = float(triage["intercept"])
    except (KeyError, TypeError, ValueError) as exc:
        raise PVSInputError(f"the triage classifier in {where} is incomplete ({exc}); refit "
                            "it") from None
    if any(a.size != k for a in arrays.values()) or not all(
            np.all(np.isfinite(a)) for a in arrays.values()) or not np.isfinite(intercept) \
            or np.any(arrays["scale"] <= 0):
        raise PVSInputError(f"the triage classifier in {where} has {k} features but "
                            f"coefficient arrays of sizes "
                            f"{[a.size for a in arrays.values()]}, or non-finite values; refit it")
    return {**dict(triage), "features": feats, **{k_: a.tolist() for k_, a in arrays.items()},
            "intercept": intercept}


def p_false_positive(columns: Mapping[str, np.ndarray], triage: Mapping) -> np.ndarray:
    """P(false positive) of each cluster of a table under a fitted classifier.

    NaN for clusters whose features are missing (a table without probability or
    uncertainty maps).
    """
    t = check_triage(triage)
    x = feature_matrix(columns)[:, [FEATURES.index(f) for f in t["features"]]]
    z = (x - np.asarray(t["mean"])) / np.asarray(t["scale"]) @ np.asarray(t["coef"])
    z = z + t["intercept"]
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-z))


def temperature_of(meta: Mapping[str, Any] | None, where: str = "the model's metadata") -> float:
    """The fitted temperature of a model's metadata (1: none fitted)."""
    cal = (meta or {}).get("calibration") or {}
    if not isinstance(cal, Mapping):
        raise PVSInputError(f"{where}: calibration must be a JSON object")
    try:
        t = float(cal.get("temperature", 1.0))
    except (TypeError, ValueError):
        t = float("nan")
    if not np.isfinite(t) or t <= 0:
        raise PVSInputError(f"the calibration temperature {cal.get('temperature')!r} in {where} "
                            "is not a positive number; refit it with python -m "
                            "napari_pvs.training.triage")
    return t


def apply_temperature(probability: np.ndarray, temperature: float) -> np.ndarray:
    """``sigmoid(logit(p) / T)`` as float32 (the same array values for ``T == 1``)."""
    p = np.asarray(probability, np.float32)
    if temperature == 1.0:
        return p
    q = np.clip(p.astype(np.float64), 1e-7, 1 - 1e-7)
    z = (np.log(q) - np.log1p(-q)) / float(temperature)
    out = (1.0 / (1.0 + np.exp(-z))).astype(np.float32)
    out[p == 0] = 0.0  # outside the ROI (or no window) stays exactly 0
    return out
