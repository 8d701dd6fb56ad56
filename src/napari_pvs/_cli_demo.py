"""``napari-pvs demo`` (the main job: phantoms -> the shipped MedNeXt and the Frangi
baseline -> Dice) and ``napari-pvs phantom``."""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import __version__
from ._cli_common import add_out, number
from .dataset import write_phantom_cohort
from .io import load_volume
from .metrics import cluster_scores, voxel_dice
from .model import starter_models
from .pipeline import check_output_folder, predict_file

__all__ = ["add_demo_parsers"]


def _cmd_phantom(args: argparse.Namespace) -> int:
    def progress(msg, done, total):
        print(f"[{done}/{total}] {msg}", flush=True)

    check_output_folder(args.out, "OUTDIR")
    files = write_phantom_cohort(
        args.out, n_sites=args.sites, per_site=args.per_site, modality=args.modality,
        seed=args.seed, size_mm=args.size_mm, aseg=args.aseg, progress=progress,
    )
    print(f"wrote {len(files)} subjects to {args.out} (participants.tsv lists their sites)")
    return 0


def _score_subject(files, pred_path: Path) -> dict:
    ref = load_volume(files.labels, as_labels=True).data
    pred = load_volume(pred_path, as_labels=True).data
    roi = load_volume(files.regions, as_labels=True).data > 0
    cs = cluster_scores(pred, ref, mask=roi)
    return {
        "subject": files.subject, "site": files.site, "voxel_dice": voxel_dice(pred, ref, roi),
        "cluster_dice": cs.dice, "cluster_precision": cs.precision, "cluster_recall": cs.recall,
        "n_pred": cs.n_pred, "n_ref": cs.n_ref,
    }


def _display_available() -> bool:
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")) and (
        os.environ.get("QT_QPA_PLATFORM", "") != "offscreen"
    )


@dataclass(frozen=True)
class _Method:
    """One way the demo segments: its row label, ``predict_file``'s model and TTA, and
    the folder its predictions go to."""

    label: str
    model: str
    tta: int | None
    folder: Path
    model_id: str = "baseline"


def _methods(modality: str, predictions: Path, tta: int | None = None) -> list[_Method]:
    """The shipped MedNeXt model for ``modality`` (when there is one) with ``tta`` flips
    (default: the model's, else 2), then Frangi."""
    methods = []
    for m in starter_models():
        if "error" not in m and m["preprocessing"].get("modality") == modality:
            tta = int(tta or m["preprocessing"].get("tta") or 2)  # 2 flips: their variance
            methods.append(_Method(f"MedNeXt({m['name']})", m["name"], tta,
                                   predictions / m["name"], m["id"]))
            break
    return [*methods, _Method("Frangi", "baseline", None, predictions / "frangi")]


_HEADER = (f"{'subject':<10} {'site':<6} {'voxel mm':>8} {'method':<16} {'voxel Dice':>10} "
           f"{'cluster Dice':>12} {'cluster P':>9} {'cluster R':>9} {'n pred':>6} {'n ref':>6} "
           f"{'time':>6}")


def _score_cohort(subjects, methods: list[_Method]) -> list[dict]:
    """Segment each subject with each method and print its scores, a row per method."""
    rows = []
    print(_HEADER)
    for files in subjects:
        spacing = json.loads(files.regions.with_name(f"sub-{files.subject}_desc-phantom.json")
                             .read_text())["spacing_mm"]
        for method in methods:
            t = time.perf_counter()
            pred = predict_file(files.image, method.folder, model=method.model, tta=method.tta,
                                roi=files.regions, modality=files.modality)["labels"]
            seconds = time.perf_counter() - t
            row = {"subject": files.subject, "site": files.site, "method": method.label,
                   "model": method.model_id, "voxel_mm": spacing,
                   **_score_subject(files, pred), "seconds": seconds}
            rows.append(row)
            print(f"{row['subject']:<10} {row['site']:<6} {spacing:>8.1f} {method.label:<16} "
                  f"{row['voxel_dice']:>10.3f} {row['cluster_dice']:>12.3f} "
                  f"{row['cluster_precision']:>9.2f} {row['cluster_recall']:>9.2f} "
                  f"{row['n_pred']:>6d} {row['n_ref']:>6d} {row['seconds']:>5.1f}s", flush=True)
    return rows


def _print_means(rows: list[dict], methods: list[_Method]) -> None:
    for method in methods:
        mine = [r for r in rows if r["method"] == method.label]
        vd = np.array([r["voxel_dice"] for r in mine])
        cd = np.array([r["cluster_dice"] for r in mine])
        print(f"mean +/- sd   {method.label:<16} voxel Dice {vd.mean():.3f} +/- {vd.std():.3f}   "
              f"cluster Dice {cd.mean():.3f} +/- {cd.std():.3f}   "
              f"{sum(r['seconds'] for r in mine):.0f} s in all")


def _cmd_demo(args: argparse.Namespace) -> int:
    out = check_output_folder(args.out, "--out")
    print(f"napari-pvs {__version__} demo: {args.sites} sites x {args.per_site} {args.modality} "
          f"phantoms -> {out}", flush=True)
    t0 = time.perf_counter()
    subjects = write_phantom_cohort(
        out / "cohort", n_sites=args.sites, per_site=args.per_site, modality=args.modality,
        seed=args.seed, size_mm=args.size_mm,
        progress=lambda m, d, n: print(f"  phantom [{d}/{n}] {m}", flush=True),
    )
    methods = _methods(args.modality, out / "predictions", args.tta)
    mednext = methods[0] if len(methods) > 1 else None
    print(f"  cohort written in {time.perf_counter() - t0:.1f} s; segmenting inside each "
          "subject's WM+BG mask with "
          + (f"the shipped {mednext.label} ({mednext.tta} TTA flips) and " if mednext else "")
          + "the Frangi baseline", flush=True)
    if mednext is None:
        print(f"  (no shipped {args.modality} model: `napari-pvs model ls` lists them; Frangi "
              "only)", flush=True)
    rows = _score_cohort(subjects, methods)
    _print_means(rows, methods)
    (out / "scores.json").write_text(json.dumps(rows, indent=1))
    print(f"scores: {out / 'scores.json'}; predictions: "
          + ", ".join(str(m.folder) for m in methods))
    if args.viewer and _display_available():
        from ._widgets._demo import show_demo  # Qt and napari: only when a viewer opens

        show_demo(subjects, out, methods[-1].folder, args.screenshot,
                  mednext=(mednext.model, mednext.folder) if mednext else None)
    elif args.viewer:
        print("no display found: skipping the napari viewer (open the files with "
              "`napari <file.nii.gz>` on a desktop)")
    return 0


def _cohort_args(p: argparse.ArgumentParser, sites: int, per_site: int, size_mm: float) -> None:
    p.add_argument("--sites", type=int, default=sites, help="number of scanner sites")
    p.add_argument("--per-site", type=int, default=per_site, help="subjects per site")
    p.add_argument("--modality", choices=("T2w", "T1w"), default="T2w",
                   help="contrast: T2w (PVS bright) or T1w (PVS dark)")
    p.add_argument("--seed", type=int, default=0, help="seed of the phantoms")
    p.add_argument("--size-mm", type=number(float, 32, 320, what="a field of view in mm"),
                   default=size_mm, help="field of view in mm (the anatomy scales with it)")


def add_demo_parsers(sub) -> None:
    """Register ``demo`` and ``phantom``."""
    p = sub.add_parser("demo", help="main job: phantom cohort -> the starter MedNeXt and the "
                                    "Frangi baseline -> Dice per subject")
    add_out(p, "output folder (default: ./pvs-demo)", default="pvs-demo", required=False)
    p.add_argument("--no-viewer", dest="viewer", action="store_false",
                   help="do not open napari even when a display exists")
    p.add_argument("--screenshot", metavar="PNG",
                   help="save a screenshot of the viewer to PNG and exit instead of waiting")
    p.add_argument("--tta", type=number(int, 1, 8, what="a count of mirror variants"),
                   default=None,
                   help="mirror TTA variants of the shipped MedNeXt model, 1-8 (default: the "
                        "model's, else 2; each one adds a pass over every window)")
    _cohort_args(p, 3, 2, 144.0)
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("phantom", help="write a synthetic multi-site cohort (BIDS-like)")
    add_out(p, "output folder of the cohort", positional="OUTDIR")
    _cohort_args(p, 3, 2, 160.0)
    p.add_argument("--aseg", action="store_true",
                   help="also write each subject's anatomy as FreeSurfer's aseg.mgz (conformed "
                        "256³ 1 mm LIA grid) in derivatives/freesurfer/sub-<id>/mri/")
    p.set_defaults(func=_cmd_phantom)
