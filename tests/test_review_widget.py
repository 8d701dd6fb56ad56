"""The review widget, driven through a real viewer (needs an X server: xvfb-run)."""

from __future__ import annotations

import numpy as np
import pytest
from _widget_helpers import camera, phantom_viewer

from napari_pvs.store import CorrectionsStore

pytestmark = pytest.mark.gui


def test_review_shortcuts_do_not_collide_with_napari():
    from napari.layers import Labels
    from napari.settings import get_settings

    from napari_pvs._widgets.review import KEYS

    taken = {str(k).upper().replace("+", "-") for keys in get_settings().shortcuts.shortcuts.values()
             for k in keys}
    taken |= {str(k).upper().replace("+", "-") for k in Labels.class_keymap}
    ours = {k.upper() for k in KEYS.values()}
    assert len(ours) == 5 and not ours & taken, ours & taken
    assert {"E", "P", "F", "M"} <= taken  # the check sees napari's own Labels keys


def _predicted_review(viewer, qtbot):
    """Phantom -> baseline prediction -> review widget on its labels; plants a false
    positive 3x3x3 blob in the predicted labels first (returns its centre voxel)."""
    from napari_pvs._widgets.predict import BASELINE, PredictWidget
    from napari_pvs._widgets.review import ReviewWidget

    ph, image, regions = phantom_viewer(viewer)
    pw = PredictWidget(viewer)
    qtbot.addWidget(pw)
    pw.model.value = BASELINE  # not the default starter model
    pw.run()
    qtbot.waitUntil(lambda: pw.worker is None, timeout=120_000)
    labels = viewer.layers["phantom T2w [baseline] PVS"]
    # a spot in WM with no PVS within 3 voxels: the planted blob is its own cluster
    wm = np.argwhere(ph.regions == 1)
    free = next(tuple(int(v) for v in p) for p in wm[len(wm) // 2:]
                if not labels.data[p[0] - 3:p[0] + 4, p[1] - 3:p[1] + 4, p[2] - 3:p[2] + 4].any())
    i, j, k = free
    labels.data[i - 1:i + 2, j - 1:j + 2, k - 1:k + 2] = 1
    rw = ReviewWidget(viewer)
    qtbot.addWidget(rw)
    rw.set_layer(labels)
    return ph, image, labels, rw, free, pw


def _check_sorting(rw, s):
    """The sort choice and the column headers order the table."""
    rw.sort.value = "size"
    sizes = [int(s.row(c)["voxels"]) for c in rw.order()]
    assert sizes == sorted(sizes, reverse=True)
    rw.table.horizontalHeader().sectionClicked.emit(2)  # a click on "voxels" reverses the order
    assert [int(s.row(c)["voxels"]) for c in rw.order()] == sorted(sizes)
    rw.table.horizontalHeader().sectionClicked.emit(3)  # "uncertainty": NaN for the baseline
    assert len(rw.order()) == s.n
    rw.sort.value = "priority"
    rw.sort.value = "size"
    assert [int(s.row(c)["voxels"]) for c in rw.order()] == sizes


def test_review_rejects_a_planted_false_positive_with_its_key(make_napari_viewer, qtbot, tmp_path):
    from qtpy.QtCore import Qt

    viewer = make_napari_viewer(show=True)
    ph, image, labels, rw, (i, j, k), _ = _predicted_review(viewer, qtbot)
    s = rw.session
    cid = int(s.clusters[i, j, k])
    assert s.row(cid)["voxels"] == 27 and rw.counters.value.startswith(f"reviewed 0 of {s.n}:")
    _check_sorting(rw, s)
    rw.go_to(cid)
    world = labels.data_to_world([i, j, k])
    np.testing.assert_allclose(viewer.dims.point, world, atol=1.0)  # the planted blob's slice
    np.testing.assert_allclose(camera(viewer).center[-2:], np.asarray(world)[-2:], atol=1.0)
    np.testing.assert_allclose(viewer.layers["review: current cluster"].data[0], world, atol=1e-6)
    selected = rw.table.selectionModel().selectedRows()
    assert int(rw.table.item(selected[0].row(), 0).data(Qt.UserRole)) == cid
    # J on napari's canvas rejects the current cluster, with the labels layer active
    viewer.layers.selection.active = labels
    canvas = viewer.window._qt_viewer.canvas.native
    canvas.setFocus()
    qtbot.keyClick(canvas, Qt.Key_J)
    qtbot.waitUntil(lambda: s.decisions.get(cid) == "rejected", timeout=5000)
    assert labels.data[i - 1:i + 2, j - 1:j + 2, k - 1:k + 2].sum() == 0
    assert rw.current != cid  # moved on to the next cluster
    assert rw.counters.value.startswith(f"reviewed 1 of {s.n}:")
    qtbot.keyClick(canvas, Qt.Key_U)  # undo puts it back
    qtbot.waitUntil(lambda: cid not in s.decisions, timeout=5000)
    assert labels.data[i - 1:i + 2, j - 1:j + 2, k - 1:k + 2].all()
    rw.go_to(cid)
    rw.reject()
    other = rw.current
    rw.accept()
    assert s.decisions == {cid: "rejected", other: "accepted"}
    # manual painting in the labels layer is a correction too
    labels.brush_size = 1
    labels.paint((i, j + 3, k), 1, refresh=True)
    assert s.painted > 0  # and the counters show it, once napari has written the voxels
    qtbot.waitUntil(lambda: f"{s.painted} voxels painted" in rw.counters.value, timeout=2000)
    rw.store.value = str(tmp_path / "lab.pvs.zarr")
    rw.subject.value = "w01"
    assert rw.save()
    assert not rw.has_unsaved()
    with CorrectionsStore.open(tmp_path / "lab.pvs.zarr") as store:
        saved = np.asarray(store.labels("w01")[...])
        assert saved[i - 1:i + 2, j - 1:j + 2, k - 1:k + 2].sum() == 0
        np.testing.assert_array_equal(saved, labels.data)
        meta = store.versions("w01")[-1]
        assert meta["summary"]["clusters_rejected"] == 1 and meta["summary"]["clusters_accepted"] == 1
        assert meta["summary"]["voxels_painted_manually"] == s.summary()["voxels_painted_manually"] > 0
        kinds = [e["kind"] for e in store.events("w01")]
        assert kinds.count("cluster_rejected") == 2 and "undo" in kinds and "paint" in kinds
        np.testing.assert_allclose(store.info("w01")["affine"], ph.affine)  # the image's geometry
        np.testing.assert_array_equal(store.regions("w01")[...], ph.regions)
    # Save decisions: a review-only version whose mask holds the decided clusters
    rw.go_to(rw.session.next_unreviewed(rw.order(), other))
    third = rw.current
    rw.reject()
    rw.save_panel.decisions_button.native.click()
    assert not rw.has_unsaved()
    with CorrectionsStore.open(tmp_path / "lab.pvs.zarr") as store:
        assert store.version_kind("w01") == "review" and store.info("w01")["status"] == "corrected"
        known = store.read_reviewed("w01").reshape(-1)
        for c in (cid, other, third):
            assert known[s.cluster_voxels(c)].all()
        undecided = next(c for c in range(1, s.n + 1) if c not in s.decisions)
        assert not known[s.cluster_voxels(undecided)].any()
    # work pending when retraining starts is saved as this review was: decisions only
    rw.accept()
    assert rw.has_unsaved() and rw.state.save_pending() and not rw.has_unsaved()
    with CorrectionsStore.open(tmp_path / "lab.pvs.zarr") as store:
        assert store.version_kind("w01") == "review" and store.info("w01")["latest"] == 3
    rw.unbind_keys()


def test_closing_with_unsaved_corrections_asks_first(make_napari_viewer, qtbot, tmp_path,
                                                     monkeypatch):
    from qtpy.QtGui import QCloseEvent
    from qtpy.QtWidgets import QMessageBox

    viewer = make_napari_viewer()
    ph, image, labels, rw, _, _ = _predicted_review(viewer, qtbot)
    window = viewer.window._qt_window
    asked = []

    def answer(value):
        def _question(*args, **kwargs):
            asked.append(args[2])
            return value
        return _question

    assert rw._guard.eventFilter(window, QCloseEvent()) is False  # nothing unsaved: no question
    assert asked == []
    rw.next()
    rw.reject()
    monkeypatch.setattr(QMessageBox, "question", answer(QMessageBox.Cancel))
    event = QCloseEvent()
    assert rw._guard.eventFilter(window, event) is True and not event.isAccepted()
    assert "1 rejected" in asked[-1] and rw.has_unsaved()
    # Save with no store chosen fails: the window stays open and nothing is lost
    monkeypatch.setattr(QMessageBox, "question", answer(QMessageBox.Save))
    assert rw._guard.eventFilter(window, QCloseEvent()) is True and rw.has_unsaved()
    rw.store.value = str(tmp_path / "c.pvs.zarr")
    rw.subject.value = "w01"
    assert rw._guard.eventFilter(window, QCloseEvent()) is False  # saved, then closes
    assert not rw.has_unsaved()
    with CorrectionsStore.open(tmp_path / "c.pvs.zarr") as store:
        assert store.latest_version("w01") == 1
    rw.reject()
    # choosing another labels layer over unsaved decisions asks too; Cancel stays
    monkeypatch.setattr(QMessageBox, "question", answer(QMessageBox.Cancel))
    truthlike = viewer.add_labels(np.zeros_like(labels.data), name="other labels",
                                  scale=labels.scale, affine=labels.affine)
    rw.labels.reset_choices()
    rw.labels.value = truthlike
    assert rw.layer is labels and rw.labels.value is labels and rw.has_unsaved()
    monkeypatch.setattr(QMessageBox, "question", answer(QMessageBox.Discard))
    assert rw._guard.eventFilter(window, QCloseEvent()) is False
    rw.session.dirty = False
    rw.unbind_keys()


def test_the_widget_follows_the_sessions_signals(make_napari_viewer, qtbot):
    """Decisions made on the session itself (not through the widget's buttons) reach the
    table, the counters and the cluster map; Recompute relabels what was painted."""
    viewer = make_napari_viewer()
    ph, image, labels, rw, (i, j, k), _ = _predicted_review(viewer, qtbot)
    s = rw.session
    cid = int(s.clusters[i, j, k])
    clusters = viewer.layers["phantom T2w [baseline] clusters"]
    before = clusters.data[i - 1:i + 2, j - 1:j + 2, k - 1:k + 2].copy()
    row = rw.order().index(cid)
    s.reject(cid)
    assert rw.table.item(row, 1).text() == "rejected"
    assert rw.counters.value.startswith(f"reviewed 1 of {s.n}:") and "(unsaved)" in rw.counters.value
    assert not clusters.data[i - 1:i + 2, j - 1:j + 2, k - 1:k + 2].any()
    s.undo()
    assert rw.table.item(row, 1).text() == "" and rw.counters.value.startswith(f"reviewed 0 of {s.n}:")
    np.testing.assert_array_equal(clusters.data[i - 1:i + 2, j - 1:j + 2, k - 1:k + 2], before)
    # the planted blob erased by hand is no cluster once Recompute relabels
    n = s.n
    labels.data[i - 1:i + 2, j - 1:j + 2, k - 1:k + 2] = 0
    rw.go_to(cid)
    rw.save_panel.refresh_button.native.click()
    assert rw.session is s and s.n == n - 1 and rw.table.rowCount() == n - 1
    assert rw.current is None and rw.counters.value.startswith(f"reviewed 0 of {n - 1}:")
    assert [e["kind"] for e in s.events] == ["cluster_rejected", "undo"] and rw.has_unsaved()
    s.dirty = False


def _binding(viewer, key):
    from napari.utils.key_bindings import coerce_keybinding

    return viewer.keymap.get(coerce_keybinding(key))


def test_keys_are_unbound_when_the_widget_closes_or_leaves_its_dock(make_napari_viewer, qtbot):
    from napari_pvs._widgets.review import KEYS, ReviewWidget

    viewer = make_napari_viewer()

    def mine(_viewer):
        return None

    viewer.bind_key("U", mine)  # a binding of the user's, which the widget's Undo replaces
    rw = ReviewWidget(viewer)
    qtbot.addWidget(rw)
    assert all(_binding(viewer, key) not in (None, mine) for key in KEYS.values())
    assert all(sc.isEnabled() for sc in rw._shortcuts) and len(rw._shortcuts) == 5
    shortcuts = list(rw._shortcuts)
    rw.close()
    assert _binding(viewer, "U") is mine  # given back
    assert all(_binding(viewer, key) is None for key in KEYS.values() if key != "U")
    assert not any(sc.isEnabled() for sc in shortcuts)
    # a docked widget gives its keys back when napari removes its dock (the panel's x)
    docked = ReviewWidget(viewer)
    dock = viewer.window.add_dock_widget(docked, name="review", area="right")
    assert _binding(viewer, "J") is not None and _binding(viewer, "U") is not mine
    viewer.window.remove_dock_widget(dock)
    assert all(_binding(viewer, key) is None for key in KEYS.values() if key != "U")
    assert _binding(viewer, "U") is mine
    # docked again: bound again
    viewer.window.add_dock_widget(docked, name="review again", area="right")
    assert _binding(viewer, "J") is not None
    docked.close()
    assert _binding(viewer, "J") is None


def test_layer_roles_come_from_metadata_not_names(make_napari_viewer, qtbot):
    """Layers named like another role are taken for what their metadata says they are."""
    from napari_pvs._widgets._layers import add_prediction_layers, role
    from napari_pvs._widgets.predict import PredictWidget
    from napari_pvs._widgets.review import ReviewWidget
    from napari_pvs.clusters import cluster_table, label_clusters
    from napari_pvs.pipeline import ArrayPrediction

    viewer = make_napari_viewer()
    ph, image, regions = phantom_viewer(viewer)
    image.name = "scan [site A] region"  # fragments that used to exclude a layer
    regions.name = "wm and bg"
    pw, rw = PredictWidget(viewer), ReviewWidget(viewer)
    for w in (pw, rw):
        qtbot.addWidget(w)
    pw._refresh()
    assert pw.image.value is image and pw.regions.value is regions  # the default ROI: the role
    clusters, _ = label_clusters(ph.labels)
    pred = ArrayPrediction(labels=ph.labels.astype(np.uint8), clusters=clusters,
                           table=cluster_table(clusters), model="m",
                           vesselness=ph.image.astype(np.float32))
    pvs = add_prediction_layers(viewer, image, pred, regions_layer=regions)
    vessels = viewer.layers["scan [site A] region [m] vesselness"]
    cmap = viewer.layers["scan [site A] region [m] clusters"]
    vessels.name, cmap.name = "vessels", "my labels"
    assert [role(x) for x in (pvs, vessels, cmap, image)] == ["pvs", "vesselness", "clusters", None]
    other = viewer.add_labels(np.zeros_like(ph.labels), name="old clusters region [x]")
    images = [lay for _, lay in pw._images()]
    rois = [lay for _, lay in pw._regions()]
    reviewable = [lay for _, lay in rw._labels_choices()]
    assert image in images and vessels not in images
    assert regions in rois and other in rois and pvs not in rois and cmap not in rois
    assert reviewable == [pvs, other]  # the prediction first; no region or cluster map
    # a region map known only because a prediction names it as its regions
    regions.metadata = {k: v for k, v in regions.metadata.items() if k != "role"}
    assert role(regions) is None and role(regions, viewer) == "regions"
    assert regions not in [lay for _, lay in rw._labels_choices()]
