"""Segmentation metrics: voxel Dice and cluster-level Dice.

Cluster rule (as in the PVS literature): clusters are connected components (cc3d,
26-connectivity by default).  A predicted cluster is *detected* when it shares at
least one voxel with the reference mask; a reference cluster is detected when it
shares at least one voxel with the predicted mask.  Then::

    cluster Dice = (detected predicted + detected reference) / (n predicted + n reference)

Both maps empty gives 1.0 for every score (nothing to find, nothing found); one side
empty gives 0.0 Dice (precision / recall of the empty side's counterpart are 0.0).
Negative labels are refused (they would silently count as background), and so is a
region map without any region: it would score nothing and report 1.0.

By region: :func:`score` restricts both maps to the region (WM = 1, BG = 2 in the
region map: :mod:`napari_pvs._regions`) *before* finding clusters, so a PVS that
crosses from the BG into the WM counts once in each region.  ``count_error`` is
``n_pred - n_ref`` clusters.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import cc3d
import numpy as np

from ._errors import PVSInputError
from ._regions import SCORED_REGIONS
from .io import Volume, check_same_grid

__all__ = ["REGIONS", "ClusterScores", "cluster_scores", "score", "voxel_dice"]

REGIONS = SCORED_REGIONS  # the regions scored separately (the region table)


def _no_negatives(labels: np.ndarray, name: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.dtype != bool and labels.size and not np.issubdtype(labels.dtype, np.unsignedinteger):
        low = labels.min()
        if low < 0:
            raise PVSInputError(
                f"{name} holds negative labels (minimum {low}); PVS and region maps use 0 for "
                "background and positive labels - fix or renumber the map"
            )
    return labels


def _check(pred: np.ndarray, ref: np.ndarray, names=("prediction", "reference")):
    pred = _no_negatives(pred, names[0]) > 0
    ref = _no_negatives(ref, names[1]) > 0
    if pred.shape != ref.shape:
        raise PVSInputError(
            f"{names[0]} shape {pred.shape} does not match {names[1]} shape {ref.shape}; "
            "score maps on the same grid"
        )
    return pred, ref


def _unwrap(*maps: np.ndarray | Volume | None) -> list[np.ndarray | None]:
    """Arrays of *maps*; the Volumes among them must share one grid (shape and affine)."""
    vols = [m for m in maps if isinstance(m, Volume)]
    for vol in vols[1:]:
        check_same_grid(vol, vols[0], what="map")
    return [m.data if isinstance(m, Volume) else m for m in maps]


def _name(m, default: str) -> str:
    return str(m.path) if isinstance(m, Volume) and m.path is not None else default


def voxel_dice(pred: np.ndarray, ref: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Voxel Dice of two binary maps, optionally inside ``mask``; 1.0 if both are empty."""
    pred, ref = _check(pred, ref)
    if mask is not None:
        m = np.asarray(mask) > 0
        pred, ref = pred & m, ref & m
    total = int(pred.sum()) + int(ref.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.count_nonzero(pred & ref)) / total


@dataclass(frozen=True)
class ClusterScores:
    """Cluster-level agreement; see the module docstring for the rule."""

    dice: float
    precision: float
    recall: float
    n_pred: int
    n_ref: int
    detected_pred: int
    detected_ref: int

    def as_dict(self) -> dict:
        return asdict(self)


def _detected(labels: np.ndarray, n: int, other: np.ndarray) -> int:
    hit = np.unique(labels[other & (labels > 0)])
    return int(hit.size)


def cluster_scores(
    pred: np.ndarray, ref: np.ndarray, *, mask: np.ndarray | None = None, connectivity: int = 26
) -> ClusterScores:
    """Cluster Dice, precision and recall of two binary maps (optionally inside ``mask``)."""
    pred, ref = _check(pred, ref)
    if mask is not None:
        m = np.asarray(mask) > 0
        pred, ref = pred & m, ref & m
    lp, n_p = cc3d.connected_components(
        pred.astype(np.uint8), connectivity=connectivity, return_N=True
    )
    lr, n_r = cc3d.connected_components(
        ref.astype(np.uint8), connectivity=connectivity, return_N=True
    )
    if n_p + n_r == 0:
        return ClusterScores(1.0, 1.0, 1.0, 0, 0, 0, 0)
    dp = _detected(lp, n_p, ref)
    dr = _detected(lr, n_r, pred)
    return ClusterScores(
        dice=(dp + dr) / (n_p + n_r),
        precision=dp / n_p if n_p else (1.0 if n_r == 0 else 0.0),
        recall=dr / n_r if n_r else (1.0 if n_p == 0 else 0.0),
        n_pred=int(n_p),
        n_ref=int(n_r),
        detected_pred=dp,
        detected_ref=dr,
    )


def score(pred: np.ndarray | Volume, ref: np.ndarray | Volume,
          regions: np.ndarray | Volume | None = None, connectivity: int = 26) -> dict[str, dict]:
    """Voxel and cluster scores for the whole map and, with ``regions``, for WM and BG.

    Parameters
    ----------
    pred, ref : numpy.ndarray or napari_pvs.io.Volume
        Predicted and reference PVS labels (> 0 is PVS).
    regions : numpy.ndarray or napari_pvs.io.Volume, optional
        Region map: 1 WM, 2 BG; 0 outside.
    connectivity : {6, 18, 26}
        Neighbourhood of the clusters.

    Returns
    -------
    dict
        ``{"all": {...}, "WM": {...}, "BG": {...}}``; each holds ``voxel_dice``,
        ``cluster_dice``, ``cluster_precision``, ``cluster_recall``, ``n_pred``, ``n_ref``,
        ``count_error``, ``pred_voxels`` and ``ref_voxels``.  Without ``regions`` only
        ``"all"`` is given; with them ``"all"`` means the whole ROI (regions > 0).

    Raises
    ------
    PVSInputError
        Maps of different shapes; Volumes whose affines differ by more than 1e-3
        (the maps are on different grids, e.g. shifted); negative labels; a region
        map without any voxel > 0.
    """
    region_name = _name(regions, "regions")
    names = (_name(pred, "prediction"), _name(ref, "reference"))
    pred, ref, regions = _unwrap(pred, ref, regions)
    pred, ref = _check(pred, ref, names)
    masks = {"all": None}
    if regions is not None:
        regions = _no_negatives(regions, region_name)
        if regions.shape != pred.shape:
            raise PVSInputError(f"{region_name} shape {regions.shape} does not match the maps "
                                f"{pred.shape}; resample it to their grid")
        if not np.any(regions > 0):
            raise PVSInputError(f"{region_name} has no voxel inside a region (all 0), so there "
                                "is nothing to score; pass the region map of this subject")
        masks = {"all": regions > 0, **{name: regions == code for name, code in REGIONS.items()}}
    out = {}
    for name, m in masks.items():
        p = pred if m is None else pred & m
        r = ref if m is None else ref & m
        cs = cluster_scores(p, r, connectivity=connectivity)
        out[name] = {
            "voxel_dice": voxel_dice(p, r), "cluster_dice": cs.dice,
            "cluster_precision": cs.precision, "cluster_recall": cs.recall,
            "n_pred": cs.n_pred, "n_ref": cs.n_ref, "count_error": cs.n_pred - cs.n_ref,
            "pred_voxels": int(p.sum()), "ref_voxels": int(r.sum()),
        }
    return out
