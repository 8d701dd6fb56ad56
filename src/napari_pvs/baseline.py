"""Model-free PVS baseline: multi-scale Frangi vesselness.

This is the default segmenter until a trained MedNeXt exists.  Steps:

1. Crop to the bounding box of the region of interest (ROI), padded by three times
   the largest scale, so the filter never sees the empty field of view.
2. Normalise intensities to relative contrast against the ROI median, divided by the
   squared voxel size, so that Hessian eigenvalues are in physical units and one
   ``gamma`` serves every scanner and voxel size.
3. Multi-scale Frangi vesselness (:func:`skimage.filters.frangi`) in float32, for
   bright ridges on T2w and dark ridges on T1w, scales given in millimetres.
4. Automatic threshold: hysteresis between ``high`` and ``high / 2`` where ``high``
   is the Otsu threshold of the vesselness of the responding (> 1e-3), CSF-like ROI
   voxels.  The rule
   adapts to each volume; nothing in it is tuned on a particular subject.
5. Keep voxels that are also CSF-like in intensity (brighter than the ROI median on
   T2w, darker on T1w), restrict to the ROI and drop clusters smaller than
   ``min_cluster_mm3``.

The scales are isotropic in voxels (``sigma_mm / mean spacing``); volumes with strongly
anisotropic voxels get a warning, as the filter then under- or over-smooths one axis.
"""

from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import cc3d
import numpy as np
from skimage.filters import apply_hysteresis_threshold, frangi, threshold_otsu

from ._errors import PVSInputError

__all__ = ["DEFAULT_GAMMA", "DEFAULT_SIGMAS_MM", "BaselineResult", "segment_frangi"]

DEFAULT_SIGMAS_MM = (0.5, 0.8, 1.2)
DEFAULT_GAMMA = 0.3


@dataclass
class BaselineResult:
    """Output of :func:`segment_frangi`.

    Attributes
    ----------
    labels : ndarray of uint8
        Binary PVS mask on the input grid.
    vesselness : ndarray of float32
        Frangi response on the input grid (0 outside the processed box).
    threshold : float
        The automatic (high) vesselness threshold that was applied.
    """

    labels: np.ndarray
    vesselness: np.ndarray
    threshold: float


def _roi_box(mask: np.ndarray, pad: int) -> tuple[slice, ...]:
    idx = [np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != ax))) for ax in range(3)]
    return tuple(
        slice(max(int(i[0]) - pad, 0), min(int(i[-1]) + pad + 1, n))
        for i, n in zip(idx, mask.shape)
    )


def _frangi_tiled(
    image: np.ndarray, sigmas: list[float], *, black: bool, gamma: float, workers: int | None
) -> np.ndarray:
    """:func:`skimage.filters.frangi` over slabs with a halo, in a thread pool.

    scikit-image's Gaussian derivatives and NumPy's batched ``eigvalsh`` release the
    GIL, so slabs run in parallel; with a fixed ``gamma`` the result equals one
    whole-volume call up to float rounding (the halo covers the Gaussian support).
    """
    def run(block: np.ndarray) -> np.ndarray:
        return frangi(block, sigmas=sigmas, black_ridges=black, alpha=0.5, beta=0.5, gamma=gamma)

    workers = workers or min(os.cpu_count() or 1, 8)
    axis = int(np.argmax(image.shape))
    n = image.shape[axis]
    halo = int(np.ceil(4 * max(sigmas))) + 2
    n_slabs = min(workers, max(n // (4 * halo), 1))
    if n_slabs <= 1:
        return run(image).astype(np.float32)
    edges = np.linspace(0, n, n_slabs + 1).astype(int)
    spans = [(max(a - halo, 0), min(b + halo, n), a, b) for a, b in zip(edges[:-1], edges[1:])]
    blocks = [np.take(image, np.arange(lo, hi), axis=axis) for lo, hi, _, _ in spans]
    out = np.empty(image.shape, np.float32)
    with ThreadPoolExecutor(n_slabs) as pool:
        for (lo, _, a, b), res in zip(spans, pool.map(run, blocks)):
            src = [slice(None)] * 3
            dst = [slice(None)] * 3
            src[axis] = slice(a - lo, b - lo)
            dst[axis] = slice(a, b)
            out[tuple(dst)] = res[tuple(src)]
    return out


def segment_frangi(
    image: np.ndarray,
    spacing: tuple[float, float, float] | float = 1.0,
    *,
    roi: np.ndarray | None = None,
    modality: str = "T2w",
    sigmas_mm: tuple[float, ...] = DEFAULT_SIGMAS_MM,
    threshold: float | None = None,
    min_cluster_mm3: float = 2.0,
    gamma: float = DEFAULT_GAMMA,
    workers: int | None = None,
) -> BaselineResult:
    """Segment PVS with multi-scale Frangi vesselness.

    Parameters
    ----------
    image : ndarray, shape (X, Y, Z)
        The MR image.
    spacing : float or tuple of 3 floats
        Voxel size in mm.
    roi : ndarray, optional
        Region of interest (nonzero inside), e.g. a WM + BG mask.  Without it the
        whole nonzero image is processed and the result is restricted to it.
    modality : {"T2w", "T1w"}
        PVS are bright on T2w and dark on T1w.
    sigmas_mm : tuple of float
        Frangi scales in mm (PVS radii are about 0.25-1.5 mm).
    threshold : float, optional
        Fixed vesselness threshold instead of the automatic one.
    min_cluster_mm3 : float
        Clusters (26-connected) smaller than this are removed.
    gamma : float
        Frangi structureness constant, in units of relative contrast per mm^2.
    workers : int, optional
        Threads for the filter (default: the number of CPUs, at most 8).

    Returns
    -------
    BaselineResult
    """
    image, sp, mask = _checked_inputs(image, spacing, roi, modality)
    h = float(sp.mean())
    sigmas = [s / h for s in sigmas_mm]
    box = _roi_box(mask, int(np.ceil(3 * max(sigmas))) + 1)
    cmask = mask[box]
    crop = _relative_contrast(image[box], cmask, h)

    black = modality == "T1w"
    vess = _frangi_tiled(crop, sigmas, black=black, gamma=gamma, workers=workers)
    vess[~cmask] = 0.0
    csf_like = crop < 0 if black else crop > 0

    seg, high = _threshold(vess, cmask & csf_like, threshold,
                           int(np.ceil(min_cluster_mm3 / float(np.prod(sp)))))
    labels = np.zeros(image.shape, np.uint8)
    labels[box] = seg > 0
    full_v = np.zeros(image.shape, np.float32)
    full_v[box] = vess
    return BaselineResult(labels=labels, vesselness=full_v, threshold=float(high))


def _threshold(vess: np.ndarray, allowed: np.ndarray, threshold: float | None,
               min_vox: int) -> tuple[np.ndarray, float]:
    """Hysteresis between ``high`` and ``high / 2`` (``high``: ``threshold``, else the Otsu
    threshold of the responding allowed voxels), inside ``allowed``, without clusters
    under ``min_vox`` voxels; returns ``(mask, high)``."""
    if threshold is None:
        resp = vess[allowed]
        resp = resp[resp > 1e-3]
        high = float(threshold_otsu(resp)) if resp.size > 16 else np.inf
    else:
        high = float(threshold)
    seg = apply_hysteresis_threshold(vess, 0.5 * high, high) & allowed
    seg = cc3d.dust(seg.astype(np.uint8), threshold=min_vox, connectivity=26, in_place=True)
    return seg, high


def _checked_inputs(image, spacing, roi, modality) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(image, spacing as 3 floats, ROI mask)``, refusing what cannot be segmented."""
    image = np.asarray(image)
    if image.ndim != 3:
        raise PVSInputError(f"image must be 3D, got shape {image.shape}")
    if modality not in ("T2w", "T1w"):
        raise PVSInputError(f"modality must be 'T2w' or 'T1w', got {modality!r}")
    sp = np.broadcast_to(np.asarray(spacing, dtype=float), (3,))
    if np.any(sp <= 0):
        raise PVSInputError(f"spacing must be positive, got {tuple(sp)}")
    if sp.max() / sp.min() > 1.5:
        warnings.warn(
            f"voxels are anisotropic ({tuple(np.round(sp, 3))} mm); the Frangi baseline uses "
            "isotropic scales in voxels, so consider resampling to isotropic first",
            stacklevel=3,
        )
    if roi is None:
        mask = image > 0
    else:
        roi = np.asarray(roi)
        if roi.shape != image.shape:
            raise PVSInputError(f"ROI shape {roi.shape} does not match image shape {image.shape}")
        mask = roi > 0
    if not mask.any():
        what = "the ROI is empty" if roi is not None else "the image has no positive voxels"
        raise PVSInputError(f"{what}: nothing to segment (check the mask or the image file)")
    return image, sp, mask


def _relative_contrast(crop: np.ndarray, cmask: np.ndarray, h: float) -> np.ndarray:
    """Relative contrast to the ROI median, per mm^2 (float32): the Hessian of this
    image is in physical units, so one gamma and one threshold rule serve every voxel
    size."""
    crop = crop.astype(np.float32)
    med = float(np.median(crop[cmask]))
    if not np.isfinite(med) or med <= 0:
        raise PVSInputError(
            f"the median intensity inside the ROI is {med:g}; the baseline needs a positive "
            "MR magnitude image (check that the ROI covers brain tissue)"
        )
    crop /= med
    crop -= 1.0
    crop /= h * h
    return crop
