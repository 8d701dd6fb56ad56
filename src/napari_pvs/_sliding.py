"""Sliding-window stages on the model grid: the window plan and the TTA merger.

:func:`plan_windows` pads the preprocessed image to at least one window and tiles it
(MONAI ``dense_patch_slices`` over the ROI's bounding box, or nnU-Net v1's evenly spaced
starts over the whole grid for imported nnU-Net models), skipping windows without ROI
voxels.  :class:`TTAMerger` runs each
batch of windows through a runner (:mod:`napari_pvs._backends`) under mirror flips,
averages the foreground probability over flips (keeping its variance), and blends the
windows with a Gaussian importance map (MONAI ``compute_importance_map``, sigma 1/8 of
the window): log-odds for our own 2-class models, as MONAI's
``sliding_window_inference`` blends logits; probabilities for imported nnU-Net models,
as nnU-Net v1 does.  Together they are what MONAI's ``PatchInferer`` calls a splitter
and a merger.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from ._errors import PVSInputError

__all__ = ["FLIPS", "TTAMerger", "WindowPlan", "foreground", "importance", "plan_windows",
           "window_starts"]

# Mirror axes of the 8 TTA variants, in the order they are used.
FLIPS: tuple[tuple[int, ...], ...] = tuple(
    c for n in range(4) for c in itertools.combinations((0, 1, 2), n)
)


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


def _tiles(shape, patch, overlap, nnunet: bool) -> list[tuple[slice, ...]]:
    if not nnunet:
        from monai.data.utils import dense_patch_slices

        interval = [max(int(round(p * (1 - overlap))), 1) for p in patch]
        return list(dense_patch_slices(tuple(shape), tuple(patch), tuple(interval)))
    starts = [window_starts(n, p, overlap) for n, p in zip(shape, patch)]
    return [tuple(slice(a, a + p) for a, p in zip(corner, patch))
            for corner in itertools.product(*starts)]


@dataclass
class WindowPlan:
    """Where the windows go on the (padded) model grid.

    ``pad`` is the centred padding (before, after) per axis that makes the grid at least
    one window large (as nnU-Net pads); ``windows`` the slices that run; ``n_all`` the
    number of windows before skipping those outside the ROI.
    """

    patch: tuple[int, int, int]
    work_shape: tuple[int, int, int]
    pad: list[tuple[int, int]]
    windows: list[tuple[slice, ...]]
    n_all: int
    nnunet: bool = False

    @property
    def shape(self) -> tuple[int, ...]:
        """The padded grid."""
        return tuple(n + a + b for n, (a, b) in zip(self.work_shape, self.pad))

    def pad_image(self, image: np.ndarray) -> np.ndarray:
        """Pad a (C, *work_shape) image to the plan's grid with zeros."""
        return np.pad(image, [(0, 0), *self.pad]) if any(a or b for a, b in self.pad) else image

    def crop(self, arr: np.ndarray) -> np.ndarray:
        """A padded-grid map back to the work grid."""
        return arr[tuple(slice(a, a + n) for (a, _), n in zip(self.pad, self.work_shape))]

    def batches(self, size: int) -> list[list[tuple[slice, ...]]]:
        return [self.windows[i : i + size] for i in range(0, len(self.windows), size)]


def plan_windows(work_shape, patch, overlap: float, *, mask: np.ndarray | None = None,
                 nnunet: bool = False, skip_outside_roi: bool = True,
                 margin: int | None = None) -> WindowPlan:
    """Tile ``work_shape`` with ``patch``-sized windows at ``overlap``.

    Parameters
    ----------
    work_shape : 3 ints
        The preprocessed image's spatial shape.
    patch : 3 ints
        Window size in voxels.
    overlap : float
        In [0, 1).
    mask : ndarray of bool, optional
        ROI on the work grid; windows without one of its voxels are skipped.  For our own
        models (not ``nnunet``) the windows tile the ROI's bounding box grown by
        ``margin`` voxels rather than the whole grid: the same windows cover the ROI, but
        none are spent on the head and background around it (a 160 mm head at 0.8 mm and
        overlap 0.25: 64 windows become 36-48).  ``n_all`` still counts the whole grid's.
    nnunet : bool
        nnU-Net v1's evenly spaced starts over the whole grid (as nnU-Net tiles) instead of
        MONAI's ``dense_patch_slices``.
    skip_outside_roi : bool
        False tiles the whole grid and runs every window.
    margin : int, optional
        Context around the ROI's box, in voxels; default 1/8 of the window.
    """
    patch = tuple(int(p) for p in patch)
    work_shape = tuple(int(n) for n in work_shape)
    if len(patch) != 3 or min(patch) < 1:
        raise PVSInputError(f"window size must be 3 positive voxel counts, got {patch}")
    if not 0 <= overlap < 1:
        raise PVSInputError(f"overlap must be in [0, 1), got {overlap}")
    short = [max(p - n, 0) for p, n in zip(patch, work_shape)]
    pad = [(d // 2, d - d // 2) for d in short]
    shape = tuple(n + d for n, d in zip(work_shape, short))
    windows = _tiles(shape, patch, overlap, nnunet)
    n_all = len(windows)
    if mask is not None and skip_outside_roi:
        padded = np.pad(mask, pad) if any(short) else mask
        if not nnunet and padded.any():
            lo, hi = _roi_box(padded, patch, margin)
            windows = [tuple(slice(s.start + a, s.stop + a) for s, a in zip(w, lo))
                       for w in _tiles(tuple(b - a for a, b in zip(lo, hi)), patch, overlap,
                                       False)]
        windows = [w for w in windows if padded[w].any()]
    return WindowPlan(patch, work_shape, pad, windows, n_all, nnunet)


def _roi_box(mask: np.ndarray, patch, margin) -> tuple[list[int], list[int]]:
    """The ROI's bounding box grown by ``margin`` voxels (default 1/8 of the window) and to
    at least one window, inside the grid: ``(start, stop)`` per axis."""
    lo, hi = [], []
    for axis, (n, p) in enumerate(zip(mask.shape, patch)):
        other = tuple(a for a in range(3) if a != axis)
        idx = np.flatnonzero(mask.any(axis=other))
        m = p // 8 if margin is None else int(margin)
        a, b = max(int(idx[0]) - m, 0), min(int(idx[-1]) + 1 + m, n)
        if b - a < p:  # grow to one window, centred, clipped to the grid
            a = min(max(a - (p - (b - a)) // 2, 0), n - p)
            b = a + p
        lo.append(a)
        hi.append(b)
    return lo, hi


def importance(patch) -> np.ndarray:
    """Gaussian importance map of a window (sigma 1/8 of its size)."""
    from monai.data.utils import compute_importance_map
    from monai.utils import BlendMode

    w = compute_importance_map(tuple(patch), mode=BlendMode.GAUSSIAN, sigma_scale=0.125, device="cpu")
    return np.asarray(w, dtype=np.float32)


def foreground(logits: np.ndarray) -> np.ndarray:
    """Foreground probability (1 - P(background)) from logits (B, C, ...)."""
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return 1.0 - e[:, 0] / e.sum(axis=1)


class TTAMerger:
    """Mirror-TTA per batch of windows, Gaussian-weighted blending over the grid.

    Parameters
    ----------
    plan : WindowPlan
    tta : int
        Number of mirror variants (the first ``tta`` of :data:`FLIPS`).
    blend_logits : bool
        Blend log-odds (MONAI, our models) instead of probabilities (nnU-Net v1).
    model : str
        Names the model in the error about non-finite outputs.
    """

    def __init__(self, plan: WindowPlan, tta: int = 1, *, blend_logits: bool = True,
                 model: str = "(unnamed)"):
        if not 1 <= int(tta) <= len(FLIPS):
            raise PVSInputError(f"tta must be between 1 and {len(FLIPS)} flips, got {tta}")
        self.plan, self.flips, self.blend_logits = plan, FLIPS[: int(tta)], bool(blend_logits)
        self.model = model
        self.weight = importance(plan.patch)
        self._p = np.zeros(plan.shape, np.float32)
        self._v = np.zeros(plan.shape, np.float32)
        self._w = np.zeros(plan.shape, np.float32)

    def predict(self, runner, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Flip-averaged foreground probability of a batch ``x`` and its variance."""
        s1 = np.zeros((x.shape[0], *x.shape[2:]), np.float64)  # float64: exact zero variance
        s2 = np.zeros_like(s1)
        for axes in self.flips:
            ax = tuple(a + 2 for a in axes)
            logits = runner(np.ascontiguousarray(np.flip(x, ax)) if axes else x)
            if not np.all(np.isfinite(logits)):
                raise PVSInputError(f"model {self.model} produced NaN or infinite outputs; the "
                                    "model is broken (its training diverged?): predict with "
                                    "another model")
            p = foreground(logits).astype(np.float64)
            if axes:
                p = np.flip(p, tuple(a + 1 for a in axes))
            s1 += p
            s2 += p * p
        mean = s1 / len(self.flips)
        return mean, np.maximum(s2 / len(self.flips) - mean * mean, 0.0)

    def add(self, windows, mean: np.ndarray, var: np.ndarray) -> None:
        """Blend one batch's flip-averaged probability and variance into the grid."""
        if self.blend_logits:  # MONAI blends logits: for 2 classes that is the log-odds
            q = np.clip(mean, 1e-7, 1 - 1e-7)
            mean = np.log(q) - np.log1p(-q)
        for k, w in enumerate(windows):
            self._p[w] += self.weight * mean[k]
            self._v[w] += self.weight * var[k]
            self._w[w] += self.weight

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """``(probability, variance)`` on the work grid (0 where no window ran)."""
        covered = self._w > 0
        w = np.maximum(self._w, 1e-12)
        prob = np.where(covered, self._p / w, 0.0)
        if self.blend_logits:
            prob = np.where(covered, 1.0 / (1.0 + np.exp(-prob)), 0.0)
        var = np.where(covered, self._v / w, 0.0)
        return (self.plan.crop(prob.astype(np.float32)), self.plan.crop(var.astype(np.float32)))
