"""Active learning: rank a store's subjects by the latest model's uncertainty, or its
clusters across subjects by P(false positive) (no Qt).

:func:`predict_subjects` runs a registered model over store subjects and saves each
prediction with its uncertainty statistics; :func:`rank_subjects` orders the subjects
so that the one to correct next comes first: subjects neither reviewed nor corrected,
then reviewed ones (their cluster decisions saved), then corrected ones, each by
decreasing uncertainty.  :func:`rank_clusters` ranks the clusters of the saved
predictions across all subjects not yet corrected, the likeliest false positive (the
model's triage classifier) first.  Both can be site-aware (``site_aware=True``): the
subjects or clusters of the sites with the fewest corrected subjects come first, so a
new scanner's scans are looked at before more of the sites the store already knows
(``benchmarks/bench_active_learning.py`` measures what this saves).

:func:`predict_and_save` predicts one image, a store subject's or not, and saves a
MedNeXt prediction of a store subject the same way (the predict widget's job).

Two uncertainty scores are kept per prediction:

- ``image``: the mean voxel uncertainty inside the subject's region map (WM + BG),
  or over the whole image without one;
- ``clusters``: the mean over predicted clusters of their mean uncertainty (0 when
  the model found no cluster).
"""

from __future__ import annotations

import math
from collections.abc import Generator
from typing import Any

import numpy as np

from ._errors import PVSInputError
from .clusters import cluster_table, label_clusters
from .inference import Progress, run
from .pipeline import predict_array
from .store import CorrectionsStore, model_registry

__all__ = ["SCORES", "predict_and_save", "predict_subjects", "prediction_stats", "rank_clusters",
           "rank_subjects", "save_prediction"]

SCORES = ("clusters", "image")


def prediction_stats(uncertainty: np.ndarray, labels: np.ndarray,
                     regions: np.ndarray | None = None, table=None) -> dict[str, float]:
    """The uncertainty scores of one prediction (see the module docstring).

    ``table``, the prediction's cluster table with its ``unc_mean`` column, saves
    labelling the clusters again.
    """
    unc = np.asarray(uncertainty, dtype=np.float32)
    inside = unc[np.asarray(regions) > 0] if regions is not None else unc
    if table is None:
        clusters, _ = label_clusters(labels)
        table = cluster_table(clusters, uncertainty=unc)
    per = table.columns["unc_mean"]
    return {"image": float(inside.mean()) if inside.size else 0.0,
            "clusters": float(per.mean()) if len(per) else 0.0, "n_clusters": int(len(per))}


def save_prediction(store, subject: str, model_id: str, pred, regions=None) -> dict[str, float]:
    """Save a MedNeXt :class:`~napari_pvs.pipeline.ArrayPrediction` of a store subject
    with its uncertainty scores (``store`` writable); returns the scores."""
    stats = prediction_stats(pred.uncertainty, pred.labels, regions, table=pred.table)
    store.save_prediction(subject, model_id, probability=pred.probability,
                          uncertainty=pred.uncertainty, labels=pred.labels, stats=stats)
    return stats


def predict_subjects(store, model_id: str, subjects: list[str] | None = None, *,
                     skip_done: bool = True, tta: int | None = None, device: str | None = None,
                     backend: str = "auto", cancel=None) -> Generator[Any, None, list[str]]:
    """Predict store subjects with a registered model and save the maps; a generator.

    ``store`` must be writable.  Subjects that already hold this model's prediction
    are skipped unless ``skip_done`` is False.  Yields :class:`~napari_pvs.inference.Progress`
    (one step per subject); returns the subjects predicted.
    """
    todo = [s for s in (subjects or store.subjects())
            if not (skip_done and model_id in store.predictions(s))]
    done = []
    for k, sid in enumerate(todo):
        yield Progress(k, len(todo), f"{sid}: predicting with {model_id}")
        info = store.info(sid)
        image = store.read_image(sid)
        regions = store.read_regions(sid)
        gen = predict_array(image, info["spacing"], model_id, affine=np.asarray(info["affine"]),
                            roi=regions, modality=info.get("modality", "T2w"), tta=tta,
                            device=device, backend=backend, registry=store.models, cancel=cancel)
        save_prediction(store, sid, model_id, run(gen), regions)
        done.append(sid)
    yield Progress(len(todo), len(todo), f"{len(done)} subject(s) predicted with {model_id}")
    return done


def predict_and_save(image: np.ndarray, spacing, model: str, *, store_path=None,
                     subject: str | None = None, roi: np.ndarray | None = None,
                     brain: np.ndarray | None = None,
                     **predict_kwargs) -> Generator[Any, None, Any]:
    """Predict an image, and save a MedNeXt prediction when it is a store subject's.

    Parameters
    ----------
    image, spacing, model, roi, brain, **predict_kwargs
        As for :func:`napari_pvs.pipeline.predict_array`; ``model`` may be a model id
        of the registry of the store at ``store_path``.  ``roi`` and ``brain`` come from a
        segmentation with :func:`napari_pvs.regions.from_segmentation`, say.
    store_path : path, optional
        The corrections store (when there is one).
    subject : str, optional
        The store subject the image is.  Its prediction (with probability, so not the
        Frangi baseline) is saved with its uncertainty scores, ``roi`` as its region
        map, for the active-learning queue; nothing is saved for a subject not in the
        store.

    Returns
    -------
    ArrayPrediction
        The prediction (a generator: yields ``Progress``, as ``predict_array``).
    """
    registry = model_registry(store_path) if store_path else None
    pred = yield from predict_array(image, spacing, model, roi=roi, brain=brain, registry=registry,
                                    **predict_kwargs)
    if store_path and subject and pred.probability is not None:
        with CorrectionsStore.open(store_path, writable=True, wait=10) as store:
            if subject in store.subjects():
                save_prediction(store, subject, pred.model, pred, roi)
    return pred


def _stats(store, sid: str, model_id: str) -> dict[str, float]:
    group = store.prediction(sid, model_id)
    stats = dict(group.attrs.get("stats") or {})
    if not all(k in stats for k in SCORES):  # saved without statistics: compute them now
        stats = prediction_stats(store.read_prediction(sid, model_id, "uncertainty"),
                                 store.read_prediction(sid, model_id, "labels"),
                                 store.read_regions(sid))
    return stats


def _corrected_per_site(store) -> dict[str, int]:
    """``{site: subjects corrected in full}`` of the store."""
    out: dict[str, int] = {}
    for sid in store.subjects():
        info = store.info(sid)
        site = info.get("site", "unknown")
        out[site] = out.get(site, 0) + (info["status"] == "corrected")
    return out


def rank_subjects(store, model_id: str | None = None, by: str = "clusters",
                  site_aware: bool = False) -> list[dict[str, Any]]:
    """Store subjects, the one to correct next first.

    Parameters
    ----------
    store : CorrectionsStore
    model_id : str, optional
        Whose uncertainty ranks the subjects (default: the newest registered model).
    by : {"clusters", "image"}
        Which uncertainty score ranks them.
    site_aware : bool
        Within each status, subjects of the sites with the fewest corrected subjects come
        first (a new scanner's scans before more of the sites the store already knows),
        then by uncertainty; each row gets ``site_corrected``.

    Returns
    -------
    list of dict
        One row per subject: ``subject``, ``site``, ``status``, ``versions``, ``labels``
        (the latest version's kind: ``full``, ``review`` for review-only decisions, or
        ``none``), ``model_id``, ``uncertainty`` (the chosen score; NaN when the subject
        has no prediction of the model), ``image``, ``clusters``, ``n_clusters``.
        Subjects neither corrected nor reviewed come first, then reviewed ones (their
        clusters were triaged, the rest of the map was not), corrected ones last; within
        each, by decreasing uncertainty, unpredicted ones last.
    """
    if by not in SCORES:
        raise PVSInputError(f"unknown uncertainty score {by!r}; choose one of {SCORES}")
    if model_id is None:
        model_id = store.models.latest_id()
    per_site = _corrected_per_site(store) if site_aware else {}
    rows = []
    for sid in store.subjects():
        info = store.info(sid)
        row = {"subject": sid, "site": info.get("site", "unknown"), "status": info["status"],
               "versions": len(store.version_numbers(sid)), "labels": store.labels_kind(sid),
               "model_id": model_id,
               "uncertainty": math.nan, "image": math.nan, "clusters": math.nan, "n_clusters": 0}
        if model_id is not None and model_id in store.predictions(sid):
            row.update(_stats(store, sid, model_id))
            row["uncertainty"] = row[by]
        if site_aware:
            row["site_corrected"] = per_site.get(row["site"], 0)
        rows.append(row)

    def key(r):
        u = r["uncertainty"]
        done = {"reviewed": 1, "corrected": 2}.get(r["status"], 0)
        return (done, r.get("site_corrected", 0), math.isnan(u), -(0.0 if math.isnan(u) else u),
                r["subject"])

    return sorted(rows, key=key)


def _decided(store, subject: str, shape) -> np.ndarray | None:
    """Voxels decided in the subject's review-only versions (None: none saved)."""
    out = None
    for v in store.version_numbers(subject):
        if store.version_kind(subject, v) == "review":
            mask = store.read_reviewed(subject, v)
            out = mask if out is None else out | mask
    return None if out is None or out.shape != tuple(shape) else out


def rank_clusters(store, model_id: str | None = None, limit: int | None = None,
                  site_aware: bool = False) -> list[dict[str, Any]]:
    """The predicted clusters of every subject not yet corrected, across subjects, the
    likeliest false positive first.

    Parameters
    ----------
    store : CorrectionsStore
    model_id : str, optional
        Whose saved predictions are ranked (default: the newest registered model).  Its
        triage classifier (:mod:`napari_pvs.triage`) gives ``p_false_positive``; a model
        without one ranks by the heuristic ``priority``.
    limit : int, optional
        Return the first ``limit`` rows only.
    site_aware : bool
        Clusters of the sites with the fewest corrected subjects first, then by
        priority; each row gets ``site_corrected``.

    Returns
    -------
    list of dict
        One row per cluster: ``subject``, ``site``, ``cluster`` (its id in the cluster
        map of the saved labels), ``p_false_positive`` (NaN without a classifier),
        ``priority``, ``voxels``, ``region``, ``centroid_{i,j,k}``; sorted by decreasing
        priority, then subject and cluster.  Clusters whose voxels were mostly decided in
        a saved review (review-only versions) are left out.
    """
    if model_id is None:
        model_id = store.models.latest_id()
    if model_id is None:
        return []
    triage = (store.models.meta(model_id) or {}).get("triage")
    per_site = _corrected_per_site(store) if site_aware else {}
    rows = []
    for sid in store.subjects():
        info = store.info(sid)
        if info["status"] == "corrected" or model_id not in store.predictions(sid):
            continue
        labels = store.read_prediction(sid, model_id, "labels")
        clusters, _ = label_clusters(labels)
        decided = _decided(store, sid, labels.shape)
        table = cluster_table(clusters, probability=store.read_prediction(sid, model_id,
                                                                          "probability"),
                              uncertainty=store.read_prediction(sid, model_id, "uncertainty"),
                              regions=store.read_regions(sid),
                              affine=np.asarray(info["affine"], float), triage=triage)
        cols = table.columns
        if decided is not None:  # clusters mostly decided in saved reviews: not again
            n = int(clusters.max()) + 1
            size = np.bincount(clusters.ravel(), minlength=n)
            done = np.bincount(clusters.ravel(), weights=decided.ravel(), minlength=n)
            open_ = (done <= 0.5 * size)[np.asarray(cols["id"], np.int64)]
        for i in range(len(table)):
            if decided is not None and not open_[i]:
                continue
            rows.append({"subject": sid, "site": info.get("site", "unknown"),
                         "cluster": int(cols["id"][i]),
                         **{k: cols[k][i].item() if hasattr(cols[k][i], "item") else cols[k][i]
                            for k in ("p_false_positive", "priority", "voxels", "region",
                                      "centroid_i", "centroid_j", "centroid_k")}})
            if site_aware:
                rows[-1]["site_corrected"] = per_site.get(rows[-1]["site"], 0)
    rows.sort(key=lambda r: (r.get("site_corrected", 0), -r["priority"], r["subject"],
                             r["cluster"]))
    return rows[:limit] if limit is not None else rows
