"""Predict widget: segment the chosen image layer in a background thread.

The model is a starter model shipped in the package (the default, first in the list:
:data:`napari_pvs.model.STARTER_MODELS`), the Frangi baseline, a model of the current
store's registry, or a checkpoint file.  The regions (where PVS are labelled, and named
WM or BG in the cluster table) are estimated automatically, or come from a region map /
mask on the image's grid, or from a whole-brain segmentation on any grid (FreeSurfer's
aseg.mgz, SynthSeg, fMRIPrep's desc-aseg), mapped by
:func:`napari_pvs.regions.from_segmentation` in the worker.  The worker runs
:func:`napari_pvs.active.predict_and_save`, which also saves a MedNeXt prediction of a
store subject to the store, for the active-learning queue; the widget only reads its
inputs on the GUI thread and adds the result layers
(:func:`._layers.add_prediction_layers`), with the region map made from a segmentation.
"""

from __future__ import annotations

import threading
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from magicgui.widgets import ComboBox, Container, FileEdit, Label, PushButton, SpinBox
from qtpy.QtWidgets import QProgressBar, QVBoxLayout

from .._errors import PVSInputError
from .._volume import Volume
from ..active import predict_and_save
from ..inference import PredictionCancelled, Progress
from ..model import STARTER_MODELS, modality_mismatch, read_meta, starter_models, starter_path
from ..regions import from_segmentation
from ._common import ViewerWidget
from ._layers import MAPS, add_prediction_layers, geometry, modality, reset_ordered, role
from ._state import state_for
from ._worker import start_worker

__all__ = ["AUTOMATIC", "Segmentation", "predict_with_regions", "start_prediction",
           "starter_choices", "PredictWidget"]

STARTER = "starter"  # the default model: MedNeXt-XS for T2w images
BASELINE = "baseline (Frangi)"
FILE = "checkpoint file..."
DEVICES = ("auto", "cpu", "cuda", "mps")
AUTOMATIC = "automatic (no regions given)"
AUTOMATIC_NOTE = (
    "regions are estimated automatically: PVS outside the white matter and basal ganglia, "
    "and the region column, are not comparable with the MedNet-PVS paper's.  For the real "
    "regions open the subject's FreeSurfer / SynthSeg / fMRIPrep segmentation (File > Open, "
    "e.g. aseg.mgz) and choose it under 'regions' as 'segmentation: NAME'.")


def starter_choices() -> list[tuple[str, str]]:
    """``(label, name)`` of each shipped model, e.g. ``("starter (MedNeXt-XS, T2w)",
    "starter")``; a model missing from the installation says so in its label."""
    out = []
    for m in starter_models():
        if "error" in m:
            out.append((f"{m['name']} (missing: reinstall napari-pvs)", m["name"]))
        else:
            out.append((f"{m['name']} (MedNeXt-{m['arch']['variant']}, "
                        f"{m['preprocessing'].get('modality', '?')})", m["name"]))
    return out


@dataclass(frozen=True)
class Segmentation:
    """A regions choice: the whole-brain segmentation in Labels ``layer`` (any grid)."""

    layer: Any


def predict_with_regions(image: np.ndarray, spacing, model: str, *, affine,
                         segmentation: Volume | None = None, **kwargs
                         ) -> Generator[Any, None, tuple[Any, Any]]:
    """:func:`~napari_pvs.active.predict_and_save`, the region map and brain mask first
    mapped from ``segmentation`` (any grid) when given; a generator.

    Returns ``(prediction, SegmentationRegions or None)``.
    """
    regions = None
    if segmentation is not None:
        yield Progress(0, 0, "mapping the segmentation to WM/BG regions ...")
        regions = from_segmentation(segmentation, Volume(image, affine, tuple(spacing)))
        kwargs.update(roi=regions.regions, brain=regions.brain)
    pred = yield from predict_and_save(image, spacing, model, affine=affine, **kwargs)
    return pred, regions


def _volume_of(layer) -> Volume:
    """A Labels layer's data and geometry (read on the GUI thread)."""
    affine, spacing = geometry(layer)
    return Volume(np.asarray(layer.data), affine, spacing)


def _add_regions_layer(viewer, image_layer, made, segmentation_layer):
    """The region map made from ``segmentation_layer``, outlined over the image."""
    from napari.utils.colormaps import DirectLabelColormap

    src = {k: v for k, v in (image_layer.metadata or {}).items()
           if k in ("nifti_affine", "store", "subject", "site", "modality", "spacing", "shape")}
    layer = viewer.add_labels(
        made.regions, name=f"{image_layer.name} regions from {segmentation_layer.name} "
                           "(1 WM, 2 BG)",
        opacity=0.6, scale=image_layer.scale, translate=image_layer.translate,
        affine=image_layer.affine,
        colormap=DirectLabelColormap(color_dict={None: "transparent", 0: "transparent",
                                                 1: "deepskyblue", 2: "orange"}),
        metadata={**src, "role": "regions", "segmentation": made.meta})
    layer.contour = 1  # outlines: the PVS inside stay visible
    return layer


def start_prediction(viewer, image_layer, model: str, *, roi_layer=None, segmentation_layer=None,
                     tta: int = 1, device: str = "auto", store: str | None = None, cancel=None,
                     progress=None, done=None, finished=None):
    """Read the inputs on the GUI thread and start a prediction worker; returns it.

    ``roi_layer`` is a region map or mask on the image's grid; ``segmentation_layer`` a
    whole-brain segmentation on any grid (mapped to regions and brain mask in the
    worker).  ``progress(Progress)``, ``done(labels_layer)`` and ``finished()`` are
    called on the GUI thread; failures are napari notifications.
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
                                "this image, or the layer as 'segmentation: ...'")
    seg = None
    if segmentation_layer is not None:
        if np.asarray(segmentation_layer.data).ndim != 3:
            raise PVSInputError(f"segmentation {segmentation_layer.name!r} is not a 3D label "
                                "volume")
        seg = _volume_of(segmentation_layer)
    meta = image_layer.metadata or {}
    subject = meta.get("subject") if meta.get("store") in (None, store) else None

    def _returned(result):
        pred, made = result
        regions_layer = roi_layer
        if made is not None:
            regions_layer = _add_regions_layer(viewer, image_layer, made, segmentation_layer)
        layer = add_prediction_layers(viewer, image_layer, pred, regions_layer=regions_layer)
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

    return start_worker(predict_with_regions, image, spacing, model, affine=affine,
                        segmentation=seg, roi=roi, modality=modality(image_layer), tta=tta,
                        device=None if device == "auto" else device, store_path=store,
                        subject=subject, cancel=cancel, yielded=progress, returned=_returned,
                        errored=_errored, finished=finished)


class PredictWidget(ViewerWidget):
    """Choose image, model, device, TTA and regions; Run predicts in the background."""

    def __init__(self, napari_viewer):
        super().__init__(napari_viewer)
        self.worker = None
        self._cancel: threading.Event | None = None
        self.image = ComboBox(label="image", choices=self._images)
        self._starters = starter_choices()  # read once: the labels need the files' headers
        self.model = ComboBox(label="model", choices=self._models,
                              tooltip="the shipped starter model (MedNeXt, for the contrast it "
                                      "names), the Frangi baseline, a model of the store's "
                                      "registry, or a checkpoint file")
        self.checkpoint = FileEdit(label="checkpoint", filter="*.safetensors *.json", visible=False)
        self.device = ComboBox(label="device", choices=DEVICES, value="auto")
        self.tta = SpinBox(label="TTA flips", min=1, max=8, value=1,
                           tooltip="mirror variants averaged (1 = none, 8 = all axes)")
        self.regions = ComboBox(
            label="regions", choices=self._regions,
            tooltip="where PVS are labelled and which are WM / BG: estimated automatically, "
                    "a region map or mask drawn on this image, or a whole-brain segmentation "
                    "on any grid (FreeSurfer aseg.mgz, SynthSeg, fMRIPrep desc-aseg)")
        self.run_button = PushButton(text="Run")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.status = Label(value="")
        self.form = Container(widgets=[self.image, self.model, self.checkpoint, self.device, self.tta,
                                       self.regions, Container(widgets=[self.run_button, self.cancel_button],
                                                           layout="horizontal", labels=False),
                                       self.status])
        self.bar = QProgressBar()
        self.bar.setFormat("%v / %m")
        lay = QVBoxLayout(self)
        lay.addWidget(self.form.native)
        lay.addWidget(self.bar)
        lay.addStretch(1)
        self.model.changed.connect(lambda v: setattr(self.checkpoint, "visible", v == FILE))
        self.image.changed.connect(self._refresh)  # the region maps on its grid
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

    def _regions(self, _=None) -> list:
        """Automatic, the region maps / masks on the image's grid, and every Labels layer
        (a region map excepted) as a whole-brain segmentation."""
        from napari.layers import Labels

        image = getattr(self, "image", None)
        shape = None if image is None or image.value is None else image.value.data.shape
        labels = [lay for lay in self.viewer.layers if isinstance(lay, Labels) and lay.ndim == 3
                  and role(lay) not in ("pvs", "clusters")]
        return ([(AUTOMATIC, None)]
                + [(lay.name, lay) for lay in labels if lay.data.shape == shape]
                + [(f"segmentation: {lay.name}", Segmentation(lay)) for lay in labels
                   if role(lay, self.viewer) != "regions"])

    def _models(self, _=None) -> list:
        """The shipped models first (the first is the default), then the others."""
        return [*self._starters, *((m, m) for m in (BASELINE, *self.state.model_ids(), FILE))]

    def _refresh(self, *_):
        self.form.reset_choices()
        reset_ordered(self.model)
        if self.regions.value is None:  # a region map of the image, if any
            for _name, choice in self._regions()[1:]:
                if not isinstance(choice, Segmentation) and role(choice, self.viewer) == "regions":
                    self.regions.value = choice
                    break

    def _on_model(self, model_id: str):
        self._refresh()
        self.model.value = model_id

    def model_spec(self) -> str:
        """What the pipeline takes: ``"baseline"``, a checkpoint's path (a shipped model's
        in the installed package) or a registry id."""
        value = self.model.value
        if value == BASELINE:
            return "baseline"
        if value in STARTER_MODELS:
            return str(starter_path(value))
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
        choice = self.regions.value
        seg = choice.layer if isinstance(choice, Segmentation) else None
        try:
            spec = self.model_spec()
            self.worker = start_prediction(
                self.viewer, self.image.value, spec,
                roi_layer=None if seg is not None else choice, segmentation_layer=seg,
                tta=int(self.tta.value), device=self.device.value, store=self.state.store,
                cancel=self._cancel, progress=self._progress, finished=self._finished)
        except PVSInputError as exc:
            show_error(str(exc))
            return None
        if choice is None:
            self._note_automatic()
        self._check_modality(spec)
        self.run_button.enabled = False
        self.cancel_button.enabled = True
        self.status.value = f"predicting {self.image.value.name} ..."
        self.bar.setRange(0, 0)
        return self.worker

    def _check_modality(self, spec: str) -> None:
        """Warn when the image's contrast is not the one the checkpoint was trained on."""
        from napari.utils.notifications import show_warning

        if not spec.endswith(".safetensors"):
            return
        try:
            meta = read_meta(spec)
        except PVSInputError:  # the worker reports a broken checkpoint
            return
        message = modality_mismatch(meta, modality(self.image.value), self.image.value.name,
                                    name=self.model.value)
        if message:
            show_warning(message)

    def _note_automatic(self) -> None:
        """Once per viewer: what automatic regions mean, and how to give the real ones."""
        from napari.utils.notifications import show_info

        if not self.state.automatic_regions_noted:
            self.state.automatic_regions_noted = True
            show_info(AUTOMATIC_NOTE)

    def _progress(self, p) -> None:
        self.bar.setRange(0, p.total)  # 0: a step of unknown length, the busy indicator
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
        if self.status.value.startswith(("predicting", "cancelling", "window", "Frangi",
                                         "mapping")):
            self.status.value = ""
