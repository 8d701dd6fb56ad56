"""File-to-file prediction: NIfTI in, NIfTI maps out, in the source geometry.

``napari-pvs predict`` and batch scripts call :func:`predict_file`; it composes
:mod:`napari_pvs.io`, :mod:`napari_pvs.baseline` / :mod:`napari_pvs.inference`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ._errors import PVSInputError

__all__ = ["load_roi", "modality_from_name", "predict_file"]


def modality_from_name(path: str | os.PathLike[str], given: str | None = None) -> str:
    """``given``, else the BIDS suffix of the file name (``_T1w``), else T2w."""
    if given:
        return given
    name = Path(path).name
    return "T1w" if "_T1w" in name or "T1w." in name else "T2w"


def load_roi(roi: str | os.PathLike[str], like) -> np.ndarray:
    """Load a mask / region map (integer labels) and check it lies on the grid of ``like``."""
    from .io import load_volume

    vol = load_volume(roi, as_labels=True)
    if vol.shape != like.shape:
        raise PVSInputError(
            f"{roi}: ROI shape {vol.shape} does not match image {like.path} shape {like.shape}; "
            "resample the mask to the image grid"
        )
    if not np.allclose(vol.affine, like.affine, atol=1e-3):
        raise PVSInputError(
            f"{roi}: ROI affine differs from the affine of {like.path}; the mask is on another "
            "grid (resample it to the image, e.g. with mri_vol2vol or antsApplyTransforms)"
        )
    return vol.data


def predict_file(
    image: str | os.PathLike[str],
    outdir: str | os.PathLike[str],
    *,
    model: str = "baseline",
    roi: str | os.PathLike[str] | None = None,
    modality: str | None = None,
    volume: int | None = None,
    tta: int | None = None,
    device: str | None = None,
    backend: str = "auto",
    overlap: float | None = None,
    progress: Callable | None = None,
) -> dict[str, Path]:
    """Segment one NIfTI image; returns the written files by kind.

    Always writes ``OUTDIR/<stem>_pvs.nii.gz`` (uint8 labels).  A MedNeXt checkpoint
    (``model`` = a ``.safetensors`` file, or an ensemble ``.json``) also writes ``<stem>_prob.nii.gz``
    and ``<stem>_uncertainty.nii.gz`` (float32), and ``<stem>_clusters.csv``, the
    per-cluster table (:mod:`napari_pvs.clusters`).  All keep the source geometry.
    ``tta`` and ``overlap`` default to the checkpoint's own settings (8 flips and 0.5
    for imported nnU-Net models), else 1 flip and 0.5.
    """
    from .io import load_volume, save_labels, save_map, strip_nifti_suffix

    image = Path(image)
    vol = load_volume(image, volume=volume)
    roi_labels = load_roi(roi, vol) if roi is not None else None
    mask = None if roi_labels is None else roi_labels > 0
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    stem = strip_nifti_suffix(image.name)
    outs: dict[str, Path] = {}
    if model == "baseline":
        from .baseline import segment_frangi

        result = segment_frangi(vol.data, vol.spacing, roi=mask,
                                modality=modality_from_name(image, modality))
        labels = result.labels
    else:
        ckpt = Path(model)
        if not ckpt.is_file():
            raise PVSInputError(f"--model {model!r} is neither 'baseline' nor an existing checkpoint file")
        from .inference import predict_volume, run
        from .model import checkpoint_hash, load_checkpoint

        net, meta = load_checkpoint(ckpt)
        pre = meta.get("preprocessing", {})
        tta = int(tta or pre.get("tta") or 1)  # imported nnU-Net models mirror all axes
        overlap = float(pre.get("overlap", 0.5) if overlap is None else overlap)
        pred = run(predict_volume(vol.data, vol.spacing, net, meta, roi=mask, tta=tta, device=device,
                                  backend=backend, overlap=overlap, cache_key=checkpoint_hash(ckpt)),
                   progress)
        labels = pred.labels
        outs["probability"] = save_map(outdir / f"{stem}_prob.nii.gz", pred.probability, like=vol)
        outs["uncertainty"] = save_map(outdir / f"{stem}_uncertainty.nii.gz", pred.uncertainty,
                                       like=vol)
        from .clusters import cluster_table, label_clusters

        clusters, _ = label_clusters(labels)
        table = cluster_table(clusters, probability=pred.probability, uncertainty=pred.uncertainty,
                              regions=None if roi_labels is None else roi_labels,
                              affine=vol.affine, spacing=vol.spacing)
        outs["clusters"] = table.to_csv(outdir / f"{stem}_clusters.csv")
    outs["labels"] = save_labels(outdir / f"{stem}_pvs.nii.gz", labels, like=vol)
    return outs
