"""Voxel and cluster Dice on hand-built volumes with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from napari_pvs.metrics import cluster_scores, voxel_dice


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
