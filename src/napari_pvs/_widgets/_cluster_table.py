"""The review widget's cluster table: one row per cluster of a review session."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from qtpy.QtCore import QSize, Qt, Signal
from qtpy.QtGui import QColor
from qtpy.QtWidgets import QAbstractItemView, QHeaderView, QTableWidget, QTableWidgetItem

if TYPE_CHECKING:
    from ..review import ReviewSession

__all__ = ["COLUMNS", "MODEL_COLUMNS", "ClusterTable", "has_values"]

# (header, table column, header tooltip); short headers keep every column readable at
# the dock's width, the tooltips say what they are
COLUMNS = [("cluster", "id", "cluster id"),
           ("status", None, "your decision: accepted or rejected"),
           ("voxels", "voxels", "cluster size in voxels"),
           ("unc.", "unc_mean", "mean uncertainty of the model over the cluster (0-1)"),
           ("prob.", "prob_mean", "mean PVS probability over the cluster (0-1)"),
           ("region", "region", "WM (white matter), BG (basal ganglia) or other"),
           ("mm", "length_mm", "cluster length in mm"),
           ("P(FP)", "p_false_positive", "P(false positive) from the model's fitted triage "
            "classifier (empty: the model has none)"),
           ("priority", "priority", "review priority: P(FP) when the model has a triage "
            "classifier, else a heuristic; the most doubtful clusters first")]
# the columns only a network's prediction fills (NaN for the Frangi baseline, and
# p_false_positive for a model without a triage classifier): hidden when no cluster has
# a value
MODEL_COLUMNS = ("unc_mean", "prob_mean", "p_false_positive")
DECIMALS = {"length_mm": 1}
STATUS_COLOUR = {"accepted": "#2e7d32", "rejected": "#c62828"}


def has_values(session: ReviewSession | None, col: str) -> bool:
    """Whether some cluster of ``session`` has a value in table column ``col`` (True
    without clusters: nothing to judge by).  The Frangi baseline has no probability and
    no uncertainty."""
    if session is None or not session.n:
        return True
    return bool(np.any(~np.isnan(np.asarray(session.table.columns[col], float))))


def _fmt(v, col: str | None = None) -> str:
    if isinstance(v, float):
        return "" if np.isnan(v) else f"{v:.{DECIMALS.get(col, 2)}f}"
    return str(v)


class ClusterTable(QTableWidget):
    """The clusters of a :class:`~napari_pvs.review.ReviewSession`, sorted by a column.

    A click on a column header sorts by it, a second click reverses the order.
    ``chosen(int)`` is emitted when the reviewer selects a cluster's row.
    """

    chosen = Signal(int)

    def __init__(self):
        super().__init__(0, len(COLUMNS))
        for c, (header, _, tip) in enumerate(COLUMNS):
            item = QTableWidgetItem(header)
            item.setToolTip(tip)
            self.setHorizontalHeaderItem(c, item)
        self.setSelectionBehavior(QAbstractItemView.SelectRows)
        self.setSelectionMode(QAbstractItemView.SingleSelection)
        self.setEditTriggers(QAbstractItemView.NoEditTriggers)
        self.verticalHeader().setVisible(False)
        header = self.horizontalHeader()
        header.setSectionResizeMode(QHeaderView.ResizeToContents)
        # the status column is as wide as its longest word from the start, so that the
        # first decision does not widen the table
        header.setSectionResizeMode(1, QHeaderView.Fixed)
        header.resizeSection(1, max(header.sectionSizeHint(1),
                                    self.fontMetrics().horizontalAdvance("rejected") + 16))
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
            for c, (_, col, _tip) in enumerate(COLUMNS):
                item = QTableWidgetItem("" if col is None else _fmt(row[col], col))
                if c == 0:
                    item.setData(Qt.UserRole, int(cid))
                if col is None:
                    self._status[cid] = item
                self.setItem(r, c, item)
            self.show_status(cid)
        for c, (_, col, _tip) in enumerate(COLUMNS):
            self.setColumnHidden(c, col in MODEL_COLUMNS and not has_values(session, col))
        self.blockSignals(False)
        # never narrower than its columns: the dock widens when a MedNeXt prediction adds
        # unc. and prob. to the baseline's columns, instead of hiding the last behind a
        # scroll bar
        self.setMinimumWidth(self.columns_width())
        self.updateGeometry()

    def columns_width(self) -> int:
        """The width the visible columns need, with the frame and the scroll bar."""
        header = self.horizontalHeader()
        width = sum(max(header.sectionSizeHint(c), self.sizeHintForColumn(c), header.sectionSize(c))
                    for c in range(self.columnCount()) if not self.isColumnHidden(c))
        return width + 2 * self.frameWidth() + self.verticalScrollBar().sizeHint().width()

    def sizeHint(self) -> QSize:  # noqa: N802 (Qt's name)
        """Wide enough for every visible column: the dock opens at that width."""
        hint = super().sizeHint()
        return QSize(max(hint.width(), self.columns_width()), hint.height())

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
