"""``napari-pvs predict`` and ``napari-pvs score``."""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

from ._backends import BACKENDS
from ._cli_common import ProgressReport, add_device, add_out, number
from ._errors import PVSInputError
from .io import load_volume, strip_nifti_suffix
from .metrics import score
from .model import STARTER_MODELS, modality_mismatch, read_meta, starter_path
from .pipeline import check_output_folder, modality_from_name, predict_file
from .store import CorrectionsStore

__all__ = ["add_predict_parsers", "resolve_model"]


def resolve_model(model: str, store: str | None) -> str:
    """``baseline``, a shipped model's name (``starter``), a checkpoint or ensemble file,
    or (with ``store``) a registry id, as the widgets name models; returns what
    :func:`predict_file` takes: ``"baseline"`` or the model's file.

    The names come first: a file called ``starter`` in the working folder is reached
    as ``./starter``."""
    if model == "baseline":
        return model
    if model in STARTER_MODELS:
        return str(starter_path(model))
    if Path(model).is_file():
        return model
    if store is None:
        raise PVSInputError(f"--model {model!r} is neither 'baseline' nor an existing checkpoint "
                            f"file nor a shipped model ({', '.join(STARTER_MODELS)}); for a "
                            "model of a store's registry add --store STORE")
    with CorrectionsStore.open(store) as opened:  # read-only: checks that it is a store
        return str(opened.models.path(model))


def _warn_modality(model: str, path: str, images: list[str], given: str | None) -> None:
    """One warning line per image whose contrast is not the one the model was trained on
    (a T1w image given to the T2w starter model, say)."""
    if not path.endswith(".safetensors"):  # the baseline takes both; ensembles: no record
        return
    try:
        meta = read_meta(path)
    except PVSInputError:  # a broken checkpoint: loading it says why, after the image
        return
    for image in images:
        modality = modality_from_name(image, given)
        how = ("--modality" if given else "by its file name" if modality == "T1w"
               else "no --modality given")
        message = modality_mismatch(meta, modality, f"{Path(image).name} ({how})", name=model)
        if message:
            warnings.warn(message, UserWarning, stacklevel=2)


def _check_names(images: list[str], out: str) -> None:
    """Refuse before any work two inputs whose outputs would have one name."""
    by_stem: dict[str, str] = {}
    for image in images:
        stem = strip_nifti_suffix(Path(image).name)
        if stem in by_stem:
            raise PVSInputError(
                f"{by_stem[stem]} and {image} would both be written to "
                f"{Path(out) / stem}_pvs.nii.gz; predict them into different -o folders")
        by_stem[stem] = image


def _cmd_predict(args: argparse.Namespace) -> int:
    for option, value in (("--roi", args.roi), ("--seg", args.seg)):
        if value is not None and len(args.images) > 1:
            raise PVSInputError(f"{option} applies to one image; run predict once per image "
                                "with its own")
    if args.whole_image and (args.roi is not None or args.seg is not None):
        raise PVSInputError("--whole-image predicts without regions; leave out --roi / --seg")
    check_output_folder(args.out, "-o")
    _check_names(args.images, args.out)
    model = resolve_model(args.model, args.store)
    _warn_modality(args.model, model, args.images, args.modality)
    for image in args.images:
        t = time.perf_counter()
        outs = predict_file(
            image, args.out, model=model, roi=args.roi, seg=args.seg, lut=args.lut,
            auto_regions=not args.whole_image, modality=args.modality,
            volume=args.volume, tta=args.tta, device=args.device, backend=args.backend,
            overlap=args.overlap, progress=ProgressReport(Path(image).name),
        )
        names = ", ".join(str(p) for p in outs.values())
        print(f"{image} -> {names} ({time.perf_counter() - t:.1f} s)", flush=True)
    return 0


def _cmd_score(args: argparse.Namespace) -> int:
    pred = load_volume(args.pred, as_labels=True)
    ref = load_volume(args.gt, as_labels=True)
    regions = load_volume(args.regions, as_labels=True) if args.regions else None
    # score() checks that the three lie on one grid (shape and affine), as the store does
    result = score(pred, ref, regions, connectivity=args.connectivity)
    print(json.dumps({"pred": str(args.pred), "gt": str(args.gt), "regions": args.regions,
                      "connectivity": args.connectivity, "scores": result}, indent=1))
    return 0


def _cmd_regions(args: argparse.Namespace) -> int:
    from .io import save_labels
    from .regions import from_segmentation, save_region_map

    out = Path(args.out)
    if not str(out).lower().endswith((".nii.gz", ".nii")):
        raise PVSInputError(f"-o {out}: the region map is written as NIfTI; end the name in "
                            ".nii.gz")
    like = load_volume(args.like)
    mapped = from_segmentation(args.seg, like, lut=args.lut or "freesurfer")
    out.parent.mkdir(parents=True, exist_ok=True)
    written = [str(p) for p in save_region_map(out, mapped.regions, like,
                                               {**mapped.meta, "like": str(args.like)})]
    if args.brain:
        written.append(str(save_labels(args.brain, mapped.brain, like=like)))
    counts = ", ".join(f"{k} {v} voxels" for k, v in mapped.meta["voxels"].items())
    print(f"{args.seg} -> {', '.join(written)} ({counts}; brain "
          f"{mapped.meta['brain_voxels']} voxels; table {mapped.meta['table']['name']})")
    return 0


def add_predict_parsers(sub) -> None:
    """Register ``predict``, ``regions`` and ``score``."""
    p = sub.add_parser("predict", help="segment NIfTI images")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="NIfTI image(s) to segment")
    add_out(p, "output folder", aliases=("--output",))
    p.add_argument("--model", default="baseline",
                   help="'baseline' (Frangi vesselness, the default), a shipped model ("
                        f"{', '.join(repr(n) for n in STARTER_MODELS)}: `napari-pvs model ls` "
                        "describes them), a MedNeXt checkpoint (.safetensors), "
                        "an ensemble (.json), or with --store a model id of the store's registry")
    p.add_argument("--store", metavar="STORE",
                   help="corrections store whose registry names --model (NAME.pvs.zarr)")
    p.add_argument("--roi", help="region map or mask on the image grid (1 WM, 2 BG; nonzero "
                                 "inside)")
    p.add_argument("--seg", metavar="SEG",
                   help="whole-brain segmentation on any grid (FreeSurfer aseg.mgz, SynthSeg, "
                        "fMRIPrep desc-aseg_dseg.nii.gz): gives the WM/BG regions and the "
                        "brain mask")
    p.add_argument("--lut", metavar="TSV",
                   help="label<TAB>region table (WM, BG, other) for --seg (default: "
                        "FreeSurfer's labels)")
    p.add_argument("--whole-image", action="store_true",
                   help="without --seg or --roi, predict on the whole field of view instead "
                        "of inside WM and BG estimated from the image")
    p.add_argument("--modality", choices=("T2w", "T1w"),
                   help="contrast (default: from the BIDS suffix of the file name, else T2w)")
    p.add_argument("--volume", type=int, help="volume index for 4D files")
    p.add_argument("--tta", type=number(int, 1, 8, what="a count of mirror variants"),
                   default=None,
                   help="mirror TTA variants, 1-8 (MedNeXt only; default: the model's, else 1)")
    add_device(p, "that runs the network")
    p.add_argument("--backend", default="auto", choices=("auto", *BACKENDS),
                   help="window runner on CPU (default: the fastest installed)")
    p.add_argument("--overlap", type=number(float, 0, 1, hi_open=True, what="a fraction"),
                   default=None,
                   help="sliding-window overlap in [0, 1) (default: the model's, else 0.5)")
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("regions", help="WM/BG region map on an image's grid, from a "
                                       "whole-brain segmentation")
    p.add_argument("seg", metavar="SEG", help="aseg-style segmentation (.mgz or NIfTI, any grid)")
    p.add_argument("--like", required=True, metavar="IMAGE",
                   help="the image whose grid the region map lies on")
    p.add_argument("-o", "--out", required=True, metavar="REGIONS.nii.gz",
                   help="region map to write (0 other, 1 WM, 2 BG), with a .json sidecar")
    p.add_argument("--lut", metavar="TSV",
                   help="label<TAB>region table (WM, BG, other); default: FreeSurfer's labels")
    p.add_argument("--brain", metavar="MASK.nii.gz",
                   help="also write the brain mask (every label > 0) on the image's grid")
    p.set_defaults(func=_cmd_regions)

    p = sub.add_parser("score", help="voxel and cluster Dice of a prediction (JSON)")
    p.add_argument("pred", help="predicted PVS labels (NIfTI)")
    p.add_argument("gt", help="reference labels (NIfTI, same grid)")
    p.add_argument("--regions", help="region map: 1 WM, 2 BG (scores per region)")
    p.add_argument("--connectivity", type=int, default=26, choices=(6, 18, 26),
                   help="voxel neighbourhood that joins a cluster (default: 26)")
    p.set_defaults(func=_cmd_score)
