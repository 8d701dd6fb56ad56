"""False-positive triage of a PVS label map, cluster by cluster (no Qt).

A :class:`ReviewSession` holds the label array being corrected (edited in place, so a
napari Labels layer sharing the array shows every change), its clusters (connected
components of the labels when the session starts) and their table, and the
reviewer's decisions.

Decisions
---------
Each cluster is in one of three states, ``unreviewed`` (the start), ``accepted`` or
``rejected``:

- ``accept(cid)`` moves it to ``accepted`` (a true PVS);
- ``reject(cid)`` moves it to ``rejected`` (a false positive: its voxels are erased);
- repeating the cluster's current decision is a no-op: it returns None, adds no undo
  step and no event;
- ``undo()`` reverts the last decision that changed something: the cluster goes back to
  its previous state, and exactly the voxels that decision erased (or restored) are
  restored (or erased again).

Painting
--------
In napari the reviewer paints straight into the labels array; the widget then calls
``record_paint(indices)`` with the voxels that changed (:func:`painted_voxels` reads
them from the Labels layer's ``paint`` event).  The session never writes a painted
voxel again: painting always wins over decisions, whenever it happened.

The model
---------
After every call, for each voxel ``v`` (``original`` = the labels when the session
started)::

    labels[v] = the value last painted at v   if v was painted in this session,
                0                             else if v's cluster is currently rejected,
                original[v]                   otherwise.

So accepting a rejected cluster, or undoing its rejection, restores the voxels the
rejection erased except those painted since; rejecting never erases a painted voxel.

The counters of :meth:`ReviewSession.summary` follow the labels: ``clusters_accepted``
and ``clusters_rejected`` count the clusters in each state; ``voxels_rejected`` counts
the voxels that are 0 because their cluster is rejected (its unpainted voxels);
``voxels_painted_manually`` counts the painted voxels whose value differs from what
the decisions alone give (``original``, or 0 in a rejected cluster), plus the voxels
reported by count only (``record_paint(n)``, or carried over through
:attr:`ReviewSession.painted`), which the session cannot locate or protect.

Every decision, undo and paint is an event (a dict); :meth:`ReviewSession.save`
commits the labels as a new version of a store subject, with the edit summary and the
events, and clears the unsaved flag.

Review-only saves
-----------------
A reviewer who triaged some clusters has not checked the rest of the map.
``save(..., review_only=True)`` commits the labels as a *review-only* version with
:meth:`ReviewSession.reviewed_mask`: 1 on every voxel of an accepted cluster (label as
it is: PVS), of a rejected cluster (0 unless painted since) and on every painted voxel
(whatever was painted); 0 elsewhere, including clusters not decided.  Training learns
from the 1s only.  Decisions made before :meth:`ReviewSession.recompute` stay in the
mask; voxels reported by count only cannot be located and are not in it.

Each change emits psygnal signals (see :class:`ReviewSession`), which the review
widget listens to; a no-op (a repeated decision, nothing to undo) emits nothing.
"""

from __future__ import annotations

import numbers
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from psygnal import Signal

from ._review_arrays import check_labels, flat_indices, painted_voxels
from .clusters import ClusterTable, cluster_table, label_clusters

__all__ = ["STATES", "Decision", "ReviewSession", "painted_voxels"]

STATES = ("unreviewed", "accepted", "rejected")
_TIME = "%Y-%m-%dT%H:%M:%S%z"


@dataclass
class Decision:
    """One undoable step: a change of a cluster's state, and the voxels it wrote.

    ``voxels`` are positions into the cluster voxel list of the session (see
    :meth:`ReviewSession.cluster_voxels`): those the step erased (to ``rejected``) or
    restored (``rejected`` to ``accepted``); empty when the labels did not change.
    """

    cluster: int
    kind: str  # "accepted" | "rejected"
    previous: str | None  # the cluster's decision before this step (None: unreviewed)
    voxels: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))


class ReviewSession:
    """Cluster-by-cluster review of a label array (see the module docstring for the model).

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
    triage : dict, optional
        The model's false-positive classifier (:mod:`napari_pvs.triage`): the table gets
        ``p_false_positive``, the priority follows it, and
        :meth:`expected_false_positives` estimates what is left to find.

    Raises
    ------
    ValueError
        Labels that are not a writable 3D integer numpy array, or maps of another shape.

    Signals
    -------
    decided(cluster, state), undone(cluster, state now)
        ``accept`` / ``reject`` changed a cluster's state; ``undo`` reverted a decision.
    paint_recorded(voxels), recomputed(clusters), saved(version)
        ``record_paint``, ``recompute``, ``save`` did something.
    changed()
        After each of the above: the labels, decisions or summary changed.
    """

    decided = Signal(int, str)
    undone = Signal(int, str)
    paint_recorded = Signal(int)
    recomputed = Signal(int)
    saved = Signal(int)
    changed = Signal()

    def __init__(self, labels: np.ndarray, *, probability: np.ndarray | None = None,
                 uncertainty: np.ndarray | None = None, regions: np.ndarray | None = None,
                 affine: np.ndarray | None = None, connectivity: int = 26,
                 triage: dict | None = None):
        check_labels(labels)
        self._triage = triage
        self.labels = labels
        # a flat view (C order) that writes through, whatever the array's memory order
        self._flat = labels.reshape(-1) if labels.flags.c_contiguous else labels.flat
        self._affine, self._connectivity = affine, connectivity
        self._maps = {"probability": probability, "uncertainty": uncertainty, "regions": regions}
        self.events: list[dict[str, Any]] = []
        self.dirty = False
        self._painted_count_only = 0  # voxels reported by count only (cannot be located)
        self._reviewed_before: np.ndarray | None = None  # decided before a recompute (flat)
        self._start(self._maps)

    def _start(self, maps: dict[str, np.ndarray | None]) -> None:
        """Label the clusters of the labels as they are now, with these maps; no decision,
        undo step or located paint yet.  Changes nothing when the table fails."""
        labels = self.labels
        clusters, n = label_clusters(labels, self._connectivity)
        self.table: ClusterTable = cluster_table(clusters, affine=self._affine,
                                                 triage=self._triage, **maps)
        self.clusters, self.n, self._maps = clusters, n, maps
        self._original = labels.copy()
        # voxels of every cluster: flat indices sorted by cluster id, sliced by offsets
        flat = self.clusters.ravel()
        fg = np.flatnonzero(flat)
        order = np.argsort(flat[fg], kind="stable")
        self._voxels = fg[order]
        self._offsets = np.r_[0, np.cumsum(np.bincount(flat[fg], minlength=self.n + 1)[1:])]
        self._row_of = {int(c): i for i, c in enumerate(self.table.columns["id"])}
        self.decisions: dict[int, str] = {}  # clusters not in it are unreviewed
        self._history: list[Decision] = []
        # per cluster voxel (aligned with _voxels): erased by a rejection, and its value then
        self._erased = np.zeros(len(self._voxels), bool)
        self._erased_values = np.zeros(len(self._voxels), labels.dtype)
        self._painted_mask = np.zeros(labels.size, bool)  # flat: painted in this session
        self._painted_idx = np.zeros(0, np.int64)  # the same, as sorted flat indices

    def recompute(self, **maps: np.ndarray | None) -> int:
        """Relabel the clusters of the labels as they are now (after painting, say).

        The decisions and undo steps go (their clusters are gone); the event log, the
        unsaved flag and the number of painted voxels stay (the painted voxels are
        counted, no longer located).  ``maps`` (``probability``, ``uncertainty``,
        ``regions``) replace those given before; None drops one.  Returns the number
        of clusters; emits ``recomputed`` and ``changed``.
        """
        unknown = sorted(set(maps) - set(self._maps))
        if unknown:
            raise ValueError(f"unknown maps {unknown}; give some of {sorted(self._maps)}")
        painted = self.painted
        known = self.reviewed_mask().reshape(-1)  # decided voxels stay known for review-only saves
        self._start({**self._maps, **maps})
        self._painted_count_only = painted
        self._reviewed_before = known
        self._emit(self.recomputed, self.n)
        return self.n

    def _emit(self, signal, *args) -> None:
        signal.emit(*args)
        self.changed.emit()

    # ------------------------------------------------------------------ queries
    def cluster_voxels(self, cid: int) -> np.ndarray:
        """Flat indices (into the volume) of cluster ``cid``'s voxels."""
        self._check(cid)
        return self._voxels[self._positions(cid)]

    def _positions(self, cid: int) -> np.ndarray:
        return np.arange(self._offsets[cid - 1], self._offsets[cid])

    def row(self, cid: int) -> dict[str, Any]:
        """The table row of cluster ``cid``."""
        self._check(cid)
        return self.table.row(self._row_of[cid])

    def order(self, by: str = "priority", descending: bool = True) -> list[int]:
        """Cluster ids sorted by a table column."""
        if by not in self.table.columns:
            raise ValueError(f"unknown column {by!r}; choose one of {sorted(self.table.columns)}")
        return [int(self.table.columns["id"][i]) for i in self.table.order(by, descending)]

    def state(self, cid: int) -> str:
        """Cluster ``cid``'s state: one of :data:`STATES`."""
        self._check(cid)
        return self.decisions.get(int(cid), "unreviewed")

    @property
    def reviewed(self) -> int:
        return len(self.decisions)

    def expected_false_positives(self) -> float | None:
        """The sum of P(false positive) over the unreviewed clusters: how many false
        positives the model expects are left.  None without a fitted classifier."""
        pf = np.asarray(self.table.columns["p_false_positive"], float)
        if not np.isfinite(pf).any():
            return None
        ids = np.asarray(self.table.columns["id"], np.int64)
        open_ = np.array([int(c) not in self.decisions for c in ids], bool)
        return float(np.nansum(pf[open_]))

    @property
    def painted(self) -> int:
        """Voxels painted manually (``summary()["voxels_painted_manually"]``).

        Setting it sets the count of voxels painted that the session cannot locate,
        e.g. those of an earlier session on the same labels (the widget's Recompute).
        """
        return self._painted_located() + self._painted_count_only

    @painted.setter
    def painted(self, voxels: int) -> None:
        self._painted_count_only = int(voxels)

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
        """Counts for the edit summary of a saved version (see the module docstring)."""
        kinds = list(self.decisions.values())
        erased = self._erased & ~self._painted_mask[self._voxels]
        return {"clusters": self.n, "clusters_reviewed": self.reviewed,
                "clusters_accepted": kinds.count("accepted"),
                "clusters_rejected": kinds.count("rejected"),
                "voxels_rejected": int(np.count_nonzero(erased)),
                "voxels_painted_manually": self.painted}

    def _painted_located(self) -> int:
        """Painted voxels whose value differs from what the decisions alone give."""
        idx = self._painted_idx
        if not len(idx):
            return 0
        rejected = np.zeros(self.n + 1, bool)
        rejected[[c for c, k in self.decisions.items() if k == "rejected"]] = True
        in_rejected = rejected[self.clusters.reshape(-1)[idx]]
        unpainted = np.where(in_rejected, 0, self._original.reshape(-1)[idx])
        return int(np.count_nonzero(self._flat[idx] != unpainted))

    # ------------------------------------------------------------------ decisions
    def _check(self, cid: int) -> None:
        if not 1 <= int(cid) <= self.n:
            raise ValueError(f"no cluster {cid}; clusters are numbered 1..{self.n}")

    def _event(self, kind: str, **details) -> dict[str, Any]:
        event = {"kind": kind, "time": time.strftime(_TIME), **details}
        self.events.append(event)
        self.dirty = True
        return event

    def accept(self, cid: int) -> dict[str, Any] | None:
        """Mark cluster ``cid`` as a true PVS (restoring its voxels when it was rejected);
        returns the event, or None when it was accepted already (nothing happens)."""
        return self._decide(int(cid), "accepted")

    def reject(self, cid: int) -> dict[str, Any] | None:
        """Mark cluster ``cid`` as a false positive and erase its unpainted voxels;
        returns the event, or None when it was rejected already (nothing happens)."""
        return self._decide(int(cid), "rejected")

    def _decide(self, cid: int, kind: str) -> dict[str, Any] | None:
        self._check(cid)
        previous = self.decisions.get(cid)
        if previous == kind:
            return None
        pos = self._positions(cid)
        if kind == "rejected":
            written = self._erase(pos)
        elif previous == "rejected":
            written = self._restore(pos)
        else:
            written = np.zeros(0, np.int64)
        self._history.append(Decision(cid, kind, previous, written))
        self.decisions[cid] = kind
        row = self.row(cid)
        event = self._event(f"cluster_{kind}", cluster=cid, voxels=int(row["voxels"]),
                            region=str(row["region"]), unc_mean=_num(row["unc_mean"]),
                            prob_mean=_num(row["prob_mean"]),
                            centroid_ijk=[round(float(row[f"centroid_{a}"]), 1) for a in "ijk"])
        self._emit(self.decided, cid, kind)
        return event

    def _erase(self, pos: np.ndarray) -> np.ndarray:
        """Erase the cluster voxels at ``pos`` that are unpainted and non-zero (a voxel
        zeroed by hand and not reported stays as it is); returns the positions erased."""
        idx = self._voxels[pos]
        values = self._flat[idx]
        keep = ~self._painted_mask[idx] & ~self._erased[pos] & (values != 0)
        pos, idx = pos[keep], idx[keep]
        self._erased_values[pos] = values[keep]
        self._erased[pos] = True
        self._flat[idx] = 0
        return pos

    def _restore(self, pos: np.ndarray) -> np.ndarray:
        """Put back the erased voxels at ``pos``, except those painted since (which keep
        the paint); returns the positions written."""
        pos = pos[self._erased[pos]]
        self._erased[pos] = False
        pos = pos[~self._painted_mask[self._voxels[pos]]]
        self._flat[self._voxels[pos]] = self._erased_values[pos]
        return pos

    def undo(self) -> int | None:
        """Revert the last decision: the cluster's previous state, and the voxels that
        decision erased (or restored) restored (or erased again), except those painted
        since.  Returns its cluster id, or None when there is nothing to undo."""
        if not self._history:
            return None
        step = self._history.pop()
        if step.kind == "rejected":
            self._restore(step.voxels)
        else:
            self._erase(step.voxels)  # empty unless the accept had restored a rejection
        if step.previous is None:
            self.decisions.pop(step.cluster, None)
        else:
            self.decisions[step.cluster] = step.previous
        self._event("undo", cluster=step.cluster, undone=step.kind)
        self._emit(self.undone, step.cluster, self.state(step.cluster))
        return step.cluster

    def record_paint(self, voxels, value: int | None = None) -> dict[str, Any] | None:
        """Record manual painting, already written into the labels, as a correction.

        Parameters
        ----------
        voxels : int, array of int, or tuple of index arrays
            The painted voxels: flat (C-order) indices, or one index array per axis (a
            numpy multi-index, as napari reports them; see :func:`painted_voxels`).  A
            plain number only counts voxels: the session cannot tell which, so a later
            restore may overwrite them.
        value : int, optional
            The painted value, for the event.

        Returns
        -------
        dict or None
            The event, or None when no voxel was painted.
        """
        if isinstance(voxels, numbers.Integral):
            n = int(voxels)
            if n < 0:
                raise ValueError(f"painted voxel count must be >= 0, got {n}")
            self._painted_count_only += n
        else:
            idx = flat_indices(voxels, self.labels.shape)
            n = len(idx)
            if n:
                self._painted_mask[idx] = True
                self._painted_idx = np.union1d(self._painted_idx, idx)
        if not n:
            return None
        event = self._event("paint", voxels=n, value=None if value is None else int(value))
        self._emit(self.paint_recorded, n)
        return event

    def reviewed_mask(self) -> np.ndarray:
        """The voxels whose label the reviewer decided, bool, shaped like the labels.

        True on every voxel of an accepted or rejected cluster, on every voxel painted
        in this session, and on those decided before a :meth:`recompute`; False on
        clusters not decided and everywhere else (see "Review-only saves" in the module
        docstring).
        """
        known = self._painted_mask.copy()
        decided = np.zeros(self.n + 1, bool)
        decided[list(self.decisions)] = True
        known[self._voxels[decided[self.clusters.reshape(-1)[self._voxels]]]] = True
        if self._reviewed_before is not None:
            known |= self._reviewed_before
        return known.reshape(self.labels.shape)

    # ------------------------------------------------------------------ saving
    def save(self, store, subject: str, *, author: str, image_sha256: str | None = None,
             affine: np.ndarray | None = None, review_only: bool = False) -> int:
        """Commit the labels as a new version of ``subject`` in a writable store.

        The version's summary holds the painted / erased voxel counts against its parent
        and :meth:`summary`; the decisions go to the store's event log.  Returns the new
        version number.  Nothing is marked saved unless the commit succeeded.

        ``review_only=True`` saves the decisions only: a review-only version with
        :meth:`reviewed_mask`, which leaves the subject's status short of ``corrected``
        (see :meth:`napari_pvs.store.CorrectionsStore.commit_labels`).  It raises
        ValueError when nothing was decided or painted (such a version would teach
        training nothing).
        """
        reviewed = None
        if review_only:
            reviewed = self.reviewed_mask()
            if not reviewed.any():
                raise ValueError("no cluster accepted or rejected and no voxel painted: there "
                                 "are no decisions to save; decide some clusters first, or "
                                 "save the whole map as a correction")
        version = store.commit_labels(subject, self.labels, author=author, source="review",
                                      affine=affine, image_sha256=image_sha256,
                                      summary=self.summary(), events=self.events,
                                      reviewed=reviewed)
        self.events = []
        self.dirty = False
        self._emit(self.saved, version)
        return version


def _num(v) -> float | None:
    v = float(v)
    return None if np.isnan(v) else round(v, 4)
