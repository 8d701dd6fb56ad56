"""Prediction without a segmentation: automatic regions vs none, brain mask and truth.

Held-out phantoms (seeds 900+, not used while developing; all 4 sites, T2w and T1w,
``--size`` mm, default 96 so that a run fits in about 10 minutes on 2 cores; 128 mm takes
about 2-3 minutes a phantom) are segmented by the Frangi baseline with four ROIs:
none (the whole image), the automatic brain mask, the automatic WM + BG regions of
:func:`napari_pvs._auto_regions.estimate_regions`, and the true region map.  Printed:
whole-image voxel and cluster Dice, the ratio to the true-regions Dice, the region Dice
of the estimated WM and BG, and the time of ``estimate_regions`` next to the Frangi
prediction it precedes.  Targets (issue 14): estimated-regions voxel Dice >= 0.3 and
>= 80 % of the true-regions Dice.  Unless ``--no-model`` is given, the small MedNeXt
(benchmarks/data/xs_phantom.safetensors, when present) is scored too.

Run:  python benchmarks/bench_auto_regions.py [--size 96] [--seeds 1] [--no-model]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from napari_pvs._auto_regions import estimate_regions
from napari_pvs.inference import run
from napari_pvs.metrics import score, voxel_dice
from napari_pvs.phantom import make_phantom
from napari_pvs.pipeline import predict_array

MODEL = Path(__file__).parent / "data" / "xs_phantom.safetensors"
METHODS = ("none", "brain", "estimated", "true")


def predict(image, spacing, roi, modality, model="baseline"):
    t = time.perf_counter()
    pred = run(predict_array(image, spacing, model, roi=roi, modality=modality,
                             auto_regions=False))  # roi None: the whole image
    return pred.labels, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=float, default=96.0)
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--no-model", action="store_true")
    args = ap.parse_args()
    rows = []
    for modality in ("T2w", "T1w"):
        for site in range(4):
            for k in range(args.seeds):
                p = make_phantom(900 + 10 * site + k, modality=modality, site=site,
                                 size_mm=args.size)
                t = time.perf_counter()
                est = estimate_regions(p.image, p.spacing, modality)
                t_est = time.perf_counter() - t
                rois = {"none": None, "brain": est.brain.astype(np.uint8),
                        "estimated": est.regions, "true": p.regions}
                row = {"case": f"{modality} site{site} #{k}", "t_est": t_est,
                       "wm": voxel_dice(est.regions == 1, p.regions == 1),
                       "bg": voxel_dice(est.regions == 2, p.regions == 2),
                       "pvs_in": float((p.labels & (est.regions > 0)).sum()
                                       / max(int(p.labels.sum()), 1))}
                for name, roi in rois.items():
                    labels, dt = predict(p.image, p.spacing, roi, modality)
                    s = score(labels, p.labels)["all"]
                    row[name] = (s["voxel_dice"], s["cluster_dice"], s["n_pred"], dt)
                rows.append(row)
                print(f"{row['case']}: " + "  ".join(
                    f"{m} {row[m][0]:.3f}/{row[m][1]:.3f} ({row[m][2]} clusters)" for m in METHODS)
                    + f"  | ratio est/true {row['estimated'][0] / max(row['true'][0], 1e-9):.2f}"
                    f"  WM Dice {row['wm']:.3f} BG Dice {row['bg']:.3f}"
                    f" PVS kept {row['pvs_in']:.3f}"
                    f"  estimate {t_est:.2f} s vs Frangi {row['estimated'][3]:.1f} s", flush=True)
    print(f"\n{len(rows)} phantoms of {args.size:g} mm; baseline (Frangi) whole-image Dice, "
          "mean voxel / cluster:")
    true_v = np.mean([r["true"][0] for r in rows])
    for m in METHODS:
        v = np.mean([r[m][0] for r in rows])
        c = np.mean([r[m][1] for r in rows])
        print(f"  {m:9s} voxel {v:.3f}  cluster {c:.3f}  ratio to true regions {v / true_v:.2f}")
    est_v = np.mean([r["estimated"][0] for r in rows])
    worst = min(r["estimated"][0] / max(r["true"][0], 1e-9) for r in rows)
    print(f"estimated regions: voxel Dice {est_v:.3f} (target >= 0.3: "
          f"{'met' if est_v >= 0.3 else 'MISSED'}), ratio {est_v / true_v:.2f} (target >= 0.80: "
          f"{'met' if est_v / true_v >= 0.8 else 'MISSED'}; worst phantom {worst:.2f})")
    print(f"region Dice of the estimate: WM {np.mean([r['wm'] for r in rows]):.3f} "
          f"(min {min(r['wm'] for r in rows):.3f}), BG {np.mean([r['bg'] for r in rows]):.3f}; "
          f"PVS voxels inside the estimated ROI {np.mean([r['pvs_in'] for r in rows]):.3f}")
    print(f"estimate_regions {np.mean([r['t_est'] for r in rows]):.2f} s mean (max "
          f"{max(r['t_est'] for r in rows):.2f} s); baseline: the Frangi prediction with the "
          f"estimated ROI {np.mean([r['estimated'][3] for r in rows]):.1f} s, with none "
          f"{np.mean([r['none'][3] for r in rows]):.1f} s")
    if not args.no_model and MODEL.is_file():
        model_check(args.size)


def model_check(size: float) -> None:
    """Score the small MedNeXt with and without regions on one phantom per modality."""
    print(f"\nsmall MedNeXt {MODEL.name}:")
    for modality in ("T2w", "T1w"):
        p = make_phantom(950, modality=modality, site=0, size_mm=min(size, 96.0))
        est = estimate_regions(p.image, p.spacing, modality)
        for name, roi in (("none", None), ("estimated", est.regions), ("true", p.regions)):
            labels, dt = predict(p.image, p.spacing, roi, modality, model=str(MODEL))
            s = score(labels, p.labels)["all"]
            note = "  (predicts nothing)" if s["pred_voxels"] == 0 else ""
            print(f"  {modality} {name:9s} voxel {s['voxel_dice']:.3f} cluster "
                  f"{s['cluster_dice']:.3f} ({s['pred_voxels']} voxels, {dt:.1f} s){note}")


if __name__ == "__main__":
    main()
