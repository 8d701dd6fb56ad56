"""Sliding-window MedNeXt prediction with mirror-TTA uncertainty.

The one prediction API is :func:`predict_volume`, a generator: it yields
:class:`Progress` events (window batches done / total) and returns a
:class:`Prediction`.  :func:`run` drains it for scripts and the CLI; the napari widget
runs the same generator in a thread worker.  Stopping the iteration (``close()``)
or setting the ``cancel`` event stops it between two window batches.

``predict_volume`` is a composition of stages, each usable (and tested) on its own:

1. :func:`napari_pvs.preprocess.preprocess`: the image on the model's grid and
   intensity scale (the same function prepares training data).
2. :func:`napari_pvs._sliding.plan_windows`: pad to at least one window, tile with
   windows of the model's patch size at the given overlap, skip windows without ROI.
3. a runner from :func:`napari_pvs._backends.make_runner` (torch on GPU; an exported
   OpenVINO / ONNX Runtime model on CPU when installed).
4. :class:`napari_pvs._sliding.TTAMerger`: mirror TTA per batch and Gaussian blending.
   Steps 2-4 are :func:`predict_preprocessed`, which training's validation calls on its
   cached, preprocessed subjects.
5. :meth:`~napari_pvs.preprocess.Preprocessed.to_source` and :func:`postprocess`:
   back on the source grid, ``uncertainty = clip(H(p) + 4 * Var_TTA(p), 0, 1)`` with
   ``H`` the binary predictive entropy in bits (both terms lie in [0, 1]), and labels
   ``p >= threshold`` inside the ROI.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._backends import make_runner, pick_device
from ._errors import PVSInputError
from ._sliding import FLIPS, TTAMerger, WindowPlan, plan_windows
from .preprocess import Preprocessed, preprocess

__all__ = [
    "FLIPS",
    "Prediction",
    "PredictionCancelled",
    "Progress",
    "pick_device",
    "postprocess",
    "predict_prepared",
    "predict_preprocessed",
    "predict_volume",
    "run",
]


@dataclass(frozen=True)
class Progress:
    """A progress event: ``done`` of ``total`` window batches, with a message."""

    done: int
    total: int
    message: str = ""


@dataclass
class Prediction:
    """Result of :func:`predict_volume`, on the source voxel grid."""

    probability: np.ndarray
    uncertainty: np.ndarray
    tta_variance: np.ndarray
    labels: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)


class PredictionCancelled(RuntimeError):
    """Raised when the ``cancel`` event is set during :func:`predict_volume`."""


def predict_preprocessed(
    image: np.ndarray,
    plan: WindowPlan,
    runner,
    *,
    tta: int = 1,
    blend_logits: bool = True,
    model: str = "(unnamed)",
    cancel: threading.Event | None = None,
) -> Generator[Progress, None, tuple[np.ndarray, np.ndarray]]:
    """Run the windows of ``plan`` over a preprocessed image; returns ``(probability, variance)``.

    Stages 2-4 of the module docstring, on the model grid: ``image`` is (C, *work_shape)
    as :func:`~napari_pvs.preprocess.preprocess` returns it, ``runner`` a
    :class:`~napari_pvs._backends.WindowRunner` for ``plan.patch`` windows.  Yields a
    :class:`Progress` before the first batch and after each one.
    """
    img = plan.pad_image(image)
    merger = TTAMerger(plan, tta, blend_logits=blend_logits, model=model)
    batches = plan.batches(runner.batch_size)
    yield Progress(0, len(batches), f"{len(plan.windows)} of {plan.n_all} windows, "
                                    f"{len(merger.flips)} flip(s), {runner.name} on {runner.device}")
    for b, batch in enumerate(batches):
        if cancel is not None and cancel.is_set():
            raise PredictionCancelled(f"prediction cancelled after {b} of {len(batches)} batches")
        x = np.stack([img[(slice(None), *w)] for w in batch]).astype(np.float32)
        merger.add(batch, *merger.predict(runner, x))
        yield Progress(b + 1, len(batches), f"batch {b + 1}/{len(batches)}")
    return merger.result()


def postprocess(probability: np.ndarray, variance: np.ndarray, roi: np.ndarray | None,
                threshold: float = 0.5, temperature: float = 1.0, *,
                min_cluster_mm3: float = 0.0, spacing=None) -> Prediction:
    """Uncertainty and labels from source-grid probability and TTA variance (stage 5).

    Outside ``roi`` every map is 0.  ``temperature``: the model's fitted calibration
    (:func:`napari_pvs.triage.apply_temperature`; the labels of threshold 0.5 do not
    depend on it).  ``uncertainty = clip(H(p) + 4 * var, 0, 1)`` of the calibrated ``p``.
    ``min_cluster_mm3`` (with the source ``spacing``): label clusters (26-connected)
    smaller than this volume are dropped from the labels, as the Frangi baseline drops
    its own (``cc3d.dust``); the probability and uncertainty maps keep them.
    """
    from .triage import apply_temperature

    prob = apply_temperature(probability, temperature).copy()
    var = np.asarray(variance, np.float32).copy()
    if roi is not None:
        prob[~roi] = 0.0
        var[~roi] = 0.0
    p = np.clip(prob, 1e-7, 1 - 1e-7)
    entropy = -(p * np.log2(p) + (1 - p) * np.log2(1 - p))
    uncertainty = np.clip(entropy + 4.0 * var, 0.0, 1.0).astype(np.float32)
    if roi is not None:
        uncertainty[~roi] = 0.0
    labels = (prob >= threshold).astype(np.uint8)
    if min_cluster_mm3 > 0:
        if spacing is None:
            raise ValueError("min_cluster_mm3 needs the source spacing")
        from .clusters import drop_small_clusters

        labels = drop_small_clusters(labels, spacing, min_cluster_mm3)
    return Prediction(prob, uncertainty, var, labels)


def smallest_cluster_mm3(meta: dict[str, Any]) -> float:
    """The model's smallest labelled cluster in mm³ (``meta["postprocessing"]``; 0: none)."""
    return float((meta.get("postprocessing") or {}).get("min_cluster_mm3") or 0.0)


def blends_logits(meta: dict[str, Any]) -> bool:
    """Our own 2-class models blend log-odds (MONAI); nnU-Net models blend probabilities."""
    pre = meta.get("preprocessing") or {}
    return pre.get("normalization") != "nnunet_v1" and int(meta["arch"].get("out_channels", 2)) == 2

def predict_prepared(
    prep: Preprocessed,
    runner,
    meta: dict[str, Any],
    *,
    overlap: float,
    roi: np.ndarray | None,
    tta: int = 1,
    threshold: float = 0.5,
    skip_outside_roi: bool = True,
    cancel: threading.Event | None = None,
) -> Generator[Progress, None, Prediction]:
    """Stages 2-5 on an image that :func:`~napari_pvs.preprocess.preprocess` prepared.

    The windows are the runner's; ``roi`` (bool, on the source grid) bounds the labels.
    :func:`predict_volume` and training's validation both call it, so validation scores
    exactly what a prediction would.  ``info`` of the result holds the window counts.
    """
    patch = tuple(runner.window)
    plan = plan_windows(prep.work_shape, patch, overlap, mask=prep.mask, nnunet=prep.nnunet,
                        skip_outside_roi=skip_outside_roi)
    prob, var = yield from predict_preprocessed(
        prep.image, plan, runner, tta=tta, blend_logits=blends_logits(meta),
        model=meta.get("id") or "(unnamed)", cancel=cancel)
    from .triage import temperature_of

    pred = postprocess(prep.to_source(prob), prep.to_source(var), roi, threshold,
                       temperature_of(meta), min_cluster_mm3=smallest_cluster_mm3(meta),
                       spacing=prep.source_spacing)
    pred.info = {"windows": len(plan.windows), "windows_total": plan.n_all,
                 "patch_size": list(patch), "overlap": overlap,
                 "work_shape": list(prep.work_shape)}
    return pred


def predict_volume(
    image: np.ndarray,
    spacing,
    net,
    meta: dict[str, Any],
    *,
    roi: np.ndarray | None = None,
    tta: int = 1,
    device: str | None = None,
    backend: str = "auto",
    overlap: float = 0.5,
    batch_size: int | None = None,
    patch_size: tuple[int, int, int] | None = None,
    threshold: float = 0.5,
    skip_outside_roi: bool = True,
    cache_key: str | None = None,
    cancel: threading.Event | None = None,
) -> Generator[Progress, None, Prediction]:
    """Predict PVS on one volume; a generator of :class:`Progress` returning a :class:`Prediction`.

    Parameters
    ----------
    image : ndarray, (X, Y, Z) or (C, X, Y, Z)
        The MR image on its source grid.
    spacing : tuple of 3 floats
        Source voxel size in mm.
    net, meta :
        Network and metadata, as returned by :func:`napari_pvs.model.load_checkpoint`.
    roi : ndarray, optional
        Brain / WM+BG mask on the source grid; normalisation statistics come from it,
        windows without ROI voxels are skipped and labels are restricted to it.
    tta : int
        Number of mirror variants, 1 (none) to 8 (all axes).
    device, backend : str
        Torch device (default: :func:`pick_device`) and window runner
        ("auto", "torch", "onnxruntime", "openvino").
    overlap : float
        Window overlap in [0, 1).
    batch_size : int, optional
        Windows per batch (default 1 on CPU, 2 on GPU).
    patch_size : tuple of int, optional
        Window size in voxels at the model spacing (default: the model's patch size).
    threshold : float
        Probability threshold of the labels.
    skip_outside_roi : bool
        Skip windows that hold no ROI voxel (the result inside the ROI is unchanged).
    cache_key : str, optional
        Identifies the checkpoint (its sha256) so CPU runtimes cache their export.
    cancel : threading.Event, optional
        When set, the prediction stops before the next batch with
        :class:`PredictionCancelled`.
    """
    # 17 lines of code: over 60 lines only through the numpydoc docstring above
    t0 = time.perf_counter()
    arch, pre = meta["arch"], meta.get("preprocessing", {})
    if not 1 <= int(tta) <= len(FLIPS):
        raise PVSInputError(f"tta must be between 1 and {len(FLIPS)} flips, got {tta}")
    prep = preprocess(image, spacing, roi, pre, in_channels=int(arch["in_channels"]))
    patch = tuple(int(p) for p in (patch_size or pre.get("patch_size") or (64, 64, 64)))
    device = pick_device(device)
    runner = make_runner(net, window=patch, batch_size=int(batch_size or (1 if device == "cpu" else 2)),
                         device=device, backend=backend, cache_key=cache_key)
    pred = yield from predict_prepared(prep, runner, meta, overlap=overlap,
                                       roi=None if roi is None else np.asarray(roi) > 0, tta=tta,
                                       threshold=threshold, skip_outside_roi=skip_outside_roi,
                                       cancel=cancel)
    pred.info.update({"model_id": meta.get("id"), "backend": runner.name, "device": device,
                      "tta": int(tta), "seconds": time.perf_counter() - t0})
    return pred


def run(gen: Generator[Progress, None, Any], progress: Callable[[Progress], None] | None = None):
    """Drain a progress generator (e.g. :func:`predict_volume`) and return its result."""
    while True:
        try:
            event = next(gen)
        except StopIteration as stop:
            return stop.value
        if progress is not None:
            progress(event)
