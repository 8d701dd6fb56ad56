"""Active-learning queue: the store's subjects, most uncertain first.

A thin layer over :mod:`napari_pvs.active`.  The table ranks subjects by the latest
model's uncertainty (mean over clusters, or over the image) with their status and the
kind of their latest labels (full, review: cluster decisions only, or none);
"Predict missing" runs the model over subjects without its prediction, in the
background; "Open next most uncertain" loads the first subject not yet corrected, with
its prediction, ready for the review widget.
"""

from __future__ import annotations

import math
from pathlib import Path

from magicgui.widgets import ComboBox, Container, Label, PushButton
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
from ..active import predict_subjects, rank_subjects
from ..store import CorrectionsStore
from ._common import StoreEdit, ViewerWidget
from ._layers import open_store_subject
from ._worker import start_worker

__all__ = ["QueueWidget"]

COLUMNS = [("subject", "subject"), ("site", "site"), ("status", "status"),
           ("versions", "versions"), ("uncertainty", "uncertainty"), ("clusters", "n_clusters"),
           ("labels", "labels")]


class QueueWidget(ViewerWidget):
    """Rank store subjects by uncertainty and open the next one to correct."""

    def __init__(self, napari_viewer):
        super().__init__(napari_viewer)
        self.rows: list[dict] = []
        self.worker = None
        self.store = StoreEdit(self.state)
        self.score = ComboBox(label="uncertainty", choices=["clusters", "image"], value="clusters",
                              tooltip="clusters: mean over predicted clusters; image: mean over WM+BG")
        self.model = Label(value="model: none")
        self.refresh_button = PushButton(text="Refresh")
        self.predict_button = PushButton(text="Predict missing")
        self.open_button = PushButton(text="Open next most uncertain")
        self.form = Container(widgets=[self.store, self.score, self.model,
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
        self.table.cellDoubleClicked.connect(lambda r, _c: self.open(self.rows[r]["subject"]))
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

    def refresh(self) -> list[dict]:
        """Re-rank the store's subjects; returns the rows, the one to correct next first."""
        store = self._open_store()
        self.rows = [] if store is None else rank_subjects(store, by=self.score.value)
        model = self.rows[0]["model_id"] if self.rows else None
        self.model.value = f"model: {model or 'none registered'}"
        t = self.table
        t.setRowCount(len(self.rows))
        for r, row in enumerate(self.rows):
            for c, (_, key) in enumerate(COLUMNS):
                v = row[key]
                text = ("not predicted" if isinstance(v, float) and math.isnan(v)
                        else f"{v:.4f}" if isinstance(v, float) else str(v))
                item = QTableWidgetItem(text)
                if key == "uncertainty":
                    item.setTextAlignment(Qt.AlignRight | Qt.AlignVCenter)
                t.setItem(r, c, item)
        return self.rows

    def next_subject(self) -> str | None:
        """The most uncertain subject not yet corrected that has a prediction."""
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
        return self.open(sid)

    def open(self, subject: str):
        """Add the subject's layers (image, labels to correct, prediction); returns the labels layer."""
        store = self._open_store()
        if store is None:
            return None
        model = next((r["model_id"] for r in self.rows), None)
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
