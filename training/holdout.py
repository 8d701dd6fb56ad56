"""Held-out tests of a PVS model, each next to the Frangi baseline.

* **Leave one site out**: phantoms of site D (0.7 mm, the noisiest scanner), which the
  starter model never saw (:func:`site_d_phantoms`).
* **Real anatomy** (:func:`anatomy_case`): a T2w image made from the MNI152 2009
  template's own T1 intensities, inverted, so its partial volume, sulci and deep grey
  matter are the real ones, not tissue classes painted with random means.  PVS, WMH,
  lacunes, texture, bias and noise are inserted by a generator that shares nothing
  with the training generator (:mod:`napari_pvs.training.realistic`) except the
  tube rasteriser: another deformation (a sum of sinusoids on a 0.8 mm grid, or none),
  another PVS model (centre lines that follow the gradient of the distance to the
  ventricles, so they run towards the cortex; straight lenticulostriate lines), other
  size and contrast distributions, other seeds.

:func:`evaluate` predicts each case with a model and with the baseline inside the
case's true WM + BG regions, and returns voxel and cluster scores per region.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from napari_pvs._phantom_anatomy import smooth_field
from napari_pvs._phantom_tubes import render_tubes, tube_path
from napari_pvs._regions import REGION_CODES
from napari_pvs.phantom import Phantom, make_phantom

from .realistic import BG, OUTSIDE, VENTRICLE, WM, mni_template

__all__ = ["ANATOMY_CASES", "anatomy_case", "evaluate", "site_d_phantoms"]

#: (seed, warp amplitude in mm): the template as it is, and a deformed copy.
ANATOMY_CASES = ((1, 0.0), (2, 3.0))
SITE_D_SEEDS = (901, 902)


def _grid(tpl, h: float):
    vox = np.argwhere(tpl.labels != OUTSIDE)
    step = np.diag(tpl.affine)[:3]
    lo = vox.min(0) * step + tpl.affine[:3, 3] - 6.0
    hi = vox.max(0) * step + tpl.affine[:3, 3] + 6.0
    shape = tuple(int(np.ceil((b - a) / h)) for a, b in zip(lo, hi, strict=True))
    affine = np.diag([h, h, h, 1.0])
    affine[:3, 3] = lo
    return shape, affine


def _sinusoid_warp(rng, pts: np.ndarray, amplitude: float) -> np.ndarray:
    """Displacement (3, N) in mm: three sinusoids per axis, wavelengths 50-120 mm."""
    out = np.zeros_like(pts)
    if amplitude <= 0:
        return out
    for a in range(3):
        for _ in range(3):
            k = rng.standard_normal(3)
            k *= 2 * np.pi / rng.uniform(50, 120) / np.linalg.norm(k)
            out[a] += amplitude / np.sqrt(3) * np.sin(k @ pts + rng.uniform(0, 2 * np.pi))
    return out


def _follow(rng, start, field, inside, length, step=0.6):
    """A centre line through ``start`` along +/- a unit vector ``field(p)``: straighter
    and more tightly pulled than the training PVS (noise 0.1, pull 0.25)."""
    return tube_path(rng, start, field(start), length, step, inside, pull=field, noise=0.1,
                     pull_weight=0.25)


def anatomy_case(seed: int = 1, *, warp_mm: float = 0.0, spacing: float = 0.8) -> Phantom:
    """The real-anatomy validation image (T2w) with its PVS truth and WM / BG regions."""
    tpl = mni_template()
    rng = np.random.default_rng([seed, 4242])
    h = float(spacing)
    shape, affine = _grid(tpl, h)
    pts = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) * h + affine[a, 3]
                                 for a, n in enumerate(shape)], indexing="ij"), 0).reshape(3, -1)
    src = pts + _sinusoid_warp(rng, pts, warp_mm).astype(np.float32)
    del pts
    t_inv = np.linalg.inv(tpl.affine)
    src = (t_inv[:3, :3].astype(np.float32) @ src) + t_inv[:3, 3:4].astype(np.float32)
    t1 = ndi.map_coordinates(tpl.t1, src, order=1, mode="constant").reshape(shape)
    lab = ndi.map_coordinates(tpl.labels, src, order=0, mode="constant").reshape(shape)
    del src
    brain = lab != OUTSIDE
    wm, bg, vent = lab == WM, lab == BG, lab == VENTRICLE
    roi = wm | bg
    # T2w from the real T1 contrast: CSF bright, WM dark, the template's partial volume
    img = np.where(brain, np.clip(1.05 - t1, 0, 1), 0).astype(np.float32)
    csf_value = float(np.median(img[vent]))

    # PVS centre lines: WM ones along the gradient of the distance to the ventricles
    dist = ndi.gaussian_filter(ndi.distance_transform_edt(~vent, sampling=h).astype(np.float32),
                               2.0 / h)
    grad = np.stack(np.gradient(dist), 0)
    inv = np.linalg.inv(affine)

    def voxel(p):
        return np.rint(inv[:3, :3] @ p + inv[:3, 3]).astype(int)

    def inside_of(mask):
        def inside(p):
            v = voxel(p)
            return bool(np.all(v >= 0) and np.all(v < shape) and mask[tuple(v)])
        return inside

    def radial(p):
        v = np.clip(voxel(p), 0, np.array(shape) - 1)
        g = grad[(slice(None), *v)]
        return g / (np.linalg.norm(g) + 1e-9)

    deep_wm = wm & (ndi.distance_transform_edt(wm, sampling=h) > 2.5)
    tubes = []
    for p0 in _points(rng, deep_wm, affine, 260):
        pts = _follow(rng, p0, radial, inside_of(wm), float(rng.uniform(4, 18)))
        if len(pts) >= 5:
            dia = float(np.clip(rng.lognormal(np.log(1.2), 0.3), 0.6, 2.4))
            tubes.append((pts, dia / 2, float(rng.uniform(0.3, 1.0))))
    up = np.array([0.0, 0.0, 1.0])
    bg_lo = np.percentile(np.argwhere(bg)[:, 2], 35)
    for p0 in _points(rng, bg & (np.indices(shape)[2] < bg_lo), affine, 40):
        fan = up + np.array([np.sign(p0[0]) * rng.uniform(0, 0.4), rng.uniform(-0.2, 0.2), 0])
        fan /= np.linalg.norm(fan)
        pts = _follow(rng, p0, lambda p, f=fan: f, inside_of(roi), float(rng.uniform(5, 15)))
        pts = pts[len(pts) // 2:]
        if len(pts) >= 5:
            dia = float(np.clip(rng.lognormal(np.log(1.6), 0.25), 0.8, 2.8))
            tubes.append((pts, dia / 2, float(rng.uniform(0.4, 1.0))))
    occ = np.zeros(shape, np.float32)
    strength = np.zeros(shape, np.float32)
    labels = np.zeros(shape, bool)
    render_tubes(tubes, shape, affine, h, occ, labels, strength)
    labels &= roi

    # WMH: a periventricular halo and deep blobs (sums of Gaussians); lacunes
    halo = ndi.binary_dilation(vent, iterations=int(round(rng.uniform(2, 4) / h))) & wm
    wmh = ndi.gaussian_filter(halo.astype(np.float32), 1.5 / h) * rng.uniform(0.4, 0.8)
    blobs = np.zeros(shape, np.float32)
    for c in np.argwhere(deep_wm)[rng.choice(int(deep_wm.sum()), 25, replace=False)]:
        blobs[tuple(c)] = 1.0
    blobs = ndi.gaussian_filter(blobs, rng.uniform(1.5, 2.5) / h)
    wmh = np.maximum(wmh, np.clip(blobs / (blobs.max() + 1e-9) * 1.6, 0, 1) * 0.7) * wm
    img += wmh * (0.75 * csf_value - img)
    axes = [(np.arange(n, dtype=np.float32) * h + affine[a, 3]).reshape(
        [-1 if b == a else 1 for b in range(3)]) for a, n in enumerate(shape)]
    for c in _points(rng, roi, affine, 3):
        r = rng.uniform(2.0, 5.0)
        d = np.sqrt(sum((ax - c[a]) ** 2 for a, ax in enumerate(axes)))
        img[d < r] = csf_value * 0.95
        img[(d >= r) & (d < r + 1.0) & roi] = 0.7 * csf_value
    img += np.clip(strength, 0, 1) * roi * (csf_value - img)
    # texture, blur, bias, Rician noise
    img *= 1.0 + 0.03 * smooth_field(rng, shape, h, 1.5)
    img = ndi.gaussian_filter(img, 0.5 / 2.3548 / h)
    img *= np.exp(0.15 * smooth_field(rng, shape, h, 70.0))
    sigma = float(np.median(img[wm])) / 18.0
    img = np.sqrt((img + rng.standard_normal(shape, dtype=np.float32) * sigma) ** 2
                  + (rng.standard_normal(shape, dtype=np.float32) * sigma) ** 2)
    regions = np.zeros(shape, np.uint8)
    regions[wm] = REGION_CODES["WM"]
    regions[bg] = REGION_CODES["BG"]
    meta = {"subject": f"mni-{seed}", "site": "real anatomy", "modality": "T2w", "seed": seed,
            "warp_mm": warp_mm, "spacing_mm": h, "n_pvs": len(tubes)}
    return Phantom((img * 1000).astype(np.float32), labels.astype(np.uint8), regions, affine,
                   (h, h, h), meta)


def _points(rng, mask, affine, n) -> np.ndarray:
    idx = np.argwhere(mask)
    pick = idx[rng.choice(len(idx), size=min(n, len(idx)), replace=False)].astype(float)
    return pick @ affine[:3, :3].T + affine[:3, 3]


def site_d_phantoms(modality: str = "T2w", size_mm: float = 144.0):
    """``(name, Phantom)`` of site D, which no starter model trains on."""
    for seed in SITE_D_SEEDS:
        yield f"siteD-{seed}", make_phantom(seed, modality=modality, site=3, size_mm=size_mm)


def _scores(ph: Phantom, model: str, overlap: float | None = None) -> tuple[dict, float]:
    from napari_pvs.inference import run
    from napari_pvs.metrics import score
    from napari_pvs.pipeline import predict_array

    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pred = run(predict_array(ph.image, ph.spacing, model, roi=ph.regions,
                                 modality=ph.meta["modality"], overlap=overlap))
    seconds = time.perf_counter() - t
    return score(pred.labels, ph.labels, ph.regions), seconds


def evaluate(model: str | Path, *, modality: str = "T2w", cases=("site_d", "anatomy"),
             log=print, overlap: float | None = None, baseline: bool = True) -> dict:
    """Scores of ``model`` and of the Frangi baseline on the held-out cases.

    ``overlap`` overrides the model's window overlap; ``baseline=False`` skips Frangi
    (its entries are then absent).

    Returns ``{case: {subject: {"model": score, "frangi": score}}}`` with
    :func:`napari_pvs.metrics.score` dicts (``all``, ``WM``, ``BG``), plus a
    ``"mean"`` entry per case and method.
    """
    out: dict = {}
    for case in cases:
        if case == "site_d":
            subjects = site_d_phantoms(modality)
        elif case == "anatomy":
            if modality != "T2w":
                continue
            subjects = ((f"mni-{s}-warp{w:g}", anatomy_case(s, warp_mm=w))
                        for s, w in ANATOMY_CASES)
        else:
            raise ValueError(f"unknown case {case!r}")
        rows = {}
        for name, ph in subjects:
            rows[name] = {}
            methods = (("model", str(model)), ("frangi", "baseline"))[: 2 if baseline else 1]
            for method, spec in methods:
                s, secs = _scores(ph, spec, overlap if method == "model" else None)
                rows[name][method] = s
                log(f"  {case} {name} {method}: " + "  ".join(
                    f"{r} vox {s[r]['voxel_dice']:.3f} clu {s[r]['cluster_dice']:.3f} "
                    f"P {s[r]['cluster_precision']:.2f} R {s[r]['cluster_recall']:.2f}"
                    for r in ("WM", "BG")) + f"  ({secs:.1f} s)")
        out[case] = {"subjects": rows, "mean": _mean(rows)}
    return out


def _mean(rows: dict) -> dict:
    out = {}
    for method in next(iter(rows.values())):
        out[method] = {
            region: {k: float(np.mean([r[method][region][k] for r in rows.values()]))
                     for k in ("voxel_dice", "cluster_dice", "cluster_precision", "cluster_recall")}
            for region in ("all", "WM", "BG")}
    return out
