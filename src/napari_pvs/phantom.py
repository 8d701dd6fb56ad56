"""Synthetic multi-site PVS phantoms: the embedded default data.

No public PVS data set can be downloaded on the machines this project runs on, so
the demo, the tests and the benchmarks use phantoms.  A phantom is a brain-shaped
volume with CSF, ventricles, a folded cortical ribbon, white matter (WM), basal
ganglia (BG) and a thalamus, in world millimetres (RAS, centred on the origin):

* PVS are thin tortuous tubes, 0.5-3 mm wide and 2-25 mm long.  In the WM they run
  radially, away from the ventricles towards the cortex; in the BG they rise from the
  base of the putamen/pallidum and fan out upwards like lenticulostriate arteries.
  Each tube has its own contrast, so some are faint.  Partial volume is modelled by
  the fraction of each voxel that the tube covers.
* Confounders that fool naive vessel filters: WM hyperintensity (WMH) blobs, some
  elongated; lacunes (3-15 mm, CSF-filled, with a gliotic rim); flow voids of larger
  vessels (dark on both contrasts); sulcal CSF close to the WM; bias field; Rician
  noise; blur.
* ``modality="T2w"`` makes PVS/CSF bright, ``"T1w"`` makes them dark.
* Sites (:class:`SiteProfile`) differ in voxel size (0.7-1.2 mm), SNR, bias field,
  tissue contrast, PVS conspicuity and blur, so that a cohort supports
  leave-one-site-out cross-validation.

Ground-truth labels mark voxels whose centre lies within ``max(r, 0.55 * h)`` of a
tube's centre line (``r`` the tube radius, ``h`` the voxel size), so a 0.5 mm tube is
still labelled as a one-voxel line even though it barely changes the intensity.

The region mask uses the codes of :data:`REGION_CODES`: 0 other, 1 WM, 2 BG.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from scipy import ndimage as ndi

__all__ = [
    "MODALITIES",
    "REGION_CODES",
    "SITES",
    "Phantom",
    "SiteProfile",
    "make_cohort",
    "make_phantom",
    "site_profile",
]

REGION_CODES = {"other": 0, "WM": 1, "BG": 2}
MODALITIES = ("T2w", "T1w")

# Tissue intensities before site effects, (T2w, T1w).  PVS and lacunes take the CSF
# value, modulated by partial volume and by each tube's conspicuity.
_TISSUE = {
    "csf": (1.00, 0.12),
    "gm": (0.56, 0.50),
    "wm": (0.36, 0.82),
    "bg": (0.44, 0.64),
    "thalamus": (0.42, 0.70),
    "wmh": (0.84, 0.56),
    "rim": (0.66, 0.62),
    "flow_void": (0.06, 0.20),
}


@dataclass(frozen=True)
class SiteProfile:
    """Acquisition characteristics of one (synthetic) scanner site.

    Parameters
    ----------
    name : str
        Site label, e.g. ``"siteA"``.
    spacing : float
        Isotropic voxel size in mm.
    snr : float
        White-matter signal over the Rician noise sigma.
    bias : float
        Standard deviation of the log bias field.
    contrast : float
        Grey/white and PVS contrast scale (1 = nominal).
    pvs_conspicuity : float
        Scale of each PVS's contrast against its surroundings.
    blur_fwhm : float
        Extra Gaussian blur in mm (point-spread function).
    """

    name: str
    spacing: float
    snr: float
    bias: float
    contrast: float
    pvs_conspicuity: float
    blur_fwhm: float


# The first sites are fixed so that every cohort covers the same range of scanners;
# more sites are drawn at random (seeded by their index) in the same ranges.
SITES: tuple[SiteProfile, ...] = (
    SiteProfile("siteA", 1.0, 18.0, 0.10, 1.00, 1.00, 0.0),
    SiteProfile("siteB", 0.8, 12.0, 0.20, 0.90, 0.85, 0.6),
    SiteProfile("siteC", 1.2, 24.0, 0.15, 1.10, 0.90, 0.9),
    SiteProfile("siteD", 0.7, 10.0, 0.30, 0.85, 0.80, 0.4),
)


def site_profile(index: int) -> SiteProfile:
    """Return the profile of site ``index`` (0-based); deterministic."""
    if index < 0:
        raise ValueError(f"site index must be >= 0, got {index}")
    if index < len(SITES):
        return SITES[index]
    rng = np.random.default_rng([7919, index])
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    name = "site" + (letters[index] if index < 26 else f"{index:03d}")
    return SiteProfile(
        name=name,
        spacing=float(rng.choice([0.7, 0.8, 0.9, 1.0, 1.1, 1.2])),
        snr=float(rng.uniform(10, 32)),
        bias=float(rng.uniform(0.05, 0.3)),
        contrast=float(rng.uniform(0.8, 1.15)),
        pvs_conspicuity=float(rng.uniform(0.75, 1.05)),
        blur_fwhm=float(rng.uniform(0.0, 1.0)),
    )


@dataclass
class Phantom:
    """One synthetic subject.

    Attributes
    ----------
    image : ndarray of float32, shape (X, Y, Z)
        The MR image, arbitrary units (white matter near 1000 on T1w).
    labels : ndarray of uint8
        Ground-truth PVS mask (1 = PVS).
    regions : ndarray of uint8
        Region mask, :data:`REGION_CODES` (0 other, 1 WM, 2 BG).
    affine : ndarray, shape (4, 4)
        Voxel index to world RAS mm.
    spacing : tuple of float
        Voxel size in mm.
    meta : dict
        Subject id, site, modality, seed, PVS counts and diameters, WM PVS volume
        fraction, confounder counts: JSON-serialisable.
    """

    image: np.ndarray
    labels: np.ndarray
    regions: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, float, float]
    meta: dict[str, Any] = field(default_factory=dict)


def _grid(fov_mm: float, spacing: float) -> tuple[tuple[int, int, int], np.ndarray]:
    n = max(int(round(fov_mm / spacing)), 8)
    shape = (n, n, n)
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = -(n - 1) / 2.0 * spacing
    return shape, affine


def _smooth_field(
    rng: np.random.Generator, shape: tuple[int, ...], spacing: float, corr_mm: float
) -> np.ndarray:
    """Zero-mean, unit-variance random field with correlation length ~``corr_mm``.

    White noise on a coarse grid (one node per ``corr_mm``) is interpolated onto the
    voxel grid with separable Gaussian weights: three small matrix products instead
    of a full-volume spline zoom (about 10x faster at 160^3).
    """
    out = None
    mats = []
    for n in shape:
        c = max(int(math.ceil(n * spacing / corr_mm)) + 3, 4)
        nodes = np.linspace(-1.0, n, c)
        w = np.exp(-0.5 * ((np.arange(n)[:, None] - nodes[None, :]) / (0.6 * (nodes[1] - nodes[0]))) ** 2)
        mats.append((w / w.sum(1, keepdims=True)).astype(np.float32))
    out = rng.standard_normal([m.shape[1] for m in mats]).astype(np.float32)
    out = np.tensordot(mats[0], out, axes=(1, 0))
    out = np.tensordot(out, mats[1], axes=(1, 1)).transpose(0, 2, 1)
    out = np.tensordot(out, mats[2], axes=(2, 1))
    out = np.ascontiguousarray(out)
    out -= out.mean()
    out /= out.std() + 1e-12
    return out


def _ellipsoid(coords, centre, radii) -> np.ndarray:
    x, y, z = coords
    return (
        ((x - centre[0]) / radii[0]) ** 2
        + ((y - centre[1]) / radii[1]) ** 2
        + ((z - centre[2]) / radii[2]) ** 2
    )


class _Anatomy:
    """Tissue classes of one subject on its voxel grid (all masks boolean)."""

    def __init__(self, rng: np.random.Generator, shape, affine, spacing: float, size: float):
        s = size / 160.0  # anatomy scales with the field of view; PVS keep mm sizes
        idx = [np.arange(n, dtype=np.float32) for n in shape]
        x = (idx[0] * spacing + affine[0, 3])[:, None, None]
        y = (idx[1] * spacing + affine[1, 3])[None, :, None]
        z = (idx[2] * spacing + affine[2, 3])[None, None, :]
        self.coords = (x, y, z)
        radii = np.array([62.0, 74.0, 56.0]) * s * rng.uniform(0.93, 1.05, 3)
        self.brain_radius = float(radii.mean())
        fold = _smooth_field(rng, shape, spacing, 30.0 * s + 6.0)
        r_norm = np.sqrt(_ellipsoid(self.coords, (0, 0, 0), radii)).astype(np.float32)
        r_norm += 0.025 * fold
        depth = (1.0 - r_norm) * self.brain_radius  # mm below the brain surface
        self.depth = depth

        sulci = np.abs(_smooth_field(rng, shape, spacing, 9.0 + 6.0 * s))
        sulc_depth = 13.0 * s + 2.0
        gm_thick = 2.2 + 0.6 * _smooth_field(rng, shape, spacing, 20.0)
        brain = depth > 0
        csf_out = (depth <= 0) & (depth > -3.0)
        sulcal_csf = brain & (sulci < 0.09) & (depth < sulc_depth)
        gm = brain & ((depth < gm_thick) | ((sulci < 0.28) & (depth < sulc_depth + gm_thick)))

        atrophy = rng.uniform(0.75, 1.35)
        vent = np.zeros(shape, bool)
        self.vent_centres = []
        for side in (-1, 1):
            c = (side * 9.0 * s * atrophy**0.5, -2.0 * s, 13.0 * s)
            rad = (5.5 * s * atrophy, 28.0 * s, 9.0 * s * atrophy)
            # a gentle downward bend at both ends gives horn-like tips
            yy = (y - c[1]) / rad[1]
            zc = c[2] - 6.0 * s * yy**2
            vent |= ((x - c[0]) / rad[0]) ** 2 + (yy**2) + ((z - zc) / rad[2]) ** 2 < 1.0
            self.vent_centres.append(c)
        bg = np.zeros(shape, bool)
        thal = np.zeros(shape, bool)
        self.bg_centres = []
        for side in (-1, 1):
            c_bg = (side * 23.0 * s, 6.0 * s, -3.0 * s)
            r_bg = (8.0 * s, 17.0 * s, 12.0 * s)
            bg |= _ellipsoid(self.coords, c_bg, r_bg) < 1.0
            self.bg_centres.append((c_bg, r_bg))
            thal |= _ellipsoid(self.coords, (side * 9.0 * s, -16.0 * s, 0.0), (7 * s, 11 * s, 8 * s)) < 1
        inner = brain & ~gm & ~sulcal_csf
        self.csf = csf_out | sulcal_csf | (vent & brain)
        self.gm = gm & ~sulcal_csf
        self.bg = bg & inner & ~vent
        self.thalamus = thal & inner & ~vent & ~bg
        self.wm = inner & ~vent & ~bg & ~thal
        self.vent = vent & brain
        self.brain = brain


def _tube_path(rng, start, direction, length, step, inside, pull=None) -> np.ndarray:
    """Grow a tortuous centre line from ``start`` in +/- ``direction`` (mm)."""
    halves = []
    for sign in (1.0, -1.0):
        d = sign * direction
        p = start.copy()
        pts = []
        n = int(length / 2 / step)
        for _ in range(n):
            target = d if pull is None else sign * pull(p)
            d = d + 0.35 * rng.standard_normal(3) + 0.3 * target
            d /= np.linalg.norm(d) + 1e-12
            p = p + step * d
            if not inside(p):
                break
            pts.append(p.copy())
        halves.append(pts)
    pts = halves[1][::-1] + [start.copy()] + halves[0]
    return np.asarray(pts, dtype=np.float64)


def _render_tubes(tubes, shape, affine, spacing, occupancy, label, strength):
    """Rasterise tubes: partial-volume occupancy, labels and per-tube contrast.

    Each tube is a (points, radius, contrast) triple; the centre line is cut into
    short chunks so that bounding boxes stay small.
    """
    h = spacing
    inv = np.linalg.inv(affine)
    for pts, radius, contrast in tubes:
        lab_r = max(radius, 0.55 * h)
        reach = max(radius + 0.5 * h, lab_r) + 1e-6
        for k0 in range(0, len(pts) - 1, 8):
            seg = pts[k0 : k0 + 9]
            if len(seg) < 2:
                continue
            vox = (inv[:3, :3] @ seg.T).T + inv[:3, 3]
            lo = np.maximum(np.floor(vox.min(0) - reach / h - 1).astype(int), 0)
            hi = np.minimum(np.ceil(vox.max(0) + reach / h + 1).astype(int) + 1, shape)
            if np.any(hi <= lo):
                continue
            ii = [np.arange(lo[a], hi[a]) * h + affine[a, 3] for a in range(3)]
            P = np.stack(np.meshgrid(*ii, indexing="ij"), -1).reshape(-1, 1, 3)
            a, b = seg[:-1][None], seg[1:][None]
            ab = b - a
            t = np.clip(((P - a) * ab).sum(-1) / ((ab * ab).sum(-1) + 1e-12), 0, 1)
            dist = np.sqrt((((a + t[..., None] * ab) - P) ** 2).sum(-1).min(1))
            box = tuple(slice(lo[a_], hi[a_]) for a_ in range(3))
            bshape = tuple(hi - lo)
            frac = np.clip((radius + 0.5 * h - dist) / h, 0.0, 1.0).reshape(bshape)
            occupancy[box] = np.maximum(occupancy[box], frac)
            strength[box] = np.maximum(strength[box], (frac * contrast).astype(np.float32))
            label[box] |= (dist <= lab_r).reshape(bshape)


def _sample_inside(rng, mask, affine, n) -> np.ndarray:
    idx = np.flatnonzero(mask)
    pick = rng.choice(idx, size=min(n, idx.size), replace=False)
    vox = np.stack(np.unravel_index(pick, mask.shape), -1).astype(float)
    vox += rng.uniform(-0.5, 0.5, vox.shape)
    return vox @ affine[:3, :3].T + affine[:3, 3]


def _lookup(mask, affine):
    inv = np.linalg.inv(affine)

    def inside(p):
        v = np.rint(inv[:3, :3] @ p + inv[:3, 3]).astype(int)
        if np.any(v < 0) or np.any(v >= mask.shape):
            return False
        return bool(mask[tuple(v)])

    return inside


def _diameters(rng, n, median, lo=0.5, hi=3.0) -> np.ndarray:
    return np.clip(rng.lognormal(np.log(median), 0.4, n), lo, hi)


def _lengths(rng, n) -> np.ndarray:
    return np.clip(rng.lognormal(np.log(9.0), 0.55, n), 2.0, 25.0)


def _pvs_tubes(rng, anat: _Anatomy, affine, spacing, size, burden):
    """Centre lines of WM (radial) and BG (lenticulostriate) PVS."""
    s = size / 160.0
    wm_allowed = anat.wm | anat.bg
    inside_wm = _lookup(anat.wm, affine)
    inside_bg = _lookup(wm_allowed, affine)
    n_wm = max(int(burden * 520 * s**3), 8)
    n_bg = max(int(burden * 24 * s**2), 3)
    vc = np.array(anat.vent_centres)

    def radial(p):
        c = vc[0] if p[0] < 0 else vc[1]
        axis_pt = np.array([c[0], np.clip(p[1], -20 * s, 20 * s), c[2]])
        v = p - axis_pt
        return v / (np.linalg.norm(v) + 1e-12)

    tubes, kinds = [], []
    starts = _sample_inside(rng, anat.wm, affine, n_wm)
    for p0, L, dia in zip(starts, _lengths(rng, n_wm), _diameters(rng, n_wm, 1.15)):
        pts = _tube_path(rng, p0, radial(p0), L, 0.8, inside_wm, pull=radial)
        if len(pts) >= 4:  # at least 2.4 mm of centre line
            tubes.append((pts, dia / 2.0, float(rng.uniform(0.15, 1.0))))
            kinds.append("WM")
    for (c_bg, r_bg) in anat.bg_centres:
        side = np.sign(c_bg[0])
        for _ in range(n_bg):
            u, v = rng.uniform(-0.8, 0.8, 2)
            p0 = np.array([c_bg[0] + u * r_bg[0] * 0.7, c_bg[1] + v * r_bg[1], c_bg[2] - 0.75 * r_bg[2]])
            if not inside_bg(p0):
                continue
            fan = np.array([side * rng.uniform(-0.1, 0.7), rng.uniform(-0.25, 0.25), 1.0])
            fan /= np.linalg.norm(fan)
            L = float(np.clip(rng.lognormal(np.log(14.0), 0.35), 4.0, 25.0))
            pts = _tube_path(rng, p0, fan, 2 * L, 0.8, inside_bg, pull=lambda p, f=fan: f)
            # keep only the upward half: lenticulostriate PVS rise from the base
            pts = pts[len(pts) // 2 :] if len(pts) > 6 else pts
            dia = float(_diameters(rng, 1, 1.5)[0])
            if len(pts) >= 4:
                tubes.append((pts, dia / 2.0, float(rng.uniform(0.35, 1.0))))
                kinds.append("BG")
    return tubes, kinds


def _box(anat: _Anatomy, centre, extent_mm: float):
    """Slices of the grid within ``extent_mm`` of ``centre`` and their coordinates."""
    sl = []
    for a, c in enumerate(anat.coords):
        ax = c.ravel()
        lo = int(np.searchsorted(ax, centre[a] - extent_mm))
        hi = int(np.searchsorted(ax, centre[a] + extent_mm))
        sl.append(slice(lo, max(hi, lo + 1)))
    x, y, z = anat.coords
    return tuple(sl), (x[sl[0]], y[:, sl[1]], z[:, :, sl[2]])


def _confounders(rng, anat: _Anatomy, affine, spacing, size, shape):
    """WMH blobs, lacunes with a gliotic rim, and flow-void centre lines."""
    s = size / 160.0
    wmh = np.zeros(shape, np.float32)
    lac = np.zeros(shape, np.float32)
    rim = np.zeros(shape, np.float32)
    # Punctate and elongated deep WMH (many small ones look like fat PVS), plus
    # periventricular caps at the ends of the lateral ventricles.
    n_wmh = int(rng.integers(25, 60) * s**2) + 3
    blobs = []
    for c in _sample_inside(rng, anat.wm, affine, n_wmh):
        radii = rng.uniform(0.9, 3.0, 3)
        if rng.random() < 0.6:
            radii[rng.integers(3)] *= rng.uniform(1.5, 4.0)
        blobs.append((c, radii, rng.uniform(0.6, 1.0)))
    for c in anat.vent_centres:
        for end in (-1, 1):
            cap = np.array(c) + np.array([0.0, end * 28.0 * s, 2.0 * s])
            blobs.append((cap, rng.uniform(2.0, 5.0, 3) * np.array([1.0, 0.7, 1.3]), rng.uniform(0.5, 1.0)))
    for c, radii, amp in blobs:
        sl, xyz = _box(anat, c, 1.3 * radii.max() + 2 * spacing)
        e = _ellipsoid(xyz, c, radii)
        wmh[sl] = np.maximum(wmh[sl], amp * np.clip(1.4 - e, 0, 1))
    for c in _sample_inside(rng, anat.wm | anat.bg, affine, int(rng.integers(1, 5))):
        rad = rng.uniform(1.5, 7.0)
        sl, xyz = _box(anat, c, 1.6 * rad + 2 * spacing)
        d = np.sqrt(_ellipsoid(xyz, c, (rad, rad * rng.uniform(0.8, 1.2), rad)))
        lac[sl] = np.maximum(lac[sl], np.clip((1.0 - d) * rad / spacing + 0.5, 0, 1))
        rim[sl] = np.maximum(rim[sl], np.clip(1.0 - np.abs(d - 1.15) * rad / 1.2, 0, 1))
    voids = []
    inside = _lookup(anat.brain, affine)
    for c_bg, r_bg in anat.bg_centres:
        for _ in range(int(rng.integers(1, 3))):
            p0 = np.array(c_bg) + rng.uniform(-0.5, 0.5, 3) * np.array(r_bg)
            d0 = rng.standard_normal(3)
            d0 /= np.linalg.norm(d0)
            pts = _tube_path(rng, p0, d0, float(rng.uniform(12, 30)), 0.8, inside)
            if len(pts) >= 3:
                voids.append((pts, float(rng.uniform(1.2, 2.0)), 1.0))
    return wmh, lac, rim, voids


def make_phantom(
    seed: int = 0,
    *,
    modality: str = "T2w",
    site: SiteProfile | int = 0,
    size_mm: float = 160.0,
    spacing: float | None = None,
    burden: float | None = None,
    subject: str | None = None,
) -> Phantom:
    """Generate one synthetic subject, deterministically from ``seed``.

    Parameters
    ----------
    seed : int
        Seed of everything random in this subject.
    modality : {"T2w", "T1w"}
        Contrast: PVS bright (T2w) or dark (T1w).
    site : SiteProfile or int
        Scanner site, or the index of one (see :func:`site_profile`).
    size_mm : float
        Field of view (cube edge) in mm.  The anatomy scales with it; PVS keep their
        millimetre sizes, so small phantoms are fast but still realistic locally.
    spacing : float, optional
        Override the site's voxel size (mm).
    burden : float, optional
        PVS burden multiplier; drawn from [0.6, 1.4] when omitted.
    subject : str, optional
        Subject id stored in ``meta``.

    Returns
    -------
    Phantom
    """
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
    if size_mm < 32:
        raise ValueError(f"size_mm must be >= 32 mm, got {size_mm}")
    prof = site if isinstance(site, SiteProfile) else site_profile(int(site))
    if spacing is not None:
        if not 0.3 <= spacing <= 3.0:
            raise ValueError(f"spacing must be in [0.3, 3] mm, got {spacing}")
        prof = replace(prof, spacing=float(spacing))
    h = prof.spacing
    rng = np.random.default_rng(seed)
    shape, affine = _grid(size_mm, h)
    anat = _Anatomy(rng, shape, affine, h, size_mm)
    burden = float(rng.uniform(0.6, 1.4)) if burden is None else float(burden)

    tubes, kinds = _pvs_tubes(rng, anat, affine, h, size_mm, burden)
    occupancy = np.zeros(shape, np.float32)
    strength = np.zeros(shape, np.float32)
    labels = np.zeros(shape, bool)
    _render_tubes(tubes, shape, affine, h, occupancy, labels, strength)
    labels &= anat.wm | anat.bg

    wmh, lac, rim, voids = _confounders(rng, anat, affine, h, size_mm, shape)
    void_occ = np.zeros(shape, np.float32)
    _render_tubes(voids, shape, affine, h, void_occ, np.zeros(shape, bool), np.zeros(shape, np.float32))

    m = MODALITIES.index(modality)
    jitter = {k: v[m] * rng.uniform(0.97, 1.03) for k, v in _TISSUE.items()}
    wm_v = jitter["wm"]
    img = np.zeros(shape, np.float32)
    for name, mask in (("csf", anat.csf), ("gm", anat.gm), ("wm", anat.wm), ("bg", anat.bg),
                       ("thalamus", anat.thalamus)):
        img[mask] = wm_v + prof.contrast * (jitter[name] - wm_v)
    in_wm = anat.wm.astype(np.float32)
    img += in_wm * wmh * (jitter["wmh"] - img)
    parenchyma = (anat.wm | anat.bg).astype(np.float32)
    img += parenchyma * rim * (jitter["rim"] - img)
    img += parenchyma * lac * (jitter["csf"] - img)
    pvs_mix = np.clip(strength * prof.pvs_conspicuity, 0, 1) * parenchyma
    img += pvs_mix * (jitter["csf"] - img)
    img += void_occ * anat.brain * (jitter["flow_void"] - img)

    if prof.blur_fwhm > 0:
        img = ndi.gaussian_filter(img, prof.blur_fwhm / 2.3548 / h)
    bias = np.exp(prof.bias * _smooth_field(rng, shape, h, 60.0)).astype(np.float32)
    img *= bias
    sigma = wm_v / prof.snr
    noise_r = rng.standard_normal(shape, dtype=np.float32) * sigma
    noise_i = rng.standard_normal(shape, dtype=np.float32) * sigma
    head = ndi.binary_dilation(anat.brain | anat.csf, iterations=2)
    img = np.sqrt((img + noise_r) ** 2 + noise_i**2) * np.where(head, 1.0, 0.15)
    img = (img * 1000.0).astype(np.float32)

    regions = np.zeros(shape, np.uint8)
    regions[anat.wm] = REGION_CODES["WM"]
    regions[anat.bg] = REGION_CODES["BG"]
    voxel_mm3 = h**3
    wm_vox = int(anat.wm.sum())
    wm_pvs = int((labels & anat.wm).sum())
    diam = [2 * r for _, r, _ in tubes]
    meta = {
        "subject": subject,
        "site": prof.name,
        "modality": modality,
        "seed": int(seed),
        "spacing_mm": h,
        "snr": prof.snr,
        "burden": burden,
        "n_pvs_wm": kinds.count("WM"),
        "n_pvs_bg": kinds.count("BG"),
        "pvs_diameter_mm": {"min": float(np.min(diam)), "median": float(np.median(diam)),
                            "max": float(np.max(diam))},
        "pvs_length_mm": _length_stats([p for p, _, _ in tubes]),
        "pvs_volume_fraction_wm": wm_pvs / max(wm_vox, 1),
        "pvs_volume_mm3": float(labels.sum() * voxel_mm3),
        "wm_volume_mm3": float(wm_vox * voxel_mm3),
        "bg_volume_mm3": float(anat.bg.sum() * voxel_mm3),
        "n_flow_voids": len(voids),
        "site_profile": {k: getattr(prof, k) for k in SiteProfile.__dataclass_fields__},
    }
    return Phantom(img, labels.astype(np.uint8), regions, affine, (h, h, h), meta)


def _length_stats(paths) -> dict[str, float]:
    lengths = [float(np.linalg.norm(np.diff(p, axis=0), axis=1).sum()) for p in paths]
    return {"min": min(lengths), "median": float(np.median(lengths)), "max": max(lengths)}


def make_cohort(
    n_sites: int = 3,
    per_site: int = 2,
    *,
    modality: str = "T2w",
    seed: int = 0,
    size_mm: float = 160.0,
):
    """Yield ``(subject_id, Phantom)`` for ``n_sites`` x ``per_site`` subjects.

    Subject ``j`` of site ``i`` is seeded with ``(seed, i, j)``, so a cohort is
    reproducible and adding sites does not change the existing subjects.
    """
    if n_sites < 1 or per_site < 1:
        raise ValueError(f"need at least one site and one subject per site, got {n_sites}x{per_site}")
    for i in range(n_sites):
        prof = site_profile(i)
        for j in range(per_site):
            sid = f"{prof.name}{j + 1:02d}"
            sub_seed = int(np.random.SeedSequence([seed, i, j]).generate_state(1)[0])
            yield sid, make_phantom(sub_seed, modality=modality, site=prof, size_mm=size_mm, subject=sid)
