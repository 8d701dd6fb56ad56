"""Parts every widget shares: a base bound to the viewer, and the store field."""

from __future__ import annotations

from magicgui.widgets import FileEdit
from qtpy.QtWidgets import QWidget

from ._state import ViewerState, state_for

__all__ = ["StoreEdit", "ViewerWidget", "store_path"]


class ViewerWidget(QWidget):
    """A napari-pvs dock widget: its viewer, and the state the viewer's widgets share."""

    def __init__(self, napari_viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.state: ViewerState = state_for(napari_viewer)


def store_path(value) -> str | None:
    """A path field's value as a store folder; None when the field is empty."""
    value = str(value)
    return None if value in ("", ".") else value


class StoreEdit(FileEdit):
    """The corrections store folder, the same in every widget of a viewer.

    An edit sets the viewer's current store (``state.store``); a new current store,
    chosen in another widget, fills the field in.
    """

    def __init__(self, state: ViewerState, **kwargs):
        super().__init__(label="store", mode="d", value=state.store or "", **kwargs)
        self._state = state
        self.changed.connect(self._to_state)
        self.changed.connect(self._show_end)
        self.line_edit.native.editingFinished.connect(self._show_end)
        state.store_changed.connect(self._from_state)
        self._show_end()

    def _show_end(self, *_) -> None:
        """Show the end of a long path, the store's own name; the tooltip has all of it."""
        edit = self.line_edit.native
        edit.setCursorPosition(len(edit.text()))
        edit.setToolTip(self.path or "the corrections store folder (*.pvs.zarr)")

    @property
    def path(self) -> str | None:
        """The chosen folder, or None."""
        return store_path(self.value)

    def _to_state(self, _value) -> None:
        self._state.store = self.path

    def _from_state(self, path: str) -> None:
        if path and str(self.value) != path:
            self.value = path
