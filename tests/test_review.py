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


# ---------------------------------------------------------------- decision state machine
def _state(s, lab, cid):
    """(decision, cluster voxels still set, summary counters) of cluster ``cid``."""
    idx = s.cluster_voxels(cid)
    sm = s.summary()
    return (s.decisions.get(cid, "unreviewed"), int(np.count_nonzero(lab.reshape(-1)[idx])),
            sm["clusters_accepted"], sm["clusters_rejected"], sm["voxels_rejected"])


@pytest.mark.parametrize("steps, want", [
    # the reported loss: the second reject used to record an empty erase, which the accept
    # then "restored" -- the cluster stayed erased, shown as accepted, 0 voxels rejected
    (["reject", "reject", "accept"], ("accepted", 27, 1, 0, 0)),
    (["reject", "reject", "undo"], ("unreviewed", 27, 0, 0, 0)),
    (["reject", "accept", "undo"], ("rejected", 0, 0, 1, 27)),
    (["accept", "reject", "undo"], ("accepted", 27, 1, 0, 0)),
    (["accept", "accept", "undo"], ("unreviewed", 27, 0, 0, 0)),
    (["reject", "accept", "reject", "undo", "undo"], ("rejected", 0, 0, 1, 27)),
    (["reject", "accept", "reject", "undo", "undo", "undo"], ("unreviewed", 27, 0, 0, 0)),
    (["accept", "reject", "reject", "accept"], ("accepted", 27, 1, 0, 0)),
])
def test_decisions_are_a_state_machine_and_never_lose_voxels(steps, want):
    lab = _labels()
    before = lab.copy()
    s = ReviewSession(lab)
    blob = _ids(s)[27]
    for step in steps:
        s.undo() if step == "undo" else getattr(s, step)(blob)
    assert _state(s, lab, blob) == want
    others = np.ones(lab.size, bool)
    others[s.cluster_voxels(blob)] = False
    np.testing.assert_array_equal(lab.reshape(-1)[others], before.reshape(-1)[others])
    while s.undo() is not None:  # undoing everything gives back the labels it started with
        pass
    np.testing.assert_array_equal(lab, before)
    assert s.summary()["voxels_rejected"] == 0 and s.reviewed == 0


def test_a_repeated_decision_is_a_no_op_without_event_or_undo_step():
    lab = _labels()
    s = ReviewSession(lab)
    blob = _ids(s)[27]
    assert s.reject(blob)["kind"] == "cluster_rejected"
    assert s.reject(blob) is None
    assert [e["kind"] for e in s.events] == ["cluster_rejected"]
    assert s.undo() == blob and s.undo() is None  # one step only
    assert s.accept(blob)["kind"] == "cluster_accepted" and s.accept(blob) is None
    assert s.state(blob) == "accepted"


def test_painting_wins_over_restoring_a_rejected_cluster():
    lab = _labels()
    before = lab.copy()
    s = ReviewSession(lab)
    blob = _ids(s)[27]
    v = np.ravel_multi_index((11, 11, 11), lab.shape)
    s.reject(blob)
    s.accept(blob)
    lab[11, 11, 11] = 0  # the reviewer erases one voxel of the accepted cluster by hand
    assert s.record_paint(np.array([v]), 0)["voxels"] == 1
    assert s.summary()["voxels_painted_manually"] == 1
    s.undo()  # back to rejected: the painted voxel is not the rejection's to restore later
    assert lab[10:13, 10:13, 10:13].sum() == 0 and s.summary()["voxels_rejected"] == 26
    assert s.summary()["voxels_painted_manually"] == 0  # the rejection erases it anyway
    s.accept(blob)  # restores the 26 voxels the rejection erased, not the painted one
    assert lab[11, 11, 11] == 0 and lab[10:13, 10:13, 10:13].sum() == 26
    assert s.summary()["voxels_painted_manually"] == 1
    # painting into a rejected cluster survives its undo and its re-rejection
    s.reject(blob)
    lab[10, 10, 10] = 1
    s.record_paint((np.array([10]), np.array([10]), np.array([10])), 1)  # a napari multi-index
    assert s.summary()["voxels_rejected"] == 25
    s.undo()
    s.reject(blob)
    assert lab[10, 10, 10] == 1 and lab[11, 11, 11] == 0 and lab[10:13, 10:13, 10:13].sum() == 1
    others = np.ones(lab.shape, bool)
    others[10:13, 10:13, 10:13] = False
    np.testing.assert_array_equal(lab[others], before[others])


def test_record_paint_keeps_the_count_form_and_refuses_bad_indices():
    lab = _labels()
    s = ReviewSession(lab)
    assert s.record_paint(5, 1)["voxels"] == 5 and s.painted == 5
    assert s.record_paint(np.zeros(0, np.int64)) is None  # nothing painted: no event
    s.painted = 7  # the widget carries the count of an earlier session over
    assert s.summary()["voxels_painted_manually"] == 7
    with pytest.raises(ValueError, match="flat indices"):
        s.record_paint(np.array([lab.size]))
    with pytest.raises(ValueError, match="outside the labels"):
        s.record_paint((np.array([20]), np.array([0]), np.array([0])))


def test_fortran_ordered_labels_are_edited_in_place():
    lab = np.asfortranarray(_labels())
    s = ReviewSession(lab)
    blob = _ids(s)[27]
    s.reject(blob)
    assert lab[10:13, 10:13, 10:13].sum() == 0 and int(lab.sum()) == 41
    s.undo()
    assert lab[10:13, 10:13, 10:13].all()


def test_painted_voxels_reads_napari_paint_events():
    from napari_pvs.review import painted_voxels

    shape = (4, 5, 6)
    mask = np.zeros((1, 2, 3), bool)
    mask[0, 1, 2] = mask[0, 0, 0] = True
    atoms = [((slice(2, 3), slice(1, 3), slice(3, 6)), mask, np.zeros(2), 1),  # masked stroke
             ((slice(0, 1), slice(0, 1), slice(0, 2)), None, np.zeros((1, 1, 2)), 1),  # whole box
             ((np.array([3]), np.array([4]), np.array([5])), np.zeros(1), 1)]  # data_setitem
    idx, value = painted_voxels(atoms, shape)
    want = [(2, 1, 3), (2, 2, 5), (0, 0, 0), (0, 0, 1), (3, 4, 5)]
    assert idx.tolist() == sorted(np.ravel_multi_index(tuple(np.array(want).T), shape).tolist())
    assert value == 1
    assert painted_voxels(atoms[:1] + [(atoms[2][0], np.zeros(1), 0)], shape)[1] is None


def test_napari_paint_events_protect_painted_voxels():
    """The review widget's wiring, without a viewer: a napari Labels layer sharing the
    array reports its paint events to the session through ``painted_voxels``."""
    from napari.layers import Labels

    from napari_pvs.review import painted_voxels

    lab = _labels()
    s = ReviewSession(lab)
    layer = Labels(lab)
    assert layer.data is lab
    layer.events.paint.connect(lambda e: s.record_paint(*painted_voxels(e.value, lab.shape)))
    blob = _ids(s)[27]
    s.reject(blob)
    s.accept(blob)
    layer.brush_size = 1
    layer.paint((11, 11, 11), 0, refresh=False)  # a brush stroke erases one voxel by hand
    layer.data_setitem((np.array([12]), np.array([12]), np.array([12])), 0, refresh=False)
    assert lab[11, 11, 11] == 0 and lab[12, 12, 12] == 0
    assert s.events[-1]["kind"] == "paint" and s.summary()["voxels_painted_manually"] == 2
    s.undo()  # rejected again
    s.accept(blob)  # restores what the rejection erased, not the painted voxels
    assert lab[10:13, 10:13, 10:13].sum() == 25 and lab[11, 11, 11] == 0 and lab[12, 12, 12] == 0


# ---------------------------------------------------------------- signals
def _record(s):
    """Every signal the session emits, in order, as (name, args)."""
    got = []
    for name in ("decided", "undone", "paint_recorded", "recomputed", "saved", "changed"):
        getattr(s, name).connect(lambda *args, name=name: got.append((name, args)))
    return got


def test_decisions_undo_and_paint_emit_signals_after_the_change():
    lab = _labels()
    s = ReviewSession(lab)
    got = _record(s)
    blob, rod = _ids(s)[27], _ids(s)[40]
    seen = []  # what a listener sees when the signal arrives: the labels already changed
    s.decided.connect(lambda cid, state: seen.append((state, int(lab[11, 11, 11]))))
    s.reject(blob)
    assert got == [("decided", (blob, "rejected")), ("changed", ())]
    assert seen == [("rejected", 0)]
    got.clear()
    assert s.reject(blob) is None and got == []  # a repeated decision: nothing
    s.accept(rod)
    s.accept(rod)
    assert got == [("decided", (rod, "accepted")), ("changed", ())]
    got.clear()
    s.undo()
    s.undo()
    assert got == [("undone", (rod, "unreviewed")), ("changed", ()),
                   ("undone", (blob, "unreviewed")), ("changed", ())]
    got.clear()
    assert s.undo() is None and got == []  # nothing to undo: nothing
    s.record_paint(np.zeros(0, np.int64))
    assert got == []
    s.record_paint(np.array([0, 1, 1]), 1)
    s.record_paint(4)
    assert got == [("paint_recorded", (2,)), ("changed", ()), ("paint_recorded", (4,)),
                   ("changed", ())]


def test_recompute_relabels_keeps_the_log_and_emits():
    lab = _labels()
    s = ReviewSession(lab)
    blob = _ids(s)[27]
    s.reject(blob)
    lab[16, 16, 15] = 1  # painted next to the one-voxel cluster, reported by index
    s.record_paint(np.array([np.ravel_multi_index((16, 16, 15), lab.shape)]), 1)
    got = _record(s)
    unc = np.full(lab.shape, 0.25, np.float32)
    assert s.recompute(uncertainty=unc) == 2  # the rejected blob is gone, the rod remains
    assert got == [("recomputed", (2,)), ("changed", ())]
    assert s.decisions == {} and s.undo() is None  # its decisions went with the clusters
    assert sorted(int(v) for v in s.table.columns["voxels"]) == [2, 40]
    np.testing.assert_allclose(s.table.columns["unc_mean"], 0.25)
    assert s.dirty and [e["kind"] for e in s.events] == ["cluster_rejected", "paint"]
    assert s.painted == 1  # still counted, no longer located
    with pytest.raises(ValueError, match="unknown maps"):
        s.recompute(probabilities=unc)
    with pytest.raises(ValueError):  # a map of another grid changes nothing
        s.recompute(uncertainty=np.zeros((3, 3, 3), np.float32))
    assert s.n == 2 and len(got) == 2


def test_save_emits_the_version(tmp_path):
    from napari_pvs.io import Volume

    lab = _labels()
    store = CorrectionsStore.create(tmp_path / "s.pvs.zarr")
    store.add_subject("sub01", Volume(np.zeros(lab.shape, np.float32), np.eye(4), (1.0,) * 3))
    s = ReviewSession(lab)
    s.reject(_ids(s)[1])
    got = _record(s)
    assert s.save(store, "sub01", author="me") == 1
    assert got == [("saved", (1,)), ("changed", ())]
    store.close()
