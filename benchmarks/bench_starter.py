"""The shipped starter model against the Frangi baseline: held-out accuracy and speed.

1. **Speed** (the variant is picked by it): seconds to predict a 160³ phantom (site A,
   1 mm, T2w, its WM + BG regions) with the default runtime and the model's own TTA,
   for the starter (MedNeXt-XS k3) and for MedNeXt-S k3 with the same preprocessing
   (random weights: the time does not depend on them), next to the Frangi baseline on
   the same image.  Target: <= 10 s.
2. **Leave one site out**: phantoms of site D (0.7 mm, SNR 10), which the starter never
   saw.  Target: the model beats Frangi on voxel Dice and cluster Dice, in WM and in BG.
3. **Real anatomy** (:func:`napari_pvs.training.holdout.anatomy_case`): the MNI152
   template's own T2w-like contrast with PVS, WMH, lacunes and noise inserted by a
   generator separate from the training one; the template as it is and a deformed
   copy.  Target: the model matches or beats Frangi's cluster precision and cluster
   Dice and beats its voxel Dice.

Run:  python benchmarks/bench_starter.py [--model PATH] [--skip-speed]
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from napari_pvs.inference import run
from napari_pvs.model import read_meta, save_checkpoint, starter_path
from napari_pvs.network import arch_config, build_network
from napari_pvs.phantom import make_phantom
from napari_pvs.pipeline import predict_array
from napari_pvs.training.holdout import evaluate


def _seconds(ph, model: str, repeat: int = 2) -> float:
    best = np.inf
    for _ in range(repeat):
        t = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run(predict_array(ph.image, ph.spacing, model, roi=ph.regions))
        best = min(best, time.perf_counter() - t)
    return best


def speed(model: Path) -> dict:
    ph = make_phantom(5, site=0, size_mm=160)
    meta = read_meta(model)
    with tempfile.TemporaryDirectory() as tmp:
        s_meta = {**meta, "id": None, "arch": arch_config("S", 3), "card": None}
        s_path = save_checkpoint(Path(tmp) / "s_k3.safetensors", build_network(s_meta["arch"]),
                                 s_meta)
        # the first call of each model also exports it for the CPU runtime: not timed
        for m in (str(model), str(s_path)):
            _seconds(ph, m, repeat=1)
        out = {"frangi": _seconds(ph, "baseline"), "starter XS k3": _seconds(ph, str(model)),
               "S k3": _seconds(ph, str(s_path), repeat=1)}
    print(f"\n160³ phantom (1 mm, TTA {meta['preprocessing'].get('tta', 1)}), default runtime:")
    for name, s in out.items():
        print(f"  {name:<14} {s:6.1f} s  ({s / out['frangi']:.2f}x Frangi)")
    ok = out["starter XS k3"] <= 10
    print(f"  target <= 10 s for the starter: {'met' if ok else 'MISSED'}")
    return out


def _table(title: str, mean: dict, keys) -> None:
    print(f"\n{title}")
    print(f"  {'':<8}" + "".join(f"{r + ' ' + k:>22}" for r in ("WM", "BG") for k in keys))
    for method in ("model", "frangi"):
        print(f"  {method:<8}" + "".join(f"{mean[method][r][k]:>22.3f}" for r in ("WM", "BG")
                                         for k in keys))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="default: the shipped starter")
    ap.add_argument("--skip-speed", action="store_true")
    args = ap.parse_args()
    model = args.model or starter_path("starter")
    card = read_meta(model).get("card") or {}
    print(f"model {model.name}: {card.get('data', '(no card)')}")
    if not args.skip_speed:
        speed(model)
    res = evaluate(model, modality="T2w")
    site_d = res["site_d"]["mean"]
    _table("Leave one site out: site D phantoms (mean of 2)", site_d,
           ("voxel_dice", "cluster_dice"))
    wins = [site_d["model"][r][k] > site_d["frangi"][r][k]
            for r in ("WM", "BG") for k in ("voxel_dice", "cluster_dice")]
    print(f"  target: beats Frangi on all four: {'met' if all(wins) else 'MISSED'} "
          f"({sum(wins)}/4)")
    anat = res["anatomy"]["mean"]
    keys = ("cluster_precision", "cluster_recall", "voxel_dice", "cluster_dice")
    print("\nReal anatomy (MNI152 template, as it is and deformed; WM + BG)")
    print(f"  {'':<8}" + "".join(f"{k:>19}" for k in keys))
    for method in ("model", "frangi"):
        print(f"  {method:<8}" + "".join(f"{anat[method]['all'][k]:>19.3f}" for k in keys))
    for name, row in res["anatomy"]["subjects"].items():
        print(f"  {name}: " + "  ".join(
            f"{m} P {row[m]['all']['cluster_precision']:.2f} "
            f"R {row[m]['all']['cluster_recall']:.2f} vox {row[m]['all']['voxel_dice']:.3f} "
            f"clu {row[m]['all']['cluster_dice']:.3f}"
            for m in ("model", "frangi")))
    a, f = anat["model"]["all"], anat["frangi"]["all"]
    ok = (a["cluster_precision"] >= f["cluster_precision"]
          and a["cluster_dice"] >= f["cluster_dice"] and a["voxel_dice"] > f["voxel_dice"])
    print(f"  target: precision and cluster Dice >= Frangi's, voxel Dice > Frangi's: "
          f"{'met' if ok else 'MISSED'}")


if __name__ == "__main__":
    main()
