"""The napari widgets, driven through a real viewer (needs an X server: xvfb-run)."""

from __future__ import annotations

import time

import numpy as np
import pytest
from _widget_helpers import phantom_viewer, store_with_model
from qtpy.QtCore import QTimer

from napari_pvs.io import Volume
from napari_pvs.store import CorrectionsStore

pytestmark = pytest.mark.gui


def _wait_measuring(qtbot, widget, timeout_ms):
    """Wait for the widget's worker while a 50 ms timer ticks; returns the tick times."""
    ticks = []
    timer = QTimer()
    timer.setInterval(50)
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=timeout_ms)
    timer.stop()
    return np.asarray(ticks)


@pytest.mark.parametrize("model", ["baseline", "mednext"])
def test_predict_widget_adds_layers_and_keeps_the_viewer_responsive(make_napari_viewer, qtbot,
                                                                     tmp_path, model):
    from napari.layers import Image, Labels

    from napari_pvs._widgets._state import state_for
    from napari_pvs._widgets.predict import BASELINE, PredictWidget

    viewer = make_napari_viewer()
    ph, image, regions = phantom_viewer(viewer)
    w = PredictWidget(viewer)
    qtbot.addWidget(w)
    assert w.image.value is image and w.regions.value is regions  # the region map is the default ROI
    w.model.value = BASELINE  # the default is the starter model (tested below)
    if model == "mednext":
        model_id = store_with_model(tmp_path / "s.pvs.zarr", ph)
        state_for(viewer).store = str(tmp_path / "s.pvs.zarr")
        assert w.model.choices == ("starter", "starter-fast", BASELINE, model_id,
                                   "checkpoint file...")
        w.model.value = model_id
        w.tta.value = 2
    returned = []
    w.run().returned.connect(returned.append)
    t0 = time.perf_counter()
    ticks = _wait_measuring(qtbot, w, 180_000)
    pred, made = returned[0]  # (the prediction, regions made from a segmentation)
    assert made is None
    inside = ticks[(ticks > t0) & (ticks < t0 + pred.seconds)]  # while the worker computed
    gap = float(np.diff(np.r_[t0, inside]).max())
    print(f"{model}: predicted in {pred.seconds:.1f} s, largest event-loop gap {gap * 1e3:.0f} ms")
    assert gap < 0.2
    names = [lay.name for lay in viewer.layers]
    tag = "baseline" if model == "baseline" else model_id
    labels = viewer.layers[f"phantom T2w [{tag}] PVS"]
    assert isinstance(labels, Labels) and labels.visible and labels.editable
    np.testing.assert_array_equal(labels.data, pred.labels)
    clusters = viewer.layers[f"phantom T2w [{tag}] clusters"]
    assert clusters.data.max() == len(pred.table) > 0
    maps = ["vesselness"] if model == "baseline" else ["probability", "uncertainty"]
    for key in maps:
        layer = viewer.layers[f"phantom T2w [{tag}] {key}"]
        assert isinstance(layer, Image) and not layer.visible
        np.testing.assert_array_equal(layer.scale, image.scale)
    assert all(f"[{tag}] {k}" not in " ".join(names) for k in ({"probability", "uncertainty",
                                                                "vesselness"} - set(maps)))
    if model == "mednext":  # the store subject's prediction was not saved: the layer is no subject
        with CorrectionsStore.open(tmp_path / "s.pvs.zarr") as store:
            assert store.predictions("w01") == []


def test_predict_widget_defaults_to_the_shipped_starter_model(make_napari_viewer, qtbot,
                                                              monkeypatch):
    """The starter model is first and chosen; it runs from the package's file and fills
    the probability and uncertainty layers and table columns; another contrast warns."""
    from napari.utils import notifications

    from napari_pvs._widgets.predict import BASELINE, PredictWidget
    from napari_pvs.model import read_meta, starter_path

    viewer = make_napari_viewer()
    ph, image, regions = phantom_viewer(viewer, size_mm=48.0)
    w = PredictWidget(viewer)
    qtbot.addWidget(w)
    assert w.model.value == "starter"
    assert w.model.choices[:3] == ("starter", "starter-fast", BASELINE)  # shipped ones first
    assert w.model.native.currentText() == "starter (MedNeXt-XS, T2w)"
    assert w.model_spec() == str(starter_path())
    warned = []
    monkeypatch.setattr(notifications, "show_warning", warned.append)
    returned = []
    w.run().returned.connect(returned.append)
    qtbot.waitUntil(lambda: w.worker is None, timeout=180_000)
    pred, _ = returned[0]
    assert pred.model == read_meta(starter_path())["id"] and not warned  # a T2w image
    tag = f"phantom T2w [{pred.model}]"
    for key in ("probability", "uncertainty"):
        np.testing.assert_array_equal(viewer.layers[f"{tag} {key}"].data, getattr(pred, key))
    table = viewer.layers[f"{tag} clusters"].features.iloc[1:]  # row 0: the background
    assert len(table) == len(pred.table) > 0
    assert np.isfinite(table[["unc_mean", "prob_mean"]].to_numpy(float)).all()
    assert not pred.labels[regions.data == 0].any()
    image.metadata["modality"] = "T1w"
    w._check_modality(w.model_spec())
    assert len(warned) == 1 and "phantom T2w is T1w but the model 'starter'" in warned[0]


def test_predict_cancel_stops_without_adding_layers(make_napari_viewer, qtbot, tmp_path):
    from napari_pvs._widgets._state import state_for
    from napari_pvs._widgets.predict import PredictWidget

    viewer = make_napari_viewer()
    ph, image, regions = phantom_viewer(viewer, size_mm=96.0)
    model_id = store_with_model(tmp_path / "s.pvs.zarr", ph, spacing=0.5)  # many windows
    state_for(viewer).store = str(tmp_path / "s.pvs.zarr")
    w = PredictWidget(viewer)
    qtbot.addWidget(w)
    w.model.value = model_id
    w.device.value = "cpu"
    progress = []
    w.run().yielded.connect(progress.append)
    qtbot.waitUntil(lambda: len(progress) >= 2, timeout=120_000)
    n = len(viewer.layers)
    w.cancel()
    qtbot.waitUntil(lambda: w.worker is None, timeout=60_000)
    assert len(viewer.layers) == n and w.run_button.enabled
    assert progress[-1].done < progress[-1].total


def test_queue_ranks_clusters_across_subjects_and_opens_the_likeliest_false_positive(
        make_napari_viewer, qtbot, tmp_path):
    """Ranking clusters: one list over the subjects not yet corrected, by the model's
    P(false positive); "Open next" opens the top cluster's subject, and the review widget
    goes to that cluster, its table showing P(FP) and the false positives expected left."""
    from napari_pvs._widgets._state import state_for
    from napari_pvs._widgets.queue import QueueWidget
    from napari_pvs._widgets.review import ReviewWidget
    from napari_pvs.model import arch_config, build_network, default_meta
    from napari_pvs.phantom import make_phantom
    from napari_pvs.triage import FEATURES

    k = len(FEATURES)
    coef = [0.0] * k
    coef[FEATURES.index("linearity")] = -8.0  # blobs: false positives
    triage = {"features": list(FEATURES), "mean": [0.0] * k, "scale": [1.0] * k,
              "coef": coef, "intercept": 4.0}
    path = tmp_path / "q.pvs.zarr"
    with CorrectionsStore.create(path) as store:
        for n, blob in enumerate((False, True, False)):
            ph = make_phantom(seed=n, size_mm=40.0, subject=f"q{n}")
            store.add_subject(f"q{n}", Volume(ph.image, ph.affine, ph.spacing), site="A",
                              regions=ph.regions)
            lab = np.zeros(ph.image.shape, np.uint8)
            lab[4:20, 10, 10] = 1  # a tube in each
            if blob:
                lab[25:28, 25:28, 25:28] = 1  # the one false-positive-looking cluster
            prob = np.where(lab > 0, 0.8, 0.0).astype(np.float32)
            store.save_prediction(f"q{n}", "m1", probability=prob, uncertainty=prob / 3,
                                  labels=lab)
        arch = arch_config("XS", 3)
        store.models.register(build_network(arch), {**default_meta(arch), "id": "m1",
                                                    "triage": triage})
    viewer = make_napari_viewer()
    review = ReviewWidget(viewer)
    w = QueueWidget(viewer)
    qtbot.addWidget(review)
    qtbot.addWidget(w)
    state_for(viewer).store = str(path)
    w.rank.value = "clusters"
    rows = w.rows
    assert len(rows) == 4 and rows[0]["subject"] == "q1" and rows[0]["p_false_positive"] > 0.9
    assert all(r["p_false_positive"] < 0.1 for r in rows[1:])
    assert [w.table.horizontalHeaderItem(c).text() for c in range(3)] == ["subject", "site",
                                                                           "cluster"]
    assert w.open_button.text == "Open next likeliest false positive"
    layer = w.open_next()
    assert layer.metadata["subject"] == "q1" and review.layer is layer
    s = review.session
    assert review.current == rows[0]["cluster"]
    assert s.row(review.current)["p_false_positive"] > 0.9
    assert s.expected_false_positives() > 0.9
    assert "expected false positives left: 1" in review.nav.counters.value
    w.rank.value = "subjects"
    assert w.table.horizontalHeaderItem(2).text() == "status"


def test_queue_ranks_subjects_and_opens_the_most_uncertain(make_napari_viewer, qtbot, tmp_path):
    from napari_pvs._widgets._state import state_for
    from napari_pvs._widgets.queue import QueueWidget
    from napari_pvs.phantom import make_phantom

    path = tmp_path / "q.pvs.zarr"
    with CorrectionsStore.create(path) as store:
        for k in range(3):
            ph = make_phantom(seed=k, size_mm=40.0, subject=f"q{k}")
            store.add_subject(f"q{k}", Volume(ph.image, ph.affine, ph.spacing), site="A",
                              regions=ph.regions)
            shape = ph.image.shape
            unc = np.full(shape, 0.1 * (k + 1), np.float32)
            lab = np.zeros(shape, np.uint8)
            lab[5:8, 5:8, 5:8] = 1
            store.save_prediction(f"q{k}", "m1", probability=unc, uncertainty=unc, labels=lab)
        store.commit_labels("q2", np.zeros(shape, np.uint8), author="me")  # corrected: goes last
        from napari_pvs.model import arch_config, build_network, default_meta

        arch = arch_config("XS", 3)
        store.models.register(build_network(arch), {**default_meta(arch), "id": "m1"})
    viewer = make_napari_viewer()
    w = QueueWidget(viewer)
    qtbot.addWidget(w)
    state_for(viewer).store = str(path)
    rows = w.refresh()
    assert [r["subject"] for r in rows] == ["q1", "q0", "q2"]
    assert w.table.item(0, 0).text() == "q1" and w.table.item(2, 2).text() == "corrected"
    assert [w.table.item(r, 6).text() for r in range(3)] == ["none", "none", "full"]  # labels
    layer = w.open_next()
    assert layer.name == "q1 [m1] PVS" and layer.metadata["subject"] == "q1"
    assert {"q1 image", "q1 [m1] uncertainty", "q1 [m1] probability"} <= {x.name for x in viewer.layers}
    assert not viewer.layers["q1 [m1] uncertainty"].visible
    np.testing.assert_allclose(viewer.layers["q1 image"].data_to_world([0, 0, 0]),
                               make_phantom(seed=1, size_mm=40.0).affine[:3, 3], atol=1e-4)
    # a new subject without the model's prediction: "Predict missing" fills it in
    with CorrectionsStore.open(path, writable=True) as store:
        ph = make_phantom(seed=5, size_mm=40.0, subject="q3")
        store.add_subject("q3", Volume(ph.image, ph.affine, ph.spacing), site="B", regions=ph.regions)
    # not corrected but not predicted: after the predicted ones, before the corrected one
    assert [r["subject"] for r in w.refresh()] == ["q1", "q0", "q3", "q2"]
    assert w.table.item(2, 4).text() == "not predicted"
    w.predict_missing()
    qtbot.waitUntil(lambda: w.worker is None, timeout=120_000)
    row = next(r for r in w.rows if r["subject"] == "q3")
    assert row["status"] == "predicted" and row["uncertainty"] == row["uncertainty"]  # not NaN
    # new sites first: site B has no corrected subject, site A one (q2)
    w.site_aware.value = True
    assert [r["subject"] for r in w.rows][:1] == ["q3"] and w.rows[-1]["subject"] == "q2"
    with CorrectionsStore.open(path) as store:
        assert store.predictions("q3") == ["m1"]


def test_end_to_end_predict_review_save_retrain_repredict(make_napari_viewer, qtbot, tmp_path):
    """Sample phantom -> predict -> reject a planted false positive -> save -> retrain a tiny
    model in a child process -> the new model is registered -> re-predict with it."""
    from napari_pvs._widgets.predict import BASELINE, PredictWidget
    from napari_pvs._widgets.retrain import NEW, STARTER, RetrainWidget
    from napari_pvs._widgets.review import ReviewWidget

    viewer = make_napari_viewer()
    viewer.open_sample("napari-pvs", "phantom_t2w")  # through the plugin's manifest
    pw, rw, tw = PredictWidget(viewer), ReviewWidget(viewer), RetrainWidget(viewer)
    for w in (pw, rw, tw):
        qtbot.addWidget(w)
    assert pw.image.value is viewer.layers["phantom T2w"]
    assert pw.regions.value is viewer.layers["regions (1 WM, 2 BG)"]
    pw.model.value = BASELINE
    pw.run()
    qtbot.waitUntil(lambda: pw.worker is None, timeout=180_000)
    labels = viewer.layers["phantom T2w [baseline] PVS"]
    assert rw.layer is labels  # the review widget follows the new prediction
    truth = viewer.layers["PVS truth"].data
    wm = np.argwhere(viewer.layers["regions (1 WM, 2 BG)"].data == 1)
    i, j, k = next(tuple(int(v) for v in p) for p in wm[::97]
                   if not (labels.data[p[0] - 3:p[0] + 4, p[1] - 3:p[1] + 4, p[2] - 3:p[2] + 4].any()
                           or truth[p[0] - 3:p[0] + 4, p[1] - 3:p[1] + 4, p[2] - 3:p[2] + 4].any()))
    labels.data[i - 1:i + 2, j - 1:j + 2, k - 1:k + 2] = 1  # a false positive of the model
    rw.set_layer(labels)
    cid = int(rw.session.clusters[i, j, k])
    rw.go_to(cid)
    rw.reject()
    assert labels.data[i - 1:i + 2, j - 1:j + 2, k - 1:k + 2].sum() == 0
    rw.store.value = str(tmp_path / "e2e.pvs.zarr")
    rw.subject.value = "sample01"
    # retrain saves the pending correction first, then trains in a child process
    # a store without models fine-tunes the shipped starter model by default; this test
    # trains a new tiny network instead
    assert tw.init.value == STARTER and tw.mode.value == "subprocess"
    tw.init.value = NEW
    tw.iterations.value = 4
    tw.patch.value = 48
    assert str(tw.store.value) == str(tmp_path / "e2e.pvs.zarr")
    worker = tw.retrain()
    assert worker is not None and not rw.has_unsaved()
    with CorrectionsStore.open(tmp_path / "e2e.pvs.zarr") as store:
        saved = np.asarray(store.labels("sample01")[...])
        assert saved[i - 1:i + 2, j - 1:j + 2, k - 1:k + 2].sum() == 0
        assert store.info("sample01")["status"] == "corrected"
    qtbot.waitUntil(lambda: tw.worker is None, timeout=300_000)
    assert tw.model_id is not None and tw.history["it"] == [1, 2, 3, 4]
    with CorrectionsStore.open(tmp_path / "e2e.pvs.zarr") as store:
        meta = {m["id"]: m for m in store.models.list()}[tw.model_id]
        assert meta["provenance"]["data_versions"] == {"sample01": 1}
    assert pw.model.value == tw.model_id  # the predict widget offers the new model
    assert tw.repredict_button.enabled
    tw.repredict()
    name = f"phantom T2w [{tw.model_id}] PVS"
    qtbot.waitUntil(lambda: name in viewer.layers, timeout=300_000)
    assert f"phantom T2w [{tw.model_id}] uncertainty" in viewer.layers
    with CorrectionsStore.open(tmp_path / "e2e.pvs.zarr") as store:
        assert store.predictions("sample01") == [tw.model_id]  # ready for the queue
    rw.unbind_keys()


@pytest.fixture
def corrected_store(tmp_path):
    from napari_pvs.phantom import make_phantom

    path = tmp_path / "r.pvs.zarr"
    with CorrectionsStore.create(path) as store:
        for k in range(2):
            ph = make_phantom(seed=k, size_mm=48.0, subject=f"r{k}")
            store.add_subject(f"r{k}", Volume(ph.image, ph.affine, ph.spacing), site="A",
                              regions=ph.regions)
            store.commit_labels(f"r{k}", ph.labels, author="truth")
    return path


@pytest.mark.parametrize("mode", ["subprocess", "thread"])
def test_retrain_widget_trains_plots_and_registers(make_napari_viewer, qtbot, corrected_store, mode):
    from napari_pvs._widgets._state import state_for
    from napari_pvs._widgets.retrain import RetrainWidget

    viewer = make_napari_viewer()
    w = RetrainWidget(viewer)
    qtbot.addWidget(w)
    registered = []
    state_for(viewer).model_registered.connect(registered.append)
    w.store.value = str(corrected_store)
    w.iterations.value = 4
    w.patch.value = 32
    w.mode.value = mode
    assert w.retrain() is not None and not w.retrain_button.enabled
    qtbot.waitUntil(lambda: w.worker is None, timeout=240_000)
    assert registered == [w.model_id] and w.bar.value() == 4
    assert len(w.ax.lines) == 1 and list(w.ax.lines[0].get_xdata()) == [1, 2, 3, 4]
    with CorrectionsStore.open(corrected_store) as store:
        assert w.model_id in [m["id"] for m in store.models.list()]
    assert w.init.value == w.model_id  # the next run fine-tunes the new model
    assert w.config().lr == pytest.approx(3e-4)  # at the fine-tuning learning rate
    w.init.value = "new network (from scratch)"
    assert w.config().lr == pytest.approx(3e-3)


def test_retrain_cancel_and_failure_are_reported(make_napari_viewer, qtbot, corrected_store,
                                                 tmp_path, monkeypatch):
    import napari.utils.notifications as notifications

    from napari_pvs._widgets.retrain import RetrainWidget

    errors = []
    monkeypatch.setattr(notifications, "show_error", errors.append)
    viewer = make_napari_viewer()
    w = RetrainWidget(viewer)
    qtbot.addWidget(w)
    w.store.value = str(corrected_store)
    w.iterations.value = 500
    w.patch.value = 32
    w.retrain()
    qtbot.waitUntil(lambda: len(w.history["it"]) >= 2, timeout=120_000)
    w.cancel()
    qtbot.waitUntil(lambda: w.worker is None, timeout=60_000)
    assert w.status.value == "cancelled" and w.model_id is None and errors == []
    with CorrectionsStore.open(corrected_store) as store:
        assert store.models.list() == []
    # a store folder that is not a store: a clear error, no worker
    (tmp_path / "empty.pvs.zarr").mkdir()
    w.store.value = str(tmp_path / "empty.pvs.zarr")
    assert w.retrain() is None and "not a corrections store" in errors[-1]


@pytest.mark.parametrize("name", ["predict", "review", "retrain", "queue"])
def test_screenshot_of_each_widget_docked_in_napari_is_not_blank(make_napari_viewer, qtbot, name,
                                                                 tmp_path):
    import importlib

    from qtpy.QtWidgets import QApplication

    classes = {"predict": "PredictWidget", "review": "ReviewWidget", "retrain": "RetrainWidget",
               "queue": "QueueWidget"}
    viewer = make_napari_viewer(show=True)
    phantom_viewer(viewer)
    cls = getattr(importlib.import_module(f"napari_pvs._widgets.{name}"), classes[name])
    widget = cls(viewer)
    viewer.window.add_dock_widget(widget, name=name, area="right")
    for _ in range(5):
        QApplication.processEvents()
    shot = viewer.screenshot(str(tmp_path / f"{name}_window.png"), canvas_only=False)
    assert shot.ndim == 3 and shot.shape[0] > 300 and shot.shape[1] > 400
    assert (tmp_path / f"{name}_window.png").stat().st_size > 10_000
    grab = widget.grab()
    assert grab.width() > 150 and grab.height() > 100
    assert grab.save(str(tmp_path / f"{name}.png"))
    from PIL import Image

    pixels = np.asarray(Image.open(tmp_path / f"{name}.png").convert("L"), dtype=float)
    assert pixels.std() > 10  # text and controls, not a flat panel
    assert len(np.unique(pixels)) > 20
    if name == "review":
        widget.unbind_keys()


def test_docked_widgets_read_well_at_the_default_width(make_napari_viewer, qtbot, tmp_path):
    """Predict is the first tab; the review table's columns, the counters and the end of
    the store path are readable at the dock's default width; the baseline's empty
    uncertainty and probability columns are hidden (and not offered as orders)."""
    from qtpy.QtWidgets import QApplication, QTabBar

    from napari_pvs._widgets._demo import _dock_widgets

    viewer = make_napari_viewer(show=True)
    phantom_viewer(viewer)
    store = tmp_path / "a folder with a rather long name" / "another long folder" / "lab.pvs.zarr"
    widgets, docks = _dock_widgets(viewer)
    win = viewer.window._qt_window
    win.resize(1500, 950)
    for _ in range(10):  # Qt makes the dock tab bar from the event loop
        QApplication.processEvents()
    tabs = next(b for b in win.findChildren(QTabBar) if b.count() == 4)
    assert [tabs.tabText(i) for i in range(4)] == ["Predict", "Review clusters", "Retrain",
                                                   "Active-learning queue"]
    pw, rw = widgets["Predict"], widgets["Review clusters"]
    pw.model.value = "baseline (Frangi)"
    pw.run()
    qtbot.waitUntil(lambda: pw.worker is None, timeout=120_000)
    assert rw.session is not None and rw.session.n > 0
    docks["Review clusters"].raise_()
    rw.store.value = str(store)
    for _ in range(10):
        QApplication.processEvents()

    table = rw.table
    hidden = [table.horizontalHeaderItem(c).text() for c in range(table.columnCount())
              if table.isColumnHidden(c)]
    assert hidden == ["unc.", "prob.", "P(FP)"]  # the Frangi baseline has none of them
    assert rw.sort.choices == ("priority", "size", "region")
    header = table.horizontalHeader()
    for c in range(table.columnCount()):
        if not table.isColumnHidden(c):  # each header and value fits its column
            assert header.sectionSize(c) >= header.sectionSizeHint(c)
            assert header.sectionSize(c) >= table.sizeHintForColumn(c)
    assert table.columns_width() <= table.width(), "columns cut off at the dock's width"

    row = {cell.y() for cell in rw.counters.cells.values()}
    assert len(row) == 1  # the counters: one row of numbers over their captions
    for cell in rw.counters.findChildren(type(next(iter(rw.counters.cells.values())))):
        assert cell.width() >= cell.sizeHint().width(), cell.text()

    edit = rw.store.line_edit.native
    assert edit.text() == str(store) and edit.toolTip() == str(store)
    assert edit.cursorPosition() == len(edit.text())  # the end, the store's name, shows
    assert edit.cursorRect().right() <= edit.width()


@pytest.mark.slow
def test_the_demo_viewer_reviews_the_starter_prediction_beside_frangi(make_napari_viewer, qtbot,
                                                                      tmp_path):
    """``napari-pvs demo``'s viewer: the MedNeXt prediction under review with its maps and
    filled uncertainty / probability columns; Frangi's prediction a hidden outline."""
    import nibabel as nib
    from qtpy.QtWidgets import QApplication

    from napari_pvs._widgets._demo import open_demo
    from napari_pvs.dataset import write_phantom_cohort
    from napari_pvs.pipeline import predict_file

    subjects = write_phantom_cohort(tmp_path / "cohort", n_sites=1, per_site=1, size_mm=48)
    s = subjects[0]
    written = {}
    for model, folder in (("starter", "starter"), ("baseline", "frangi")):
        written[folder] = predict_file(s.image, tmp_path / folder, model=model, tta=1,
                                       roi=s.regions, modality=s.modality)
    viewer = make_napari_viewer(show=True)
    widgets, docks = open_demo(viewer, subjects, tmp_path, tmp_path / "frangi",
                               ("starter", tmp_path / "starter"))
    rw = widgets["Review clusters"]
    docks["Review clusters"].raise_()
    for _ in range(10):
        QApplication.processEvents()
    base = f"{s.subject} image [starter]"  # the shipped name, as the demo's rows say
    assert rw.layer is viewer.layers[f"{base} PVS"]
    for key in ("probability", "uncertainty"):
        layer = viewer.layers[f"{base} {key}"]
        assert not layer.visible
        np.testing.assert_allclose(layer.data, nib.load(written["starter"][key]).get_fdata())
    frangi = viewer.layers["Frangi prediction (outline)"]
    assert not frangi.visible and frangi.contour == 1
    np.testing.assert_array_equal(frangi.data > 0,
                                  np.asarray(nib.load(written["frangi"]["labels"]).dataobj) > 0)
    assert "PVS truth (outline)" in viewer.layers
    table = rw.table
    columns = {table.horizontalHeaderItem(c).text(): c for c in range(table.columnCount())}
    assert table.rowCount() == rw.session.n > 0
    for name in ("unc.", "prob."):
        assert not table.isColumnHidden(columns[name])
        assert all(table.item(r, columns[name]).text() for r in range(table.rowCount()))
    assert "uncertainty" in rw.sort.choices
    # the dock cannot be narrower than the columns (the demo's, sized for the session-less
    # table, was: its last column hid behind a scroll bar)
    assert table.minimumWidth() >= table.columns_width() <= table.width()
    rw.unbind_keys()
