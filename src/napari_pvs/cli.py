"""The ``napari-pvs`` command.

Subcommands::

    napari-pvs demo     [--out DIR] [--sites N] [--per-site M] [--modality T2w|T1w] [--no-viewer]
    napari-pvs phantom  OUTDIR [--sites N] [--per-site M] [--modality T2w|T1w] [--seed S]
    napari-pvs predict  IMAGE [IMAGE ...] -o OUTDIR [--model baseline] [--roi MASK] [--modality]

Bad input exits with status 2 and one line ``napari-pvs: error: ...`` on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from . import __version__
from ._errors import PVSInputError

__all__ = ["main", "predict_file"]


def _modality_from_name(path: Path, given: str | None) -> str:
    if given:
        return given
    name = path.name
    return "T1w" if "_T1w" in name or "T1w." in name else "T2w"


def predict_file(
    image: str | Path,
    outdir: str | Path,
    *,
    model: str = "baseline",
    roi: str | Path | None = None,
    modality: str | None = None,
    volume: int | None = None,
) -> Path:
    """Segment one NIfTI image and write ``OUTDIR/<stem>_pvs.nii.gz`` (uint8).

    The output keeps the source geometry.  ``roi`` (a NIfTI mask on the same grid,
    nonzero inside) restricts the segmentation.  Only ``model="baseline"`` exists
    until a MedNeXt model is trained or imported.
    """
    from .baseline import segment_frangi
    from .io import load_volume, save_labels, strip_nifti_suffix

    if model != "baseline":
        raise PVSInputError(
            f"unknown model {model!r}: only 'baseline' (Frangi) is available in this version"
        )
    image = Path(image)
    vol = load_volume(image, volume=volume)
    mask = None
    if roi is not None:
        roi_vol = load_volume(roi, as_labels=True)
        if roi_vol.shape != vol.shape:
            raise PVSInputError(
                f"{roi}: ROI shape {roi_vol.shape} does not match image {image} shape {vol.shape}; "
                "resample the mask to the image grid"
            )
        import numpy as np

        if not np.allclose(roi_vol.affine, vol.affine, atol=1e-3):
            raise PVSInputError(
                f"{roi}: ROI affine differs from the affine of {image}; the mask is on another "
                "grid (resample it to the image, e.g. with mri_vol2vol or antsApplyTransforms)"
            )
        mask = roi_vol.data > 0
    result = segment_frangi(
        vol.data, vol.spacing, roi=mask, modality=_modality_from_name(image, modality)
    )
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    out = outdir / f"{strip_nifti_suffix(image.name)}_pvs.nii.gz"
    save_labels(out, result.labels, like=vol)
    return out


def _cmd_phantom(args: argparse.Namespace) -> int:
    from .dataset import write_phantom_cohort

    def progress(msg, done, total):
        print(f"[{done}/{total}] {msg}", flush=True)

    files = write_phantom_cohort(
        args.outdir, n_sites=args.sites, per_site=args.per_site, modality=args.modality,
        seed=args.seed, size_mm=args.size_mm, progress=progress,
    )
    print(f"wrote {len(files)} subjects to {args.outdir} (participants.tsv lists their sites)")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    if args.roi is not None and len(args.images) > 1:
        raise PVSInputError("--roi applies to one image; run predict once per image with its mask")
    for image in args.images:
        t = time.perf_counter()
        out = predict_file(image, args.output, model=args.model, roi=args.roi,
                           modality=args.modality, volume=args.volume)
        print(f"{image} -> {out} ({time.perf_counter() - t:.1f} s)", flush=True)
    return 0


def _score_subject(files, pred_path: Path) -> dict:
    from .io import load_volume
    from .metrics import cluster_scores, voxel_dice

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


def _cmd_demo(args: argparse.Namespace) -> int:
    import numpy as np

    from .dataset import write_phantom_cohort

    out = Path(args.out)
    print(f"napari-pvs {__version__} demo: {args.sites} sites x {args.per_site} {args.modality} "
          f"phantoms -> {out}", flush=True)
    t0 = time.perf_counter()
    subjects = write_phantom_cohort(
        out / "cohort", n_sites=args.sites, per_site=args.per_site, modality=args.modality,
        seed=args.seed, size_mm=args.size_mm,
        progress=lambda m, d, n: print(f"  phantom [{d}/{n}] {m}", flush=True),
    )
    print(f"  cohort written in {time.perf_counter() - t0:.1f} s; segmenting with the Frangi baseline "
          "inside each subject's WM+BG mask", flush=True)
    rows = []
    header = f"{'subject':<10} {'site':<6} {'voxel':>6} {'vox Dice':>8} {'clu Dice':>8} " \
             f"{'clu P':>6} {'clu R':>6} {'n pred':>6} {'n ref':>6} {'time':>6}"
    print(header)
    for files in subjects:
        t = time.perf_counter()
        pred = predict_file(files.image, out / "predictions", roi=files.regions,
                            modality=files.modality)
        row = _score_subject(files, pred)
        row["seconds"] = time.perf_counter() - t
        rows.append(row)
        spacing = json.loads(files.regions.with_name(f"sub-{files.subject}_desc-phantom.json")
                             .read_text())["spacing_mm"]
        print(f"{row['subject']:<10} {row['site']:<6} {spacing:>4.1f}mm {row['voxel_dice']:>8.3f} "
              f"{row['cluster_dice']:>8.3f} {row['cluster_precision']:>6.2f} "
              f"{row['cluster_recall']:>6.2f} {row['n_pred']:>6d} {row['n_ref']:>6d} "
              f"{row['seconds']:>5.1f}s", flush=True)
    vd = np.array([r["voxel_dice"] for r in rows])
    cd = np.array([r["cluster_dice"] for r in rows])
    print(f"mean +/- sd   voxel Dice {vd.mean():.3f} +/- {vd.std():.3f}   "
          f"cluster Dice {cd.mean():.3f} +/- {cd.std():.3f}")
    (out / "scores.json").write_text(json.dumps(rows, indent=1))
    print(f"scores: {out / 'scores.json'}; predictions: {out / 'predictions'}")
    if args.viewer and _display_available():
        _show(subjects[0], out / "predictions", args.screenshot)
    elif args.viewer:
        print("no display found: skipping the napari viewer (open the files with "
              "`napari <file.nii.gz>` on a desktop)")
    return 0


def _show(files, pred_dir: Path, screenshot: str | None = None) -> None:
    import napari

    from ._reader import layer_data_from_volume
    from .io import load_volume, strip_nifti_suffix

    viewer = napari.Viewer(title=f"napari-pvs demo: sub-{files.subject}")
    image = load_volume(files.image)
    data, kw, _ = layer_data_from_volume(image)
    viewer.add_image(data, **kw)
    from napari.utils.colormaps import DirectLabelColormap

    colours = {"regions": "yellow", "PVS truth": "magenta", "PVS baseline": "cyan"}
    for path, name in ((files.regions, "regions"), (files.labels, "PVS truth"),
                       (pred_dir / f"{strip_nifti_suffix(files.image.name)}_pvs.nii.gz",
                        "PVS baseline")):
        vol = load_volume(path, as_labels=True)
        data, kw, _ = layer_data_from_volume(vol, name=name, labels=vol.data)
        kw["colormap"] = DirectLabelColormap(color_dict={None: "transparent", 0: "transparent",
                                                         1: colours[name], 2: "orange"})
        layer = viewer.add_labels(data, **kw)
        layer.visible = name != "regions"
        if name == "PVS truth":
            layer.contour = 1  # outline the truth, fill the prediction
    # axial slices shown radiologically: anterior up, right on the viewer's right
    viewer.dims.order = (2, 1, 0)
    viewer.camera.orientation2d = ("up", "right")
    zr = viewer.dims.range[2]
    viewer.dims.set_point(2, (zr.start + zr.stop) / 2 - 5)
    viewer.reset_view()
    if screenshot:
        viewer.screenshot(screenshot, canvas_only=False, flash=False)
        print(f"screenshot: {screenshot}")
        viewer.close()
        return
    napari.run()


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="napari-pvs", description="PVS segmentation in brain MRI")
    ap.add_argument("--version", action="version", version=f"napari-pvs {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)

    def cohort_args(p, sites, per_site, size_mm):
        p.add_argument("--sites", type=int, default=sites, help="number of scanner sites")
        p.add_argument("--per-site", type=int, default=per_site, help="subjects per site")
        p.add_argument("--modality", choices=("T2w", "T1w"), default="T2w")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--size-mm", type=float, default=size_mm,
                       help="field of view in mm (the anatomy scales with it)")

    p = sub.add_parser("demo", help="main job: phantom cohort -> baseline -> Dice per subject")
    p.add_argument("--out", default="pvs-demo", help="output folder (default: ./pvs-demo)")
    p.add_argument("--no-viewer", dest="viewer", action="store_false",
                   help="do not open napari even when a display exists")
    p.add_argument("--screenshot", metavar="PNG",
                   help="save a screenshot of the viewer to PNG and exit instead of waiting")
    cohort_args(p, 3, 2, 144.0)
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("phantom", help="write a synthetic multi-site cohort (BIDS-like)")
    p.add_argument("outdir")
    cohort_args(p, 3, 2, 160.0)
    p.set_defaults(func=_cmd_phantom)

    p = sub.add_parser("predict", help="segment NIfTI images")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--model", default="baseline", help="'baseline' (Frangi vesselness)")
    p.add_argument("--roi", help="mask on the image grid (nonzero inside), e.g. WM+BG")
    p.add_argument("--modality", choices=("T2w", "T1w"),
                   help="contrast (default: from the BIDS suffix of the file name, else T2w)")
    p.add_argument("--volume", type=int, help="volume index for 4D files")
    p.set_defaults(func=_cmd_predict)
    return ap


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``napari-pvs`` command; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except PVSInputError as exc:
        print(f"napari-pvs: error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # argument values that the core rejected
        print(f"napari-pvs: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
