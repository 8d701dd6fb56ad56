"""Predict widget: segment the chosen image layer in a background thread.

The model is the Frangi baseline, a model of the current store's registry, or a
checkpoint file.  The worker runs :func:`napari_pvs.active.predict_and_save`, which
also saves a MedNeXt prediction of a store subject to the store, for the
active-learning queue; the widget only reads its inputs on the GUI thread and adds the
result layers (:func:`._layers.add_prediction_layers`).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
from magicgui.widgets import ComboBox, Container, FileEdit, Label, PushButton, SpinBox
from qtpy.QtWidgets import QProgressBar, QVBoxLayout

from .._errors import PVSInputError
from ..active import predict_and_save
from ..inference import PredictionCancelled
from ._common import ViewerWidget
from ._layers import MAPS, add_prediction_layers, geometry, modality, reset_ordered, role
from ._state import state_for
from ._worker import start_worker

__all__ = ["PredictWidget", "start_prediction"]

BASELINE = "baseline (Frangi)"
FILE = "checkpoint file..."
DEVICES = ("auto", "cpu", "cuda", "mps")


def start_prediction(viewer, image_layer, model: str, *, roi_layer=None, tta: int = 1,
                     device: str = "auto", store: str | None = None, cancel=None,
                     progress=None, done=None, finished=None):
    """Read the inputs on the GUI thread and start a prediction worker; returns it.

    ``progress(Progress)``, ``done(labels_layer)`` and ``finished()`` are called on the
    GUI thread; failures are napari notifications.
    """
    from napari.utils.notifications import show_error, show_info

    image = np.asarray(image_layer.data)
    if image.ndim != 3:
        raise PVSInputError(f"layer {image_layer.name!r} has shape {image.shape}; predict needs a "
                            "3D volume (split 4D series into volumes first)")
    affine, spacing = geometry(image_layer)
    roi = None
    if roi_layer is not None:
        roi = np.asarray(roi_layer.data)
        if roi.shape != image.shape:
            raise PVSInputError(f"ROI layer {roi_layer.name!r} has shape {roi.shape}, image "
                                f"{image_layer.name!r} has {image.shape}: choose the ROI drawn on "
                                "this image")
    meta = image_layer.metadata or {}
    subject = meta.get("subject") if meta.get("store") in (None, store) else None

    def _returned(pred):
        layer = add_prediction_layers(viewer, image_layer, pred, regions_layer=roi_layer)
        show_info(f"{image_layer.name}: {len(pred.table)} PVS clusters with {pred.model} "
                  f"in {pred.seconds:.1f} s")
        state_for(viewer).predicted.emit(layer)
        if done is not None:
            done(layer)

    def _errored(exc):
        if isinstance(exc, PredictionCancelled):
            show_info(f"{image_layer.name}: prediction cancelled")
        else:
            show_error(f"prediction of {image_layer.name!r} failed: {exc}")

    return start_worker(predict_and_save, image, spacing, model, affine=affine, roi=roi,
                        modality=modality(image_layer), tta=tta,
                        device=None if device == "auto" else device, store_path=store,
                        subject=subject, cancel=cancel, yielded=progress, returned=_returned,
                        errored=_errored, finished=finished)


class PredictWidget(ViewerWidget):
    """Choose image, model, device, TTA and ROI; Run predicts in the background."""

    def __init__(self, napari_viewer):
        super().__init__(napari_viewer)
        self.worker = None
        self._cancel: threading.Event | None = None
        self.image = ComboBox(label="image", choices=self._images)
        self.model = ComboBox(label="model", choices=self._models)
        self.checkpoint = FileEdit(label="checkpoint", filter="*.safetensors *.json", visible=False)
        self.device = ComboBox(label="device", choices=DEVICES, value="auto")
        self.tta = SpinBox(label="TTA flips", min=1, max=8, value=1,
                           tooltip="mirror variants averaged (1 = none, 8 = all axes)")
        self.roi = ComboBox(label="ROI (optional)", choices=self._rois,
                            tooltip="WM/BG region map or brain mask; windows outside are skipped")
        self.run_button = PushButton(text="Run")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.status = Label(value="")
        self.form = Container(widgets=[self.image, self.model, self.checkpoint, self.device, self.tta,
                                       self.roi, Container(widgets=[self.run_button, self.cancel_button],
                                                           layout="horizontal", labels=False),
                                       self.status])
        self.bar = QProgressBar()
        self.bar.setFormat("%v / %m")
        lay = QVBoxLayout(self)
        lay.addWidget(self.form.native)
        lay.addWidget(self.bar)
        lay.addStretch(1)
        self.model.changed.connect(lambda v: setattr(self.checkpoint, "visible", v == FILE))
        self.run_button.clicked.connect(self.run)
        self.cancel_button.clicked.connect(self.cancel)
        for ev in (napari_viewer.layers.events.inserted, napari_viewer.layers.events.removed):
            ev.connect(self._refresh)
        self.state.store_changed.connect(self._refresh)
        self.state.model_registered.connect(self._on_model)
        self._refresh()

    # ------------------------------------------------------------------ choices
    def _images(self, _=None) -> list:
        from napari.layers import Image

        return [(lay.name, lay) for lay in self.viewer.layers
                if isinstance(lay, Image) and lay.ndim == 3 and not lay.rgb
                and role(lay) not in MAPS]  # not our own prediction maps

    def _rois(self, _=None) -> list:
        from napari.layers import Labels

        return [("none", None)] + [(lay.name, lay) for lay in self.viewer.layers
                                   if isinstance(lay, Labels) and lay.ndim == 3
                                   and role(lay) not in ("pvs", "clusters")]

    def _models(self, _=None) -> list:
        return [BASELINE, *self.state.model_ids(), FILE]

    def _refresh(self, *_):
        self.form.reset_choices()
        reset_ordered(self.model)
        image = self.image.value
        if self.roi.value is None and image is not None:  # a region map of the image, if any
            for _name, layer in self._rois()[1:]:
                if role(layer, self.viewer) == "regions" and layer.data.shape == image.data.shape:
                    self.roi.value = layer
                    break

    def _on_model(self, model_id: str):
        self._refresh()
        self.model.value = model_id

    def model_spec(self) -> str:
        value = self.model.value
        if value == BASELINE:
            return "baseline"
        if value == FILE:
            path = Path(self.checkpoint.value)
            if not path.is_file():
                raise PVSInputError(f"checkpoint {str(path)!r} is not a file: choose a .safetensors "
                                    "checkpoint or an ensemble .json")
            return str(path)
        return value

    # ------------------------------------------------------------------ running
    def run(self) -> Any:
        """Start the prediction; returns the worker (None when the inputs are wrong)."""
        from napari.utils.notifications import show_error

        if self.worker is not None:
            return self.worker
        if self.image.value is None:
            show_error("no 3D image layer to predict: open a NIfTI volume or a sample phantom")
            return None
        self._cancel = threading.Event()
        try:
            self.worker = start_prediction(
                self.viewer, self.image.value, self.model_spec(), roi_layer=self.roi.value,
                tta=int(self.tta.value), device=self.device.value, store=self.state.store,
                cancel=self._cancel, progress=self._progress, finished=self._finished)
        except PVSInputError as exc:
            show_error(str(exc))
            return None
        self.run_button.enabled = False
        self.cancel_button.enabled = True
        self.status.value = f"predicting {self.image.value.name} ..."
        self.bar.setRange(0, 0)
        return self.worker

    def _progress(self, p) -> None:
        self.bar.setRange(0, max(p.total, 1))
        self.bar.setValue(p.done)
        self.status.value = p.message

    def cancel(self) -> None:
        if self._cancel is not None:
            self._cancel.set()
        self.status.value = "cancelling ..."  # the worker stops within one window batch

    def _finished(self) -> None:
        self.worker = None
        self.run_button.enabled = True
        self.cancel_button.enabled = False
        if self.bar.maximum() == 0:  # still the busy indicator: nothing was reported
            self.bar.setRange(0, 1)
            self.bar.setValue(0)
        if self.status.value.startswith(("predicting", "cancelling", "window", "Frangi")):
            self.status.value = ""
