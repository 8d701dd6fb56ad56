"""Retrain widget: one click fine-tunes on the store's corrections.

"Retrain on corrections" saves the review widget's pending corrections, then runs a
:class:`napari_pvs.training.job.TrainingJob` in a background worker.  By default the
training runs in a child process.  ``benchmarks/bench_retrain_ui.py`` measured both
ways through this code path: the GUI event loop stayed as responsive with a training
thread as with a child process (largest gap between 50 ms ticks: 55 ms for both, and
the same training time), so isolation decides: a crash of the child (out of memory, a
segfault) is reported instead of taking napari and the unsaved work down.  A live
plot shows the loss and the validation Dice; Cancel stops the run at the next
iteration.  When the model is registered the widget offers "Re-predict" on the image.
"""

from __future__ import annotations

import time
from pathlib import Path

from magicgui.widgets import ComboBox, Container, FloatSpinBox, Label, PushButton, SpinBox
from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
from matplotlib.figure import Figure
from qtpy.QtWidgets import QProgressBar, QVBoxLayout

from .._errors import PVSInputError
from ..training.finetune import FinetuneConfig, TrainingCancelled
from ..training.job import TrainingJob
from ._common import StoreEdit, ViewerWidget
from ._layers import reset_ordered
from ._worker import start_worker
from .predict import start_prediction

__all__ = ["RetrainWidget"]

NEW = "new network (from scratch)"
STARTER = "starter"  # the model shipped in the package (napari_pvs.model.STARTER_MODELS)
LR_FINETUNE, LR_NEW = 3e-4, 3e-3


class RetrainWidget(ViewerWidget):
    """Fine-tune the latest model on the store's corrected subjects."""

    def __init__(self, napari_viewer):
        super().__init__(napari_viewer)
        self.job = None
        self.worker = None
        self.model_id: str | None = None
        self.history: dict[str, list] = {"it": [], "loss": [], "val_it": [], "val": [], "val_cluster": []}
        self.store = StoreEdit(self.state)
        self.init = ComboBox(label="start from", choices=self._inits)
        self.iterations = SpinBox(label="iterations", min=1, max=100000, value=200)
        self.patch = SpinBox(label="patch (voxels)", min=32, max=256, step=16, value=48)
        self.lr = FloatSpinBox(label="learning rate", min=1e-6, max=1e-1, step=1e-4, value=LR_NEW,
                               tooltip=f"{LR_FINETUNE:g} to fine-tune a model (the paper's), "
                                       f"{LR_NEW:g} for a new network")
        self.lr.native.setDecimals(5)
        self.mode = ComboBox(label="run in", choices=["subprocess", "thread"], value="subprocess",
                             tooltip="a child process keeps napari responsive and survives crashes")
        self.retrain_button = PushButton(text="Retrain on corrections")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.repredict_button = PushButton(text="Re-predict", enabled=False)
        self.status = Label(value="")
        self.form = Container(widgets=[
            self.store, self.init, self.iterations, self.patch, self.lr, self.mode,
            Container(widgets=[self.retrain_button, self.cancel_button], layout="horizontal",
                      labels=False),
            self.status, self.repredict_button])
        self.bar = QProgressBar()
        self.bar.setFormat("%v / %m iterations")
        fig = Figure(figsize=(3.6, 2.4), tight_layout=True)
        fig.patch.set_facecolor("#262930")
        self.ax = fig.add_subplot(111)
        self.ax2 = self.ax.twinx()
        self.canvas = FigureCanvasQTAgg(fig)
        self.canvas.setMinimumHeight(200)
        self._style_axes()
        self._last_draw = 0.0
        lay = QVBoxLayout(self)
        lay.addWidget(self.form.native)
        lay.addWidget(self.bar)
        lay.addWidget(self.canvas, 1)
        self.init.changed.connect(self._default_lr)
        self._default_lr(self.init.value)
        self.retrain_button.clicked.connect(self.retrain)
        self.cancel_button.clicked.connect(self.cancel)
        self.repredict_button.clicked.connect(self.repredict)
        self.state.store_changed.connect(self._on_store)
        self.state.model_registered.connect(lambda _: self._refresh_inits())

    # ------------------------------------------------------------------ choices
    def _inits(self, _=None) -> list:
        # the newest model first: fine-tune it by default; the shipped starter model when
        # the store has none yet
        return [*self.state.model_ids(), STARTER, NEW]

    def _default_lr(self, init) -> None:
        self.lr.value = LR_NEW if init in (None, NEW) else LR_FINETUNE

    def _on_store(self, _path: str) -> None:
        self._refresh_inits()

    def _refresh_inits(self) -> None:
        reset_ordered(self.init)
        self.init.value = self.init.choices[0]  # the newest model

    # ------------------------------------------------------------------ plot
    def _style_axes(self) -> None:
        for ax in (self.ax, self.ax2):
            ax.set_facecolor("#262930")
            ax.tick_params(colors="#dddddd", labelsize=7)
            for spine in ax.spines.values():
                spine.set_color("#888888")
        self.ax.set_xlabel("iteration", color="#dddddd", fontsize=8)
        self.ax.set_ylabel("loss", color="#4fc3f7", fontsize=8)
        self.ax2.set_ylabel("validation Dice", color="#ffb74d", fontsize=8)
        self.ax2.set_ylim(0, 1)

    def _plot(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_draw < 0.5:  # redraw at most twice a second
            return
        self._last_draw = now
        h = self.history
        self.ax.clear()
        self.ax2.clear()
        self._style_axes()
        if h["it"]:
            self.ax.plot(h["it"], h["loss"], color="#4fc3f7", lw=1, label="loss")
        if h["val_it"]:
            self.ax2.plot(h["val_it"], h["val"], "o-", color="#ffb74d", ms=3, lw=1, label="voxel Dice")
            self.ax2.plot(h["val_it"], h["val_cluster"], "s--", color="#e57373", ms=3, lw=1,
                          label="cluster Dice")
            self.ax2.legend(loc="lower right", fontsize=6, facecolor="#262930", labelcolor="#dddddd")
        self.canvas.draw_idle()

    # ------------------------------------------------------------------ running
    def config(self) -> FinetuneConfig:
        n = int(self.iterations.value)
        return FinetuneConfig(iterations=n, iterations_per_epoch=max(1, min(50, n)),
                              patch=(int(self.patch.value),) * 3, lr=float(self.lr.value))

    def retrain(self):
        """Save pending corrections, then start training; returns the worker or None."""
        from napari.utils.notifications import show_error

        if self.worker is not None:
            return self.worker
        store = self.store.path
        if store is None:
            show_error("choose a corrections store (*.pvs.zarr) to train on")
            return None
        self.state.store = store
        if not self.state.save_pending():  # this may create the store
            show_error("retraining stopped: the pending corrections could not be saved")
            return None
        if not (Path(store) / "zarr.json").is_file():
            show_error(f"{store} is not a corrections store: review and save corrections first, "
                       "or create one with `napari-pvs store init`")
            return None
        try:  # the same checks as the CLI, before any work starts
            config = self.config().validate()
        except PVSInputError as exc:
            show_error(f"retraining not started: {exc}")
            return None
        init = None if self.init.value in (None, NEW) else self.init.value
        self.job = TrainingJob(store, init=init, config=config, mode=self.mode.value)
        self.history = {k: [] for k in self.history}
        self.model_id = None
        self.bar.setRange(0, int(self.iterations.value))
        self.bar.setValue(0)
        self.retrain_button.enabled = False
        self.repredict_button.enabled = False
        self.cancel_button.enabled = True
        self.status.value = f"starting ({self.mode.value}) ..."
        self.worker = start_worker(self.job.events, yielded=self._on_event, returned=self._on_done,
                                   errored=self._on_error, finished=self._on_finished)
        return self.worker

    def _on_event(self, ev) -> None:
        if ev.kind == "iteration":
            self.bar.setValue(ev.iteration)
            self.history["it"].append(ev.iteration)
            self.history["loss"].append(ev.loss)
            self.status.value = f"iteration {ev.iteration}/{ev.total}, loss {ev.loss:.3f}"
            self._plot()
        elif ev.kind == "validation":
            self.history["val_it"].append(ev.iteration)
            self.history["val"].append(ev.val_dice)
            self.history["val_cluster"].append(ev.val_cluster_dice)
            self._plot(force=True)
        elif ev.kind in ("start", "triage"):
            self.status.value = ev.message[:120]

    def _on_done(self, model_id: str) -> None:
        from napari.utils.notifications import show_info

        self.model_id = model_id
        self._plot(force=True)
        self.status.value = f"registered {model_id}"
        self.repredict_button.enabled = self._target()[0] is not None
        self.state.model_registered.emit(model_id)
        show_info(f"training finished: model {model_id} registered in {self.store.value}")

    def _on_error(self, exc) -> None:
        from napari.utils.notifications import show_error, show_info

        if isinstance(exc, TrainingCancelled):
            self.status.value = "cancelled"
            show_info("training cancelled; the store is unchanged")
        else:
            self.status.value = "failed"
            show_error(f"training failed: {exc}")

    def _on_finished(self) -> None:
        self.worker = None
        self.retrain_button.enabled = True
        self.cancel_button.enabled = False

    def cancel(self) -> None:
        if self.job is not None:
            self.job.cancel()
            self.status.value = "cancelling ..."

    # ------------------------------------------------------------------ re-predict
    def _target(self):
        """``(image, ROI)`` to re-predict: those of the newest prediction whose image is
        still open, else the selected image layer and no ROI."""
        from napari.layers import Image

        layers = self.viewer.layers
        for layer in reversed(list(layers)):
            pred = (layer.metadata or {}).get("prediction") or {}
            if pred.get("image") in layers:
                roi = layers[pred["regions"]] if pred.get("regions") in layers else None
                return layers[pred["image"]], roi
        active = layers.selection.active
        return (active if isinstance(active, Image) else None), None

    def repredict(self):
        """Predict the current image with the new model; returns the worker."""
        image, roi = self._target()
        if self.model_id is None or image is None:
            return None
        self.repredict_button.enabled = False
        self.status.value = f"predicting {image.name} with {self.model_id} ..."

        def _done(layer):
            self.status.value = f"re-predicted with {self.model_id}"

        return start_prediction(self.viewer, image, self.model_id, roi_layer=roi,
                                store=self.store.path, done=_done,
                                finished=lambda: setattr(self.repredict_button, "enabled", True))
