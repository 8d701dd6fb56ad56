"""Automatic brain mask and WM / basal ganglia (BG) regions, for prediction without a
segmentation or ROI.

PVS are scored only in the white matter (WM) and the basal ganglia (BG); run on the
whole field of view, a vessel filter also fires on CSF, cortex and skull.  Without a
region map, :func:`estimate_regions` estimates one from the image alone:

1. Work grid: block means to about 1.6-2.4 mm voxels (a 160 mm phantom at 0.8 mm,
   200^3, becomes 100^3), so every step below is cheap; PVS blur into the WM there.
2. Head mask: Otsu threshold of the log intensity, largest component, opened by 4 mm
   to cut thin bridges (scalp, neck), grown back and hole-filled (``brain``).
3. Bias field: the WM is the mode of the histogram; a smooth multiplicative field is
   fitted to the voxels near that mode (normalised Gaussian smoothing, 20 mm, on a
   5 mm grid), with a tolerance that shrinks from 0.4 to 0.08 (log units).
4. Tissue classes: a 3-class Gaussian mixture (WM, GM/partial volume, CSF) on the
   corrected intensities of low-gradient voxels, as FSL FAST does without its MRF.
   Intensities are then expressed in units where WM = 0 and CSF = 1, which reads the
   same on T2w (CSF bright) and T1w (CSF dark).
5. Cortex and outer CSF: GM/CSF-like voxels (median-filtered > 0.2) in the outer 40 %
   of the brain depth that are connected to the surface.  Ventricles: large (> 0.2 %
   of the head) interior CSF-like components.  ROI = the rest of the head, closed by
   2 voxels so that PVS cut out by the class threshold come back in.
   Full-resolution edge cleanup: with the bias field and class means carried to the
   image grid (smoothed 0.6 mm), CSF-like voxels (> 0.5) within 3 mm of the excluded
   tissue and connected to it, then GM-like ones (> 0.3) within 2 mm, leave the ROI:
   the closing pulls ventricle walls, sulcal CSF and cortex edges in, where the vessel
   filter fires.  Isolated CSF-like tubes (the PVS) stay, bar their ends at the edge.
6. BG (best effort): deep (> 30 % depth), GM-like interior blobs (smoothed, clipped
   intensity > 0.06), opened, > 0.15 % of the head, whose centroid lies more than
   0.22 half-widths from the mid-plane along the left-right axis, found as the axis of
   best mirror symmetry of the deep brain.  The rest of the ROI is WM.

Measured on held-out 96 mm phantoms (seeds 300-307, both contrasts, all 4 sites;
Frangi threshold and scoring as the baseline does, on a cached vesselness): the Frangi
baseline's whole-image voxel Dice is 0.15-0.62 (mean 0.32) with these regions, 47-103 %
(mean 70 %) of the Dice it reaches with the true region map (without the edge cleanup:
mean 0.28, 61 %); the ROI keeps 71-94 % (mean 87 %) of the true PVS voxels and the WM
Dice against the truth is 0.80-0.93.  Weakest: ventricles the coarse step misses (large
in-ROI CSF blobs; removing them cost too many PVS) and, on some sites, deep cortex.
The BG estimate is weak: BG on T2w differs from WM by only ~12 % of the WM-CSF
contrast, and the BG is usually absorbed into WM (BG Dice near 0), which does not
change the ROI but does change per-region scores.  Time: 0.4-2 s for a 96 mm phantom
on 2 shared cores.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import cc3d
import numpy as np
from scipy import ndimage as ndi
from skimage.filters import threshold_otsu

from ._errors import PVSInputError
from ._regions import REGION_CODES

__all__ = ["AutoRegions", "estimate_regions"]

#: Target voxel size of the work grid (mm); block means of round(WORK_MM / spacing).
WORK_MM = 1.8
#: Voxel size of the grid the bias field is smoothed on (mm).
BIAS_MM = 5.0
METHOD = "gmm3+depth"


@dataclass(frozen=True)
class AutoRegions:
    """Regions estimated from the image alone.

    Attributes
    ----------
    regions : ndarray of uint8
        Region map on the image grid, :data:`~napari_pvs._regions.REGION_CODES`
        (0 other, 1 WM, 2 BG).
    brain : ndarray of bool
        Head / brain mask on the image grid (the tissue inside the skull's dark rim;
        on T2w it includes the outer CSF).
    method : str
        Short name of the method.
    meta : dict
        JSON-serialisable figures: class means, volumes, work grid, left-right axis.
    """

    regions: np.ndarray
    brain: np.ndarray
    method: str
    meta: dict[str, Any] = field(default_factory=dict)


def _checked(image, spacing, modality):
    image = np.asarray(image)
    if image.ndim != 3:
        raise PVSInputError(f"need a 3D image to estimate regions, got shape {image.shape}; "
                            "pick one volume of a 4D series")
    if modality not in ("T2w", "T1w"):
        raise PVSInputError(f"modality must be 'T2w' or 'T1w', got {modality!r}")
    sp = np.broadcast_to(np.asarray(spacing, dtype=float), (3,)).copy()
    if not np.all(np.isfinite(sp)) or np.any(sp <= 0):
        raise PVSInputError(f"spacing must be 3 positive numbers, got {tuple(sp)}")
    if image.dtype == bool or not np.issubdtype(image.dtype, np.number):
        raise PVSInputError(f"image must hold intensities, got dtype {image.dtype}; "
                            "pass the MR image, or supply --seg or --roi")
    if min(image.shape) < 8:
        raise PVSInputError(f"image of shape {image.shape} is too small to hold a brain; "
                            "pass the whole 3D volume, or supply --seg or --roi")
    img = image.astype(np.float32, copy=False)
    if not np.all(np.isfinite(img)):
        raise PVSInputError("image holds NaN or infinite values, so no brain mask can be "
                            "estimated; fix the image, or supply --seg or --roi")
    if float(img.max()) == float(img.min()):
        if float(img.max()) == 0.0:
            raise PVSInputError("image is all zeros, so there is no brain to find; check the "
                                "file, or supply --seg or --roi")
        raise PVSInputError(f"image is constant ({float(img.max()):g} everywhere), so there is no "
                            "brain to find; check the file, or supply --seg or --roi")
    return img, sp


def _block_mean(img, f):
    shape = [n // k * k for n, k in zip(img.shape, f, strict=False)]
    a = img[: shape[0], : shape[1], : shape[2]]
    a = a.reshape(shape[0] // f[0], f[0], shape[1] // f[1], f[1], shape[2] // f[2], f[2])
    return a.mean(axis=(1, 3, 5), dtype=np.float32)


def _largest(mask):
    lab, n = cc3d.connected_components(mask.astype(np.uint8), connectivity=6, return_N=True)
    if n == 0:
        return mask
    counts = np.bincount(lab.ravel())
    counts[0] = 0
    return lab == counts.argmax()


def _head(lo, sp):
    """Head mask of the work grid: Otsu of log intensity, opened by 4 mm, hole-filled."""
    pos = lo[lo > 0]
    if pos.size < 64:
        raise PVSInputError(f"image has only {pos.size} work voxels above zero, too few for a "
                            "brain; check the file, or supply --seg or --roi")
    hi = np.percentile(pos, 99.5)
    vals = np.log(np.clip(lo, hi * 1e-4, hi))
    thr = threshold_otsu(vals)
    fg = _largest(vals > thr)
    # open by ~4 mm to cut thin bridges, keep the largest part, grow back inside fg
    r = 4.0
    dist = ndi.distance_transform_edt(fg, sampling=sp)
    core = _largest(dist > r)
    back = ndi.distance_transform_edt(~core, sampling=sp) <= r + 1e-3
    head = ndi.binary_fill_holes(back & fg)
    return head


def _gmm(c, means, n_iter=20):
    k = len(means)
    mu = np.array(means, float)
    var = np.full(k, np.var(c) / k**2)
    w = np.full(k, 1.0 / k)
    for _ in range(n_iter):
        ll = -0.5 * (c[:, None] - mu) ** 2 / var - 0.5 * np.log(var) + np.log(w)
        ll -= ll.max(1, keepdims=True)
        r = np.exp(ll)
        r /= r.sum(1, keepdims=True)
        nk = r.sum(0) + 1e-9
        mu = (r * c[:, None]).sum(0) / nk
        var = (r * (c[:, None] - mu) ** 2).sum(0) / nk + 1e-6 * np.var(c)
        w = nk / nk.sum()
    return mu, var, w, r


def _mode(values):
    hist, edges = np.histogram(values, bins=256)
    hist = ndi.gaussian_filter1d(hist.astype(float), 2.0)
    i = int(hist.argmax())
    return 0.5 * (edges[i] + edges[i + 1])


def _tissue(lo, head, modality, sp):
    """Bias-corrected intensity in units where WM = 0 and CSF = 1; and class fit."""
    fb = np.maximum(1, np.round(BIAS_MM / sp)).astype(int)
    logx = np.log(np.maximum(lo, 1e-6 * lo.max()))
    bias = np.zeros(lo.shape, np.float32)
    mode = _mode(logx[head])
    for tol in (0.4, 0.3, 0.25, 0.2, 0.15, 0.12, 0.1, 0.08, 0.08):
        ok = head & (np.abs(logx - bias - mode) < tol)
        resid = np.where(ok, logx - mode, 0.0)
        num = ndi.gaussian_filter(_block_sum(resid, fb), 20.0 / (sp * fb))
        den = ndi.gaussian_filter(_block_sum(ok.astype(np.float64), fb), 20.0 / (sp * fb))
        bias = _resize((num / np.maximum(den, 1e-3)).astype(np.float32), fb, lo.shape)
        mode = _mode((logx - bias)[head])
    corr = np.exp(logx - bias)
    grad = ndi.gaussian_gradient_magnitude(corr, 1.0)
    pure = head & (grad < np.quantile(grad[head], 0.6))
    fit = np.flatnonzero(pure.ravel())
    if fit.size > 200_000:
        fit = np.random.default_rng(0).choice(fit, 200_000, replace=False)
    c = corr.ravel()[fit]
    wm = np.exp(mode)
    init = (wm, 0.5 * (wm + np.quantile(c, 0.98)), np.quantile(c, 0.98)) if modality == "T2w" else (
        wm, 0.5 * (wm + np.quantile(c, 0.02)), np.quantile(c, 0.02))
    mu, var, w, _ = _gmm(c, init, 30)
    u = np.where(head, (corr - mu[0]) / (mu[2] - mu[0]), 0).astype(np.float32)
    return u, mu, bias


def _block_sum(a, f):
    pad = [(0, (-n) % k) for n, k in zip(a.shape, f, strict=False)]
    a = np.pad(a, pad)
    s = a.shape
    return a.reshape(s[0] // f[0], f[0], s[1] // f[1], f[1], s[2] // f[2], f[2]).sum(axis=(1, 3, 5))


def _resize(a, f, shape):
    zoomed = ndi.zoom(a, f, order=1, mode="nearest", grid_mode=True)
    out = np.empty(shape, np.float32)
    sl = tuple(slice(0, min(n, m)) for n, m in zip(shape, zoomed.shape, strict=False))
    pad = [(0, n - x.stop) for n, x in zip(shape, sl, strict=True)]
    out[...] = np.pad(zoomed[sl], pad, mode="edge")
    return out


def estimate_regions(image: np.ndarray, spacing, modality: str = "T2w") -> AutoRegions:
    """Estimate a brain mask and a WM / BG region map from the image alone.

    Parameters
    ----------
    image : ndarray, shape (X, Y, Z)
        The MR image (any real dtype); skull-stripped images (zero outside) work too.
    spacing : float or tuple of 3 floats
        Voxel size in mm.
    modality : {"T2w", "T1w"}
        Contrast: CSF bright (T2w) or dark (T1w).

    Returns
    -------
    AutoRegions

    Raises
    ------
    PVSInputError
        An image that is not 3D, is all zeros or constant, holds NaN or infinite values,
        or has no brain-sized foreground; a bad spacing or modality.
    """
    img, sp = _checked(image, spacing, modality)
    f = np.maximum(1, np.round(WORK_MM / sp)).astype(int)
    lo = _block_mean(img, f)
    lsp = sp * f
    head = _head(lo, lsp)
    u, mu, bias = _tissue(lo, head, modality, lsp)
    depth = ndi.distance_transform_edt(head, sampling=lsp)
    dnorm = depth / max(float(depth.max()), 1e-6)
    um = ndi.median_filter(u, 3)
    interior = head & ~_outer(head, um, depth, dnorm, lsp)
    voxel_mm3 = float(np.prod(lsp))
    head_mm3 = float(head.sum()) * voxel_mm3
    vent = _big_parts(interior & (um > 0.5), 0.002 * head_mm3 / voxel_mm3)
    bg, lr_axis = _basal_ganglia(u, um, head, interior, dnorm, lsp, head_mm3)
    roi = _largest(interior & ~vent)
    roi = ndi.binary_closing(roi, iterations=2) & head & ~vent
    bg &= roi
    regions_lo = np.zeros(lo.shape, np.uint8)
    regions_lo[roi] = REGION_CODES["WM"]
    regions_lo[bg] = REGION_CODES["BG"]
    regions = _upsample(regions_lo, f, img.shape)
    regions = _refine(regions, img, f, sp, bias, mu)
    brain = _upsample(head.astype(np.uint8), f, img.shape).astype(bool)
    vox_full = float(np.prod(sp))
    meta = {"class_means": [round(float(m), 3) for m in mu], "work_factor": f.tolist(),
            "lr_axis": lr_axis, "brain_mm3": round(float(brain.sum()) * vox_full, 1),
            "wm_mm3": round(float((regions == 1).sum()) * vox_full, 1),
            "bg_mm3": round(float((regions == 2).sum()) * vox_full, 1),
            "ventricles_mm3": round(float(vent.sum()) * voxel_mm3, 1)}
    return AutoRegions(regions, brain, METHOD, meta)


#: Full-resolution refinement: (band depth in mm, threshold in WM = 0 / CSF = 1 units)
#: for CSF-like, then GM-like voxels connected to the excluded tissue.
REFINE_STEPS = ((3.0, 0.5), (2.0, 0.3))
#: Smoothing (mm) of the full-resolution image before the refinement's thresholds.
REFINE_SIGMA_MM = 0.6


def _refine(regions, img, f, sp, bias_lo, mu):
    """Full-resolution cleanup of the ROI edge: CSF-like voxels within 3 mm of the
    excluded cortex / CSF / ventricles and connected to them, then GM-like ones within
    2 mm, leave the ROI (partial-volume edges the coarse closing pulled in)."""
    bias = _resize(bias_lo, f, img.shape)
    u = (img * np.exp(-bias) - mu[0]) / (mu[2] - mu[0])
    us = ndi.gaussian_filter(u, REFINE_SIGMA_MM / sp)
    roi = regions > 0
    for d, t in REFINE_STEPS:
        out = ~roi
        band = ndi.distance_transform_edt(roi, sampling=sp) <= d
        cand = roi & band & (us > t)
        lab = cc3d.connected_components((cand | out).astype(np.uint8), connectivity=6)
        ids = np.unique(lab[out])
        roi &= ~(cand & np.isin(lab, ids[ids > 0]))
    return np.where(roi, regions, 0).astype(np.uint8)


def _outer(head, um, depth, dnorm, sp):
    """Cortex and outer / sulcal CSF: GM- or CSF-like voxels in the outer 40 % of the
    depth that are connected to the surface, plus the one-voxel surface shell."""
    gmcsf = head & (um > 0.2) & (dnorm < 0.4)
    lab = cc3d.connected_components(gmcsf.astype(np.uint8), connectivity=6)
    shell = head & (depth <= 1.5 * sp.max())
    ids = np.unique(lab[shell & gmcsf])
    return np.isin(lab, ids[ids > 0]) | (head & ~ndi.binary_erosion(head))


def _big_parts(mask, min_voxels):
    """Connected components of ``mask`` with at least ``min_voxels`` voxels."""
    lab = cc3d.connected_components(mask.astype(np.uint8), connectivity=6)
    cnt = np.bincount(lab.ravel())
    keep = np.flatnonzero(cnt >= min_voxels)
    return np.isin(lab, keep[keep > 0])


def _lr_axis(zs, head, dnorm):
    """``(axis, centre of mass)``: the axis of best mirror symmetry of the deep brain."""
    com = np.array(ndi.center_of_mass(head))
    deep = head & (dnorm > 0.3)
    zz = np.where(deep, zs, 0).astype(np.float32)
    zz[deep] -= zz[deep].mean()
    sym = []
    for a in range(3):
        shift = int(round(2 * com[a] - (zz.shape[a] - 1)))
        flipped = np.roll(np.flip(zz, a), shift, axis=a)
        sym.append(float((zz * flipped).sum() / max(float((zz * zz).sum()), 1e-12)))
    return int(np.argmax(sym)), com


def _basal_ganglia(u, um, head, interior, dnorm, sp, head_mm3):
    """BG mask of the work grid (best effort) and the left-right axis used."""
    zs = ndi.gaussian_filter(np.clip(u, -0.3, 0.3), 1.5 / sp)
    cand = interior & (zs > 0.06) & (um < 0.5) & (dnorm > 0.3)
    cand = ndi.binary_opening(cand, iterations=1)
    lab = cc3d.connected_components(cand.astype(np.uint8), connectivity=6)
    ax, com = _lr_axis(zs, head, dnorm)
    idx = np.flatnonzero(head.any(axis=tuple(i for i in range(3) if i != ax)))
    half = (idx[-1] - idx[0] + 1) / 2
    bg = np.zeros(u.shape, bool)
    voxel_mm3 = float(np.prod(sp))
    for i, sl in enumerate(ndi.find_objects(lab), 1):
        if sl is None:
            continue
        m = lab[sl] == i
        if m.sum() * voxel_mm3 < 0.0015 * head_mm3:
            continue
        offset = abs(ndi.center_of_mass(m)[ax] + sl[ax].start - com[ax]) / half
        if offset > 0.22:
            bg[sl] |= m
    bg = ndi.binary_fill_holes(ndi.binary_closing(bg, iterations=1) & interior)
    return bg, ax


def _upsample(a, f, shape):
    out = a
    for ax in range(3):
        out = np.repeat(out, f[ax], axis=ax)
    pad = [(0, n - m) for n, m in zip(shape, out.shape, strict=True)]
    return np.pad(out, pad, mode="edge")
