"""A slow, obviously-correct per-cluster table: one skimage regionprops loop.

Used by the tests and by benchmarks/bench_clusters.py as the reference the fast
table must equal.
"""

from __future__ import annotations

import numpy as np
from skimage.measure import regionprops

NAMES = {0: "other", 1: "WM", 2: "BG"}


def reference_table(labels, probability, uncertainty, regions, affine):
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    rows = {}
    for rp in regionprops(labels.astype(np.int64), intensity_image=None):
        coords = rp.coords.astype(float)
        row = {"voxels": rp.area, "volume_mm3": rp.area * abs(np.linalg.det(affine[:3, :3]))}
        c = coords.mean(0)
        row.update(centroid_i=c[0], centroid_j=c[1], centroid_k=c[2])
        w = affine[:3, :3] @ c + affine[:3, 3]
        row.update(centroid_x=w[0], centroid_y=w[1], centroid_z=w[2])
        lo, hi = rp.bbox[:3], rp.bbox[3:]
        for a, ax in enumerate("ijk"):
            row[f"bbox_{ax}_min"], row[f"bbox_{ax}_max"] = lo[a], hi[a] - 1
        idx = tuple(rp.coords.T)
        p, u = probability[idx].astype(float), uncertainty[idx].astype(float)
        row.update(prob_mean=p.mean(), prob_max=p.max(), unc_mean=u.mean(), unc_max=u.max())
        r = regions[idx].astype(int)
        r[(r < 0) | (r > 2)] = 0
        row["region"] = NAMES[int(np.bincount(r, minlength=3).argmax())]
        xyz = coords @ affine[:3, :3].T
        cov = np.cov(xyz.T, bias=True) if len(xyz) > 1 else np.zeros((3, 3))
        cov = cov + np.diag(spacing**2 / 12)
        l1, l2, _ = sorted(np.linalg.eigvalsh(cov), reverse=True)
        row.update(length_mm=np.sqrt(12 * l1), linearity=(l1 - l2) / l1, elongation=np.sqrt(l1 / l2))
        row["priority"] = 0.6 * row["unc_mean"] + 0.4 * (1 - row["linearity"])
        rows[rp.label] = row
    return rows
