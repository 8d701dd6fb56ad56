"""The viewer of ``napari-pvs demo``: a phantom subject, its predictions and the widgets.

The demo's cohort is imported into a corrections store (``<out>/demo.pvs.zarr``); the
first subject opens from it with the shipped MedNeXt model's prediction under review
(its probability and uncertainty maps, and the cluster table with their columns), so
Save, Retrain and the queue work on that store straight away.  The Frangi baseline's
prediction and the phantom's ground truth are hidden outlines, for comparison.  Without
a MedNeXt prediction (a T1w demo: no shipped T1w model yet), Frangi's is under review.
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

__all__ = ["demo_store", "open_demo", "show_demo"]


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


def _outline(viewer, image, data, name: str, colour: str):
    """A hidden labels layer drawn as outlines in ``colour``, on the image's grid."""
    from napari.utils.colormaps import DirectLabelColormap

    colours = {None: "transparent", 0: "transparent", 1: colour}
    layer = viewer.add_labels((np.asarray(data) > 0).astype(np.uint8), name=name, opacity=0.8,
                              colormap=DirectLabelColormap(color_dict=colours),
                              scale=image.scale, affine=image.affine, visible=False)
    layer.contour = 1
    return layer


def _read_maps(folder: Path, subject) -> dict[str, np.ndarray]:
    """The labels (and, for MedNeXt, probability and uncertainty) that ``napari-pvs
    predict`` wrote for ``subject`` into ``folder``."""
    stem = folder / strip_nifti_suffix(subject.image.name)
    maps = {"labels": load_volume(f"{stem}_pvs.nii.gz", as_labels=True).data.astype(np.uint8)}
    for key, suffix in (("probability", "prob"), ("uncertainty", "uncertainty")):
        if Path(f"{stem}_{suffix}.nii.gz").is_file():
            maps[key] = load_volume(f"{stem}_{suffix}.nii.gz").data.astype(np.float32)
    return maps


def _demo_prediction(viewer, subject, frangi_dir: Path, mednext: tuple[str, Path] | None):
    """Add the subject's prediction for review: the MedNeXt one (``(model name, folder)``;
    the layers are named by it) when there is one, else Frangi's.  The truth, and Frangi's
    prediction when it is not the one reviewed, are hidden outlines.  Returns the PVS
    labels layer under review."""
    image = viewer.layers[f"{subject.subject} image"]
    regions = viewer.layers[f"{subject.subject} regions (1 WM, 2 BG)"]
    _outline(viewer, image, load_volume(subject.labels, as_labels=True).data,
             "PVS truth (outline)", "lime")
    frangi = _read_maps(frangi_dir, subject)
    if mednext is None:
        model, maps = "baseline", frangi
    else:
        _outline(viewer, image, frangi["labels"], "Frangi prediction (outline)", "orange")
        model, maps = mednext[0], _read_maps(mednext[1], subject)
    labels = maps.pop("labels")
    pred = prediction_from_labels(labels, model=model, regions=regions.data,
                                  affine=np.asarray(image.metadata["nifti_affine"]), **maps)
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


def open_demo(viewer, subjects, out: Path, pred_dir: Path,
              mednext: tuple[str, Path] | None = None) -> tuple[dict, dict]:
    """Fill ``viewer`` with the first subject, its predictions and the docked widgets,
    the review widget on the prediction under review; returns ``(widgets, docks)``.

    ``pred_dir`` holds the Frangi predictions, ``mednext`` is ``(model name, folder)``
    of the MedNeXt ones (reviewed when given; ``"starter"`` names its layers)."""
    first = subjects[0]
    store_path = demo_store(subjects, Path(out) / "demo.pvs.zarr")
    state_for(viewer).store = str(store_path)
    with CorrectionsStore.open(store_path) as store:
        open_store_subject(viewer, store, first.subject, with_labels=False)  # the prediction's
        # labels, added below, are the ones to correct
    pvs = _demo_prediction(viewer, first, pred_dir, mednext)
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
    return widgets, docks


def _room_for_the_layer_list(viewer) -> None:
    """Give napari's layer controls the height they need and the layer list the rest, so
    that every layer of the demo shows (Qt's relayout, when the review table widens its
    dock, sometimes hands the room to the controls instead)."""
    from qtpy.QtCore import Qt

    qt_viewer = viewer.window._qt_viewer
    controls, layers = qt_viewer.dockLayerControls, qt_viewer.dockLayerList
    need = controls.widget().minimumSizeHint().height() + 20
    viewer.window._qt_window.resizeDocks([controls, layers],
                                         [need, controls.height() + layers.height() - need],
                                         Qt.Vertical)


def show_demo(subjects, out: Path, pred_dir: Path, screenshot: str | None = None,
              mednext: tuple[str, Path] | None = None):
    """Open napari on the first subject (:func:`open_demo`); returns the viewer (after
    the screenshot: closed)."""
    import napari

    viewer = napari.Viewer(title=f"napari-pvs demo: sub-{subjects[0].subject}")
    widgets, docks = open_demo(viewer, subjects, out, pred_dir, mednext)
    QTimer.singleShot(0, docks["Review clusters"].raise_)  # once the dock tabs exist
    QTimer.singleShot(0, lambda: _room_for_the_layer_list(viewer))
    if screenshot:
        for _ in range(10):
            QApplication.processEvents()
        docks["Review clusters"].raise_()
        _room_for_the_layer_list(viewer)
        for _ in range(10):
            QApplication.processEvents()
        viewer.screenshot(screenshot, canvas_only=False, flash=False)
        print(f"screenshot: {screenshot}")
        widgets["Review clusters"].unbind_keys()
        viewer.close()
        return viewer
    napari.run()
    return viewer
