"""Review widget: triage the predicted PVS clusters one by one.

A thin layer over :class:`napari_pvs.review.ReviewSession`: the table lists the
clusters of the chosen labels layer (sortable by uncertainty, size, probability or
region); selecting a row moves the viewer to the cluster and rings it; Accept, Reject
(erases the cluster from the labels), Previous, Next and Undo have keys that napari's
Labels layer does not use.  Manual painting in the labels layer counts as a
correction.  Save commits the labels as a new version of the store subject, with the
edit summary and every decision as an event.  Closing napari with unsaved
corrections asks first.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from magicgui.widgets import ComboBox, Container, FileEdit, Label, LineEdit, PushButton
from qtpy.QtCore import QEvent, QObject, Qt
from qtpy.QtGui import QKeySequence
from qtpy.QtWidgets import (
    QAbstractItemView,
    QHeaderView,
    QMessageBox,
    QShortcut,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from ._layers import geometry, user
from ._state import state_for

__all__ = ["KEYS", "ReviewWidget"]

# napari's Labels layer uses 1-7, E, P, F, L, Z, X, B, M and more: these are free
KEYS = {"accept": "K", "reject": "J", "previous": "Shift-N", "next": "N", "undo": "U"}
SORT = {"priority": "priority", "uncertainty": "unc_mean", "size": "voxels",
        "probability": "prob_mean", "region": "region"}
COLUMNS = [("cluster", "id"), ("status", None), ("voxels", "voxels"), ("uncertainty", "unc_mean"),
           ("probability", "prob_mean"), ("region", "region"), ("length mm", "length_mm"),
           ("priority", "priority")]
STATUS_COLOUR = {"accepted": "#2e7d32", "rejected": "#c62828"}


def _fmt(v) -> str:
    if isinstance(v, float):
        return "" if np.isnan(v) else f"{v:.3f}"
    return str(v)


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


class ReviewWidget(QWidget):
    """Accept / reject clusters of a PVS labels layer and save them to the store."""

    def __init__(self, napari_viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.state = state_for(napari_viewer)
        self.session = None
        self.layer = None
        self.current: int | None = None
        self.labels = ComboBox(label="labels", choices=self._labels_choices)
        self.sort = ComboBox(label="sort by", choices=list(SORT), value="priority")
        self.store = FileEdit(label="store", mode="d", value=self.state.store or "")
        self.subject = LineEdit(label="subject")
        self.counter = Label(value="reviewed 0 of 0")
        self.edits = Label(value="")
        for lab in (self.counter, self.edits):
            lab.native.setWordWrap(True)
            lab.native.setAlignment(Qt.AlignLeft | Qt.AlignVCenter)
        b = {name: PushButton(text=f"{name.capitalize()} [{key.replace('-', '+')}]")
             for name, key in KEYS.items()}
        self.buttons = b
        self.save_button = PushButton(text="Save corrections to store")
        self.refresh_button = PushButton(text="Recompute clusters")
        self.form = Container(widgets=[
            self.labels, self.sort,
            Container(widgets=[b["previous"], b["next"]], layout="horizontal", labels=False),
            Container(widgets=[b["accept"], b["reject"], b["undo"]], layout="horizontal",
                      labels=False),
            self.counter, self.edits], labels=True)
        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels([c for c, _ in COLUMNS])
        self.table.setSelectionBehavior(QAbstractItemView.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SingleSelection)
        self.table.setEditTriggers(QAbstractItemView.NoEditTriggers)
        self.table.verticalHeader().setVisible(False)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeToContents)
        self.table.horizontalHeader().sectionClicked.connect(self._on_header)
        self._descending = True
        self.table.setMinimumHeight(220)
        self.save_form = Container(widgets=[self.store, self.subject, self.save_button,
                                            self.refresh_button])
        lay = QVBoxLayout(self)
        lay.addWidget(self.form.native)
        lay.addWidget(self.table, 1)
        lay.addWidget(self.save_form.native)

        b["accept"].clicked.connect(self.accept)
        b["reject"].clicked.connect(self.reject)
        b["next"].clicked.connect(self.next)
        b["previous"].clicked.connect(self.previous)
        b["undo"].clicked.connect(self.undo)
        self.save_button.clicked.connect(self.save)
        self.refresh_button.clicked.connect(lambda: self.set_layer(self.layer, keep_edits=True))
        self.sort.changed.connect(self._on_sort_choice)
        self.labels.changed.connect(self._on_labels_choice)
        self.table.itemSelectionChanged.connect(self._on_row)
        self.store.changed.connect(lambda v: setattr(self.state, "store", str(v) if str(v) not in
                                                     ("", ".") else None))
        for ev in (napari_viewer.layers.events.inserted, napari_viewer.layers.events.removed):
            ev.connect(self._refresh_choices)
        self.state.store_changed.connect(self._on_store)
        self.state.add_saver(self.save, self.has_unsaved)
        self.state.subject_opened.connect(self._follow)
        self.state.predicted.connect(self._follow)
        self._bind_keys()
        self._guard = _CloseGuard(self)
        napari_viewer.window._qt_window.installEventFilter(self._guard)
        self._on_labels_choice(self.labels.value)

    # ------------------------------------------------------------------ keys
    def _actions(self):
        return {"accept": self.accept, "reject": self.reject, "next": self.next,
                "previous": self.previous, "undo": self.undo}

    def _bind_keys(self) -> None:
        self._shortcuts = []
        for name, fn in self._actions().items():
            key = KEYS[name]
            self.viewer.bind_key(key, lambda _v, fn=fn: fn(), overwrite=True)
            sc = QShortcut(QKeySequence(key.replace("-", "+")), self)
            sc.setContext(Qt.WidgetWithChildrenShortcut)
            sc.activated.connect(fn)
            self._shortcuts.append(sc)

    def unbind_keys(self) -> None:
        for key in KEYS.values():
            self.viewer.bind_key(key, None)

    # ------------------------------------------------------------------ layers
    def _labels_choices(self, _=None) -> list:
        from napari.layers import Labels

        layers = [lay for lay in self.viewer.layers if isinstance(lay, Labels) and lay.ndim == 3
                  and not lay.name.endswith(" clusters") and "region" not in lay.name.lower()]
        # predictions and store subjects first, newest first
        layers.sort(key=lambda lay: "prediction" not in (lay.metadata or {}))
        return [(lay.name, lay) for lay in layers]

    def _refresh_choices(self, *_) -> None:
        self.form.reset_choices()

    def _on_store(self, path: str) -> None:
        if str(self.store.value) != path and path:
            self.store.value = path

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

    def set_layer(self, layer, keep_edits: bool = False) -> None:
        """Review ``layer`` (a 3D Labels layer); with ``keep_edits`` the pending events stay."""
        from ..review import ReviewSession

        old = self.session if keep_edits else None
        if self.layer is not None and self.layer is not layer:
            self.layer.events.paint.disconnect(self._on_paint)
        self.layer, self.session, self.current = layer, None, None
        self._cluster_ids: dict[int, np.ndarray] = {}  # cluster map values of rejected clusters
        if layer is None:
            self._fill_table()
            return
        if self.labels.value is not layer:
            self.labels.reset_choices()
            self.labels.value = layer
        if not isinstance(layer.data, np.ndarray) or not layer.data.flags.writeable:
            layer.data = np.array(layer.data)  # lazy store arrays are read-only: edit a copy
        maps = self._linked(layer)
        affine, _ = geometry(layer)
        self.session = ReviewSession(layer.data, affine=affine, **maps)
        if old is not None:
            self.session.events, self.session.painted = old.events, old.painted
            self.session.dirty = old.dirty
        layer.events.paint.disconnect(self._on_paint)  # connected once, whatever happened before
        layer.events.paint.connect(self._on_paint)
        meta = layer.metadata or {}
        if meta.get("store"):
            self.store.value = meta["store"]
        self.subject.value = meta.get("subject") or _subject_from(self._image_layer())
        self._fill_table()

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
        for key in ("probability", "uncertainty", "regions"):
            other = self._linked_layer(key, layer)
            if other is not None:
                out[key] = np.asarray(other.data)
        return out

    def _image_layer(self):
        return self._linked_layer("image")

    # ------------------------------------------------------------------ table
    def _fill_table(self) -> None:
        t = self.table
        t.blockSignals(True)
        t.setRowCount(0)
        self._status_items = {}
        if self.session is not None:
            s = self.session
            key = self._sort_key()
            ids = s.order(key, descending=self._descending)
            t.setRowCount(len(ids))
            for r, cid in enumerate(ids):
                row = s.row(cid)
                for c, (_, col) in enumerate(COLUMNS):
                    value = s.decisions.get(cid, "") if col is None else row[col]
                    item = QTableWidgetItem(_fmt(value))
                    if c == 0:
                        item.setData(Qt.UserRole, int(cid))
                    if col is None:
                        self._status_items[cid] = item
                    t.setItem(r, c, item)
                self._paint_status(cid)
        t.blockSignals(False)
        self._update_counter()

    def _sort_key(self) -> str:
        return getattr(self, "_header_key", None) or SORT[self.sort.value]

    def _on_sort_choice(self, value) -> None:
        self._header_key = None
        self._descending = value != "region"
        self._fill_table()

    def _on_header(self, column: int) -> None:
        """A click on a column header sorts by it; a second click reverses the order."""
        key = COLUMNS[column][1]
        if key is None:
            return
        self._descending = not self._descending if key == self._sort_key() else key != "region"
        self._header_key = key
        self._fill_table()

    def order(self) -> list[int]:
        """Cluster ids in the table's current (visual) order."""
        return [int(self.table.item(r, 0).data(Qt.UserRole)) for r in range(self.table.rowCount())]

    def _paint_status(self, cid: int) -> None:
        from qtpy.QtGui import QColor

        item = self._status_items.get(cid)
        if item is None:
            return
        status = self.session.decisions.get(cid, "")
        item.setText(status)
        item.setForeground(QColor(STATUS_COLOUR.get(status, "#dddddd")))

    def _update_counter(self) -> None:
        s = self.session
        if s is None:
            self.counter.value = "no labels layer to review"
            self.edits.value = ""
            return
        self.counter.value = f"reviewed {s.reviewed} of {s.n}"
        sm = s.summary()
        self.edits.value = (f"{sm['clusters_rejected']} rejected, {sm['clusters_accepted']} accepted, "
                            f"{sm['voxels_painted_manually']} voxels painted"
                            + (" (unsaved)" if s.dirty else ""))

    def _on_row(self) -> None:
        rows = self.table.selectionModel().selectedRows()
        if rows:
            self.go_to(int(self.table.item(rows[0].row(), 0).data(Qt.UserRole)), select=False)

    # ------------------------------------------------------------------ navigation
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
            for r in range(self.table.rowCount()):
                if int(self.table.item(r, 0).data(Qt.UserRole)) == cid:
                    self.table.blockSignals(True)
                    self.table.selectRow(r)
                    self.table.blockSignals(False)
                    self.table.scrollToItem(self.table.item(r, 0))
                    break

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
        cid = self.current
        getattr(self.session, what)(cid)
        self._sync_layers(cid)
        self.next()

    def undo(self) -> None:
        if self.session is None:
            return
        cid = self.session.undo()
        if cid is not None:
            self._sync_layers(cid)
            self.go_to(cid)

    def _sync_layers(self, cid: int) -> None:
        self.layer.refresh()
        clusters = self._linked_layer("clusters")
        if clusters is not None:  # rejected clusters vanish from the coloured map as well
            idx = self.session.cluster_voxels(cid)
            flat = clusters.data.reshape(-1)
            if self.session.decisions.get(cid) == "rejected":
                # keep the map's own ids: they differ from the session's once the clusters
                # were recomputed after painting
                self._cluster_ids.setdefault(cid, flat[idx].copy())
                flat[idx] = 0
            elif cid in self._cluster_ids:
                flat[idx] = self._cluster_ids.pop(cid)
            clusters.refresh()
        self._paint_status(cid)
        self._update_counter()

    def _on_paint(self, event) -> None:
        if self.session is None:
            return
        from ..review import painted_voxels

        # the session learns which voxels were painted, so that no decision overwrites them
        voxels, value = painted_voxels(event.value, self.layer.data.shape)
        if self.session.record_paint(voxels, value) is not None:
            self._update_counter()

    # ------------------------------------------------------------------ saving
    def has_unsaved(self) -> bool:
        return self.session is not None and self.session.dirty

    def save(self) -> bool:
        """Commit the labels as a new store version; False (with a notification) on failure."""
        from napari.utils.notifications import show_error, show_info

        from .._errors import PVSInputError
        from ..store import CorrectionsStore

        if self.session is None:
            show_error("nothing to save: choose a labels layer to review first")
            return False
        path = Path(str(self.store.value)) if str(self.store.value) not in ("", ".") else None
        subject = str(self.subject.value).strip()
        if path is None or not subject:
            show_error("choose a store folder (*.pvs.zarr) and a subject id before saving")
            return False
        try:
            if not (path / "zarr.json").is_file():
                CorrectionsStore.create(path).close()
            with CorrectionsStore.open(path, writable=True, wait=5) as store:
                if subject not in store.subjects():
                    self._add_subject(store, subject)
                affine, _ = geometry(self.layer)
                summary = self.session.summary()
                version = self.session.save(store, subject, author=user(), affine=affine,
                                            image_sha256=(self.layer.metadata or {}).get("sha256"))
        except (PVSInputError, OSError, ValueError) as exc:
            show_error(f"corrections NOT saved ({exc}); they are still in the layer")
            return False
        meta = dict(self.layer.metadata or {})
        meta.update({"store": str(path), "subject": subject, "version": version})
        self.layer.metadata = meta
        image = self._image_layer()
        if image is not None and image.data.shape == self.layer.data.shape:
            image.metadata = {**(image.metadata or {}), "store": str(path), "subject": subject}
        self.state.store = str(path)
        self._update_counter()
        show_info(f"saved {subject} v{version}: {summary['clusters_rejected']} clusters rejected, "
                  f"{summary['clusters_accepted']} accepted, {summary['voxels_painted_manually']} "
                  "voxels painted")
        return True

    def _add_subject(self, store, subject: str) -> None:
        from .._errors import PVSInputError
        from ..io import Volume

        image = self._image_layer()
        if image is None or image.data.shape != self.layer.data.shape:
            raise PVSInputError(f"subject {subject!r} is not in {store.path} and the image these "
                                "labels were drawn on is not open; add it with `napari-pvs store "
                                "import` first")
        affine, spacing = geometry(image)
        meta = image.metadata or {}
        regions = self._linked(self.layer).get("regions")
        from ._layers import modality

        store.add_subject(subject, Volume(np.asarray(image.data, np.float32), affine, spacing,
                                          sha256=meta.get("sha256")),
                          site=str(meta.get("site") or "unknown"), modality=modality(image),
                          regions=None if regions is None else regions.astype(np.uint8))

    def confirm_close(self) -> bool:
        """Ask what to do with unsaved corrections; True lets the window close (or the
        review move to another layer)."""
        answer = QMessageBox.question(
            self, "napari-pvs: unsaved corrections",
            f"{self.edits.value}.\nSave them to the store before closing?",
            QMessageBox.Save | QMessageBox.Discard | QMessageBox.Cancel, QMessageBox.Save)
        if answer == QMessageBox.Save:
            return self.save()
        return answer == QMessageBox.Discard

    def showEvent(self, event):  # noqa: N802 (Qt's name)
        dock = self.parent()
        if dock is not None and not getattr(self, "_dock_guarded", False):
            dock.installEventFilter(self._guard)
            self._dock_guarded = True
        super().showEvent(event)


def _subject_from(layer) -> str:
    if layer is None:
        return ""
    name = re.sub(r"^sub-", "", layer.name.split(" ")[0])
    return re.sub(r"[^A-Za-z0-9]", "", name)[:40]
