"""Layer plumbing shared by the widgets: geometry, prediction layers, store subjects.

Conventions for layer ``metadata`` (the NIfTI reader and the store reader set the
first ones):

- ``nifti_affine``: the voxel-to-world matrix of the source volume;
- ``store``, ``subject``, ``site``: the store subject a layer belongs to;
- ``modality``: "T2w" or "T1w";
- ``prediction``: on a predicted labels layer, ``{"model", "image", "probability",
  "uncertainty", "vesselness", "clusters", "regions"}`` (model id and layer names);
- ``role``: what a layer the widgets added is (:data:`ROLES`): ``"pvs"`` (the PVS
  labels to correct), a prediction map (``"probability"``, ``"uncertainty"``,
  ``"vesselness"``), ``"clusters"`` (the coloured cluster map) or ``"regions"`` (a
  WM/BG region map);
- ``codes``: on a region map, its label codes (the sample data's region map has them).

:func:`role` reads a layer's role from these keys, never from its name.
"""

from __future__ import annotations

import getpass
from typing import Any

import numpy as np
import pandas as pd
from matplotlib import colormaps

from .._reader import _contrast_limits
from .._store_reader import subject_layer_kwargs

__all__ = ["MAPS", "ROLES", "add_prediction_layers", "geometry", "open_store_subject", "role",
           "user"]

MAPS = ("probability", "uncertainty", "vesselness")
ROLES = ("pvs", *MAPS, "clusters", "regions")


def user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no login name (containers): still record something
        return "napari-pvs user"


def geometry(layer) -> tuple[np.ndarray, tuple[float, float, float]]:
    """``(4x4 voxel-to-world affine, voxel spacing in mm)`` of a 3D layer."""
    meta = layer.metadata or {}
    if meta.get("nifti_affine") is not None:
        affine = np.asarray(meta["nifti_affine"], dtype=float)
    else:  # napari applies scale and translate, then its affine
        inner = np.diag([*np.asarray(layer.scale, float)[-3:], 1.0])
        inner[:3, 3] = np.asarray(layer.translate, float)[-3:]
        affine = np.asarray(layer.affine.affine_matrix, float)[-4:, -4:] @ inner
    spacing = tuple(float(s) for s in np.sqrt((affine[:3, :3] ** 2).sum(axis=0)))
    return affine, spacing


def role(layer, viewer=None) -> str | None:
    """What ``layer`` is, one of :data:`ROLES`, or None for other layers.

    Its ``role`` metadata, else ``"regions"`` for a layer with region ``codes``; with
    ``viewer``, else the key under which a prediction in it names the layer (a region
    map used as the ROI, say).
    """
    meta = layer.metadata or {}
    if meta.get("role") in ROLES:
        return meta["role"]
    if meta.get("codes"):
        return "regions"
    for other in viewer.layers if viewer is not None else ():
        names = (other.metadata or {}).get("prediction") or {}
        for key in ROLES:
            if names.get(key) == layer.name and other is not layer:
                return key
    return None


def _geo_kwargs(layer) -> dict[str, Any]:
    return {"scale": layer.scale, "translate": layer.translate, "affine": layer.affine}


def modality(layer) -> str:
    meta = layer.metadata or {}
    if meta.get("modality") in ("T1w", "T2w"):
        return meta["modality"]
    phantom = meta.get("phantom") or {}
    if phantom.get("modality") in ("T1w", "T2w"):
        return phantom["modality"]
    return "T1w" if "T1w" in layer.name or "t1" in layer.name.lower() else "T2w"


def _cluster_colours(table, uncertain: bool) -> tuple[dict, tuple[float, float]]:
    """Cluster id -> RGBA from the plasma colour map of each cluster's uncertainty
    (or, without uncertainty, of 1 - its mean probability / its size)."""
    cols = table.columns
    if uncertain:
        value = np.nan_to_num(cols["unc_mean"], nan=0.0)
    elif not np.all(np.isnan(cols["prob_mean"])):
        value = 1.0 - np.nan_to_num(cols["prob_mean"], nan=1.0)
    else:
        value = np.log1p(cols["voxels"].astype(float))
    lo, hi = (float(value.min()), float(value.max())) if value.size else (0.0, 1.0)
    norm = (value - lo) / (hi - lo) if hi > lo else np.zeros_like(value)
    rgba = colormaps["plasma"](0.15 + 0.85 * norm)
    colours = {None: (0, 0, 0, 0), 0: (0, 0, 0, 0)}
    colours.update({int(c): tuple(float(v) for v in rgba[k]) for k, c in enumerate(cols["id"])})
    return colours, (lo, hi)


MAP_COLOURS = {"probability": "magma", "uncertainty": "viridis", "vesselness": "inferno"}


def _add_map(viewer, key: str, data: np.ndarray, name: str, metadata: dict, geo: dict):
    """A prediction map as a hidden, colour-mapped, additive image layer: probability on
    [0, 1], other maps up to the 99.5th percentile of their positive values."""
    data = np.asarray(data)
    hi = 1.0
    if key != "probability" and (data > 0).any():
        hi = float(np.percentile(data[data > 0], 99.5))
    return viewer.add_image(data, name=name, colormap=MAP_COLOURS[key], visible=False,
                            contrast_limits=(0.0, max(hi, 1e-6)), blending="additive",
                            metadata={**metadata, "role": key}, **geo)


def add_prediction_layers(viewer, image_layer, pred, *, regions_layer=None) -> Any:
    """Add a prediction's layers next to ``image_layer``; returns the editable labels layer.

    PVS labels (editable, visible), probability / uncertainty (or the Frangi
    vesselness), colour-mapped and hidden, and the clusters coloured by uncertainty.
    """
    from napari.utils.colormaps import DirectLabelColormap

    base = f"{image_layer.name} [{pred.model}]"
    geo = _geo_kwargs(image_layer)
    src = {k: v for k, v in (image_layer.metadata or {}).items()
           if k in ("nifti_affine", "store", "subject", "site", "modality", "spacing", "shape")}
    names = {"model": pred.model, "image": image_layer.name,
             "regions": None if regions_layer is None else regions_layer.name,
             "triage": getattr(pred, "triage", None)}
    for key in MAPS:
        data = getattr(pred, key)
        names[key] = None if data is None else _add_map(viewer, key, data, f"{base} {key}", src,
                                                         geo).name
    labels = viewer.add_labels(pred.labels, name=f"{base} PVS", opacity=0.7, **geo)
    colours, (lo, hi) = _cluster_colours(pred.table, pred.uncertainty is not None)
    features = pd.DataFrame({k: pred.table.columns[k] for k in
                             ("id", "voxels", "unc_mean", "prob_mean", "region", "length_mm")})
    features.insert(0, "index", features["id"])
    features = pd.concat([pd.DataFrame({"index": [0]}), features], ignore_index=True)
    clusters = viewer.add_labels(pred.clusters, name=f"{base} clusters", opacity=0.9,
                                 colormap=DirectLabelColormap(color_dict=colours),
                                 features=features,
                                 metadata={**src, "colour_range": [lo, hi], "role": "clusters"},
                                 **geo)
    names["clusters"] = clusters.name
    labels.metadata = {**src, "prediction": names, "role": "pvs"}
    # the clusters, coloured by uncertainty, lie over the editable labels: voxels painted
    # by hand show in the labels' own colour, rejected clusters vanish from both
    viewer.layers.selection.active = labels
    return labels


def open_store_subject(viewer, store, subject: str, model_id: str | None = None,
                       with_labels: bool = True):
    """Add a store subject's image, labels to correct and prediction; returns the labels layer.

    The labels are the latest corrected version, else the model's predicted labels,
    else empty; they are a writable copy in memory (the store's versions are immutable).
    ``with_labels=False`` adds only the image, regions and prediction maps (returns None),
    for a caller that brings its own labels to correct.
    """
    info = store.info(subject)
    geo, meta = subject_layer_kwargs(store, subject)
    image = store.read_image(subject)

    img_layer = viewer.add_image(image, name=f"{subject} image", colormap="gray",
                                 contrast_limits=_contrast_limits(image), metadata=dict(meta), **geo)
    regions = store.read_regions(subject)
    reg_layer = None
    if regions is not None:
        reg_layer = viewer.add_labels(regions, name=f"{subject} regions (1 WM, 2 BG)",
                                      visible=False, opacity=0.3,
                                      metadata={**meta, "role": "regions"}, **geo)
    names: dict[str, Any] = {"model": model_id, "image": img_layer.name,
                             "regions": None if reg_layer is None else reg_layer.name,
                             "probability": None, "uncertainty": None, "vesselness": None,
                             "clusters": None}
    pred = store.prediction(subject, model_id) if model_id in store.predictions(subject) else None
    if pred is not None:  # the model's false-positive classifier, for the review's P(FP)
        names["triage"] = (store.models.meta(model_id) or {}).get("triage")
        for key in ("probability", "uncertainty"):
            names[key] = _add_map(viewer, key, store.read_prediction(subject, model_id, key),
                                  f"{subject} [{model_id}] {key}",
                                  meta, geo).name
    if not with_labels:
        return None
    version = info.get("latest")
    if version is not None:
        labels = store.read_labels(subject, version)
        name = f"{subject} labels v{version}"
    elif pred is not None:
        labels = store.read_prediction(subject, model_id, "labels")
        name = f"{subject} [{model_id}] PVS"
    else:
        labels = np.zeros(tuple(info["shape"]), np.uint8)
        name = f"{subject} labels (new)"
    layer = viewer.add_labels(labels, name=name, opacity=0.6,
                              metadata={**meta, "version": version, "prediction": names,
                                        "role": "pvs"}, **geo)
    viewer.layers.selection.active = layer
    return layer


def reset_ordered(combo) -> None:
    """Re-read a magicgui ComboBox's choices in their given order (magicgui appends new
    ones at the end), keeping the current value when it is still a choice."""
    value = combo.value
    combo.native.clear()
    combo.reset_choices()
    if value in combo.choices:
        combo.value = value
