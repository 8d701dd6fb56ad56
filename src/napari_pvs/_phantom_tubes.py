"""Tubes and confounders of a synthetic phantom (see :mod:`napari_pvs.phantom`): PVS
centre lines (radial in the WM, lenticulostriate in the BG), their partial-volume
rasterisation, and the look-alikes (WMH, lacunes, flow voids)."""

from __future__ import annotations

import numpy as np

from ._phantom_anatomy import Anatomy, ellipsoid

__all__ = ["confounders", "length_stats", "lookup", "pvs_tubes", "render_tubes",
           "sample_inside", "tube_path"]


def tube_path(rng, start, direction, length, step, inside, pull=None, *, noise=0.35,
              pull_weight=0.3) -> np.ndarray:
    """Grow a tortuous centre line from ``start`` in +/- ``direction`` (mm).

    Each step turns by ``noise`` x a Gaussian and ``pull_weight`` x ``pull(p)`` (else the
    current direction), relative to the current direction.
    """
    halves = []
    for sign in (1.0, -1.0):
        d = sign * direction
        p = start.copy()
        pts = []
        n = int(length / 2 / step)
        for _ in range(n):
            target = d if pull is None else sign * pull(p)
            d = d + noise * rng.standard_normal(3) + pull_weight * target
            d /= np.linalg.norm(d) + 1e-12
            p = p + step * d
            if not inside(p):
                break
            pts.append(p.copy())
        halves.append(pts)
    pts = halves[1][::-1] + [start.copy()] + halves[0]
    return np.asarray(pts, dtype=np.float64)


def render_tubes(tubes, shape, affine, spacing, occupancy, label, strength):
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


def sample_inside(rng, mask, affine, n) -> np.ndarray:
    idx = np.flatnonzero(mask)
    pick = rng.choice(idx, size=min(n, idx.size), replace=False)
    vox = np.stack(np.unravel_index(pick, mask.shape), -1).astype(float)
    vox += rng.uniform(-0.5, 0.5, vox.shape)
    return vox @ affine[:3, :3].T + affine[:3, 3]


def lookup(mask, affine):
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


def pvs_tubes(rng, anat: Anatomy, affine, spacing, size, burden):
    """Centre lines of WM (radial) and BG (lenticulostriate) PVS."""
    s = size / 160.0
    wm_allowed = anat.wm | anat.bg
    inside_wm = lookup(anat.wm, affine)
    inside_bg = lookup(wm_allowed, affine)
    n_wm = max(int(burden * 520 * s**3), 8)
    n_bg = max(int(burden * 24 * s**2), 3)
    vc = np.array(anat.vent_centres)

    def radial(p):
        c = vc[0] if p[0] < 0 else vc[1]
        axis_pt = np.array([c[0], np.clip(p[1], -20 * s, 20 * s), c[2]])
        v = p - axis_pt
        return v / (np.linalg.norm(v) + 1e-12)

    tubes, kinds = [], []
    starts = sample_inside(rng, anat.wm, affine, n_wm)
    for p0, L, dia in zip(starts, _lengths(rng, n_wm), _diameters(rng, n_wm, 1.15)):
        pts = tube_path(rng, p0, radial(p0), L, 0.8, inside_wm, pull=radial)
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
            pts = tube_path(rng, p0, fan, 2 * L, 0.8, inside_bg, pull=lambda p, f=fan: f)
            # keep only the upward half: lenticulostriate PVS rise from the base
            pts = pts[len(pts) // 2 :] if len(pts) > 6 else pts
            dia = float(_diameters(rng, 1, 1.5)[0])
            if len(pts) >= 4:
                tubes.append((pts, dia / 2.0, float(rng.uniform(0.35, 1.0))))
                kinds.append("BG")
    return tubes, kinds


def _box(anat: Anatomy, centre, extent_mm: float):
    """Slices of the grid within ``extent_mm`` of ``centre`` and their coordinates."""
    sl = []
    for a, c in enumerate(anat.coords):
        ax = c.ravel()
        lo = int(np.searchsorted(ax, centre[a] - extent_mm))
        hi = int(np.searchsorted(ax, centre[a] + extent_mm))
        sl.append(slice(lo, max(hi, lo + 1)))
    x, y, z = anat.coords
    return tuple(sl), (x[sl[0]], y[:, sl[1]], z[:, :, sl[2]])


def confounders(rng, anat: Anatomy, affine, spacing, size, shape):
    """WMH blobs, lacunes with a gliotic rim, and flow-void centre lines."""
    s = size / 160.0
    wmh = np.zeros(shape, np.float32)
    lac = np.zeros(shape, np.float32)
    rim = np.zeros(shape, np.float32)
    # Punctate and elongated deep WMH (many small ones look like fat PVS), plus
    # periventricular caps at the ends of the lateral ventricles.
    n_wmh = int(rng.integers(25, 60) * s**2) + 3
    blobs = []
    for c in sample_inside(rng, anat.wm, affine, n_wmh):
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
        e = ellipsoid(xyz, c, radii)
        wmh[sl] = np.maximum(wmh[sl], amp * np.clip(1.4 - e, 0, 1))
    for c in sample_inside(rng, anat.wm | anat.bg, affine, int(rng.integers(1, 5))):
        rad = rng.uniform(1.5, 7.0)
        sl, xyz = _box(anat, c, 1.6 * rad + 2 * spacing)
        d = np.sqrt(ellipsoid(xyz, c, (rad, rad * rng.uniform(0.8, 1.2), rad)))
        lac[sl] = np.maximum(lac[sl], np.clip((1.0 - d) * rad / spacing + 0.5, 0, 1))
        rim[sl] = np.maximum(rim[sl], np.clip(1.0 - np.abs(d - 1.15) * rad / 1.2, 0, 1))
    voids = []
    inside = lookup(anat.brain, affine)
    for c_bg, r_bg in anat.bg_centres:
        for _ in range(int(rng.integers(1, 3))):
            p0 = np.array(c_bg) + rng.uniform(-0.5, 0.5, 3) * np.array(r_bg)
            d0 = rng.standard_normal(3)
            d0 /= np.linalg.norm(d0)
            pts = tube_path(rng, p0, d0, float(rng.uniform(12, 30)), 0.8, inside)
            if len(pts) >= 3:
                voids.append((pts, float(rng.uniform(1.2, 2.0)), 1.0))
    return wmh, lac, rim, voids


def length_stats(paths) -> dict[str, float]:
    lengths = [float(np.linalg.norm(np.diff(p, axis=0), axis=1).sum()) for p in paths]
    return {"min": min(lengths), "median": float(np.median(lengths)), "max": max(lengths)}
