"""Sliding-window MedNeXt prediction with mirror-TTA uncertainty.

The one prediction API is :func:`predict_volume`, a generator: it yields
:class:`Progress` events (window batches done / total) and returns a
:class:`Prediction`.  :func:`run` drains it for scripts and the CLI; the napari widget
runs the same generator in a thread worker.  Stopping the iteration (``close()``)
or setting the ``cancel`` event stops it between two window batches.

Steps
-----
1. Resample the image (trilinear, MONAI ``Resize``) to the model's target spacing when
   it differs by more than 1 %; the ROI is resampled with nearest neighbour.
2. z-score the intensities inside the ROI (or inside the nonzero voxels).
3. Pad to at least one patch; tile with windows of the model's patch size at the
   given overlap (MONAI ``dense_patch_slices``, or nnU-Net v1's evenly spaced steps
   for imported nnU-Net models).  Windows that hold no ROI voxel are
   skipped.  A Gaussian importance map (MONAI ``compute_importance_map``, sigma 1/8 of
   the patch) is computed once and weights every window.
4. Windows run in batches through a :mod:`napari_pvs._backends` runner (torch on
   GPU; an exported OpenVINO / ONNX Runtime model on CPU when installed).
5. Mirror TTA: each batch runs under the first ``tta`` of the 8 flip combinations;
   the foreground probability is averaged over flips and its variance kept.
   Windows are blended as MONAI's ``sliding_window_inference`` does (Gaussian-weighted
   logits, here the log-odds of the flip-averaged probability), or as nnU-Net v1 does
   (Gaussian-weighted probabilities) for imported nnU-Net models.
6. Back on the source grid: probability, ``tta_variance``, ``uncertainty`` =
   ``clip(H(p) + 4 * Var_TTA(p), 0, 1)`` with ``H`` the binary predictive entropy in
   bits (both terms lie in [0, 1]), and labels ``p >= threshold`` inside the ROI.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._errors import PVSInputError

__all__ = [
    "FLIPS",
    "Prediction",
    "PredictionCancelled",
    "Progress",
    "pick_device",
    "predict_volume",
    "run",
]

# Mirror axes of the 8 TTA variants, in the order they are used.
FLIPS: tuple[tuple[int, ...], ...] = tuple(
    c for n in range(4) for c in itertools.combinations((0, 1, 2), n)
)


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


def pick_device(preferred: str | None = None) -> str:
    """``preferred`` if given, else CUDA, then Apple MPS, then CPU."""
    import torch

    if preferred and preferred != "auto":
        try:
            dev = torch.device(preferred)
        except (RuntimeError, TypeError, ValueError):
            dev = None
        if dev is None or dev.type not in ("cpu", "cuda", "mps"):
            raise PVSInputError(f"unknown device {preferred!r}; use cpu, cuda, cuda:N or mps")
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise PVSInputError(f"device {preferred!r} requested but CUDA is not available; "
                                "use --device cpu")
        if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
            raise PVSInputError(f"device {preferred!r} does not exist: this machine has "
                                f"{torch.cuda.device_count()} CUDA device(s)")
        mps = getattr(torch.backends, "mps", None)
        if dev.type == "mps" and not (mps is not None and mps.is_available()):
            raise PVSInputError(f"device {preferred!r} requested but Apple MPS is not available; "
                                "use --device cpu")
        return preferred
    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "mps"
    return "cpu"


def _resize(arr: np.ndarray, shape: tuple[int, ...], mode: str) -> np.ndarray:
    from monai.transforms import Resize

    if tuple(arr.shape[-3:]) == tuple(shape):
        return arr
    out = Resize(spatial_size=tuple(int(s) for s in shape), mode=mode)(arr[None] if arr.ndim == 3 else arr)
    out = np.asarray(out)
    return out[0] if arr.ndim == 3 else out


def _check_inputs(image, spacing, roi, in_channels):
    image = np.asarray(image, dtype=np.float32)
    if image.ndim == 3:
        image = image[None]
    if image.ndim != 4:
        raise PVSInputError(f"image must be 3D (or channels-first 4D), got shape {image.shape}")
    if image.shape[0] != in_channels:
        raise PVSInputError(
            f"the model expects {in_channels} input channel(s) but the image has {image.shape[0]} "
            f"(shape {image.shape}); pass one volume per model input channel"
        )
    if spacing is None:
        raise PVSInputError("the voxel spacing is missing; it is needed to resample to the "
                            "model's spacing (load the image with napari_pvs.io.load_volume)")
    sp = np.broadcast_to(np.asarray(spacing, dtype=float), (3,))
    if not np.all(np.isfinite(sp) & (sp > 0)):
        raise PVSInputError(f"invalid voxel spacing {tuple(sp)}; it must be positive mm values")
    if roi is not None:
        roi = np.asarray(roi) > 0
        if roi.shape != image.shape[1:]:
            raise PVSInputError(f"ROI shape {roi.shape} does not match image shape {image.shape[1:]}")
        if not roi.any():
            raise PVSInputError("the ROI is empty: nothing to predict (check the mask)")
    return image, sp, roi


MAX_WORK_VOXELS = 2**30  # one float32 volume of 4 GiB; a 0.5 mm whole head is ~1e8


def work_grid(shape, spacing, target) -> tuple[int, ...]:
    """Grid shape at spacing ``target``; ``shape`` itself when within 1 % of ``spacing``.

    Refuses (before anything is allocated) a grid of more than ``MAX_WORK_VOXELS``.
    """
    spacing = np.asarray(spacing, dtype=float)
    target = np.broadcast_to(np.asarray(target, dtype=float), (3,))
    if not np.all(np.isfinite(target) & (target > 0)):
        raise PVSInputError(f"invalid target spacing {tuple(target)}; it must be positive mm "
                            "values")
    if np.all(np.abs(target / spacing - 1) <= 0.01):
        out = tuple(int(n) for n in shape)
    else:
        out = tuple(max(int(round(n * s / t)), 1) for n, s, t in zip(shape, spacing, target))
    if int(np.prod(out, dtype=object)) > MAX_WORK_VOXELS:
        raise PVSInputError(f"resampling {tuple(shape)} voxels of {tuple(spacing.tolist())} mm to "
                            f"{tuple(target.tolist())} mm gives a {out} grid, over the limit of "
                            f"{MAX_WORK_VOXELS:,} voxels; check the model's target spacing")
    return out


def _preprocess(image, sp, roi, pre):
    """Resample and normalise; returns ``(img, mask, work_shape, transpose or None)``.

    ``pre["normalization"] == "nnunet_v1"`` follows an imported nnU-Net v1 plan:
    transpose by ``transpose_forward``, third-order spline resampling to the target
    spacing (skimage ``resize``, edge mode, as nnU-Net v1 does), and "nonCT" z-scoring,
    inside the nonzero mask (zero outside) where ``use_mask_for_norm`` is set.
    Otherwise: trilinear resampling (MONAI ``Resize``) and z-score inside the ROI.
    """
    target = np.broadcast_to(np.asarray(pre.get("target_spacing") or sp, dtype=float), (3,))
    order = None
    if pre.get("normalization") == "nnunet_v1":
        order = tuple(int(a) for a in pre.get("transpose_forward", (0, 1, 2)))
        image = image.transpose((0, *[a + 1 for a in order]))
        sp = sp[list(order)]
        roi = None if roi is None else roi.transpose(order)
    work_shape = work_grid(image.shape[1:], sp, target)
    mask = None if roi is None else _resize(roi.astype(np.float32), work_shape, "nearest") > 0.5
    if order is None:
        return _zscore(_resize(image, work_shape, "trilinear"), mask), mask, work_shape, None
    return _nnunet_normalise(_spline_resize(image, work_shape), pre), mask, work_shape, order


def _spline_resize(image: np.ndarray, shape) -> np.ndarray:
    """Third-order spline resize of each channel (nnU-Net v1's image resampling)."""
    if tuple(image.shape[1:]) == tuple(shape):
        return image
    from skimage.transform import resize

    return np.stack([resize(c.astype(float), shape, order=3, mode="edge", cval=0, clip=True,
                            anti_aliasing=False) for c in image]).astype(np.float32)


def _nnunet_normalise(image: np.ndarray, pre) -> np.ndarray:
    """nnU-Net v1 "nonCT" normalisation per channel, optionally inside the nonzero mask."""
    schemes = pre.get("normalization_schemes") or ["nonCT"] * image.shape[0]
    use_mask = pre.get("use_mask_for_norm") or [False] * image.shape[0]
    out = np.empty_like(image, dtype=np.float32)
    nonzero = np.any(image != 0, axis=0)
    for c in range(image.shape[0]):
        if schemes[c] not in ("nonCT", "noNorm"):
            raise PVSInputError(f"normalisation scheme {schemes[c]!r} of the imported plans is not "
                                "supported (only nonCT / noNorm)")
        if schemes[c] == "noNorm":
            out[c] = image[c]
        elif use_mask[c]:
            v = image[c][nonzero]
            out[c] = np.where(nonzero, (image[c] - v.mean()) / (v.std() + 1e-8), 0.0)
        else:
            out[c] = (image[c] - image[c].mean()) / (image[c].std() + 1e-8)
    return out


def _zscore(image: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    sel = mask if mask is not None and mask.any() else np.any(image != 0, axis=0)
    if not sel.any():
        sel = np.ones(image.shape[1:], bool)
    out = np.empty_like(image)
    for c in range(image.shape[0]):
        v = image[c][sel]
        out[c] = (image[c] - v.mean()) / max(float(v.std()), 1e-8)
    return out


def window_starts(size: int, patch: int, overlap: float) -> list[int]:
    """Window start positions along one axis, evenly spaced (nnU-Net v1's rule).

    ``n = ceil((size - patch) / (patch * (1 - overlap))) + 1`` windows whose starts are
    spread evenly over ``[0, size - patch]``, so the first and last windows touch the
    borders and no window is squeezed against the end.
    """
    if size <= patch:
        return [0]
    step = patch * (1 - overlap)
    n = int(np.ceil((size - patch) / step)) + 1
    actual = (size - patch) / max(n - 1, 1)
    return [int(round(actual * i)) for i in range(n)]


def _windows(shape, patch, overlap, nnunet: bool):
    """Window slices: nnU-Net v1's evenly spaced starts for imported nnU-Net models,
    else MONAI's ``dense_patch_slices`` (what ``sliding_window_inference`` uses)."""
    if not nnunet:
        from monai.data.utils import dense_patch_slices

        interval = [max(int(round(p * (1 - overlap))), 1) for p in patch]
        return dense_patch_slices(tuple(shape), tuple(patch), tuple(interval))
    starts = [window_starts(n, p, overlap) for n, p in zip(shape, patch)]
    return [tuple(slice(a, a + p) for a, p in zip(corner, patch))
            for corner in itertools.product(*starts)]


def _importance(patch) -> np.ndarray:
    from monai.data.utils import compute_importance_map
    from monai.utils import BlendMode

    w = compute_importance_map(tuple(patch), mode=BlendMode.GAUSSIAN, sigma_scale=0.125, device="cpu")
    return np.asarray(w, dtype=np.float32)


def _foreground(logits: np.ndarray) -> np.ndarray:
    """Foreground probability (1 - P(background)) from logits (B, C, ...)."""
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return 1.0 - e[:, 0] / e.sum(axis=1)


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
    from ._backends import make_runner

    t0 = time.perf_counter()
    arch, pre = meta["arch"], meta.get("preprocessing", {})
    if not 1 <= int(tta) <= len(FLIPS):
        raise PVSInputError(f"tta must be between 1 and {len(FLIPS)} flips, got {tta}")
    if not 0 <= overlap < 1:
        raise PVSInputError(f"overlap must be in [0, 1), got {overlap}")
    image, sp, roi = _check_inputs(image, spacing, roi, int(arch["in_channels"]))
    src_shape = image.shape[1:]
    img, mask, work_shape, order = _preprocess(image, sp, roi, pre)
    patch = tuple(int(p) for p in (patch_size or pre.get("patch_size") or (64, 64, 64)))
    short = [max(p - n, 0) for p, n in zip(patch, work_shape)]
    pad = [(d // 2, d - d // 2) for d in short]  # centred, as nnU-Net pads
    if any(short):
        img = np.pad(img, [(0, 0), *pad])
        if mask is not None:
            mask = np.pad(mask, pad)
    shape = img.shape[1:]
    windows = _windows(shape, patch, overlap, nnunet=order is not None)
    # nnU-Net blends softmax probabilities; MONAI (and our own models) blend logits
    blend_logits = order is None and int(arch.get("out_channels", 2)) == 2
    n_all = len(windows)
    if mask is not None and skip_outside_roi:
        windows = [w for w in windows if mask[w].any()]
    device = pick_device(device)
    bs = int(batch_size or (1 if device == "cpu" else 2))
    runner = make_runner(net, window=patch, batch_size=bs, device=device, backend=backend,
                         cache_key=cache_key)
    weight = _importance(patch)
    flips = FLIPS[: int(tta)]
    acc_p = np.zeros(shape, np.float32)
    acc_v = np.zeros(shape, np.float32)
    acc_w = np.zeros(shape, np.float32)
    batches = [windows[i : i + bs] for i in range(0, len(windows), bs)]
    yield Progress(0, len(batches), f"{len(windows)} of {n_all} windows, {len(flips)} flip(s), "
                                    f"{runner.name} on {device}")
    for b, batch in enumerate(batches):
        if cancel is not None and cancel.is_set():
            raise PredictionCancelled(f"prediction cancelled after {b} of {len(batches)} batches")
        x = np.stack([img[(slice(None), *w)] for w in batch]).astype(np.float32)
        s1 = np.zeros((len(batch), *patch), np.float64)  # float64: exact zero variance
        s2 = np.zeros_like(s1)
        for axes in flips:
            ax = tuple(a + 2 for a in axes)
            xf = np.ascontiguousarray(np.flip(x, ax)) if axes else x
            logits = runner(xf)
            if not np.all(np.isfinite(logits)):
                raise PVSInputError(f"model {meta.get('id') or '(unnamed)'} produced NaN or "
                                    "infinite outputs; the model is broken (its training "
                                    "diverged?): predict with another model")
            p = _foreground(logits).astype(np.float64)
            if axes:
                p = np.flip(p, tuple(a + 1 for a in axes))
            s1 += p
            s2 += p * p
        mean = s1 / len(flips)
        var = np.maximum(s2 / len(flips) - mean * mean, 0.0)
        if blend_logits:  # MONAI blends logits: for 2 classes that is the log-odds
            q = np.clip(mean, 1e-7, 1 - 1e-7)
            mean = np.log(q) - np.log1p(-q)
        for k, w in enumerate(batch):
            acc_p[w] += weight * mean[k]
            acc_v[w] += weight * var[k]
            acc_w[w] += weight
        yield Progress(b + 1, len(batches), f"batch {b + 1}/{len(batches)}")

    covered = acc_w > 0
    prob = np.where(covered, acc_p / np.maximum(acc_w, 1e-12), 0.0)
    if blend_logits:
        prob = np.where(covered, 1.0 / (1.0 + np.exp(-prob)), 0.0)
    prob = prob.astype(np.float32)
    var = np.where(covered, acc_v / np.maximum(acc_w, 1e-12), 0.0).astype(np.float32)
    crop = tuple(slice(a, a + n) for (a, _), n in zip(pad, work_shape))
    prob, var = prob[crop], var[crop]
    if order is not None:  # undo the plans' transpose
        back = tuple(int(a) for a in pre["transpose_backward"])
        prob, var = prob.transpose(back), var.transpose(back)
    prob = _resize(prob, src_shape, "trilinear").astype(np.float32)
    var = _resize(var, src_shape, "trilinear").astype(np.float32)
    if roi is not None:
        prob[~roi] = 0.0
        var[~roi] = 0.0
    p = np.clip(prob, 1e-7, 1 - 1e-7)
    entropy = -(p * np.log2(p) + (1 - p) * np.log2(1 - p))
    uncertainty = np.clip(entropy + 4.0 * var, 0.0, 1.0).astype(np.float32)
    if roi is not None:
        uncertainty[~roi] = 0.0
    labels = (prob >= threshold).astype(np.uint8)
    info = {
        "model_id": meta.get("id"), "backend": runner.name, "device": device, "tta": len(flips),
        "windows": len(windows), "windows_total": n_all, "patch_size": list(patch),
        "overlap": overlap, "work_shape": list(work_shape), "seconds": time.perf_counter() - t0,
    }
    return Prediction(prob, uncertainty, var, labels, info)


def run(gen: Generator[Progress, None, Any], progress: Callable[[Progress], None] | None = None):
    """Drain a progress generator (e.g. :func:`predict_volume`) and return its result."""
    while True:
        try:
            event = next(gen)
        except StopIteration as stop:
            return stop.value
        if progress is not None:
            progress(event)
