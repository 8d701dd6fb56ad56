"""Take the README's screenshots from the real app (run under a display or xvfb-run).

    xvfb-run -a -s "-screen 0 1600x1000x24" python docs/make_screenshots.py [--out docs/screenshots]

A small phantom cohort goes into a store (2 sites x 3 subjects, three of them
corrected); then,
in one napari window with the four widgets docked:

1. predict.png: the Frangi baseline predicted on the uncorrected subject;
2. retrain.png: "Retrain on corrections", fine-tuning the store's earlier model (the
   small MedNeXt of ``benchmarks/data``) for --iterations, with its live loss /
   validation-Dice plot;
3. review.png: "Re-predict" with the new model, clusters coloured by uncertainty,
   a few clusters accepted and rejected;
4. queue.png: the active-learning queue after "Predict missing".
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def _wait(app, predicate, timeout=1800):
    t0 = time.time()
    while not predicate():
        app.processEvents()
        time.sleep(0.02)
        if time.time() - t0 > timeout:
            raise TimeoutError("the widget did not finish in time")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).parent / "screenshots"))
    ap.add_argument("--iterations", type=int, default=100)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    import napari
    from qtpy.QtWidgets import QApplication

    from napari_pvs._widgets._demo import demo_store
    from napari_pvs._widgets._layers import open_store_subject
    from napari_pvs._widgets._state import state_for
    from napari_pvs._widgets.predict import PredictWidget
    from napari_pvs._widgets.queue import QueueWidget
    from napari_pvs._widgets.retrain import RetrainWidget
    from napari_pvs._widgets.review import ReviewWidget
    from napari_pvs.dataset import write_phantom_cohort
    from napari_pvs.io import load_volume
    from napari_pvs.store import CorrectionsStore

    tmp = Path(tempfile.mkdtemp(prefix="pvs-shots-"))
    cohort = write_phantom_cohort(tmp / "cohort", n_sites=2, per_site=3, size_mm=112, seed=3)
    store_path = demo_store(cohort, tmp / "lab.pvs.zarr")
    with CorrectionsStore.open(store_path, writable=True) as store:
        for s in cohort[1:4]:
            store.commit_labels(s.subject, load_volume(s.labels, as_labels=True).data,
                                author="earlier corrections")
        # the lab's earlier model: the small MedNeXt the inference benchmark uses
        from napari_pvs.model import load_checkpoint

        net, meta = load_checkpoint(Path(__file__).parents[1] / "benchmarks" / "data" /
                                    "xs_phantom.safetensors")
        store.models.register(net, meta)
    viewer = napari.Viewer(title="napari-pvs")
    app = QApplication.instance()
    viewer.window._qt_window.resize(1500, 950)
    state = state_for(viewer)
    state.store = str(store_path)
    widgets = {"Predict": PredictWidget(viewer), "Review clusters": ReviewWidget(viewer),
               "Retrain": RetrainWidget(viewer), "Active-learning queue": QueueWidget(viewer)}
    docks = {n: viewer.window.add_dock_widget(w, name=n, area="right") for n, w in widgets.items()}
    qt = viewer.window._qt_window
    for name in ("Retrain", "Active-learning queue", "Predict"):
        qt.tabifyDockWidget(docks["Review clusters"], docks[name])
    with CorrectionsStore.open(store_path) as store:
        open_store_subject(viewer, store, cohort[0].subject, with_labels=False)
    viewer.dims.order = (2, 1, 0)
    camera = viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera
    camera.orientation2d = ("up", "right")
    viewer.reset_view()

    def shot(dock: str, name: str) -> None:
        for _ in range(5):
            app.processEvents()
        docks[dock].raise_()
        for _ in range(10):
            app.processEvents()
        viewer.screenshot(str(out / name), canvas_only=False, flash=False)
        print(f"wrote {out / name}", flush=True)

    pw, rw, tw, qw = widgets.values()
    pw.model.value = "baseline (Frangi)"  # not the default starter model: the baseline first
    pw.run()
    _wait(app, lambda: pw.worker is None)
    shot("Predict", "predict.png")

    tw.iterations.value = args.iterations  # fine-tune the earlier model (the default)
    tw.retrain()
    _wait(app, lambda: tw.worker is None)
    tw._plot(force=True)
    shot("Retrain", "retrain.png")

    tw.repredict()
    _wait(app, lambda: rw.layer is not None
          and (rw.layer.metadata.get("prediction") or {}).get("model") == tw.model_id)
    viewer.layers[f"{cohort[0].subject} image [baseline] PVS"].visible = False
    viewer.layers[f"{cohort[0].subject} image [baseline] clusters"].visible = False
    rw.sort.value = "uncertainty"
    rw.next()
    rw.accept()
    rw.reject()
    rw.accept()
    shot("Review clusters", "review.png")
    rw.save()

    qw.predict_missing()
    _wait(app, lambda: qw.worker is None)
    qw.refresh()
    shot("Active-learning queue", "queue.png")
    rw.unbind_keys()
    viewer.close()


if __name__ == "__main__":
    main()
