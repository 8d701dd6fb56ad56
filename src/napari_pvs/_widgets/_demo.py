"""The viewer of ``napari-pvs demo``: a phantom subject, its prediction and the widgets.

The demo's cohort is imported into a corrections store (``<out>/demo.pvs.zarr``); the
first subject opens from it with its Frangi prediction under review, so Save, Retrain
and the queue work on that store straight away.  The phantom's ground truth is shown
as an outline for comparison.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QApplication

from ..io import load_volume, strip_nifti_suffix
from ..pipeline import prediction_from_labels
from ..store import CorrectionsStore
from ._layers import add_prediction_layers, open_store_subject
from ._state import state_for
from .predict import PredictWidget
from .queue import QueueWidget
from .retrain import RetrainWidget
from .review import ReviewWidget

__all__ = ["demo_store", "show_demo"]


def demo_store(subjects, path: Path):
    """Import the cohort's images and region maps into a store (reused when it exists)."""
    if not (path / "zarr.json").is_file():
        CorrectionsStore.create(path).close()
    with CorrectionsStore.open(path, writable=True, wait=5) as store:
        have = set(store.subjects())
        for s in subjects:
            if s.subject not in have:
                store.add_subject(s.subject, load_volume(s.image), site=s.site, modality=s.modality,
                                  regions=load_volume(s.regions, as_labels=True).data)
    return path


def _demo_prediction(viewer, subject, pred_dir: Path):
    """Add the subject's baseline prediction (written by the demo command) for review,
    and its ground truth as a hidden outline; returns the PVS labels layer."""
    from napari.utils.colormaps import DirectLabelColormap

    image = viewer.layers[f"{subject.subject} image"]
    regions = viewer.layers[f"{subject.subject} regions (1 WM, 2 BG)"]
    truth = load_volume(subject.labels, as_labels=True).data
    outline = viewer.add_labels(truth, name="PVS truth (outline)", opacity=0.8,
                                colormap=DirectLabelColormap(color_dict={None: "transparent",
                                                                         0: "transparent", 1: "lime"}),
                                scale=image.scale, affine=image.affine, visible=False)
    outline.contour = 1
    labels = load_volume(pred_dir / f"{strip_nifti_suffix(subject.image.name)}_pvs.nii.gz",
                         as_labels=True).data.astype(np.uint8)
    pred = prediction_from_labels(labels, regions=regions.data,
                                  affine=np.asarray(image.metadata["nifti_affine"]))
    return add_prediction_layers(viewer, image, pred, regions_layer=regions)


def _dock_widgets(viewer) -> tuple[dict, dict]:
    """The four widgets, docked as tabs on the right in the order of the work (and of
    the plugin menu): Predict, Review clusters, Retrain, Active-learning queue; returns
    ``(widgets, docks)`` by name."""
    widgets = {"Predict": PredictWidget(viewer), "Review clusters": ReviewWidget(viewer),
               "Retrain": RetrainWidget(viewer), "Active-learning queue": QueueWidget(viewer)}
    docks = {name: viewer.window.add_dock_widget(w, name=name, area="right")
             for name, w in widgets.items()}
    first, *others = docks.values()
    for dock in others:  # each tab goes after the last
        viewer.window._qt_window.tabifyDockWidget(first, dock)
    return widgets, docks


def show_demo(subjects, out: Path, pred_dir: Path, screenshot: str | None = None):
    """Open napari on the first subject; returns the viewer (after the screenshot: closed)."""
    import napari

    first = subjects[0]
    store_path = demo_store(subjects, Path(out) / "demo.pvs.zarr")
    viewer = napari.Viewer(title=f"napari-pvs demo: sub-{first.subject}")
    state_for(viewer).store = str(store_path)
    with CorrectionsStore.open(store_path) as store:
        open_store_subject(viewer, store, first.subject, with_labels=False)  # the prediction's
        # labels, added below, are the ones to correct
    pvs = _demo_prediction(viewer, first, pred_dir)
    widgets, docks = _dock_widgets(viewer)
    viewer.window._qt_window.resize(1500, 950)
    review = widgets["Review clusters"]
    review.set_layer(pvs)
    # axial slices shown radiologically: anterior up, right on the viewer's right
    viewer.dims.order = (2, 1, 0)
    camera = viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera
    camera.orientation2d = ("up", "right")
    viewer.reset_view()
    review.next()  # the first cluster to review, ringed
    QTimer.singleShot(0, docks["Review clusters"].raise_)  # once the dock tabs exist
    if screenshot:
        for _ in range(10):
            QApplication.processEvents()
        docks["Review clusters"].raise_()
        for _ in range(10):
            QApplication.processEvents()
        viewer.screenshot(screenshot, canvas_only=False, flash=False)
        print(f"screenshot: {screenshot}")
        review.unbind_keys()
        viewer.close()
        return viewer
    napari.run()
    return viewer
