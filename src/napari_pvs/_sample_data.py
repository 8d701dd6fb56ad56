"""npe2 sample data: one synthetic PVS phantom per contrast (see napari_pvs.phantom)."""

from __future__ import annotations

import numpy as np

from .phantom import REGION_CODES, make_phantom

__all__ = ["phantom_t1w", "phantom_t2w"]


def _layers(modality: str) -> list[tuple]:
    ph = make_phantom(seed=0, modality=modality, site=0, subject="sample")
    spacing = np.asarray(ph.spacing)
    scale = tuple(float(s) for s in spacing)
    affine = ph.affine @ np.diag([*(1.0 / spacing), 1.0])
    geo = {"scale": scale, "affine": affine}
    meta = {"nifti_affine": ph.affine.tolist(), "phantom": ph.meta}
    lo, hi = np.percentile(ph.image[ph.regions > 0], [0.5, 99.8])
    return [
        (ph.image, {"name": f"phantom {modality}", "colormap": "gray",
                    "contrast_limits": (float(lo), float(hi)), "metadata": meta, **geo}, "image"),
        (ph.regions, {"name": "regions (1 WM, 2 BG)", "visible": False, "opacity": 0.3,
                      "metadata": {**meta, "codes": REGION_CODES}, **geo}, "labels"),
        (ph.labels, {"name": "PVS truth", "metadata": meta, **geo}, "labels"),
    ]


def phantom_t2w() -> list[tuple]:
    """T2w phantom (PVS bright) with its ground-truth PVS and region labels."""
    return _layers("T2w")


def phantom_t1w() -> list[tuple]:
    """T1w phantom (PVS dark) with its ground-truth PVS and region labels."""
    return _layers("T1w")
