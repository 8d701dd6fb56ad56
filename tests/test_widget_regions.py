"""The predict widget's regions: automatic, a region map, or a whole-brain segmentation
on any grid (needs an X server: xvfb-run)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from napari_pvs.io import Volume
from napari_pvs.phantom import conformed_aseg, make_phantom

pytestmark = pytest.mark.gui


@pytest.fixture(scope="module")
def phantom96():
    return make_phantom(seed=3, size_mm=96, subject="r")


def _open(viewer, ph, tmp_path, shift_mm: float = 0.0):
    """The phantom's image, and its aseg on FreeSurfer's 256³ LIA grid opened with the
    plugin's reader as ``aseg`` (its world position shifted by ``shift_mm``)."""
    from napari_pvs._reader import read_nifti

    scale, aff = Volume(None, ph.affine, ph.spacing).napari_transform()
    meta = {"nifti_affine": ph.affine.tolist(), "modality": "T2w"}
    image = viewer.add_image(ph.image, name="phantom T2w", scale=scale, affine=aff, metadata=meta)
    mgh = conformed_aseg(ph)
    affine = mgh.affine.copy()
    affine[:3, 3] += shift_mm
    path = tmp_path / "aseg.mgz"
    nib.save(nib.MGHImage(np.asarray(mgh.dataobj), affine), path)
    [(data, kwargs, kind)] = read_nifti(str(path))
    assert kind == "labels" and kwargs["name"] == "aseg"
    seg = viewer.add_labels(data, **kwargs)
    return image, seg


def _widget(viewer, qtbot):
    from napari_pvs._widgets.predict import BASELINE, PredictWidget

    w = PredictWidget(viewer)
    qtbot.addWidget(w)
    w.model.value = BASELINE  # not the default starter model
    return w


def _choose_segmentation(w, seg):
    from napari_pvs._widgets.predict import AUTOMATIC, Segmentation

    names = [w.regions.native.itemText(i) for i in range(w.regions.native.count())]
    # no region map on the image's grid: automatic by default; the aseg (256³) is no
    # region map of the image, only a segmentation
    assert names == [AUTOMATIC, "segmentation: aseg"] and w.regions.value is None
    w.regions.value = Segmentation(seg)


def test_regions_from_a_segmentation_on_another_grid(make_napari_viewer, qtbot, tmp_path,
                                                     phantom96, monkeypatch):
    import napari.utils.notifications as notifications

    ph = phantom96
    viewer = make_napari_viewer()
    image, seg = _open(viewer, ph, tmp_path)
    assert seg.data.shape == (256, 256, 256) != image.data.shape
    infos = []
    monkeypatch.setattr(notifications, "show_info", infos.append)
    w = _widget(viewer, qtbot)
    _choose_segmentation(w, seg)
    returned = []
    w.run().returned.connect(returned.append)
    qtbot.waitUntil(lambda: w.worker is None, timeout=180_000)
    pred, made = returned[0]
    assert not any("automatically" in m for m in infos)  # real regions: no note

    # the region map made from the aseg, on the image's grid, is in the viewer
    regions = viewer.layers["phantom T2w regions from aseg (1 WM, 2 BG)"]
    assert regions.metadata["role"] == "regions" and regions.data.shape == image.data.shape
    np.testing.assert_array_equal(regions.scale, image.scale)
    truth = np.isin(ph.regions, (1, 2))
    mapped = np.isin(regions.data, (1, 2))
    mismatch = np.count_nonzero(truth ^ mapped) / np.count_nonzero(truth)
    print(f"WM+BG from the conformed aseg vs the phantom's: {mismatch:.2%} of voxels differ")
    # two nearest-neighbour resamplings between grids half a voxel apart (the phantom's
    # voxel centres lie at .5 mm, the conformed grid's at whole mm) move the boundary by
    # up to a voxel: 9.7% of the WM+BG voxels of this 96 mm phantom (4.8% each way)
    assert mismatch < 0.15

    labels = viewer.layers["phantom T2w [baseline] PVS"]
    np.testing.assert_array_equal(labels.data, pred.labels)
    assert labels.metadata["prediction"]["regions"] == regions.name
    pvs = labels.data > 0
    assert pvs.any()
    outside = np.count_nonzero(pvs & ~truth) / np.count_nonzero(pvs)
    print(f"PVS voxels outside the phantom's true WM+BG: {outside:.2%}")
    assert not (pvs & ~mapped).any()  # labelled inside the given regions only
    assert outside < 0.06  # 2.9% measured: the region boundary moved by a voxel (above)
    assert not (pvs & ~ndimage.binary_dilation(truth)).any()  # and by no more
    table = viewer.layers["phantom T2w [baseline] clusters"].features
    assert set(table["region"][1:]) <= {"WM", "BG"} and len(table) > 1  # row 0: background


def test_a_segmentation_that_does_not_overlap_is_an_error_and_loses_nothing(
        make_napari_viewer, qtbot, tmp_path, phantom96, monkeypatch):
    import napari.utils.notifications as notifications

    viewer = make_napari_viewer()
    image, seg = _open(viewer, phantom96, tmp_path, shift_mm=1000.0)
    errors = []
    monkeypatch.setattr(notifications, "show_error", errors.append)
    w = _widget(viewer, qtbot)
    _choose_segmentation(w, seg)
    before = [lay.name for lay in viewer.layers]
    assert w.run() is not None
    qtbot.waitUntil(lambda: w.worker is None, timeout=60_000)
    assert len(errors) == 1 and "does not overlap the image" in errors[0]
    assert [lay.name for lay in viewer.layers] == before  # nothing added, nothing lost
    assert w.run_button.enabled and not w.cancel_button.enabled
    assert w.regions.value.layer is seg  # the choice stays, to fix and run again


def test_automatic_regions_say_once_what_they_mean(make_napari_viewer, qtbot, tmp_path,
                                                   monkeypatch):
    import napari.utils.notifications as notifications

    from napari_pvs._widgets.predict import AUTOMATIC_NOTE

    viewer = make_napari_viewer()
    ph = make_phantom(seed=0, size_mm=48, subject="a")
    scale, aff = Volume(None, ph.affine, ph.spacing).napari_transform()
    viewer.add_image(ph.image, name="phantom T2w", scale=scale, affine=aff,
                     metadata={"nifti_affine": ph.affine.tolist(), "modality": "T2w"})
    infos = []
    monkeypatch.setattr(notifications, "show_info", infos.append)
    w = _widget(viewer, qtbot)
    assert w.regions.value is None
    for _ in range(2):
        w.run()
        qtbot.waitUntil(lambda: w.worker is None, timeout=60_000)
    assert infos.count(AUTOMATIC_NOTE) == 1
    assert "MedNet-PVS" in AUTOMATIC_NOTE and "aseg.mgz" in AUTOMATIC_NOTE
    assert "phantom T2w [baseline] PVS" in viewer.layers
