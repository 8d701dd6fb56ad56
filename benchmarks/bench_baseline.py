"""Baseline speed: napari-pvs Frangi segmenter vs a plain whole-volume skimage call.

Target (issue 2): a 197 x 233 x 189 volume at 1 mm (the MNI152 1 mm grid) in <= 10 s
on the 2-core development machine.  The baseline of the comparison is one
``skimage.filters.frangi`` call on the whole volume with the same scales, in float64
as scikit-image computes by default.

Run:  python benchmarks/bench_baseline.py [--repeat N]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from napari_pvs.baseline import DEFAULT_GAMMA, DEFAULT_SIGMAS_MM, segment_frangi
from napari_pvs.metrics import voxel_dice
from napari_pvs.phantom import make_phantom

SHAPE = (197, 233, 189)


def mni_sized_phantom(seed: int = 0):
    """A 1 mm phantom placed in the centre of a 197 x 233 x 189 grid."""
    p = make_phantom(seed, site=0, size_mm=176.0)  # brain ~136 x 163 x 123 mm

    def place(a):
        out = np.zeros(SHAPE, a.dtype)
        src, dst = [], []
        for n_out, n_in in zip(SHAPE, a.shape):
            if n_in <= n_out:
                o = (n_out - n_in) // 2
                src.append(slice(0, n_in))
                dst.append(slice(o, o + n_in))
            else:
                o = (n_in - n_out) // 2
                src.append(slice(o, o + n_out))
                dst.append(slice(0, n_out))
        out[tuple(dst)] = a[tuple(src)]
        return out

    return place(p.image), place(p.labels), place(p.regions)


def best_of(fn, repeat: int) -> tuple[float, object]:
    best, out = np.inf, None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args()
    from skimage.filters import frangi

    image, labels, regions = mni_sized_phantom()
    roi = regions > 0
    print(f"volume {image.shape} at 1 mm, ROI {int(roi.sum())} voxels "
          f"({100 * roi.mean():.1f}% of the grid)")

    t_ours, res = best_of(lambda: segment_frangi(image, 1.0, roi=roi), args.repeat)
    t_plain, _ = best_of(
        lambda: frangi(image.astype(np.float64), sigmas=list(DEFAULT_SIGMAS_MM),
                       black_ridges=False, alpha=0.5, beta=0.5, gamma=DEFAULT_GAMMA),
        args.repeat,
    )
    dice = voxel_dice(res.labels, labels, roi)
    print(f"napari-pvs segment_frangi (ROI box, float32, threaded): {t_ours:6.2f} s  "
          f"(target <= 10 s: {'met' if t_ours <= 10 else 'MISSED'}); voxel Dice {dice:.3f}")
    print(f"baseline: skimage.filters.frangi on the whole volume:  {t_plain:6.2f} s")
    print(f"ratio plain / ours: {t_plain / t_ours:.2f}x")


if __name__ == "__main__":
    main()
