"""Retrain widget: which way of running fine-tuning keeps napari responsive?

Trains the same small model (MedNeXt-XS, 48^3 patches) on the same corrected
phantom store twice, through the widget's own code path (a napari thread worker
following a ``TrainingJob``): once with training in a child process, once in a
thread of the napari process.  Meanwhile a 50 ms QTimer ticks on the GUI thread, as
napari's event loop would handle a mouse move; the gaps between ticks measure how
long the GUI was frozen.  Target: the largest gap under 200 ms.

Run:  xvfb-run -a python benchmarks/bench_retrain_ui.py [--iterations 60]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np


def _store(tmp: Path) -> Path:
    """Three corrected 80 mm phantoms of one site (1 mm), as the tests' phantom_store."""
    from napari_pvs.dataset import store_from_cohort, write_phantom_cohort

    cohort = write_phantom_cohort(tmp / "cohort", n_sites=1, per_site=3, size_mm=80.0)
    path = tmp / "bench.pvs.zarr"
    store_from_cohort(path, cohort).close()
    return path


def measure(app, store: Path, mode: str, iterations: int) -> dict:
    from qtpy.QtCore import QTimer

    from napari_pvs._widgets._worker import start_worker
    from napari_pvs.training.finetune import FinetuneConfig
    from napari_pvs.training.job import TrainingJob

    cfg = FinetuneConfig(iterations=iterations, iterations_per_epoch=iterations, patch=(48, 48, 48),
                         val_fraction=0.0, target_spacing=(1.0, 1.0, 1.0))
    job = TrainingJob(store, config=cfg, mode=mode)
    ticks, state = [], {"done": False, "first": None}

    def _event(ev):
        if ev.kind == "iteration" and state["first"] is None:
            state["first"] = time.perf_counter()  # training proper has started

    timer = QTimer()
    timer.setInterval(50)
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    t0 = time.perf_counter()
    timer.start()
    start_worker(job.events, yielded=_event, finished=lambda: state.update(done=True))
    while not state["done"]:
        app.processEvents()
        time.sleep(0.005)
    timer.stop()
    wall = time.perf_counter() - t0
    t = np.asarray(ticks)
    t = t[t >= (state["first"] or t0)]
    gaps = np.diff(t) * 1e3
    return {"mode": mode, "wall_s": wall, "max_ms": float(gaps.max()), "p99_ms": float(np.percentile(gaps, 99)),
            "mean_ms": float(gaps.mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=60)
    args = ap.parse_args()
    from qtpy.QtWidgets import QApplication

    app = QApplication.instance() or QApplication([])
    with tempfile.TemporaryDirectory() as tmp:
        store = _store(Path(tmp))
        rows = [measure(app, store, mode, args.iterations) for mode in ("subprocess", "thread")]
    print(f"{'mode':<11} {'wall':>7} {'tick gap max':>13} {'p99':>7} {'mean':>7}   (50 ms timer, "
          f"{args.iterations} iterations)")
    for r in rows:
        print(f"{r['mode']:<11} {r['wall_s']:>6.1f}s {r['max_ms']:>11.0f}ms {r['p99_ms']:>5.0f}ms "
              f"{r['mean_ms']:>5.0f}ms   target max < 200 ms: {'met' if r['max_ms'] < 200 else 'MISSED'}")
    sub, thr = rows
    print(f"largest freeze: thread / subprocess = {thr['max_ms'] / sub['max_ms']:.2f}x; "
          f"training time: thread / subprocess = {thr['wall_s'] / sub['wall_s']:.2f}x")


if __name__ == "__main__":
    main()
