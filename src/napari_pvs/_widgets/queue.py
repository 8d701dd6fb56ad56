"""Active-learning queue: the store's subjects, most uncertain first, or their clusters,
likeliest false positive first.

A thin layer over :mod:`napari_pvs.active`.  Ranking *subjects*, the table orders them by
the latest model's uncertainty (mean over clusters, or over the image) with their
status and the kind of their latest labels (full, review: cluster decisions only, or
none); "Open next" loads the first subject not yet corrected, with its prediction,
ready for the review widget.  Ranking *clusters*, the table lists the predicted clusters
of every subject not yet corrected, across subjects, by P(false positive) (the model's
triage classifier; the heuristic priority without one); "Open next" loads the subject
of the first one and the review widget goes to that cluster.  "Predict missing" runs the
model over subjects without its prediction, in the background.
"""

from __future__ import annotations

import math
from pathlib import Path

from magicgui.widgets import CheckBox, ComboBox, Container, Label, PushButton
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QAbstractItemView,
    QHeaderView,
    QProgressBar,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
)

from .._errors import PVSInputError
from ..active import predict_subjects, rank_clusters, rank_subjects
from ..store import CorrectionsStore
from ._common import StoreEdit, ViewerWidget
from ._layers import open_store_subject
from ._worker import start_worker

__all__ = ["QueueWidget"]

COLUMNS = [("subject", "subject"), ("site", "site"), ("status", "status"),
           ("versions", "versions"), ("uncertainty", "uncertainty"), ("clusters", "n_clusters"),
           ("labels", "labels")]
CLUSTER_COLUMNS = [("subject", "subject"), ("site", "site"), ("cluster", "cluster"),
                   ("P(FP)", "p_false_positive"), ("priority", "priority"),
                   ("voxels", "voxels"), ("region", "region")]
#: Clusters listed in the cluster ranking (the queue's head; "Open next" takes the first).
MAX_CLUSTER_ROWS = 500


class QueueWidget(ViewerWidget):
    """Rank store subjects by uncertainty and open the next one to correct."""

    def __init__(self, napari_viewer):
        super().__init__(napari_viewer)
        self.rows: list[dict] = []
        self._model: str | None = None  # whose predictions the rows rank
        self.worker = None
        self.store = StoreEdit(self.state)
        self.score = ComboBox(label="uncertainty", choices=["clusters", "image"], value="clusters",
                              tooltip="clusters: mean over predicted clusters; image: mean over WM+BG")
        self.rank = ComboBox(label="rank", choices=["subjects", "clusters"], value="subjects",
                             tooltip="subjects: by uncertainty; clusters: every predicted "
                                     "cluster of the subjects not yet corrected, likeliest "
                                     "false positive first")
        self.site_aware = CheckBox(text="new sites first", value=False,
                                   tooltip="subjects (or clusters) of the sites with the "
                                           "fewest corrected subjects first: a new scanner's "
                                           "scans before more of the sites already known")
        self.model = Label(value="model: none")
        self.refresh_button = PushButton(text="Refresh")
        self.predict_button = PushButton(text="Predict missing")
        self.open_button = PushButton(text="Open next most uncertain")
        self.form = Container(widgets=[self.store, self.rank, self.score, self.site_aware,
                                       self.model,
                                       Container(widgets=[self.refresh_button, self.predict_button],
                                                 layout="horizontal", labels=False),
                                       self.open_button])
        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels([c for c, _ in COLUMNS])
        self.table.setSelectionBehavior(QAbstractItemView.SelectRows)
        self.table.setEditTriggers(QAbstractItemView.NoEditTriggers)
        self.table.verticalHeader().setVisible(False)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeToContents)
        self.bar = QProgressBar()
        self.bar.setVisible(False)
        lay = QVBoxLayout(self)
        lay.addWidget(self.form.native)
        lay.addWidget(self.bar)
        lay.addWidget(self.table, 1)
        self.refresh_button.clicked.connect(self.refresh)
        self.predict_button.clicked.connect(self.predict_missing)
        self.open_button.clicked.connect(self.open_next)
        self.score.changed.connect(lambda _: self.refresh())
        self.rank.changed.connect(lambda _: self.refresh())
        self.site_aware.changed.connect(lambda _: self.refresh())
        self.table.cellDoubleClicked.connect(lambda r, _c: self.open_row(r))
        self.store.changed.connect(lambda _: self.refresh())
        self.state.model_registered.connect(lambda _: self.refresh())
        if self.state.store:
            self.refresh()

    def _open_store(self, writable: bool = False):
        from napari.utils.notifications import show_error

        path = self.store.path
        if path is None or not Path(path).is_dir():
            return None
        try:
            return CorrectionsStore.open(path, writable=writable, wait=5)
        except PVSInputError as exc:
            show_error(str(exc))
            return None

    @property
    def by_cluster(self) -> bool:
        return self.rank.value == "clusters"

    def refresh(self) -> list[dict]:
        """Re-rank the store's subjects (or clusters); returns the rows, the next first."""
        store = self._open_store()
        model = None if store is None else store.models.latest_id()
        self.score.enabled = not self.by_cluster
        self.open_button.text = ("Open next likeliest false positive" if self.by_cluster
                                 else "Open next most uncertain")
        if store is None:
            self.rows = []
        elif self.by_cluster:
            self.rows = rank_clusters(store, model, limit=MAX_CLUSTER_ROWS,
                                      site_aware=self.site_aware.value)
        else:
            self.rows = rank_subjects(store, by=self.score.value,
                                      site_aware=self.site_aware.value)
        self.model.value = f"model: {model or 'none registered'}"
        columns = CLUSTER_COLUMNS if self.by_cluster else COLUMNS
        t = self.table
        t.setColumnCount(len(columns))
        t.setHorizontalHeaderLabels([c for c, _ in columns])
        t.setRowCount(len(self.rows))
        for r, row in enumerate(self.rows):
            for c, (_, key) in enumerate(columns):
                v = row[key]
                nan = isinstance(v, float) and math.isnan(v)
                text = (("" if self.by_cluster else "not predicted") if nan
                        else f"{v:.4f}" if isinstance(v, float) else str(v))
                item = QTableWidgetItem(text)
                if isinstance(v, (int, float)):
                    item.setTextAlignment(Qt.AlignRight | Qt.AlignVCenter)
                t.setItem(r, c, item)
        self._model = model
        return self.rows

    def next_subject(self) -> str | None:
        """The most uncertain subject not yet corrected that has a prediction (ranking
        clusters: the subject of the likeliest false positive)."""
        if self.by_cluster:
            return self.rows[0]["subject"] if self.rows else None
        for row in self.rows:
            if row["status"] != "corrected" and not math.isnan(row["uncertainty"]):
                return row["subject"]
        return None

    def open_next(self):
        from napari.utils.notifications import show_info

        self.refresh()
        sid = self.next_subject()
        if sid is None:
            show_info("no predicted subject left to correct: run 'Predict missing' first, or "
                      "every subject is corrected")
            return None
        return self.open_row(0) if self.by_cluster else self.open(sid)

    def open_row(self, r: int):
        """Open row ``r``'s subject (and, ranking clusters, go to its cluster)."""
        row = self.rows[r]
        if not self.by_cluster:
            return self.open(row["subject"])
        layer = self.open(row["subject"])
        if layer is not None:
            ijk = tuple(row[f"centroid_{a}"] for a in "ijk")
            world = layer.data_to_world(ijk)
            self.viewer.dims.set_point(range(len(world)), tuple(world))
            self.state.cluster_requested.emit(ijk)
        return layer

    def open(self, subject: str):
        """Add the subject's layers (image, labels to correct, prediction); returns the labels layer."""
        store = self._open_store()
        if store is None:
            return None
        model = self._model or store.models.latest_id()
        layer = open_store_subject(self.viewer, store, subject, model)
        self.state.subject_opened.emit(layer)
        return layer

    def predict_missing(self):
        """Predict every subject lacking the latest model's prediction; returns the worker."""
        from napari.utils.notifications import show_error, show_info

        store = self._open_store()
        latest = None if store is None else store.models.latest()
        if latest is None:
            show_error("the store has no registered model yet: retrain first")
            return None
        path = str(store.path)

        def job():
            with CorrectionsStore.open(path, writable=True, wait=10) as st:
                return (yield from predict_subjects(st, latest["id"]))

        self.bar.setVisible(True)
        self.predict_button.enabled = False
        self.worker = start_worker(
            job, yielded=lambda p: (self.bar.setRange(0, max(p.total, 1)), self.bar.setValue(p.done)),
            returned=lambda done: (show_info(f"predicted {len(done)} subject(s)"), self.refresh()),
            errored=lambda exc: show_error(f"prediction failed: {exc}"), finished=self._finished)
        return self.worker

    def _finished(self) -> None:
        self.worker = None
        self.bar.setVisible(False)
        self.predict_button.enabled = True
