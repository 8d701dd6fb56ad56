"""File-to-file prediction: NIfTI in, NIfTI maps out, in the source geometry.

``napari-pvs predict`` and batch scripts call :func:`predict_file`; it composes
:mod:`napari_pvs.io`, :mod:`napari_pvs.baseline` / :mod:`napari_pvs.inference`.
"""

from __future__ import annotations

import copy
import functools
import os
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ._errors import PVSInputError
from .baseline import segment_frangi
from .clusters import cluster_table, label_clusters
from .inference import PredictionCancelled, Progress, predict_volume, run
from .io import check_same_grid, load_volume, save_labels, save_map, strip_nifti_suffix
from .model import STARTER_MODELS, checkpoint_hash, load_checkpoint, starter_path

__all__ = [
    "AUTO_REGIONS_NOTE",
    "ArrayPrediction",
    "AutoRegionsWarning",
    "check_output_folder",
    "load_model",
    "load_roi",
    "modality_from_name",
    "predict_array",
    "predict_file",
    "prediction_from_labels",
]


def modality_from_name(path: str | os.PathLike[str], given: str | None = None) -> str:
    """``given``, else the BIDS suffix of the file name (``_T1w``), else T2w."""
    if given:
        return given
    name = Path(path).name
    return "T1w" if "_T1w" in name or "T1w." in name else "T2w"


def load_roi(roi: str | os.PathLike[str], like) -> np.ndarray:
    """Load a mask / region map (integer labels) and check it lies on the grid of ``like``."""
    vol = load_volume(roi, as_labels=True)
    check_same_grid(vol, like, what="ROI")
    return vol.data


def check_output_folder(path: str | os.PathLike[str], option: str = "-o") -> Path:
    """Refuse an output folder that exists as a file (or lies under a file).

    Parameters
    ----------
    path : str or os.PathLike
        The output folder; it may not exist yet.
    option : str
        The command-line option or argument that gave it, for the message.

    Returns
    -------
    pathlib.Path
        *path*.

    Raises
    ------
    PVSInputError
        Naming the option, the path and the file in the way.
    """
    path = Path(path)
    for part in (path, *path.parents):
        if part.exists():
            if not part.is_dir():
                what = f"{option} {path}" if part == path else f"{option} {path}: {part}"
                raise PVSInputError(
                    f"{what} is an existing file, not a folder; give a folder (new or "
                    "existing), or move the file away"
                )
            break
    return path


def predict_file(
    image: str | os.PathLike[str],
    outdir: str | os.PathLike[str],
    *,
    model: str = "baseline",
    roi: str | os.PathLike[str] | None = None,
    seg: str | os.PathLike[str] | None = None,
    lut: str | os.PathLike[str] | None = None,
    modality: str | None = None,
    volume: int | None = None,
    tta: int | None = None,
    device: str | None = None,
    backend: str = "auto",
    overlap: float | None = None,
    registry=None,
    progress: Callable | None = None,
    auto_regions: bool = True,
) -> dict[str, Path]:
    """Segment one NIfTI image; returns the written files by kind.

    Load, :func:`predict_array`, save.  Always writes ``OUTDIR/<stem>_pvs.nii.gz`` (uint8
    labels) and ``<stem>_clusters.csv``, the per-cluster table (:mod:`napari_pvs.clusters`;
    its probability columns are empty for the baseline).  A MedNeXt model (a
    ``.safetensors`` file, an ensemble ``.json``, or a model id of ``registry``) also
    writes ``<stem>_prob.nii.gz`` and ``<stem>_uncertainty.nii.gz`` (float32).  All keep
    the source geometry.  ``tta`` and ``overlap`` default to the checkpoint's own settings (8 flips and 0.5 for imported
    nnU-Net models), else 1 flip and 0.5.

    ``roi`` is a region map or mask on the image grid; ``seg`` an aseg-style segmentation
    on any grid (FreeSurfer ``aseg.mgz``, SynthSeg, fMRIPrep ``desc-aseg_dseg``), mapped
    by :func:`napari_pvs.regions.from_segmentation` with the table ``lut``.  With ``seg``
    the region map is also written, ``<stem>_regions.nii.gz`` with a ``.json`` sidecar
    that records the segmentation and the table.  With neither (and ``auto_regions``),
    the regions are estimated from the image (:func:`predict_array`) and written the same
    way, their sidecar naming the method.
    """
    image = Path(image)
    outdir = check_output_folder(outdir, "outdir")
    if roi is not None and seg is not None:
        raise PVSInputError("give either --roi (a region map on the image grid) or --seg (a "
                            "whole-brain segmentation on any grid), not both")
    if lut is not None and seg is None:
        raise PVSInputError("--lut maps the labels of --seg; give --seg as well")
    vol = load_volume(image, volume=volume)
    regions = load_roi(roi, vol) if roi is not None else None
    brain = seg_meta = None
    if seg is not None:
        from .regions import from_segmentation

        mapped = from_segmentation(seg, vol, lut=lut or "freesurfer")
        regions, brain, seg_meta = mapped.regions, mapped.brain, {"source": "segmentation",
                                                                   **mapped.meta}
    named = model == "baseline" or model in STARTER_MODELS
    if not named and registry is None and not Path(model).is_file():
        raise PVSInputError(f"--model {model!r} is neither 'baseline' nor an existing checkpoint "
                            f"file nor a shipped model ({', '.join(STARTER_MODELS)}); give "
                            "--store to name a model of a store's registry")
    gen = predict_array(vol.data, vol.spacing, model, affine=vol.affine, roi=regions,
                        brain=brain, modality=modality_from_name(image, modality), tta=tta,
                        device=device, backend=backend, overlap=overlap, registry=registry,
                        auto_regions=auto_regions, regions_meta=seg_meta)
    pred = run(gen, progress)
    outdir.mkdir(parents=True, exist_ok=True)
    stem = strip_nifti_suffix(image.name)
    outs: dict[str, Path] = {}
    if pred.probability is not None:
        outs["probability"] = save_map(outdir / f"{stem}_prob.nii.gz", pred.probability, like=vol)
        outs["uncertainty"] = save_map(outdir / f"{stem}_uncertainty.nii.gz", pred.uncertainty,
                                       like=vol)
    outs["clusters"] = pred.table.to_csv(outdir / f"{stem}_clusters.csv")
    if pred.regions is not None and (pred.regions_meta or {}).get("source") != "roi":
        from .regions import save_region_map

        outs["regions"], _ = save_region_map(outdir / f"{stem}_regions.nii.gz", pred.regions,
                                             vol, pred.regions_meta)
    outs["labels"] = save_labels(outdir / f"{stem}_pvs.nii.gz", pred.labels, like=vol)
    return outs


@dataclass
class ArrayPrediction:
    """Result of :func:`predict_array`: the maps on the source grid and their clusters.

    ``probability`` and ``uncertainty`` are None for the Frangi baseline, which gives
    ``vesselness`` instead.
    """

    labels: np.ndarray
    clusters: np.ndarray
    table: Any  # napari_pvs.clusters.ClusterTable
    model: str
    probability: np.ndarray | None = None
    uncertainty: np.ndarray | None = None
    vesselness: np.ndarray | None = None
    seconds: float = 0.0
    #: The region map the labels were restricted to (None: the whole image), and where
    #: it came from: ``{"source": "roi" | "segmentation" | "automatic", ...}``.
    regions: np.ndarray | None = None
    regions_meta: dict | None = None
    #: The model's false-positive classifier (:mod:`napari_pvs.triage`), None without one.
    triage: dict | None = None


def load_model(model: str, registry=None, device: str = "cpu"):
    """``(network, metadata, cache key)`` of a shipped model's name (``"starter"``), a
    checkpoint file or a registry id.

    Loaded once per process and file version (path, size, modification time): a cohort
    worker that predicts many images reads its checkpoint once; a rewritten file loads
    again.  The network is in eval mode and is not changed by prediction.
    """
    path = starter_path(model) if model in STARTER_MODELS else Path(model)
    if not path.is_file():
        if registry is None:
            raise PVSInputError(f"model {model!r} is not a checkpoint file, and no store registry "
                                "was given to look it up in")
        path = registry.path(model)
    st = Path(path).stat()
    net, meta, key = _load_checkpoint_once(str(Path(path).resolve()), st.st_size,
                                           st.st_mtime_ns, device)
    return net, copy.deepcopy(meta), key  # the caller's own metadata to change


@functools.lru_cache(maxsize=4)
def _load_checkpoint_once(path: str, size: int, mtime_ns: int, device: str):
    net, meta = load_checkpoint(path, device)
    return net, meta, checkpoint_hash(path)


def predict_array(
    image: np.ndarray,
    spacing,
    model: str = "baseline",
    *,
    affine: np.ndarray | None = None,
    roi: np.ndarray | None = None,
    brain: np.ndarray | None = None,
    modality: str = "T2w",
    tta: int | None = None,
    device: str | None = None,
    backend: str = "auto",
    overlap: float | None = None,
    registry=None,
    cancel=None,
    auto_regions: bool = True,
    regions_meta: dict | None = None,
) -> Generator[Any, None, ArrayPrediction]:
    """Segment an in-memory volume and tabulate its clusters; a generator.

    Parameters
    ----------
    image : ndarray, (X, Y, Z)
    spacing : tuple of 3 floats
        Voxel size in mm.
    model : str
        ``"baseline"`` (Frangi), a shipped model (``"starter"``), a model id of
        ``registry``, or a checkpoint file.
    affine : ndarray (4, 4), optional
        For the table's world centroids.
    roi : ndarray, optional
        Region map or mask on the image grid (integers; 1 WM, 2 BG name the regions).
        PVS are labelled inside it only.
    brain : ndarray of bool, optional
        Brain mask on the image grid (e.g. every label of a segmentation).  Imported
        nnU-Net models, trained on skull-stripped images, see the image zeroed outside
        it, so their "nonzero" normalisation mask is the brain.
    tta, device, backend, overlap, cancel :
        As in :func:`napari_pvs.inference.predict_volume` (``tta`` and ``overlap``
        default to the checkpoint's settings, else 1 flip and 0.5).
    registry : ModelRegistry, optional
        Where a model id is looked up.
    auto_regions : bool
        Without ``roi`` and ``brain``, restrict the prediction to the WM and BG estimated
        from the image (:func:`napari_pvs._auto_regions.estimate_regions`) and warn once
        (:class:`AutoRegionsWarning`) that the results are not those of real regions.
        False predicts on the whole field of view.
    regions_meta : dict, optional
        Where ``roi`` came from; kept in the result's ``regions_meta``.

    Yields
    ------
    napari_pvs.inference.Progress

    Returns
    -------
    ArrayPrediction
    """
    # 37 lines of code: over 60 lines only through the numpydoc docstring above
    t0 = time.perf_counter()
    image = np.asarray(image)
    if image.ndim != 3:
        raise PVSInputError(f"need a 3D image, got shape {image.shape}; pick one volume of a 4D series")
    regions = None
    if roi is not None:
        regions = np.asarray(roi)
        if regions.shape != image.shape:
            raise PVSInputError(f"ROI shape {regions.shape} does not match image shape {image.shape}; "
                                "resample the mask to the image grid")
    if regions is not None:
        regions_meta = regions_meta or {"source": "roi"}
    elif brain is None and auto_regions:
        regions, regions_meta = _automatic_regions(image, spacing, modality)
    mask = None if regions is None else regions > 0
    if brain is not None and np.shape(brain) != image.shape:
        raise PVSInputError(f"brain mask shape {np.shape(brain)} does not match image shape "
                            f"{image.shape}")
    out: dict[str, Any] = {}
    triage = None
    if model == "baseline":
        yield Progress(0, 1, "Frangi vesselness")
        result = segment_frangi(image, spacing, roi=mask, modality=modality)
        labels, out["vesselness"] = result.labels, result.vesselness
        yield Progress(1, 1, "Frangi vesselness done")
    else:
        net, meta, key = load_model(model, registry)
        pre = meta.get("preprocessing", {})
        overlap = float(pre.get("overlap", 0.5) if overlap is None else overlap)
        if brain is not None and pre.get("normalization") == "nnunet_v1":
            image = np.where(brain, image, 0).astype(image.dtype, copy=False)  # skull-strip
        pred = yield from predict_volume(image, spacing, net, meta, roi=mask,
                                         tta=int(tta or pre.get("tta") or 1), device=device,
                                         backend=backend, overlap=overlap, cache_key=key,
                                         cancel=cancel)
        labels, out["probability"], out["uncertainty"] = pred.labels, pred.probability, pred.uncertainty
        model = meta.get("id") or model
        triage = meta.get("triage")
    if cancel is not None and cancel.is_set():
        raise PredictionCancelled("prediction cancelled")
    pred = prediction_from_labels(labels, model=str(model), regions=regions, affine=affine,
                                  spacing=spacing, seconds=time.perf_counter() - t0,
                                  triage=triage, **out)
    pred.regions, pred.regions_meta = regions, regions_meta
    return pred


class AutoRegionsWarning(UserWarning):
    """No segmentation or ROI was given: the regions were estimated from the image."""


#: What :class:`AutoRegionsWarning` says (one message, so it is shown once per command).
AUTO_REGIONS_NOTE = (
    "no segmentation or ROI given: PVS are predicted inside the white matter and basal "
    "ganglia as estimated from the image itself. Scores and counts are not comparable with "
    "MedNet-PVS's, which use a FreeSurfer-style segmentation: give one with --seg (aseg.mgz "
    "from FreeSurfer, SynthSeg, FastSurfer, or fMRIPrep's desc-aseg_dseg.nii.gz), or a "
    "0/1/2 region map with --roi")


def _automatic_regions(image: np.ndarray, spacing,
                       modality: str) -> tuple[np.ndarray | None, dict]:
    """The estimated region map and its record; warns once (:class:`AutoRegionsWarning`).

    An image the estimate cannot handle (too small, constant) is predicted whole, with a
    warning that says why."""
    import warnings

    from ._auto_regions import estimate_regions

    try:
        est = estimate_regions(image, spacing, modality)
    except PVSInputError as exc:
        warnings.warn(f"could not estimate the brain's regions ({exc}); predicting on the whole "
                      "image", AutoRegionsWarning, stacklevel=3)
        return None, {"source": "whole image", "reason": str(exc)}
    warnings.warn(AUTO_REGIONS_NOTE, AutoRegionsWarning, stacklevel=3)
    return est.regions, {"source": "automatic", "method": est.method, **est.meta}


def prediction_from_labels(labels: np.ndarray, *, model: str = "baseline",
                           regions: np.ndarray | None = None, affine=None, spacing=None,
                           seconds: float = 0.0, triage: dict | None = None,
                           **maps) -> ArrayPrediction:
    """An :class:`ArrayPrediction` of PVS labels: their clusters and cluster table.

    ``maps`` are the prediction's ``probability`` / ``uncertainty`` / ``vesselness``.  A
    WM (1) / BG (2) region map names the clusters' regions; a plain mask does not.
    ``triage``: the model's false-positive classifier, for ``p_false_positive``.
    """
    labels = np.asarray(labels, np.uint8)
    clusters, _ = label_clusters(labels)
    table = cluster_table(clusters, probability=maps.get("probability"),
                          uncertainty=maps.get("uncertainty"),
                          regions=None if regions is None or regions.max() > 2 else regions,
                          affine=affine, spacing=spacing, triage=triage)
    return ArrayPrediction(labels=labels, clusters=clusters, table=table, model=str(model),
                           seconds=seconds, triage=triage, **maps)
