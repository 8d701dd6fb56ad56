"""Fine-tuning report: a small MedNeXt trained from scratch on CPU vs the Frangi baseline.

Store: a synthetic multi-site T2w store, 4 sites x 3 subjects (phantoms of --size-mm).
Per site, the last subject is held out; the other 8 are the corrected training
subjects.  MedNeXt-XS k3 is trained from scratch through the real code path
(``napari_pvs.training.finetune`` on the store) for --iterations, within a CPU budget
of 15 minutes.  Then the held-out subjects (seen sites) are predicted with the new
model and with the Frangi baseline, inside their WM+BG masks, and both are scored.

Target: the fine-tuned MedNeXt beats the baseline's cluster Dice on the held-out
phantoms after at most 15 minutes of CPU training.

Run:  python benchmarks/bench_finetune.py [--iterations 1400] [--spacing 0.8] [--size-mm 96]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=1400)
    ap.add_argument("--size-mm", type=float, default=96.0)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--spacing", type=float, default=0.8, help="training / prediction spacing (mm)")
    args = ap.parse_args()
    from napari_pvs.baseline import segment_frangi
    from napari_pvs.dataset import store_from_cohort, write_phantom_cohort
    from napari_pvs.inference import predict_volume, run
    from napari_pvs.io import load_volume
    from napari_pvs.metrics import score
    from napari_pvs.training.finetune import FinetuneConfig, finetune

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cohort = write_phantom_cohort(tmp / "cohort", n_sites=4, per_site=3, size_mm=args.size_mm,
                                      seed=args.seed)
        held_out = [s for s in cohort if s.subject.endswith("03")]
        store = store_from_cohort(tmp / "bench.pvs.zarr", cohort,
                                  corrected={s.subject for s in cohort if s not in held_out},
                                  author="phantom truth")
        cfg = FinetuneConfig(iterations=args.iterations, iterations_per_epoch=args.iterations,
                             patch=(48, 48, 48), batch_size=2, lr=args.lr, val_fraction=0.0,
                             variant="XS", kernel_size=3, target_spacing=(args.spacing,) * 3,
                             seed=args.seed)
        t0 = time.perf_counter()
        losses = []
        model_id = run(finetune(store, config=cfg),
                       lambda e: e.kind == "iteration" and losses.append(e.loss))
        train_s = time.perf_counter() - t0
        print(f"trained MedNeXt-XS k3 from scratch at {args.spacing} mm: {args.iterations} iterations "
              f"in {train_s / 60:.1f} min "
              f"(budget 15 min: {'met' if train_s <= 900 else 'EXCEEDED'}); loss "
              f"{np.mean(losses[:20]):.3f} -> {np.mean(losses[-20:]):.3f}; model {model_id}")
        net, meta = store.models.load(model_id)
        rows = []
        for s in held_out:
            img = load_volume(s.image)
            reg = load_volume(s.regions, as_labels=True).data
            ref = load_volume(s.labels, as_labels=True).data
            roi = reg > 0
            pred = run(predict_volume(img.data, img.spacing, net, meta, roi=roi))
            base = segment_frangi(img.data, img.spacing, roi=roi)
            sm, sb = score(pred.labels, ref, reg)["all"], score(base.labels, ref, reg)["all"]
            rows.append((s.subject, s.site, sm, sb))
            print(f"{s.subject:<9} {s.site}: MedNeXt voxel {sm['voxel_dice']:.3f} cluster "
                  f"{sm['cluster_dice']:.3f} | Frangi voxel {sb['voxel_dice']:.3f} cluster "
                  f"{sb['cluster_dice']:.3f}")
        m = np.array([[r[2]["voxel_dice"], r[2]["cluster_dice"]] for r in rows])
        b = np.array([[r[3]["voxel_dice"], r[3]["cluster_dice"]] for r in rows])
        print(f"held-out mean: MedNeXt voxel {m[:, 0].mean():.3f} cluster {m[:, 1].mean():.3f}; "
              f"Frangi voxel {b[:, 0].mean():.3f} cluster {b[:, 1].mean():.3f}; "
              f"cluster Dice ratio {m[:, 1].mean() / b[:, 1].mean():.2f} (target > 1: "
              f"{'met' if m[:, 1].mean() > b[:, 1].mean() else 'MISSED'})")
        store.close()


if __name__ == "__main__":
    main()
