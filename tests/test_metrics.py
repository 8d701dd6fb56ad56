"""Voxel and cluster Dice on hand-built volumes with known answers."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from _helpers import assert_clean_failure, run_cli

from napari_pvs import PVSInputError
from napari_pvs.io import load_volume
from napari_pvs.metrics import cluster_scores, score, voxel_dice


def test_voxel_dice_known_values():
    a = np.zeros((4, 4, 4), bool)
    b = np.zeros_like(a)
    a[0, 0, :2] = True  # 2 voxels
    b[0, 0, 1:4] = True  # 3 voxels, 1 shared
    assert voxel_dice(a, b) == pytest.approx(2 * 1 / 5)
    assert voxel_dice(a, a) == 1.0
    mask = np.zeros_like(a)
    mask[0, 0, 1] = True
    assert voxel_dice(a, b, mask) == 1.0


def test_empty_cases():
    z = np.zeros((3, 3, 3), np.uint8)
    one = z.copy()
    one[1, 1, 1] = 1
    assert voxel_dice(z, z) == 1.0
    assert voxel_dice(one, z) == 0.0
    assert cluster_scores(z, z).dice == 1.0
    s = cluster_scores(one, z)
    assert (s.dice, s.n_pred, s.n_ref) == (0.0, 1, 0)
    assert cluster_scores(one, one).dice == 1.0


def test_cluster_dice_rule():
    pred = np.zeros((10, 10, 10), np.uint8)
    ref = np.zeros_like(pred)
    pred[1, 1, 1:4] = 1  # overlaps ref cluster A
    pred[8, 8, 8] = 1  # false positive
    ref[1, 1, 3:6] = 1  # A
    ref[5, 1, 1] = 1  # B, missed
    ref[5, 5, 1] = 1  # C, missed
    s = cluster_scores(pred, ref)
    assert (s.n_pred, s.n_ref, s.detected_pred, s.detected_ref) == (2, 3, 1, 1)
    assert s.dice == pytest.approx(2 / 5)
    assert s.precision == pytest.approx(0.5) and s.recall == pytest.approx(1 / 3)


def test_diagonal_neighbours_depend_on_connectivity():
    pred = np.zeros((4, 4, 4), np.uint8)
    pred[0, 0, 0] = pred[1, 1, 1] = 1  # touch only at a corner
    ref = np.zeros_like(pred)
    ref[0, 0, 0] = 1
    assert cluster_scores(pred, ref, connectivity=26).n_pred == 1
    s6 = cluster_scores(pred, ref, connectivity=6)
    assert s6.n_pred == 2 and s6.detected_pred == 1


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="shape"):
        voxel_dice(np.zeros((2, 2, 2)), np.zeros((2, 2, 3)))


def _maps(tmp_path, shift_mm=(0.0, 0.0, 0.0), regions=1, ref_value=1):
    """pred.nii.gz, ref.nii.gz (identical voxels) and regions.nii.gz on a 1 mm 8^3 grid;
    the reference's affine is translated by *shift_mm*."""
    pred = np.zeros((8, 8, 8), np.int16)
    pred[2:5, 3, 3] = 1
    affine = np.eye(4)
    shifted = affine.copy()
    shifted[:3, 3] += shift_mm
    files = {}
    for name, data, aff in (("pred", pred, affine), ("ref", pred * ref_value, shifted),
                            ("regions", np.full_like(pred, regions), affine)):
        files[name] = tmp_path / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(data, aff), files[name])
    return files


def test_score_refuses_maps_on_different_grids(tmp_path):
    files = _maps(tmp_path, shift_mm=(5.0, 0.0, 0.0))
    pred, ref = (load_volume(files[k], as_labels=True) for k in ("pred", "ref"))
    assert score(pred.data, ref.data)["all"]["voxel_dice"] == 1.0  # arrays carry no geometry
    with pytest.raises(PVSInputError, match=r"ref\.nii\.gz: map affine differs from that of "
                                            r".*pred\.nii\.gz by up to 5 \(mm\)"):
        score(pred, ref)
    rc, out, err = run_cli("score", files["pred"], files["ref"])
    assert_clean_failure(rc, out, err, "ref.nii.gz", "pred.nii.gz", "affine differs")


def test_score_accepts_affines_within_the_store_tolerance(tmp_path):
    files = _maps(tmp_path, shift_mm=(5e-4, 0.0, 0.0))
    pred, ref, reg = (load_volume(files[k], as_labels=True) for k in ("pred", "ref", "regions"))
    assert score(pred, ref, reg)["WM"]["voxel_dice"] == 1.0


def test_score_refuses_an_empty_region_map(tmp_path):
    files = _maps(tmp_path, regions=0)
    pred, ref, reg = (load_volume(files[k], as_labels=True) for k in ("pred", "ref", "regions"))
    with pytest.raises(PVSInputError, match=r"regions\.nii\.gz has no voxel inside a region"):
        score(pred, ref, reg)
    with pytest.raises(PVSInputError, match="regions has no voxel"):
        score(pred.data, ref.data, np.zeros_like(pred.data))
    rc, out, err = run_cli("score", files["pred"], files["ref"], "--regions", files["regions"])
    assert_clean_failure(rc, out, err, "regions.nii.gz", "no voxel inside a region")


@pytest.mark.parametrize("which", ["ref", "regions"])
def test_score_refuses_negative_labels(tmp_path, which):
    files = _maps(tmp_path, **({"ref_value": -1} if which == "ref" else {"regions": -2}))
    pred, ref, reg = (load_volume(files[k], as_labels=True) for k in ("pred", "ref", "regions"))
    with pytest.raises(PVSInputError, match=rf"{which}\.nii\.gz holds negative labels"):
        score(pred, ref, reg)
    rc, out, err = run_cli("score", files["pred"], files["ref"], "--regions", files["regions"])
    assert_clean_failure(rc, out, err, f"{which}.nii.gz", "negative labels")
