"""Segmentation metrics: voxel Dice and cluster-level Dice.

Cluster rule (as in the PVS literature): clusters are connected components (cc3d,
26-connectivity by default).  A predicted cluster is *detected* when it shares at
least one voxel with the reference mask; a reference cluster is detected when it
shares at least one voxel with the predicted mask.  Then::

    cluster Dice = (detected predicted + detected reference) / (n predicted + n reference)

Both maps empty gives 1.0 for every score (nothing to find, nothing found); one side
empty gives 0.0 Dice (precision / recall of the empty side's counterpart are 0.0).

By region: :func:`score` restricts both maps to the region (WM = 1, BG = 2 in the
region map, as the phantoms write them) *before* finding clusters, so a PVS that
crosses from the BG into the WM counts once in each region.  ``count_error`` is
``n_pred - n_ref`` clusters.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["REGIONS", "ClusterScores", "cluster_scores", "score", "voxel_dice"]

REGIONS = {"WM": 1, "BG": 2}


def _check(pred: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(pred) > 0
    ref = np.asarray(ref) > 0
    if pred.shape != ref.shape:
        raise ValueError(
            f"prediction shape {pred.shape} does not match reference shape {ref.shape}"
        )
    return pred, ref


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
    import cc3d

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


def score(pred: np.ndarray, ref: np.ndarray, regions: np.ndarray | None = None,
          connectivity: int = 26) -> dict[str, dict]:
    """Voxel and cluster scores for the whole map and, with ``regions``, for WM and BG.

    Returns ``{"all": {...}, "WM": {...}, "BG": {...}}``; each holds ``voxel_dice``,
    ``cluster_dice``, ``cluster_precision``, ``cluster_recall``, ``n_pred``, ``n_ref``,
    ``count_error``, ``pred_voxels`` and ``ref_voxels``.  Without ``regions`` only
    ``"all"`` is given; with them ``"all"`` means the whole ROI (regions > 0).
    """
    pred, ref = _check(pred, ref)
    masks = {"all": None}
    if regions is not None:
        regions = np.asarray(regions)
        if regions.shape != pred.shape:
            raise ValueError(f"regions shape {regions.shape} does not match the maps {pred.shape}")
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
