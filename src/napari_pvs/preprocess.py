"""The one way an image reaches a model's grid and intensity scale, and back again.

Inference (:func:`napari_pvs.inference.predict_volume`) and training
(:func:`napari_pvs.training.data.load_subject`) both call :func:`preprocess`, so a model
is always trained on the input it is run on.  What it does depends on the model's
``meta["preprocessing"]``:

own models (``normalization`` absent or ``"zscore"``)
    Trilinear resampling (MONAI ``Resize``) to ``target_spacing`` when the spacing
    differs by more than 1 % (with ``min_spacing``, see :func:`work_spacing`, an axis
    finer than the target keeps its own voxel size, down to ``min_spacing``); z-score
    of each channel inside the ROI (or, without one, inside the nonzero voxels).
imported nnU-Net v1 models (``normalization == "nnunet_v1"``)
    What the release's plans say: transpose by ``transpose_forward``, third-order spline
    resampling (edge mode, as nnU-Net v1 does), then "nonCT" z-scoring per channel,
    inside the nonzero mask (zero outside) where ``use_mask_for_norm`` is set.

In both cases the ROI (and training labels) follow with nearest-neighbour resampling.
:meth:`Preprocessed.to_source` takes a map on the model grid back to the source grid
(undo the transpose, trilinear resampling).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._errors import PVSInputError

__all__ = [
    "MAX_WORK_VOXELS",
    "Preprocessed",
    "check_image",
    "nnunet_normalise",
    "preprocess",
    "resize",
    "spline_resize",
    "work_grid",
    "work_spacing",
    "zscore",
]

MAX_WORK_VOXELS = 2**30  # one float32 volume of 4 GiB; a 0.5 mm whole head is ~1e8


def resize(arr: np.ndarray, shape, mode: str) -> np.ndarray:
    """MONAI ``Resize`` of a 3D array or a channels-first 4D array; ``arr`` if already ``shape``."""
    from monai.transforms import Resize

    if tuple(arr.shape[-3:]) == tuple(shape):
        return arr
    out = Resize(spatial_size=tuple(int(s) for s in shape), mode=mode)(arr[None] if arr.ndim == 3 else arr)
    out = np.asarray(out)
    return out[0] if arr.ndim == 3 else out


def resize_mask(mask: np.ndarray, shape) -> np.ndarray:
    """Nearest-neighbour resampling of a boolean mask."""
    return resize(np.asarray(mask).astype(np.float32), shape, "nearest") > 0.5


def spline_resize(image: np.ndarray, shape) -> np.ndarray:
    """Third-order spline resize of each channel (nnU-Net v1's image resampling)."""
    if tuple(image.shape[1:]) == tuple(shape):
        return image
    from skimage.transform import resize as sk_resize

    return np.stack([sk_resize(c.astype(float), shape, order=3, mode="edge", cval=0, clip=True,
                               anti_aliasing=False) for c in image]).astype(np.float32)


def zscore(image: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """z-score each channel of ``image`` (C, ...) with statistics inside ``mask``.

    Without a mask (or an empty one) the statistics come from the nonzero voxels, and
    from all voxels when the image is zero everywhere.
    """
    sel = mask if mask is not None and mask.any() else np.any(image != 0, axis=0)
    if not sel.any():
        sel = np.ones(image.shape[1:], bool)
    out = np.empty_like(image)
    for c in range(image.shape[0]):
        v = image[c][sel]
        out[c] = (image[c] - v.mean()) / max(float(v.std()), 1e-8)
    return out


def nnunet_normalise(image: np.ndarray, pre: Mapping[str, Any]) -> np.ndarray:
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


def work_spacing(spacing, pre: Mapping[str, Any] | None) -> np.ndarray:
    """The voxel size (3,) an image of ``spacing`` is run at under ``pre``.

    ``target_spacing`` (the source spacing when absent).  A model with ``min_spacing``
    never resamples an axis coarser than it came: an axis finer than the target by more
    than 1 % keeps its own voxel size, but not below ``min_spacing``.  Downsampling a
    0.7 mm image to 0.8 mm blurs away the smallest PVS (benchmarks/
    bench_runtime_settings.py); keeping the native grid costs time only on such images.
    """
    pre = pre or {}
    sp = np.asarray(spacing, dtype=float)
    target = np.broadcast_to(np.asarray(pre.get("target_spacing") or sp, dtype=float), (3,))
    if pre.get("min_spacing") is None or pre.get("normalization") == "nnunet_v1":
        return target
    floor = np.broadcast_to(np.asarray(pre["min_spacing"], dtype=float), (3,))
    finer = sp < target * 0.99
    return np.where(finer, np.maximum(sp, np.minimum(floor, target)), target)


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


def check_image(image, spacing, roi, in_channels: int):
    """``(image (C, X, Y, Z) float32, spacing (3,), roi bool or None)``, or a clear error."""
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


@dataclass
class Preprocessed:
    """An image on the model's grid and intensity scale, and how to go back.

    Attributes
    ----------
    image : ndarray (C, *work_shape), float32
        What the network sees (before padding to a window).
    mask : ndarray (*work_shape) of bool, or None
        The ROI on the model grid.
    source_shape, work_shape : tuple of int
        Spatial shapes on the source grid and the model grid.
    transpose : tuple of int, or None
        The axis order applied before resampling (nnU-Net plans), None for none.
    source_spacing : tuple of float, or None
        Voxel size of the source grid in mm.
    """

    image: np.ndarray
    mask: np.ndarray | None
    source_shape: tuple[int, int, int]
    work_shape: tuple[int, int, int]
    transpose: tuple[int, int, int] | None = None
    source_spacing: tuple[float, float, float] | None = None

    @property
    def nnunet(self) -> bool:
        """True for an imported nnU-Net v1 model's preprocessing."""
        return self.transpose is not None

    def mask_to_model(self, mask: np.ndarray) -> np.ndarray:
        """A source-grid mask (labels, ROI) on the model grid: transposed, nearest neighbour."""
        mask = np.asarray(mask) > 0
        if mask.shape != tuple(self.source_shape):
            raise PVSInputError(f"mask shape {mask.shape} does not match the image shape "
                                f"{tuple(self.source_shape)}")
        if self.transpose is not None:
            mask = mask.transpose(self.transpose)
        return resize_mask(mask, self.work_shape)

    def to_source(self, arr: np.ndarray) -> np.ndarray:
        """A model-grid map back on the source grid: transpose undone, trilinear, float32."""
        if self.transpose is not None:
            arr = arr.transpose(tuple(int(a) for a in np.argsort(self.transpose)))
        return resize(np.asarray(arr, np.float32), self.source_shape, "trilinear").astype(np.float32)


def preprocess(image, spacing, roi, pre: Mapping[str, Any] | None, *,
               in_channels: int = 1) -> Preprocessed:
    """Take an image on its source grid to the model's grid and intensity scale.

    Parameters
    ----------
    image : ndarray, (X, Y, Z) or (C, X, Y, Z)
    spacing : tuple of 3 floats
        Source voxel size in mm.
    roi : ndarray of bool, optional
        Brain / WM+BG mask on the source grid; own models z-score inside it.
    pre : mapping
        The model's ``meta["preprocessing"]`` (``target_spacing``, ``normalization`` and,
        for imported nnU-Net models, the plans' transpose and normalisation schemes).
    in_channels : int
        Channels the model expects.
    """
    pre = pre or {}
    image, sp, roi = check_image(image, spacing, roi, int(in_channels))
    src_shape = tuple(int(n) for n in image.shape[1:])
    src_spacing = tuple(float(v) for v in sp)
    target = work_spacing(sp, pre)
    order = None
    if pre.get("normalization") == "nnunet_v1":
        order = tuple(int(a) for a in pre.get("transpose_forward", (0, 1, 2)))
        if sorted(order) != [0, 1, 2]:
            raise PVSInputError(f"transpose_forward {order} of the model's plans is not an axis "
                                "order of (0, 1, 2); re-import the release")
        image = image.transpose((0, *[a + 1 for a in order]))
        sp = sp[list(order)]
        roi = None if roi is None else roi.transpose(order)
    work_shape = work_grid(image.shape[1:], sp, target)
    mask = None if roi is None else resize_mask(roi, work_shape)
    if order is None:
        img = zscore(resize(image, work_shape, "trilinear"), mask)
    else:
        img = nnunet_normalise(spline_resize(image, work_shape), pre)
    return Preprocessed(np.ascontiguousarray(img, dtype=np.float32), mask, src_shape,
                        tuple(int(n) for n in work_shape), order, src_spacing)
