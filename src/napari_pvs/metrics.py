"""Segmentation metrics: voxel Dice and cluster-level Dice.

Cluster rule (as in the PVS literature): clusters are connected components (cc3d,
26-connectivity by default).  A predicted cluster is *detected* when it shares at
least one voxel with the reference mask; a reference cluster is detected when it
shares at least one voxel with the predicted mask.  Then::

    cluster Dice = (detected predicted + detected reference) / (n predicted + n reference)

Both maps empty gives 1.0 for every score (nothing to find, nothing found); one side
empty gives 0.0.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["ClusterScores", "cluster_scores", "voxel_dice"]


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
