"""Review widget: triage the predicted PVS clusters one by one.

A thin layer over :class:`napari_pvs.review.ReviewSession`, built from three parts: a
navigation bar (the labels layer, the order, Previous / Next / Accept / Reject / Undo
and the progress), the cluster table (sortable by uncertainty, size, probability or
region; selecting a row moves the viewer to the cluster and rings it) and a save
panel (``_review_parts``, ``_cluster_table``).  The buttons have keys that napari's
Labels layer does not use; they are unbound when the widget closes or leaves its dock.
The widget acts on the session and listens to its signals to update the table, the
labels and the counters.  Manual painting in the labels layer counts as a correction.
Save commits the labels as a new version of the store subject, with the edit summary
and every decision as an event; Save decisions commits them as a review-only version
(only the decided clusters and painted voxels count for training).  Closing napari
with unsaved corrections asks first.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from qtpy.QtCore import QEvent, QObject, Qt, QTimer
from qtpy.QtGui import QKeySequence
from qtpy.QtWidgets import QDockWidget, QMessageBox, QShortcut, QVBoxLayout

from .._errors import PVSInputError
from ..review import ReviewSession, painted_voxels
from ._cluster_table import MODEL_COLUMNS, ClusterTable, has_values
from ._common import ViewerWidget
from ._layers import geometry, role
from ._review_parts import KEYS, SORT, NavigationBar, SavePanel, commit_review

__all__ = ["KEYS", "ReviewWidget"]

MAPS = ("probability", "uncertainty", "regions")  # the session's table columns come from them


class _CloseGuard(QObject):
    """Asks before a window (napari, or the widget's dock) closes over unsaved work."""

    def __init__(self, widget: ReviewWidget):
        super().__init__(widget)
        self.widget = widget

    def eventFilter(self, obj, event):  # noqa: N802 (Qt's name)
        if event.type() == QEvent.Close and self.widget.has_unsaved():
            if not self.widget.confirm_close():
                event.ignore()
                return True
        return False


class ReviewWidget(ViewerWidget):
    """Accept / reject clusters of a PVS labels layer and save them to the store."""

    def __init__(self, napari_viewer):
        super().__init__(napari_viewer)
        self.session: ReviewSession | None = None
        self.layer = None
        self.current: int | None = None
        self._decisions_only = False  # how this review was last saved (see save_pending)
        self._cluster_ids: dict[int, np.ndarray] = {}  # cluster map values of rejected clusters
        self.nav = NavigationBar(self._labels_choices)
        self.table = ClusterTable()
        self.save_panel = SavePanel(self.state)
        lay = QVBoxLayout(self)
        lay.addWidget(self.nav)
        lay.addWidget(self.table, 1)
        lay.addWidget(self.save_panel)
        # the parts' controls, by the names the widget has always had
        self.labels, self.sort, self.buttons = self.nav.labels, self.nav.sort, self.nav.buttons
        self.counters = self.nav.counters
        self.store, self.subject = self.save_panel.store, self.save_panel.subject
        self._connect()
        self._keys: dict[str, tuple] = {}  # key -> (our binding, the one it replaced)
        self._docked = False
        self._bind_keys()
        self._guard = _CloseGuard(self)
        napari_viewer.window._qt_window.installEventFilter(self._guard)
        self._on_labels_choice(self.labels.value)

    def _connect(self) -> None:
        for name, fn in self._actions().items():
            self.buttons[name].clicked.connect(fn)
        self.save_panel.save_button.clicked.connect(self.save)
        self.save_panel.decisions_button.clicked.connect(self.save_decisions)
        self.save_panel.refresh_button.clicked.connect(self.recompute)
        self.sort.changed.connect(lambda value: self.table.sort_by(SORT[value]))
        self.labels.changed.connect(self._on_labels_choice)
        self.table.chosen.connect(lambda cid: self.go_to(cid, select=False))
        for ev in (self.viewer.layers.events.inserted, self.viewer.layers.events.removed):
            ev.connect(self._refresh_choices)
        self.state.add_saver(self.save_pending, self.has_unsaved)
        self.state.subject_opened.connect(self._follow)
        self.state.cluster_requested.connect(self.go_to_voxel)
        self.state.predicted.connect(self._follow)

    # ------------------------------------------------------------------ keys
    def _actions(self):
        return {"accept": self.accept, "reject": self.reject, "next": self.next,
                "previous": self.previous, "undo": self.undo}

    def _bind_keys(self) -> None:
        """Bind the keys on the viewer (its canvas) and on the widget (with focus there)."""
        self._shortcuts = []
        for name, fn in self._actions().items():
            key = KEYS[name]
            ours = lambda _viewer, fn=fn: fn()  # noqa: E731
            self._keys[key] = (ours, self.viewer.bind_key(key, ours, overwrite=True))
            sc = QShortcut(QKeySequence(key.replace("-", "+")), self)
            sc.setContext(Qt.WidgetWithChildrenShortcut)
            sc.activated.connect(fn)
            self._shortcuts.append(sc)

    def unbind_keys(self) -> None:
        """Give the viewer's keys back: each binding ours replaced returns (or none).  A
        key bound again since (by another widget) keeps that binding."""
        for key, (ours, previous) in self._keys.items():
            current = self.viewer.bind_key(key, previous, overwrite=True)
            if current is not ours:
                self.viewer.bind_key(key, current, overwrite=True)
        self._keys = {}
        for sc in self._shortcuts:
            sc.setEnabled(False)
            sc.setParent(None)
        self._shortcuts = []

    def closeEvent(self, event):  # noqa: N802 (Qt's name)
        self._release()
        super().closeEvent(event)

    def event(self, event):
        if event.type() == QEvent.ParentChange:
            self._on_parent(self.parent())
        return super().event(event)

    def _on_parent(self, parent) -> None:
        """napari docks the widget (a dock becomes its parent), and takes a closed dock's
        widget out with setParent(None), without closing it."""
        if isinstance(parent, QDockWidget):
            parent.installEventFilter(self._guard)  # ask before the dock closes, too
            if not self._keys:
                self._bind_keys()
                self.viewer.window._qt_window.installEventFilter(self._guard)
            self._docked = True
        elif parent is None and self._docked:
            self._docked = False
            self._release()

    def _release(self) -> None:
        """The widget leaves the viewer: its keys and its close guard go too."""
        self.unbind_keys()
        try:
            self.viewer.window._qt_window.removeEventFilter(self._guard)
        except (AttributeError, RuntimeError):  # the viewer's window is gone already
            pass

    # ------------------------------------------------------------------ layers
    def _labels_choices(self, _=None) -> list:
        from napari.layers import Labels

        layers = [lay for lay in self.viewer.layers if isinstance(lay, Labels) and lay.ndim == 3
                  and role(lay, self.viewer) not in ("clusters", "regions")]
        # predictions and store subjects first, newest first
        layers.sort(key=lambda lay: "prediction" not in (lay.metadata or {}))
        return [(lay.name, lay) for lay in layers]

    def _refresh_choices(self, *_) -> None:
        self.nav.form.reset_choices()

    def _on_labels_choice(self, layer) -> None:
        if layer is self.layer:
            return
        if self.has_unsaved() and self.layer in self.viewer.layers and not self.confirm_close():
            self.labels.value = self.layer  # stay: the decisions would be lost otherwise
            return
        self.set_layer(layer)

    def _follow(self, layer) -> None:
        """Review a newly added prediction / subject, unless that would drop unsaved work."""
        from napari.utils.notifications import show_info

        if self.has_unsaved():
            show_info(f"review stays on {self.layer.name!r} (unsaved corrections); save them, "
                      f"then choose {layer.name!r}")
            return
        self.set_layer(layer)

    def set_layer(self, layer) -> None:
        """Review ``layer`` (a 3D Labels layer; None: nothing) from scratch."""
        if self.layer is not None and self.layer is not layer:
            self.layer.events.paint.disconnect(self._on_paint)
        self._watch(self.session, False)
        self.layer, self.session, self.current = layer, None, None
        self._decisions_only = False  # how this review was last saved
        self._cluster_ids = {}
        if layer is not None:
            if self.labels.value is not layer:
                self.labels.reset_choices()
                self.labels.value = layer
            if not isinstance(layer.data, np.ndarray) or not layer.data.flags.writeable:
                layer.data = np.array(layer.data)  # lazy store arrays are read-only: edit a copy
            affine, _ = geometry(layer)
            triage = ((layer.metadata or {}).get("prediction") or {}).get("triage")
            self.session = ReviewSession(layer.data, affine=affine, triage=triage,
                                         **self._linked(layer))
            self._watch(self.session, True)
            layer.events.paint.disconnect(self._on_paint)  # connected once, whatever happened
            layer.events.paint.connect(self._on_paint)
            meta = layer.metadata or {}
            if meta.get("store"):
                self.store.value = meta["store"]
            self.subject.value = meta.get("subject") or _subject_from(self._linked_layer("image"))
        self._fill_table()
        self.nav.show_progress(self.session)

    def _fill_table(self) -> None:
        """The table of the session, in the order chosen (the priority when the column
        it was sorted by has no values, as the baseline's uncertainty)."""
        self.nav.offer_sorts(self.session)
        if self.table.sort_key in MODEL_COLUMNS and not has_values(self.session,
                                                                    self.table.sort_key):
            self.table.sort_key, self.table.descending = SORT[self.sort.value], True
        self.table.fill(self.session)

    def _watch(self, session: ReviewSession | None, on: bool) -> None:
        """Listen to ``session``'s signals (or stop listening)."""
        if session is None:
            return
        for signal, slot in ((session.decided, self._on_decided),
                             (session.undone, self._on_decided),
                             (session.recomputed, self._on_recomputed),
                             (session.changed, self._on_changed)):
            signal.connect(slot) if on else signal.disconnect(slot)

    def _linked_layer(self, key: str, layer=None):
        """The layer that ``layer``'s (default: the reviewed one's) prediction metadata
        names under ``key``, when it is still open and on the same grid."""
        layer = self.layer if layer is None else layer
        if layer is None:
            return None
        name = ((layer.metadata or {}).get("prediction") or {}).get(key)
        other = self.viewer.layers[name] if name and name in self.viewer.layers else None
        return other if other is not None and other.data.shape == layer.data.shape else None

    def _linked(self, layer) -> dict:
        """Uncertainty, probability and regions on the labels' grid, when the layers exist."""
        out = {}
        for key in MAPS:
            other = self._linked_layer(key, layer)
            if other is not None:
                out[key] = np.asarray(other.data)
        return out

    def order(self) -> list[int]:
        """Cluster ids in the table's current (visual) order."""
        return self.table.order()

    # ------------------------------------------------------------------ session signals
    def _on_decided(self, cid: int, state: str) -> None:
        """A decision or its undo: the labels, the cluster map and the row follow."""
        self.layer.refresh()
        clusters = self._linked_layer("clusters")
        if clusters is not None:  # rejected clusters vanish from the coloured map as well
            idx = self.session.cluster_voxels(cid)
            flat = clusters.data.reshape(-1)
            if state == "rejected":
                # keep the map's own ids: they differ from the session's once the clusters
                # were recomputed after painting
                self._cluster_ids.setdefault(cid, flat[idx].copy())
                flat[idx] = 0
            elif cid in self._cluster_ids:
                flat[idx] = self._cluster_ids.pop(cid)
            clusters.refresh()
        self.table.show_status(cid)

    def _on_recomputed(self, _n: int) -> None:
        self.current = None
        self._cluster_ids = {}
        self._fill_table()

    def _on_changed(self) -> None:
        self.nav.show_progress(self.session)

    def _on_paint(self, event) -> None:
        if self.session is not None:
            # the session learns which voxels were painted, so that no decision overwrites them
            self.session.record_paint(*painted_voxels(event.value, self.layer.data.shape))
            # napari tells of the paint before it writes the voxels: count them after
            QTimer.singleShot(0, lambda: self.nav.show_progress(self.session))

    # ------------------------------------------------------------------ navigation
    def go_to_voxel(self, ijk) -> int | None:
        """Go to the cluster at voxel ``ijk`` of the reviewed labels (else the cluster whose
        centroid is nearest); returns its id, None without clusters."""
        s = self.session
        if s is None or not s.n:
            return None
        idx = tuple(int(round(float(v))) for v in ijk)
        inside = all(0 <= v < n for v, n in zip(idx, s.clusters.shape))
        cid = int(s.clusters[idx]) if inside else 0
        if not cid:
            cols = s.table.columns
            cen = np.stack([cols[f"centroid_{a}"] for a in "ijk"], 1)
            cid = int(cols["id"][int(np.argmin(((cen - np.asarray(idx)) ** 2).sum(1)))])
        self.go_to(cid)
        return cid

    def go_to(self, cid: int, select: bool = True) -> None:
        """Centre the viewer on cluster ``cid``, ring it and select its row."""
        s = self.session
        if s is None:
            return
        row = s.row(cid)
        ijk = [row[f"centroid_{a}"] for a in "ijk"]
        world = np.asarray(self.layer.data_to_world(ijk), float)
        self.current = int(cid)
        self.viewer.dims.set_point(range(len(world)), tuple(world))
        camera = self.viewer.scene.camera if hasattr(self.viewer, "scene") else self.viewer.camera
        camera.center = tuple(world[list(self.viewer.dims.displayed)])  # in displayed-axis order
        self._ring(world, max(6.0, 1.5 * float(row["length_mm"])))
        if select:
            self.table.select(cid)

    def _ring(self, world, size: float) -> None:
        name = "review: current cluster"
        if name in self.viewer.layers:
            ring = self.viewer.layers[name]
            ring.data = world[None]
            ring.size = size
        else:
            active = self.viewer.layers.selection.active
            self.viewer.add_points(world[None], name=name, size=size, symbol="ring",
                                   face_color="yellow", border_width=0, opacity=0.9)
            self.viewer.layers.selection.active = active  # keep painting on the labels

    def next(self) -> None:
        self._step(1)

    def previous(self) -> None:
        self._step(-1)

    def _step(self, step: int) -> None:
        if self.session is None:
            return
        cid = self.session.next_unreviewed(self.order(), self.current, step)
        if cid is not None:
            self.go_to(cid)

    # ------------------------------------------------------------------ decisions
    def accept(self) -> None:
        self._decide("accept")

    def reject(self) -> None:
        self._decide("reject")

    def _decide(self, what: str) -> None:
        if self.session is None:
            return
        if self.current is None:
            self.next()
            if self.current is None:
                return
        getattr(self.session, what)(self.current)  # the session's signals update the views
        self.next()

    def undo(self) -> None:
        if self.session is None:
            return
        cid = self.session.undo()
        if cid is not None:
            self.go_to(cid)

    def recompute(self) -> None:
        """Relabel the clusters of the labels as painted (the decisions made go)."""
        if self.session is not None:
            maps = self._linked(self.layer)
            self.session.recompute(**{key: maps.get(key) for key in MAPS})

    # ------------------------------------------------------------------ saving
    def has_unsaved(self) -> bool:
        return self.session is not None and self.session.dirty

    def save_decisions(self) -> bool:
        """Commit the decisions as a review-only store version (see :meth:`save`)."""
        return self.save(review_only=True)

    def save_pending(self) -> bool:
        """Save unsaved work (before retraining, or closing) the way this review was last
        saved: decisions only after Save decisions, else in full."""
        return self.save(review_only=self._decisions_only)

    def save(self, *, review_only: bool = False) -> bool:
        """Commit the labels as a new store version; False (with a notification) on failure.

        ``review_only`` saves only what was decided: the accepted and rejected clusters
        and the painted voxels (:meth:`napari_pvs.review.ReviewSession.save`).
        """
        from napari.utils.notifications import show_error, show_info

        if self.session is None:
            show_error("nothing to save: choose a labels layer to review first")
            return False
        path = self.store.path
        subject = str(self.subject.value).strip()
        if path is None or not subject:
            show_error("choose a store folder (*.pvs.zarr) and a subject id before saving")
            return False
        summary = self.session.summary()
        image = self._linked_layer("image")
        try:
            version = commit_review(self.session, self.layer, Path(path), subject, image=image,
                                    regions=self._linked(self.layer).get("regions"),
                                    review_only=review_only)
        except (PVSInputError, OSError, ValueError) as exc:
            show_error(f"corrections NOT saved ({exc}); they are still in the layer")
            return False
        self._decisions_only = review_only
        self.layer.metadata = {**(self.layer.metadata or {}), "store": path, "subject": subject,
                               "version": version}
        if image is not None:
            image.metadata = {**(image.metadata or {}), "store": path, "subject": subject}
        self.state.store = path
        show_info(f"saved {subject} v{version}{' (decisions only)' if review_only else ''}: "
                  f"{summary['clusters_rejected']} clusters rejected, "
                  f"{summary['clusters_accepted']} accepted, {summary['voxels_painted_manually']} "
                  "voxels painted")
        return True

    def confirm_close(self) -> bool:
        """Ask what to do with unsaved corrections; True lets the window close (or the
        review move to another layer)."""
        answer = QMessageBox.question(
            self, "napari-pvs: unsaved corrections",
            f"{self.counters.value}.\nSave them to the store before closing?",
            QMessageBox.Save | QMessageBox.Discard | QMessageBox.Cancel, QMessageBox.Save)
        if answer == QMessageBox.Save:
            return self.save_pending()
        return answer == QMessageBox.Discard


def _subject_from(layer) -> str:
    if layer is None:
        return ""
    name = re.sub(r"^sub-", "", layer.name.split(" ")[0])
    return re.sub(r"[^A-Za-z0-9]", "", name)[:40]
