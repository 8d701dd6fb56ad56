"""False-positive triage of a PVS label map, cluster by cluster (no Qt).

A :class:`ReviewSession` holds the label array being corrected (edited in place, so a
napari Labels layer sharing the array shows every change), its clusters and their
table, and the reviewer's decisions:

- ``accept(cid)`` marks a cluster as a true PVS;
- ``reject(cid)`` marks it a false positive and erases its voxels from the labels;
- ``undo()`` reverts the last decision, restoring erased voxels;
- ``record_paint(...)`` counts manual painting as a correction.

Every decision is an event (a dict); :meth:`ReviewSession.save` commits the labels as
a new version of a store subject, with the edit summary and the events, and clears
the unsaved flag.  The review widget is a thin layer over this class.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .clusters import ClusterTable, cluster_table, label_clusters

__all__ = ["Decision", "ReviewSession"]

@dataclass
class Decision:
    """One reversible step: a decision on a cluster, with what it overwrote."""

    cluster: int
    kind: str  # "accepted" | "rejected"
    previous: str | None  # the cluster's decision before this step
    voxels: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # flat indices erased
    values: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint8))  # their old labels


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


class ReviewSession:
    """Cluster-by-cluster review of a label array.

    Parameters
    ----------
    labels : ndarray, (X, Y, Z), integer
        The labels to correct; edited in place.  Must be a writable numpy array.
    probability, uncertainty, regions : ndarray, optional
        Maps on the same grid, for the table's columns (regions: 1 WM, 2 BG).
    affine : ndarray (4, 4), optional
        Voxel-to-world transform, for world centroids and mm lengths.
    connectivity : {6, 18, 26}
        Cluster connectivity.

    Raises
    ------
    ValueError
        Labels that are not a writable 3D integer numpy array, or maps of another shape.
    """

    def __init__(self, labels: np.ndarray, *, probability: np.ndarray | None = None,
                 uncertainty: np.ndarray | None = None, regions: np.ndarray | None = None,
                 affine: np.ndarray | None = None, connectivity: int = 26):
        if not isinstance(labels, np.ndarray):
            raise ValueError(f"labels must be a numpy array (got {type(labels).__name__}); load it "
                             "into memory first")
        if labels.ndim != 3:
            raise ValueError(f"labels must be 3D, got shape {labels.shape}")
        if labels.dtype != bool and not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels must be integers, got {labels.dtype}")
        if not labels.flags.writeable:
            raise ValueError("labels array is read-only; pass a writable copy")
        self.labels = labels
        self.clusters, self.n = label_clusters(labels, connectivity)
        self.table: ClusterTable = cluster_table(
            self.clusters, probability=probability, uncertainty=uncertainty, regions=regions,
            affine=affine)
        # voxels of every cluster: flat indices sorted by cluster id, sliced by offsets
        flat = self.clusters.ravel()
        fg = np.flatnonzero(flat)
        order = np.argsort(flat[fg], kind="stable")
        self._voxels = fg[order]
        self._offsets = np.r_[0, np.cumsum(np.bincount(flat[fg], minlength=self.n + 1)[1:])]
        self._row_of = {int(c): i for i, c in enumerate(self.table.columns["id"])}
        self.decisions: dict[int, str] = {}
        self.events: list[dict[str, Any]] = []
        self._history: list[Decision] = []
        self.painted = 0  # voxels changed by manual painting
        self.dirty = False

    # ------------------------------------------------------------------ queries
    def cluster_voxels(self, cid: int) -> np.ndarray:
        """Flat indices (into the volume) of cluster ``cid``'s voxels."""
        self._check(cid)
        return self._voxels[self._offsets[cid - 1]:self._offsets[cid]]

    def row(self, cid: int) -> dict[str, Any]:
        """The table row of cluster ``cid``."""
        self._check(cid)
        return self.table.row(self._row_of[cid])

    def order(self, by: str = "priority", descending: bool = True) -> list[int]:
        """Cluster ids sorted by a table column."""
        if by not in self.table.columns:
            raise ValueError(f"unknown column {by!r}; choose one of {sorted(self.table.columns)}")
        return [int(self.table.columns["id"][i]) for i in self.table.order(by, descending)]

    @property
    def reviewed(self) -> int:
        return len(self.decisions)

    def next_unreviewed(self, order: list[int], after: int | None = None, step: int = 1) -> int | None:
        """The next (``step`` = 1) or previous (-1) cluster of ``order`` after ``after``,
        preferring unreviewed ones; None when the order is empty."""
        if not order:
            return None
        start = order.index(after) if after in order else (-1 if step > 0 else len(order))
        n = len(order)
        for k in range(1, n + 1):
            cid = order[(start + step * k) % n]
            if cid not in self.decisions:
                return cid
        return order[(start + step) % n]

    def summary(self) -> dict[str, int]:
        """Counts for the edit summary of a saved version."""
        kinds = list(self.decisions.values())
        return {"clusters": self.n, "clusters_reviewed": self.reviewed,
                "clusters_accepted": kinds.count("accepted"),
                "clusters_rejected": kinds.count("rejected"),
                "voxels_rejected": int(sum(len(self._last_reject(c).voxels)
                                           for c, k in self.decisions.items() if k == "rejected")),
                "voxels_painted_manually": int(self.painted)}

    # ------------------------------------------------------------------ decisions
    def _check(self, cid: int) -> None:
        if not 1 <= int(cid) <= self.n:
            raise ValueError(f"no cluster {cid}; clusters are numbered 1..{self.n}")

    def _event(self, kind: str, **details) -> dict[str, Any]:
        event = {"kind": kind, "time": _now(), **details}
        self.events.append(event)
        self.dirty = True
        return event

    def accept(self, cid: int) -> dict[str, Any]:
        """Mark cluster ``cid`` as a true PVS; returns the event."""
        return self._decide(int(cid), "accepted")

    def reject(self, cid: int) -> dict[str, Any]:
        """Mark cluster ``cid`` as a false positive and erase its voxels; returns the event."""
        return self._decide(int(cid), "rejected")

    def _decide(self, cid: int, kind: str) -> dict[str, Any]:
        self._check(cid)
        previous = self.decisions.get(cid)
        step = Decision(cid, kind, previous)
        if kind == "rejected":
            idx = self.cluster_voxels(cid)
            flat = self.labels.reshape(-1)
            keep = flat[idx] != 0  # voxels already erased (e.g. painted over) stay as they are
            step.voxels, step.values = idx[keep], flat[idx[keep]].copy()
            flat[step.voxels] = 0
        elif previous == "rejected":  # accepting a rejected cluster puts its voxels back
            step = self._undo_erase(cid, step)
        self._history.append(step)
        self.decisions[cid] = kind
        row = self.row(cid)
        return self._event(f"cluster_{kind}", cluster=cid, voxels=int(row["voxels"]),
                           region=str(row["region"]), unc_mean=_num(row["unc_mean"]),
                           prob_mean=_num(row["prob_mean"]),
                           centroid_ijk=[round(float(row[f"centroid_{a}"]), 1) for a in "ijk"])

    def _last_reject(self, cid: int) -> Decision:
        return next(d for d in reversed(self._history) if d.cluster == cid and d.kind == "rejected")

    def _undo_erase(self, cid: int, step: Decision) -> Decision:
        old = self._last_reject(cid)
        self.labels.reshape(-1)[old.voxels] = old.values
        return step

    def undo(self) -> int | None:
        """Revert the last decision (restoring erased voxels); returns its cluster id,
        or None when there is nothing to undo."""
        if not self._history:
            return None
        step = self._history.pop()
        flat = self.labels.reshape(-1)
        if step.kind == "rejected":
            flat[step.voxels] = step.values
        elif step.previous == "rejected":  # the accept had restored the voxels: erase again
            flat[self._last_reject(step.cluster).voxels] = 0
        if step.previous is None:
            self.decisions.pop(step.cluster, None)
        else:
            self.decisions[step.cluster] = step.previous
        self._event("undo", cluster=step.cluster, undone=step.kind)
        return step.cluster

    def record_paint(self, voxels: int, value: int | None = None) -> dict[str, Any]:
        """Count a manual paint stroke of ``voxels`` voxels as a correction."""
        self.painted += int(voxels)
        return self._event("paint", voxels=int(voxels), value=None if value is None else int(value))

    # ------------------------------------------------------------------ saving
    def save(self, store, subject: str, *, author: str, image_sha256: str | None = None,
             affine: np.ndarray | None = None) -> int:
        """Commit the labels as a new version of ``subject`` in a writable store.

        The version's summary holds the painted / erased voxel counts against its parent
        and :meth:`summary`; the decisions go to the store's event log.  Returns the new
        version number.  Nothing is marked saved unless the commit succeeded.
        """
        version = store.commit_labels(subject, self.labels, author=author, source="review",
                                      affine=affine, image_sha256=image_sha256,
                                      summary=self.summary(), events=self.events)
        self.events = []
        self.dirty = False
        return version


def _num(v) -> float | None:
    v = float(v)
    return None if np.isnan(v) else round(v, 4)
