"""What the widgets of one viewer share: the current store, pending savers, signals."""

from __future__ import annotations

import weakref
from collections.abc import Callable

from psygnal import Signal

from ..store import model_registry

__all__ = ["ViewerState", "state_for"]

_STATES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class ViewerState:
    """Shared by the napari-pvs widgets docked in one viewer.

    Signals
    -------
    store_changed(str)
        The current store folder changed.
    model_registered(str)
        A model id was added to the current store's registry.
    subject_opened(object)
        Layers of a store subject were added (the editable labels layer is passed).
    predicted(object)
        A prediction's layers were added (its editable labels layer is passed).
    cluster_requested(object)
        The (i, j, k) voxel of a cluster of the subject just opened (the queue's next
        likeliest false positive): the review widget goes to that cluster.
    """

    store_changed = Signal(str)
    model_registered = Signal(str)
    subject_opened = Signal(object)
    predicted = Signal(object)
    cluster_requested = Signal(object)

    def __init__(self) -> None:
        self._store: str | None = None
        self._savers: list[weakref.WeakMethod] = []
        self.automatic_regions_noted = False  # the predict widget said what automatic means

    @property
    def store(self) -> str | None:
        return self._store

    @store.setter
    def store(self, path) -> None:
        path = None if path in (None, "") else str(path)
        if path != self._store:
            self._store = path
            self.store_changed.emit(path or "")

    def model_ids(self) -> list[str]:
        """Ids of the current store's registered models, the newest first."""
        if not self.store:
            return []
        return [m["id"] for m in model_registry(self.store).list()][::-1]

    def add_saver(self, method: Callable[[], bool], pending: Callable[[], bool]) -> None:
        """Register a widget's ``save`` (returns success) and its ``has_unsaved`` test."""
        self._savers.append((weakref.WeakMethod(method), weakref.WeakMethod(pending)))

    def save_pending(self) -> bool:
        """Save every widget's unsaved corrections; False when one of them failed."""
        ok = True
        for save, pending in self._savers:
            s, p = save(), pending()
            if s is not None and p is not None and p():
                ok = s() and ok
        return ok


def state_for(viewer) -> ViewerState:
    """The shared state of ``viewer`` (created on first use)."""
    state = _STATES.get(viewer)
    if state is None:
        state = _STATES[viewer] = ViewerState()
    return state
