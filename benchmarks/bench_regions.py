"""Dice with and without a segmentation: the Frangi baseline and a MedNeXt, four ways.

Held-out phantoms (T2w, or ``--modality T1w``; seeds 700+, one per site, all 4 sites;
``--size`` mm, 144 by default, the demo's size, at which the anatomy is close to a real
brain's) are predicted with each model inside:

``segmentation``
    the phantom's anatomy written as FreeSurfer's ``aseg.mgz`` on the conformed 256³
    1 mm LIA grid and mapped back by :func:`napari_pvs.regions.from_segmentation` (what
    ``predict --seg aseg.mgz`` does);
``true regions``
    the phantom's own WM + BG map (the reference);
``automatic``
    no segmentation: the regions estimated from the image (what ``predict`` does
    without ``--seg`` / ``--roi``);
``whole image``
    ``--whole-image``: no regions at all.

Printed per model and way: mean whole-image voxel Dice and cluster Dice, and the ratio
to the true-regions Dice; and the time of ``from_segmentation`` next to the Frangi
prediction it precedes.  Targets (issue 14): without a segmentation, the baseline's
voxel Dice >= 0.3 and >= 80 % of its Dice with the true regions.

The MedNeXt (``--model``, default ``benchmarks/data/xs_regions.safetensors``) was
trained with the project's own CLI on a separate phantom cohort (seed 11, 4 sites x 2,
96 mm; 6 training and 2 validation subjects)::

    napari-pvs phantom -o cohort --sites 4 --per-site 2 --size-mm 96 --seed 11
    napari-pvs store init train.pvs.zarr && napari-pvs store import train.pvs.zarr cohort
    napari-pvs train --store train.pvs.zarr --iterations 1400 --lr 3e-3 --variant XS --seed 0

(82 min on the 2 shared cores of 2026-11-29; last validation voxel Dice 0.662, cluster
Dice 0.807.)

Run:  python benchmarks/bench_regions.py [--size 144] [--per-site 1] [--modality T2w|T1w]
                                         [--model PATH|none] [--no-baseline]
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np

from napari_pvs._volume import Volume
from napari_pvs.inference import run
from napari_pvs.metrics import score
from napari_pvs.phantom import conformed_aseg, make_phantom, site_profile
from napari_pvs.pipeline import predict_array
from napari_pvs.regions import from_segmentation

DEFAULT_MODEL = Path(__file__).parent / "data" / "xs_regions.safetensors"
WAYS = ("segmentation", "true regions", "automatic", "whole image")


def _predict(ph, model: str, way: str, seg) -> np.ndarray:
    kw: dict = {}
    if way == "segmentation":
        kw = {"roi": seg.regions, "brain": seg.brain}
    elif way == "true regions":
        kw = {"roi": ph.regions}
    elif way == "whole image":
        kw = {"auto_regions": False}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return run(predict_array(ph.image, ph.spacing, model, modality=ph.meta["modality"],
                                 **kw)).labels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=float, default=144.0)
    ap.add_argument("--per-site", type=int, default=1)
    ap.add_argument("--modality", choices=("T2w", "T1w"), default="T2w")
    ap.add_argument("--no-baseline", action="store_true",
                    help="score only --model (the baseline's figures are printed by a run "
                         "with --model none)")
    ap.add_argument("--model", default=str(DEFAULT_MODEL),
                    help="MedNeXt checkpoint to score beside the baseline, or 'none'")
    args = ap.parse_args()
    models = ([] if args.no_baseline else ["baseline"]) + (
        [] if args.model == "none" else [args.model])
    if not models:
        ap.error("nothing to score: --no-baseline with --model none")
    dice = {(m, w): [] for m in models for w in WAYS}
    t_map, t_frangi = [], []
    tmp = Path(tempfile.mkdtemp(prefix="bench-regions-"))
    for site in range(4):
        for j in range(args.per_site):
            seed = 700 + 10 * site + j
            ph = make_phantom(seed, site=site, size_mm=args.size, modality=args.modality)
            seg_path = tmp / f"aseg_{seed}.mgz"
            nib.save(conformed_aseg(ph), seg_path)
            t = time.perf_counter()
            seg = from_segmentation(seg_path, Volume(ph.image, ph.affine, ph.spacing))
            t_map.append(time.perf_counter() - t)
            row = [f"{site_profile(site).name} seed {seed}"]
            for m in models:
                for w in WAYS:
                    t = time.perf_counter()
                    labels = _predict(ph, m, w, seg)
                    if w == "true regions":
                        t_frangi.append(time.perf_counter() - t)
                    s = score(labels, ph.labels)["all"]
                    dice[m, w].append((s["voxel_dice"], s["cluster_dice"]))
                    row.append(f"{s['voxel_dice']:.3f}/{s['cluster_dice']:.3f}")
            print("  ".join(row), flush=True)
    print(f"\nwhole-image voxel Dice / cluster Dice, mean over {len(t_map)} held-out phantoms "
          f"({args.size:.0f} mm, {args.modality}, 4 sites)")
    print(f"{'model':<28} {'way':<14} {'voxel Dice':>10} {'cluster Dice':>12} "
          f"{'vs true regions':>15}")
    for m in models:
        ref = np.mean([v for v, _ in dice[m, "true regions"]])
        for w in WAYS:
            v = np.mean([x for x, _ in dice[m, w]])
            c = np.mean([x for _, x in dice[m, w]])
            print(f"{Path(m).name:<28} {w:<14} {v:>10.3f} {c:>12.3f} {v / ref:>14.2f}x")
    if not args.no_baseline:
        base_auto = np.mean([v for v, _ in dice["baseline", "automatic"]])
        base_true = np.mean([v for v, _ in dice["baseline", "true regions"]])
        print(f"\ntarget: baseline without a segmentation >= 0.3 and >= 0.8x true regions: "
              f"{base_auto:.3f}, {base_auto / base_true:.2f}x -> "
              f"{'met' if base_auto >= 0.3 and base_auto >= 0.8 * base_true else 'missed'}")
    first = "Frangi" if not args.no_baseline else Path(models[0]).name
    print(f"from_segmentation (256³ aseg.mgz -> image grid): {np.mean(t_map):.2f} s per subject; "
          f"{first} prediction {np.mean(t_frangi[::len(models)]):.2f} s; ratio "
          f"{np.mean(t_map) / np.mean(t_frangi[::len(models)]):.2f}")


if __name__ == "__main__":
    main()
