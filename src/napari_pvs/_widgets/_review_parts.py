"""The review widget's navigation bar and save panel (the table: ``_cluster_table``).

The parts only lay out controls; :class:`~napari_pvs._widgets.review.ReviewWidget`
connects them to a review session.  :func:`commit_review` is the save panel's job:
the reviewed labels become a new version of a store subject.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from magicgui.widgets import ComboBox, Container, Label, LineEdit, PushButton
from qtpy.QtCore import Qt
from qtpy.QtWidgets import QVBoxLayout, QWidget

from .._errors import PVSInputError
from ..io import Volume
from ..store import CorrectionsStore
from ._common import StoreEdit
from ._layers import geometry, modality, user

if TYPE_CHECKING:
    from ..review import ReviewSession
    from ._state import ViewerState

__all__ = ["KEYS", "SORT", "NavigationBar", "SavePanel", "commit_review"]

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
        self.counter = Label(value="reviewed 0 of 0")
        self.edits = Label(value="")
        for lab in (self.counter, self.edits):
            lab.native.setWordWrap(True)
            lab.native.setAlignment(Qt.AlignLeft | Qt.AlignVCenter)
        b = self.buttons
        self.form = Container(widgets=[
            self.labels, self.sort,
            Container(widgets=[b["previous"], b["next"]], layout="horizontal", labels=False),
            Container(widgets=[b["accept"], b["reject"], b["undo"]], layout="horizontal",
                      labels=False),
            self.counter, self.edits], labels=True)
        _form(self, self.form)

    def show_progress(self, session: ReviewSession | None) -> None:
        """The counters of ``session`` (decisions, painted voxels, unsaved or not)."""
        if session is None:
            self.counter.value = "no labels layer to review"
            self.edits.value = ""
            return
        self.counter.value = f"reviewed {session.reviewed} of {session.n}"
        sm = session.summary()
        self.edits.value = (f"{sm['clusters_rejected']} rejected, {sm['clusters_accepted']} "
                            f"accepted, {sm['voxels_painted_manually']} voxels painted"
                            + (" (unsaved)" if session.dirty else ""))


class SavePanel(QWidget):
    """The store and subject to save to, Save and Recompute."""

    def __init__(self, state: ViewerState):
        super().__init__()
        self.store = StoreEdit(state)
        self.subject = LineEdit(label="subject")
        self.save_button = PushButton(text="Save corrections to store")
        self.refresh_button = PushButton(text="Recompute clusters")
        self.form = Container(widgets=[self.store, self.subject, self.save_button,
                                       self.refresh_button])
        _form(self, self.form)


def commit_review(session: ReviewSession, layer, path: Path, subject: str, image=None,
                  regions: np.ndarray | None = None) -> int:
    """Save ``session``'s labels (of Labels ``layer``) as a new version of ``subject``.

    The store is created when ``path`` holds none; a subject it lacks is added from
    the ``image`` layer the labels were drawn on (with its ``regions``).  Returns the
    version number; raises PVSInputError, OSError or ValueError when nothing was saved.
    """
    if not (path / "zarr.json").is_file():
        CorrectionsStore.create(path).close()
    with CorrectionsStore.open(path, writable=True, wait=5) as store:
        if subject not in store.subjects():
            _add_subject(store, subject, layer, image, regions)
        affine, _ = geometry(layer)
        return session.save(store, subject, author=user(), affine=affine,
                            image_sha256=(layer.metadata or {}).get("sha256"))


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
