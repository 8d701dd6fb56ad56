"""ReviewSession: cluster decisions edit the labels, undo restores them, save commits."""

from __future__ import annotations

import numpy as np
import pytest

from napari_pvs.review import ReviewSession
from napari_pvs.store import CorrectionsStore


def _labels():
    lab = np.zeros((20, 20, 20), np.uint8)
    lab[2:4, 2:4, 2:12] = 1   # cluster A: a 2x2x10 rod (40 voxels)
    lab[10:13, 10:13, 10:13] = 1  # cluster B: a 3x3x3 blob (27 voxels)
    lab[16, 16, 16] = 1  # cluster C: one voxel
    return lab


def _ids(s):
    """Cluster id by its size."""
    return {int(v): int(c) for c, v in zip(s.table.columns["id"], s.table.columns["voxels"], strict=True)}


def test_reject_erases_exactly_the_cluster_and_undo_restores_it():
    lab = _labels()
    before = lab.copy()
    s = ReviewSession(lab)
    assert s.n == 3
    blob = _ids(s)[27]
    s.reject(blob)
    assert lab[10:13, 10:13, 10:13].sum() == 0  # edited in place
    assert int(lab.sum()) == 41
    assert s.decisions == {blob: "rejected"} and s.reviewed == 1 and s.dirty
    assert s.summary()["voxels_rejected"] == 27 and s.summary()["clusters_rejected"] == 1
    assert s.undo() == blob
    np.testing.assert_array_equal(lab, before)
    assert s.reviewed == 0
    assert [e["kind"] for e in s.events] == ["cluster_rejected", "undo"]
    assert s.undo() is None


def test_accepting_a_rejected_cluster_puts_it_back_and_undo_erases_it_again():
    lab = _labels()
    s = ReviewSession(lab)
    rod = _ids(s)[40]
    s.reject(rod)
    s.accept(rod)
    assert lab[2:4, 2:4, 2:12].all() and s.decisions[rod] == "accepted"
    s.undo()
    assert lab[2:4, 2:4, 2:12].sum() == 0 and s.decisions[rod] == "rejected"


def test_reject_keeps_voxels_painted_over_since():
    lab = _labels()
    s = ReviewSession(lab)
    blob = _ids(s)[27]
    lab[10, 10, 10] = 0  # the user erased one voxel by hand first
    s.reject(blob)
    s.undo()
    assert lab[10, 10, 10] == 0 and lab[10:13, 10:13, 10:13].sum() == 26


def test_order_and_navigation_prefer_unreviewed_clusters():
    lab = _labels()
    s = ReviewSession(lab)
    by_size = s.order("voxels", descending=True)
    assert [int(s.row(c)["voxels"]) for c in by_size] == [40, 27, 1]
    s.accept(by_size[1])
    assert s.next_unreviewed(by_size, after=by_size[0]) == by_size[2]
    assert s.next_unreviewed(by_size, after=by_size[2], step=-1) == by_size[0]
    with pytest.raises(ValueError, match="unknown column"):
        s.order("nope")
    with pytest.raises(ValueError, match="no cluster 9"):
        s.reject(9)


def test_bad_label_arrays_are_refused():
    with pytest.raises(ValueError, match="numpy array"):
        ReviewSession([[[0]]])
    with pytest.raises(ValueError, match="3D"):
        ReviewSession(np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match="integers"):
        ReviewSession(np.zeros((4, 4, 4), np.float32))
    ro = np.zeros((4, 4, 4), np.uint8)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        ReviewSession(ro)


def test_save_commits_a_version_with_summary_and_events(tmp_path):
    from napari_pvs.io import Volume

    lab = _labels()
    store = CorrectionsStore.create(tmp_path / "s.pvs.zarr")
    img = np.random.default_rng(0).random(lab.shape).astype(np.float32)
    store.add_subject("sub01", Volume(img, np.eye(4), (1.0, 1.0, 1.0)))
    store.commit_labels("sub01", lab, author="model", source="model:x")
    s = ReviewSession(lab)
    ids = _ids(s)
    s.reject(ids[27])
    s.accept(ids[40])
    s.record_paint(5, 1)
    v = s.save(store, "sub01", author="me", affine=np.eye(4))
    assert v == 2 and not s.dirty and s.events == []
    meta = store.versions("sub01")[-1]
    assert meta["source"] == "review"
    assert meta["summary"]["voxels_erased"] == 27 and meta["summary"]["clusters_accepted"] == 1
    assert meta["summary"]["voxels_painted_manually"] == 5
    np.testing.assert_array_equal(store.labels("sub01", 2)[...], lab)
    kinds = [e["kind"] for e in store.events("sub01")]
    assert kinds[-4:] == ["commit", "cluster_rejected", "cluster_accepted", "paint"]
    # a failed save (wrong grid) keeps the session dirty and its events
    s.reject(ids[1])
    with pytest.raises(Exception, match="affine"):
        s.save(store, "sub01", author="me", affine=np.diag([2.0, 2, 2, 1]))
    assert s.dirty and len(s.events) == 1 and store.latest_version("sub01") == 2
    store.close()
