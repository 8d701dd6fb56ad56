"""Anatomy of a synthetic phantom (see :mod:`napari_pvs.phantom`): the voxel grid,
smooth random fields, and the tissue classes of one subject in world millimetres."""

from __future__ import annotations

import math

import numpy as np

__all__ = ["Anatomy", "ellipsoid", "grid", "smooth_field"]


def grid(fov_mm: float, spacing: float) -> tuple[tuple[int, int, int], np.ndarray]:
    n = max(int(round(fov_mm / spacing)), 8)
    shape = (n, n, n)
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = -(n - 1) / 2.0 * spacing
    return shape, affine


def smooth_field(
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


def ellipsoid(coords, centre, radii) -> np.ndarray:
    x, y, z = coords
    return (
        ((x - centre[0]) / radii[0]) ** 2
        + ((y - centre[1]) / radii[1]) ** 2
        + ((z - centre[2]) / radii[2]) ** 2
    )


class Anatomy:
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
        fold = smooth_field(rng, shape, spacing, 30.0 * s + 6.0)
        r_norm = np.sqrt(ellipsoid(self.coords, (0, 0, 0), radii)).astype(np.float32)
        r_norm += 0.025 * fold
        depth = (1.0 - r_norm) * self.brain_radius  # mm below the brain surface
        self.depth = depth

        sulci = np.abs(smooth_field(rng, shape, spacing, 9.0 + 6.0 * s))
        sulc_depth = 13.0 * s + 2.0
        gm_thick = 2.2 + 0.6 * smooth_field(rng, shape, spacing, 20.0)
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
            bg |= ellipsoid(self.coords, c_bg, r_bg) < 1.0
            self.bg_centres.append((c_bg, r_bg))
            thal |= ellipsoid(self.coords, (side * 9.0 * s, -16.0 * s, 0.0), (7 * s, 11 * s, 8 * s)) < 1
        inner = brain & ~gm & ~sulcal_csf
        self.csf = csf_out | sulcal_csf | (vent & brain)
        self.gm = gm & ~sulcal_csf
        self.bg = bg & inner & ~vent
        self.thalamus = thal & inner & ~vent & ~bg
        self.wm = inner & ~vent & ~bg & ~thal
        self.vent = vent & brain
        self.brain = brain

    def aseg(self) -> np.ndarray:
        """The tissue classes as FreeSurfer aseg labels (int32), left / right by world x.

        Cerebral WM 2/41, cortex 3/42, lateral ventricles 4/43, thalamus 10/49, the BG
        ellipsoid as putamen 12/51 (lateral half) and pallidum 13/52 (medial half),
        sulcal CSF 24; 0 outside the brain.
        """
        x = self.coords[0]
        left = np.broadcast_to(x < 0, self.wm.shape)
        out = np.zeros(self.wm.shape, np.int32)

        def put(mask, lh: int, rh: int) -> None:
            out[mask & left] = lh
            out[mask & ~left] = rh

        out[self.csf & self.brain] = 24
        put(self.gm, 3, 42)
        put(self.wm, 2, 41)
        put(self.vent, 4, 43)
        put(self.thalamus, 10, 49)
        medial = np.zeros(self.wm.shape, bool)
        for (cx, _, _), _radii in self.bg_centres:
            medial |= np.broadcast_to((np.abs(x) < abs(cx)) & ((x < 0) == (cx < 0)), self.wm.shape)
        put(self.bg & ~medial, 12, 51)
        put(self.bg & medial, 13, 52)
        return out
