"""Frangi baseline: tiled filter equals skimage, Dice well above chance, bad input."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.filters import frangi

from napari_pvs import PVSInputError
from napari_pvs.baseline import _frangi_tiled, segment_frangi
from napari_pvs.metrics import cluster_scores, voxel_dice
from napari_pvs.phantom import make_phantom


def test_tiled_frangi_equals_one_skimage_call():
    rng = np.random.default_rng(0)
    img = rng.normal(size=(64, 40, 36)).astype(np.float32)
    sig = [0.6, 1.0, 1.5]
    whole = frangi(img, sigmas=sig, black_ridges=False, alpha=0.5, beta=0.5, gamma=0.5)
    tiled = _frangi_tiled(img, sig, black=False, gamma=0.5, workers=3)
    np.testing.assert_allclose(tiled, whole, atol=1e-5)


def test_finds_a_single_bright_tube_and_nothing_else():
    img = np.full((40, 40, 40), 100.0, np.float32)
    img[20, 20, 5:35] = 300.0  # a one-voxel bright line
    img[19:22, 19:22, 5:35] += 60.0
    res = segment_frangi(img, 1.0, roi=np.ones(img.shape, bool))
    assert res.labels[20, 20, 10:30].all()
    assert res.labels[:, :, :3].sum() == 0 and res.labels[:15].sum() == 0


@pytest.mark.parametrize("modality", ["T2w", "T1w"])
def test_dice_well_above_chance_on_phantoms(modality):
    ph = make_phantom(21, modality=modality, size_mm=112.0)
    roi = ph.regions > 0
    res = segment_frangi(ph.image, ph.spacing, roi=roi, modality=modality)
    assert res.labels.dtype == np.uint8
    assert not np.any(res.labels[~roi])
    dice = voxel_dice(res.labels, ph.labels, roi)
    # chance: a random mask of the same size inside the ROI
    rng = np.random.default_rng(0)
    chance_mask = np.zeros_like(roi)
    chance_mask.flat[rng.choice(np.flatnonzero(roi), int(res.labels.sum()), replace=False)] = True
    chance = voxel_dice(chance_mask, ph.labels, roi)
    assert chance < 0.05
    assert dice > 0.3 and dice > 8 * chance
    assert cluster_scores(res.labels, ph.labels, mask=roi).dice > 0.35


def test_wrong_contrast_setting_does_much_worse():
    ph = make_phantom(21, size_mm=96.0)
    roi = ph.regions > 0
    right = voxel_dice(segment_frangi(ph.image, ph.spacing, roi=roi).labels, ph.labels, roi)
    wrong = voxel_dice(
        segment_frangi(ph.image, ph.spacing, roi=roi, modality="T1w").labels, ph.labels, roi
    )
    assert wrong < 0.5 * right


def test_bad_input():
    img = np.ones((10, 10, 10), np.float32)
    with pytest.raises(PVSInputError, match="3D"):
        segment_frangi(np.ones((10, 10)))
    with pytest.raises(PVSInputError, match="ROI shape"):
        segment_frangi(img, roi=np.ones((9, 10, 10)))
    with pytest.raises(PVSInputError, match="empty"):
        segment_frangi(img, roi=np.zeros((10, 10, 10)))
    with pytest.raises(PVSInputError, match="modality"):
        segment_frangi(img, modality="FLAIR")
    with pytest.raises(PVSInputError, match="no positive voxels"):
        segment_frangi(-img)
    with pytest.raises(PVSInputError, match="positive MR magnitude"):
        segment_frangi(-img, roi=img > 0)
    with pytest.warns(UserWarning, match="anisotropic"):
        segment_frangi(img * 100, (0.5, 0.5, 3.0))
