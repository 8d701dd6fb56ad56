"""How the starter's two runtime settings were picked, on validation subjects only.

The starter's weights are run on the 10 validation subjects of its recipe (realistic
seeds 1100-1103, cartoon phantoms of sites A-C seeds 2100-2105; the training used
1000... and 2000..., and the held-out cases are never touched here), each made twice:
at its own scanner's voxel size and at 0.7 mm.

1. ``min_spacing``: the 0.7 mm copies resampled to the model's 0.8 mm grid (as before)
   against kept on their own grid.  Images of 0.8 mm or coarser run the same either way.
2. ``min_cluster_mm3``: the smallest label cluster kept, among 0, 0.5, 1 and 1.5 mm³,
   chosen by the mean of WM and BG voxel and cluster Dice over all 20 images.

Run:  python benchmarks/bench_runtime_settings.py [--model PATH] [--threads N]
(about 10 min on 2 cores).
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from napari_pvs.clusters import drop_small_clusters
from napari_pvs.inference import run
from napari_pvs.metrics import score
from napari_pvs.model import load_checkpoint, save_checkpoint, starter_path
from napari_pvs.phantom import make_phantom
from napari_pvs.pipeline import predict_array
from napari_pvs.training.realistic import make_realistic

FLOORS = (0.0, 0.5, 1.0, 1.5)
KEYS = [(r, k) for r in ("WM", "BG") for k in ("voxel_dice", "cluster_dice")]


def _variants(model: Path, folder: Path) -> dict[str, str]:
    """The weights without either setting, and with min_spacing 0.7 (labels undusted)."""
    net, meta = load_checkpoint(model)
    meta.pop("postprocessing", None)
    out = {}
    for name, floor in (("resampled", None), ("kept", [0.7] * 3)):
        meta["preprocessing"].pop("min_spacing", None)
        if floor:
            meta["preprocessing"]["min_spacing"] = floor
        out[name] = str(save_checkpoint(folder / f"{name}.safetensors", net, meta))
    return out


def _subjects():
    for i in range(4):
        for sp in (None, 0.7):
            s = make_realistic(1100 + i, spacing=sp)
            yield f"real-val{i:02d}", sp, s.image, s.spacing, s.labels, s.regions
    for j in range(6):
        for sp in (None, 0.7):
            p = make_phantom(2100 + j, site=j % 3, size_mm=128, spacing=sp)
            yield f"phantom-val{j:02d}", sp, p.image, p.spacing, p.labels, p.regions


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="default: the shipped starter")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    model = args.model or starter_path("starter")
    rows: dict = {}  # (grid, floor) -> {"fine"|"native": [score dicts]}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        models = _variants(model, Path(tmp))
        for name, sp, image, spacing, labels, regions in _subjects():
            group = "0.7 mm copies" if sp else "own voxel size"
            preds = {}
            for grid, m in models.items():
                if grid == "kept" and min(spacing) >= 0.8 * 0.99:
                    preds[grid] = preds["resampled"]  # the setting changes nothing here
                    continue
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    preds[grid] = run(predict_array(image, spacing, m, roi=regions,
                                                    modality="T2w")).labels
            for grid, lab in preds.items():
                for floor in FLOORS:
                    s = score(drop_small_clusters(lab.copy(), spacing, floor), labels, regions)
                    rows.setdefault((grid, floor), {}).setdefault(group, []).append(s)
            print(f"  {name} at {spacing[0]:.2f} mm ({time.perf_counter() - t0:.0f} s)",
                  flush=True)

    def mean(scores, r, k):
        return float(np.mean([s[r][k] for s in scores]))

    print("\n1. min_spacing, the 0.7 mm copies (no minimum cluster volume):")
    print(f"  {'grid':<12}" + "".join(f"{r} {k.split('_')[0]:<8}" for r, k in KEYS))
    for grid in ("resampled", "kept"):
        sc = rows[(grid, 0.0)]["0.7 mm copies"]
        print(f"  {grid:<12}" + "".join(f"{mean(sc, r, k):<11.3f}" for r, k in KEYS))
    before = np.mean([mean(rows[("resampled", 0.0)]["0.7 mm copies"], r, k) for r, k in KEYS])
    after = np.mean([mean(rows[("kept", 0.0)]["0.7 mm copies"], r, k) for r, k in KEYS])
    print(f"  mean of the four: {before:.3f} -> {after:.3f} ({after / before:.3f}x)")

    print("\n2. min_cluster_mm3 with min_spacing 0.7, mean of the four Dice over all 20 images:")
    best = None
    for floor in FLOORS:
        allscores = [s for g in rows[("kept", floor)].values() for s in g]
        m = float(np.mean([mean(allscores, r, k) for r, k in KEYS]))
        per = "  ".join(f"{g}: " + " ".join(f"{mean(sc, r, k):.3f}" for r, k in KEYS)
                        for g, sc in rows[("kept", floor)].items())
        print(f"  {floor:>4g} mm³  {m:.4f}   ({per})")
        if best is None or m > best[1] + 1e-9:
            best = (floor, m)
    print(f"  best: {best[0]:g} mm³")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
