"""Per-cluster table and per-region scores: hand-built volumes and a slow reference."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from _cluster_reference import reference_table

from napari_pvs.cli import main
from napari_pvs.clusters import cluster_table, label_clusters
from napari_pvs.metrics import score


def test_diagonal_touching_voxels_depend_on_connectivity():
    m = np.zeros((5, 5, 5), np.uint8)
    m[1, 1, 1] = m[2, 2, 2] = 1  # corner contact only
    m[3, 0, 4] = m[4, 0, 4] = 1  # face contact, away from the others
    assert label_clusters(m, 26)[1] == 2
    assert label_clusters(m, 6)[1] == 3
    m2 = np.zeros((5, 5, 5), np.uint8)
    m2[1, 1, 1] = m2[2, 2, 1] = 1  # edge contact: 18 and 26 join, 6 does not
    assert label_clusters(m2, 18)[1] == 1 and label_clusters(m2, 6)[1] == 2
    with pytest.raises(ValueError):
        label_clusters(m, 4)


def test_hand_built_table_values():
    lab = np.zeros((10, 10, 10), np.uint32)
    lab[2, 2, 1:6] = 1  # a 5-voxel line along k
    lab[6:8, 6:8, 6:8] = 2  # a 2x2x2 blob
    reg = np.zeros_like(lab, dtype=np.uint8)
    reg[:5] = 1
    reg[5:] = 2
    prob = np.zeros(lab.shape, np.float32)
    prob[lab == 1] = 0.9
    prob[lab == 2] = 0.6
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = [10, 20, 30]
    t = cluster_table(lab, probability=prob, regions=reg, affine=affine)
    assert list(t.columns["id"]) == [1, 2] and list(t.columns["voxels"]) == [5, 8]
    assert t.columns["volume_mm3"][0] == pytest.approx(40.0)
    assert t.columns["centroid_k"][0] == pytest.approx(3.0)
    assert t.columns["centroid_z"][0] == pytest.approx(36.0)
    assert (t.columns["bbox_k_min"][0], t.columns["bbox_k_max"][0]) == (1, 5)
    assert list(t.columns["region"]) == ["WM", "BG"]
    assert t.columns["prob_mean"][1] == pytest.approx(0.6)
    assert np.isnan(t.columns["unc_mean"][0])
    # a line is linear, a cube is not; rod length: 5 voxels of 2 mm = 10 mm
    assert t.columns["linearity"][0] > 0.9 and t.columns["linearity"][1] < 0.01
    assert t.columns["length_mm"][0] == pytest.approx(10.0, rel=1e-6)
    # without uncertainty the blob of lower probability comes first
    assert list(t.order("priority")) == [1, 0]
    assert list(t.order("voxels", descending=False)) == [0, 1]


def test_empty_map_gives_an_empty_table(tmp_path):
    t = cluster_table(np.zeros((4, 4, 4), np.uint32))
    assert len(t) == 0
    t.to_csv(tmp_path / "e.csv")
    assert (tmp_path / "e.csv").read_text().startswith("id,voxels")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_table_equals_the_slow_reference(seed):
    rng = np.random.default_rng(seed)
    mask = rng.random((30, 28, 26)) < 0.08
    labels, n = label_clusters(mask)
    prob = rng.random(mask.shape).astype(np.float32)
    unc = rng.random(mask.shape).astype(np.float32)
    reg = rng.integers(0, 4, mask.shape).astype(np.uint8)  # 3 is "other"
    c, s_ = np.cos(0.3), np.sin(0.3)
    affine = np.array([[0.8 * c, -0.9 * s_, 0, 5], [0.8 * s_, 0.9 * c, 0, -3], [0, 0, 1.2, 7],
                       [0, 0, 0, 1]])
    t = cluster_table(labels, probability=prob, uncertainty=unc, regions=reg, affine=affine)
    ref = reference_table(labels, prob, unc, reg, affine)
    assert len(t) == n == len(ref)
    for i in range(len(t)):
        row = t.row(i)
        want = ref[row["id"]]
        for key, value in want.items():
            if isinstance(value, str):
                assert row[key] == value, (key, row["id"])
            else:
                assert row[key] == pytest.approx(value, rel=1e-9, abs=1e-9), (key, row["id"])


def test_csv_export(tmp_path):
    lab, _ = label_clusters(np.eye(6, dtype=np.uint8)[:, :, None].repeat(3, axis=2))
    path = cluster_table(lab).to_csv(tmp_path / "c.csv")
    rows = path.read_text().splitlines()
    assert len(rows) == 2 and rows[0].split(",")[:3] == ["id", "voxels", "volume_mm3"]


def test_scores_by_region():
    pred = np.zeros((20, 10, 10), np.uint8)
    ref = np.zeros_like(pred)
    regions = np.zeros_like(pred)
    regions[:10] = 1
    regions[10:] = 2
    ref[2, 2, 2:6] = 1  # WM cluster, found
    pred[2, 2, 3:7] = 1
    ref[5, 5, 5] = 1  # WM cluster, missed
    pred[15, 5, 5] = 1  # BG false positive
    s = score(pred, ref, regions)
    assert s["WM"]["cluster_dice"] == pytest.approx(2 / 3)
    assert s["WM"]["cluster_recall"] == pytest.approx(0.5)
    assert s["BG"]["cluster_dice"] == 0.0 and s["BG"]["count_error"] == 1
    assert s["all"]["n_pred"] == 2 and s["all"]["n_ref"] == 2
    assert s["WM"]["voxel_dice"] == pytest.approx(2 * 3 / (4 + 5))
    empty = score(np.zeros_like(pred), np.zeros_like(pred), regions)
    assert all(v["voxel_dice"] == 1.0 and v["cluster_dice"] == 1.0 for v in empty.values())


def test_score_cli_prints_json(tmp_path, capsys):
    pred = np.zeros((8, 8, 8), np.uint8)
    pred[1:3, 1, 1] = 1
    ref = pred.copy()
    reg = np.ones_like(pred)
    for name, a in (("p", pred), ("r", ref), ("g", reg)):
        nib.save(nib.Nifti1Image(a, np.eye(4)), tmp_path / f"{name}.nii.gz")
    assert main(["score", str(tmp_path / "p.nii.gz"), str(tmp_path / "r.nii.gz"),
                 "--regions", str(tmp_path / "g.nii.gz")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["scores"]["WM"]["voxel_dice"] == 1.0 and out["scores"]["BG"]["n_ref"] == 0
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.uint8), np.eye(4)), tmp_path / "x.nii.gz")
    assert main(["score", str(tmp_path / "p.nii.gz"), str(tmp_path / "x.nii.gz")]) == 2


def test_cluster_ids_do_not_depend_on_memory_order():
    """nibabel reads NIfTI voxels in Fortran order; a saved and re-read prediction must get
    the cluster ids (and so the table rows) it had when it was made."""
    rng = np.random.default_rng(4)
    mask = rng.random((20, 21, 22)) > 0.9
    c_ids, n = label_clusters(np.ascontiguousarray(mask))
    f_ids, m = label_clusters(np.asfortranarray(mask))
    assert n == m > 10
    np.testing.assert_array_equal(c_ids, f_ids)
