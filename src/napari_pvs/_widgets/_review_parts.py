"""The review widget's navigation bar and save panel (the table: ``_cluster_table``).

The parts only lay out controls; :class:`~napari_pvs._widgets.review.ReviewWidget`
connects them to a review session.  :func:`commit_review` is the save panel's job:
the reviewed labels become a new version of a store subject.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from magicgui.widgets import ComboBox, Container, LineEdit, PushButton
from qtpy.QtCore import Qt
from qtpy.QtWidgets import QGridLayout, QLabel, QVBoxLayout, QWidget

from .._errors import PVSInputError
from ..io import Volume
from ..store import CorrectionsStore
from ._cluster_table import MODEL_COLUMNS, STATUS_COLOUR, has_values
from ._common import StoreEdit
from ._layers import geometry, modality, user

if TYPE_CHECKING:
    from ..review import ReviewSession
    from ._state import ViewerState

__all__ = ["KEYS", "SORT", "Counters", "NavigationBar", "SavePanel", "commit_review"]

# napari's Labels layer uses 1-7, E, P, F, L, Z, X, B, M and more: these are free
KEYS = {"accept": "K", "reject": "J", "previous": "Shift-N", "next": "N", "undo": "U"}
SORT = {"priority": "priority", "uncertainty": "unc_mean", "size": "voxels",
        "probability": "prob_mean", "region": "region"}


def _form(widget: QWidget, container: Container) -> None:
    lay = QVBoxLayout(widget)
    lay.setContentsMargins(0, 0, 0, 0)
    lay.addWidget(container.native)


class NavigationBar(QWidget):
    """The labels layer and the order to review, the Previous / Next / Accept / Reject /
    Undo buttons (each with its key) and the review's progress."""

    def __init__(self, labels_choices):
        super().__init__()
        self.labels = ComboBox(label="labels", choices=labels_choices)
        self.sort = ComboBox(label="sort by", choices=list(SORT), value="priority")
        self.buttons = {name: PushButton(text=f"{name.capitalize()} [{key.replace('-', '+')}]")
                        for name, key in KEYS.items()}
        b = self.buttons
        self.form = Container(widgets=[
            self.labels, self.sort,
            Container(widgets=[b["previous"], b["next"]], layout="horizontal", labels=False),
            Container(widgets=[b["accept"], b["reject"], b["undo"]], layout="horizontal",
                      labels=False)], labels=True)
        self.counters = Counters()
        _form(self, self.form)
        self.layout().addWidget(self.counters)

    def offer_sorts(self, session: ReviewSession | None) -> None:
        """Offer the orders ``session`` has values for (no uncertainty or probability for
        the Frangi baseline)."""
        keys = [k for k, col in SORT.items() if col not in MODEL_COLUMNS or has_values(session, col)]
        if list(self.sort.choices) != keys:
            value = self.sort.value if self.sort.value in keys else "priority"
            with self.sort.changed.blocked():
                self.sort.choices = keys
                self.sort.value = value

    def show_progress(self, session: ReviewSession | None) -> None:
        """The counters of ``session`` (decisions, painted voxels, unsaved or not)."""
        self.counters.display(session)


class Counters(QWidget):
    """The review's progress as a small grid: numbers over their captions, one column
    each (reviewed, accepted, rejected, voxels painted, unsaved)."""

    CAPTIONS = {"reviewed": "reviewed", "accepted": "accepted", "rejected": "rejected",
                "fp_left": "FP left", "painted": "voxels painted", "unsaved": "unsaved"}

    def __init__(self):
        super().__init__()
        grid = QGridLayout(self)
        grid.setContentsMargins(0, 4, 0, 4)
        grid.setVerticalSpacing(0)
        self.cells: dict[str, QLabel] = {}
        for c, (key, caption) in enumerate(self.CAPTIONS.items()):
            value, cap = QLabel(""), QLabel(caption)
            value.setAlignment(Qt.AlignCenter)
            cap.setAlignment(Qt.AlignCenter)
            font = value.font()
            font.setBold(True)
            value.setFont(font)
            small = cap.font()
            small.setPointSizeF(small.pointSizeF() * 0.85)
            cap.setFont(small)
            cap.setStyleSheet("color: #9aa0a6")
            grid.addWidget(value, 0, c)
            grid.addWidget(cap, 1, c)
            self.cells[key] = value
        self.value = ""
        self.display(None)

    def display(self, session: ReviewSession | None) -> None:
        """Show ``session``'s counts (dashes without a session); ``value`` says them in words."""
        if session is None:
            for cell in self.cells.values():
                cell.setText("-")
            self.value = "no labels layer to review"
            self.setToolTip(self.value)
            return
        sm = session.summary()
        left = session.expected_false_positives()
        counts = {"reviewed": f"{session.reviewed} / {session.n}",
                  "accepted": str(sm["clusters_accepted"]),
                  "rejected": str(sm["clusters_rejected"]),
                  "fp_left": "-" if left is None else f"{left:.0f}",
                  "painted": str(sm["voxels_painted_manually"]),
                  "unsaved": "yes" if session.dirty else "no"}
        for key, text in counts.items():
            self.cells[key].setText(text)
        self.cells["accepted"].setStyleSheet(f"color: {STATUS_COLOUR['accepted']}")
        self.cells["rejected"].setStyleSheet(f"color: {STATUS_COLOUR['rejected']}")
        self.cells["unsaved"].setStyleSheet("color: #ef6c00" if session.dirty else "")
        self.value = (f"reviewed {session.reviewed} of {session.n}: {counts['accepted']} accepted, "
                      f"{counts['rejected']} rejected, {counts['painted']} voxels painted"
                      + ("" if left is None else
                         f"; expected false positives left: {left:.0f}")
                      + (" (unsaved)" if session.dirty else ""))
        self.setToolTip(self.value)


class SavePanel(QWidget):
    """The store and subject to save to, Save, Save decisions and Recompute."""

    def __init__(self, state: ViewerState):
        super().__init__()
        self.store = StoreEdit(state)
        self.subject = LineEdit(label="subject")
        self.save_button = PushButton(text="Save corrections to store",
                                      tooltip="the whole map is correct: a full version")
        self.decisions_button = PushButton(
            text="Save decisions",
            tooltip="only the accepted / rejected clusters and painted voxels are known: a "
                    "review-only version (training ignores the clusters not decided)")
        self.refresh_button = PushButton(text="Recompute clusters")
        self.form = Container(widgets=[self.store, self.subject,
                                       Container(widgets=[self.save_button,
                                                          self.decisions_button],
                                                 layout="horizontal", labels=False),
                                       self.refresh_button])
        _form(self, self.form)


def commit_review(session: ReviewSession, layer, path: Path, subject: str, image=None,
                  regions: np.ndarray | None = None, review_only: bool = False) -> int:
    """Save ``session``'s labels (of Labels ``layer``) as a new version of ``subject``.

    The store is created when ``path`` holds none; a subject it lacks is added from
    the ``image`` layer the labels were drawn on (with its ``regions``).
    ``review_only`` saves the decisions only (see :meth:`ReviewSession.save`).  Returns
    the version number; raises PVSInputError, OSError or ValueError when nothing was saved.
    """
    if not (path / "zarr.json").is_file():
        CorrectionsStore.create(path).close()
    with CorrectionsStore.open(path, writable=True, wait=5) as store:
        if subject not in store.subjects():
            _add_subject(store, subject, layer, image, regions)
        affine, _ = geometry(layer)
        return session.save(store, subject, author=user(), affine=affine,
                            image_sha256=(layer.metadata or {}).get("sha256"),
                            review_only=review_only)


def _add_subject(store, subject: str, layer, image, regions) -> None:
    if image is None or image.data.shape != layer.data.shape:
        raise PVSInputError(f"subject {subject!r} is not in {store.path} and the image these "
                            "labels were drawn on is not open; add it with `napari-pvs store "
                            "import` first")
    affine, spacing = geometry(image)
    meta = image.metadata or {}
    store.add_subject(subject, Volume(np.asarray(image.data, np.float32), affine, spacing,
                                      sha256=meta.get("sha256")),
                      site=str(meta.get("site") or "unknown"), modality=modality(image),
                      regions=None if regions is None else regions.astype(np.uint8))
