"""The review widget's cluster table: one row per cluster of a review session."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from qtpy.QtCore import Qt, Signal
from qtpy.QtGui import QColor
from qtpy.QtWidgets import QAbstractItemView, QHeaderView, QTableWidget, QTableWidgetItem

if TYPE_CHECKING:
    from ..review import ReviewSession

__all__ = ["COLUMNS", "ClusterTable"]

COLUMNS = [("cluster", "id"), ("status", None), ("voxels", "voxels"), ("uncertainty", "unc_mean"),
           ("probability", "prob_mean"), ("region", "region"), ("length mm", "length_mm"),
           ("priority", "priority")]
STATUS_COLOUR = {"accepted": "#2e7d32", "rejected": "#c62828"}


def _fmt(v) -> str:
    if isinstance(v, float):
        return "" if np.isnan(v) else f"{v:.3f}"
    return str(v)


class ClusterTable(QTableWidget):
    """The clusters of a :class:`~napari_pvs.review.ReviewSession`, sorted by a column.

    A click on a column header sorts by it, a second click reverses the order.
    ``chosen(int)`` is emitted when the reviewer selects a cluster's row.
    """

    chosen = Signal(int)

    def __init__(self):
        super().__init__(0, len(COLUMNS))
        self.setHorizontalHeaderLabels([c for c, _ in COLUMNS])
        self.setSelectionBehavior(QAbstractItemView.SelectRows)
        self.setSelectionMode(QAbstractItemView.SingleSelection)
        self.setEditTriggers(QAbstractItemView.NoEditTriggers)
        self.verticalHeader().setVisible(False)
        self.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeToContents)
        self.setMinimumHeight(220)
        self.session: ReviewSession | None = None
        self.sort_key, self.descending = "priority", True
        self._status: dict[int, QTableWidgetItem] = {}
        self.horizontalHeader().sectionClicked.connect(self._on_header)
        self.itemSelectionChanged.connect(self._on_row)

    def sort_by(self, key: str, descending: bool | None = None) -> None:
        """Sort by table column ``key`` (descending by default, except the region)."""
        self.sort_key = key
        self.descending = key != "region" if descending is None else descending
        self.fill(self.session)

    def _on_header(self, column: int) -> None:
        key = COLUMNS[column][1]
        if key is not None:
            self.sort_by(key, not self.descending if key == self.sort_key else None)

    def fill(self, session: ReviewSession | None) -> None:
        """One row per cluster of ``session`` (none without one), in the current order."""
        self.session = session
        self.blockSignals(True)
        self.setRowCount(0)
        self._status = {}
        ids = [] if session is None else session.order(self.sort_key, self.descending)
        self.setRowCount(len(ids))
        for r, cid in enumerate(ids):
            row = session.row(cid)
            for c, (_, col) in enumerate(COLUMNS):
                item = QTableWidgetItem("" if col is None else _fmt(row[col]))
                if c == 0:
                    item.setData(Qt.UserRole, int(cid))
                if col is None:
                    self._status[cid] = item
                self.setItem(r, c, item)
            self.show_status(cid)
        self.blockSignals(False)

    def show_status(self, cid: int) -> None:
        """Show cluster ``cid``'s decision, coloured."""
        item = self._status.get(cid)
        if item is None:
            return
        status = self.session.decisions.get(cid, "")
        item.setText(status)
        item.setForeground(QColor(STATUS_COLOUR.get(status, "#dddddd")))

    def order(self) -> list[int]:
        """Cluster ids in the table's current (visual) order."""
        return [int(self.item(r, 0).data(Qt.UserRole)) for r in range(self.rowCount())]

    def select(self, cid: int) -> None:
        """Select and show cluster ``cid``'s row, without emitting ``chosen``."""
        for r, other in enumerate(self.order()):
            if other == cid:
                self.blockSignals(True)
                self.selectRow(r)
                self.blockSignals(False)
                self.scrollToItem(self.item(r, 0))
                break

    def _on_row(self) -> None:
        rows = self.selectionModel().selectedRows()
        if rows:
            self.chosen.emit(int(self.item(rows[0].row(), 0).data(Qt.UserRole)))
