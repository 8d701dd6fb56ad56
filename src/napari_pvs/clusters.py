"""Connected components of a PVS map and a per-cluster table for review.

Clusters are cc3d connected components (26-connectivity by default).  The table is
computed in a few passes over the foreground voxels (one sort by cluster, then
``np.bincount`` and ``ufunc.reduceat`` over the runs); there is no Python loop over
clusters.

Columns
-------
``id`` (the label in the cluster map), ``voxels``, ``volume_mm3``, ``centroid_{i,j,k}``
(voxel), ``centroid_{x,y,z}`` (world mm, through the affine), ``bbox_{i,j,k}_{min,max}``
(inclusive voxel bounds), ``prob_mean``, ``prob_max``, ``unc_mean``, ``unc_max``
(NaN without those maps), ``region`` (dominant region: WM, BG or other),
``length_mm`` (``sqrt(12 * l1)``, the length of a uniform rod with the same spread),
``linearity`` (``(l1 - l2) / l1``) and ``elongation`` (``sqrt(l1 / l2)``), where
``l1 >= l2 >= l3`` are the eigenvalues of the covariance of the voxel centres in world
mm plus each voxel's own extent (``h^2 / 12`` per axis, so a single voxel is isotropic),
and ``priority``: ``0.6 * unc_mean + 0.4 * (1 - linearity)`` with an uncertainty map,
else ``0.6 * (1 - prob_mean) + 0.4 * (1 - linearity)``; higher means review first
(uncertain, blob-like clusters are the likely false positives; PVS are tubular).
``p_false_positive``: P(false positive) from the model's fitted classifier
(:mod:`napari_pvs.triage`), empty without one; with it, ``priority`` is that probability.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import cc3d
import numpy as np

from ._regions import REGION_NAMES

__all__ = ["COLUMN_DESCRIPTIONS", "REGION_NAMES", "ClusterTable", "cluster_table",
           "drop_small_clusters", "label_clusters", "voxels_by_cluster"]

#: what each column of the table means (the JSON sidecar of a BIDS-derivatives table)
COLUMN_DESCRIPTIONS = {
    "id": "cluster label in the PVS cluster map (26-connected components)",
    "voxels": "number of voxels",
    "volume_mm3": "volume in mm^3",
    **{f"centroid_{a}": f"centroid, voxel index {a}" for a in "ijk"},
    **{f"centroid_{a}": f"centroid, world {a} in mm (through the image affine)" for a in "xyz"},
    **{f"bbox_{a}_{e}": f"bounding box, inclusive voxel {e} along {a}" for a in "ijk"
       for e in ("min", "max")},
    "prob_mean": "mean P(PVS) over the cluster (n/a for the Frangi baseline)",
    "prob_max": "maximum P(PVS) over the cluster",
    "unc_mean": "mean predictive uncertainty over the cluster",
    "unc_max": "maximum predictive uncertainty over the cluster",
    "region": "dominant region: WM, BG or other",
    "length_mm": "length of a uniform rod with the same spread, sqrt(12 l1), in mm",
    "linearity": "(l1 - l2) / l1 of the covariance eigenvalues l1 >= l2 >= l3",
    "elongation": "sqrt(l1 / l2)",
    "priority": "review order: higher is reviewed first",
    "p_false_positive": "P(false positive) from the model's fitted triage classifier",
}


def label_clusters(mask: np.ndarray, connectivity: int = 26) -> tuple[np.ndarray, int]:
    """Connected components of ``mask > 0``: ``(labels uint32, number of clusters)``."""
    if connectivity not in (6, 18, 26):
        raise ValueError(f"connectivity must be 6, 18 or 26, got {connectivity}")
    mask = np.asarray(mask)
    if mask.ndim != 3:
        raise ValueError(f"need a 3D map, got shape {mask.shape}")
    # C order always: cc3d numbers components in memory order, so a Fortran-ordered array
    # (as nibabel reads NIfTI files) would otherwise get other cluster ids for the same map
    binary = np.ascontiguousarray(mask > 0, dtype=np.uint8)
    labels, n = cc3d.connected_components(binary, connectivity=connectivity, return_N=True)
    return labels.astype(np.uint32, copy=False), int(n)


def drop_small_clusters(labels: np.ndarray, spacing, min_mm3: float) -> np.ndarray:
    """``labels`` (uint8 0/1) without its clusters (26-connected) under ``min_mm3`` mm³
    at voxel size ``spacing``; ``cc3d.dust``, in place when there is anything to drop."""
    if min_mm3 <= 0:
        return labels
    voxels = int(np.ceil(float(min_mm3) / float(np.prod(spacing)) - 1e-9))
    if voxels <= 1:
        return labels
    return cc3d.dust(labels, threshold=voxels, connectivity=26, in_place=True)


def voxels_by_cluster(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(fg, first)``: the flat indices of the foreground voxels of a cluster map, grouped
    by cluster label (ascending), and the start of each cluster's run in ``fg``."""
    flat = np.asarray(labels).ravel()
    fg = np.flatnonzero(flat)
    lab = flat[fg]
    order = np.argsort(lab, kind="stable")
    fg, lab = fg[order], lab[order]
    first = (np.flatnonzero(np.r_[True, lab[1:] != lab[:-1]]) if lab.size
             else np.zeros(0, np.int64))
    return fg, first


@dataclass
class ClusterTable:
    """Per-cluster columns (numpy arrays of equal length), one row per cluster."""

    columns: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.columns["id"])

    def row(self, i: int) -> dict:
        return {k: v[i].item() if hasattr(v[i], "item") else v[i] for k, v in self.columns.items()}

    def order(self, by: str = "priority", descending: bool = True) -> np.ndarray:
        """Row indices sorted by a column (ties broken by cluster id)."""
        col = self.columns[by]
        key = np.asarray(col)
        if key.dtype.kind in "fc":
            key = np.nan_to_num(key, nan=-np.inf)
        idx = np.lexsort((self.columns["id"], -key if descending and key.dtype.kind != "U" else key))
        return idx[::-1] if descending and key.dtype.kind == "U" else idx

    def to_csv(self, path: str | os.PathLike[str]) -> Path:
        path = Path(path)
        names = list(self.columns)
        with open(path, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(names)
            for i in range(len(self)):
                w.writerow([_fmt(self.columns[n][i]) for n in names])
        return path


def _fmt(v) -> str:
    if isinstance(v, (float, np.floating)):
        return "" if np.isnan(v) else f"{float(v):.6g}"
    return str(v)


def cluster_table(
    labels: np.ndarray,
    *,
    probability: np.ndarray | None = None,
    uncertainty: np.ndarray | None = None,
    regions: np.ndarray | None = None,
    affine: np.ndarray | None = None,
    spacing=None,
    triage: dict | None = None,
) -> ClusterTable:
    """The per-cluster table of a cluster map (see the module docstring).

    ``triage``: a model's fitted false-positive classifier (:mod:`napari_pvs.triage`);
    with it (and a probability map) ``priority`` is ``p_false_positive``.
    """
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise ValueError(f"need a 3D cluster map, got shape {labels.shape}")
    affine = np.eye(4) if affine is None else np.asarray(affine, dtype=float)
    if spacing is None:
        spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    spacing = np.broadcast_to(np.asarray(spacing, dtype=float), (3,))
    for name, arr in (("probability", probability), ("uncertainty", uncertainty),
                      ("regions", regions)):
        if arr is not None and np.shape(arr) != labels.shape:
            raise ValueError(f"{name} shape {np.shape(arr)} does not match labels {labels.shape}")
    runs = _Runs.of(labels)
    cols = _position_columns(runs, affine)
    for key, arr in (("prob", probability), ("unc", uncertainty)):
        cols.update(_map_columns(runs, key, arr))
    cols["region"] = _region_column(runs, regions)
    cols.update(_shape_columns(runs, affine, spacing))
    if uncertainty is not None:
        cols["priority"] = 0.6 * cols["unc_mean"] + 0.4 * (1 - cols["linearity"])
    else:
        pm = np.nan_to_num(cols["prob_mean"], nan=1.0)
        cols["priority"] = 0.6 * (1 - pm) + 0.4 * (1 - cols["linearity"])
    cols["p_false_positive"] = np.full(runs.n, np.nan)
    if triage is not None and probability is not None:
        from .triage import p_false_positive

        cols["p_false_positive"] = p_false_positive(cols, triage)
        scored = np.isfinite(cols["p_false_positive"])
        cols["priority"] = np.where(scored, cols["p_false_positive"], cols["priority"])
    return ClusterTable(cols)


@dataclass
class _Runs:
    """Foreground voxels sorted by cluster: every column is a reduction over runs."""

    fg: np.ndarray  # flat indices of the foreground voxels, grouped by cluster
    first: np.ndarray  # start of each cluster's run in ``fg``
    ids: np.ndarray  # cluster label of each run
    counts: np.ndarray  # voxels of each run
    rank: np.ndarray  # run number of each voxel of ``fg``
    ijk: np.ndarray  # voxel indices (float64) of ``fg``
    centroid: np.ndarray  # mean voxel index of each run

    @classmethod
    def of(cls, labels: np.ndarray) -> _Runs:
        fg, first = voxels_by_cluster(labels)
        ids = labels.ravel()[fg[first]].astype(np.int64)
        n = ids.size
        counts = np.diff(np.r_[first, fg.size]).astype(np.int64)
        rank = np.repeat(np.arange(n), counts)
        ijk = np.stack(np.unravel_index(fg, labels.shape), 1).astype(np.float64)
        cen = np.stack([np.bincount(rank, weights=ijk[:, a], minlength=n) for a in range(3)], 1)
        cen = cen.astype(np.float64)
        cen /= np.maximum(counts, 1)[:, None]
        return cls(fg, first, ids, counts, rank, ijk, cen)

    @property
    def n(self) -> int:
        return int(self.ids.size)


def _position_columns(runs: _Runs, affine: np.ndarray) -> dict[str, np.ndarray]:
    """``id``, ``voxels``, ``volume_mm3``, centroids (voxel and world) and bounding boxes."""
    n, ijk, first = runs.n, runs.ijk, runs.first
    cols: dict[str, np.ndarray] = {"id": runs.ids, "voxels": runs.counts}
    cols["volume_mm3"] = runs.counts * float(abs(np.linalg.det(affine[:3, :3])))
    for a, ax in enumerate("ijk"):
        cols[f"centroid_{ax}"] = runs.centroid[:, a]
    world = runs.centroid @ affine[:3, :3].T + affine[:3, 3]
    for a, ax in enumerate("xyz"):
        cols[f"centroid_{ax}"] = world[:, a]
    for a, ax in enumerate("ijk"):
        cols[f"bbox_{ax}_min"] = (np.minimum.reduceat(ijk[:, a], first).astype(np.int64) if n
                                  else np.zeros(0, np.int64))
        cols[f"bbox_{ax}_max"] = (np.maximum.reduceat(ijk[:, a], first).astype(np.int64) if n
                                  else np.zeros(0, np.int64))
    return cols


def _map_columns(runs: _Runs, key: str, arr: np.ndarray | None) -> dict[str, np.ndarray]:
    """``{key}_mean`` and ``{key}_max`` of a map over each cluster (NaN without the map)."""
    n = runs.n
    if arr is None or not n:
        return {f"{key}_mean": np.full(n, np.nan), f"{key}_max": np.full(n, np.nan)}
    v = np.asarray(arr).ravel()[runs.fg].astype(np.float64)  # gather first: no full-volume copy
    return {f"{key}_mean": np.add.reduceat(v, runs.first) / runs.counts,
            f"{key}_max": np.maximum.reduceat(v, runs.first)}


def _region_column(runs: _Runs, regions: np.ndarray | None) -> np.ndarray:
    """The dominant region of each cluster (:data:`~napari_pvs._regions.REGION_NAMES`)."""
    n, k = runs.n, len(REGION_NAMES)
    names = np.array([REGION_NAMES[code] for code in range(k)], dtype=object)
    if regions is None:
        return np.full(n, REGION_NAMES[0], dtype=object)
    reg = np.asarray(regions).ravel()[runs.fg].astype(np.int64)
    reg[(reg < 0) | (reg >= k)] = 0  # codes outside the region table count as other
    per = np.bincount(runs.rank * k + reg, minlength=k * n).reshape(n, k)
    return names[per.argmax(1)] if n else np.zeros(0, dtype=object)


def _shape_columns(runs: _Runs, affine: np.ndarray, spacing: np.ndarray) -> dict[str, np.ndarray]:
    """``length_mm``, ``linearity`` and ``elongation`` from the second moments of the voxel
    centres in world mm, plus each voxel's own extent."""
    n, rank = runs.n, runs.rank
    xyz = runs.ijk @ affine[:3, :3].T
    d = xyz - (runs.centroid @ affine[:3, :3].T)[rank]
    cov = np.empty((n, 3, 3))
    for a in range(3):
        for b in range(a, 3):
            cov[:, a, b] = cov[:, b, a] = np.bincount(rank, weights=d[:, a] * d[:, b], minlength=n)
    cov /= np.maximum(runs.counts, 1)[:, None, None]
    cov += np.diag(spacing**2 / 12.0)[None]
    ev = np.linalg.eigvalsh(cov)[:, ::-1] if n else np.zeros((0, 3))  # l1 >= l2 >= l3
    l1, l2 = ev[:, 0], ev[:, 1]
    return {"length_mm": np.sqrt(12.0 * l1), "linearity": (l1 - l2) / np.maximum(l1, 1e-12),
            "elongation": np.sqrt(l1 / np.maximum(l2, 1e-12))}
