"""``napari-pvs bids BIDS_DIR OUTPUT_DIR participant|group``: the BIDS App, on Dask.

**Participant level** (:func:`run_participant`).  The images of one contrast
(:func:`napari_pvs._bids_io.find_images`) become one Dask task each
(:func:`process_image`), on a ``LocalCluster`` of ``workers`` processes (threads per
worker: the cores divided among them, so that torch and OpenVINO do not oversubscribe)
or on an existing scheduler (``scheduler`` address or ``scheduler_file``: a
dask-jobqueue cluster, say).  Each worker loads the model once.  Per image it writes BIDS
derivatives (:func:`napari_pvs._bids_io.derivative_paths`): the PVS mask, the
probability and uncertainty maps, the per-cluster table and the per-region statistics,
each ``.tsv`` with a JSON sidecar, and a QC montage; every file atomically, the mask's
sidecar (``record``) last.  The record holds the input's SHA-256 and the model id: a
rerun skips an image whose record matches (no task is submitted for it).  A failure is
isolated: the image is listed in ``logs/failed.json`` with its reason and the others
finish.  A worker that dies mid-task has the task retried on another (Dask's
``allowed-failures``).

**Group level** (:func:`run_group`): ``group/pvs_stats.tsv`` (one row per image),
``group/failed.tsv`` and ``group/report.html``, a self-contained, sortable QC report
(:mod:`napari_pvs._bids_report`).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ._bids_io import BidsImage, derivative_paths, find_images
from ._errors import PVSInputError
from ._fs import atomic_write_text, sha256_file

__all__ = ["ParticipantResult", "process_image", "run_group", "run_participant"]

#: the columns of the per-region statistics, in order
STATS_COLUMNS = ("region", "count", "volume_mm3", "median_cluster_mm3")
REGIONS = ("WM", "BG", "all")
FAILED_LOG = Path("logs") / "failed.json"
#: bad input (a one-line reason); anything else is a bug and keeps its traceback
INPUT_ERRORS = (PVSInputError, OSError, ValueError)


@dataclass
class ParticipantResult:
    """What a participant-level run did: images found, computed, skipped and failed."""

    found: int = 0
    computed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # image path -> reason
    seconds: float = 0.0


# ---------------------------------------------------------------------------- model


def model_identity(model: str) -> dict:
    """``{"id", "hash", "card", "modality"}`` of a model spec: ``baseline``, a shipped
    name, a checkpoint or an ensemble ``.json``; checked here, before any task starts.
    ``hash`` identifies the weights (every member's, for an ensemble): a rerun recomputes
    an image whose outputs came from other weights, even under the same id."""
    from . import __version__
    from .model import STARTER_MODELS, checkpoint_hash, load_ensemble, read_meta, starter_path

    if model == "baseline":
        return {"id": "frangi-baseline", "hash": f"napari-pvs {__version__}",
                "card": {"name": "Frangi vesselness baseline"}, "modality": None}
    path = starter_path(model) if model in STARTER_MODELS else Path(model)
    if not path.is_file():
        raise PVSInputError(f"--model {model!r} is neither 'baseline', a shipped model "
                            f"({', '.join(STARTER_MODELS)}) nor an existing checkpoint or "
                            "ensemble .json file")
    digest = checkpoint_hash(path)
    if path.suffix == ".json":  # an ensemble of folds: the first member describes them
        meta = read_meta(load_ensemble(path)[0])
        mid = f"ensemble-{path.parent.name}-{digest[:12]}"
    else:
        meta = read_meta(path)
        mid = meta.get("id") or f"checkpoint-{digest[:12]}"
    modality = (meta.get("preprocessing") or {}).get("modality")
    return {"id": mid, "hash": digest, "card": meta.get("card"),
            "modality": modality if modality in ("T1w", "T2w") else None}


_WORKER_THREADS: list = []


def _set_threads(threads: int | None) -> None:
    """Give torch (and so OpenVINO) ``threads`` threads in this worker process, once."""
    if threads and _WORKER_THREADS != [threads]:
        import torch

        torch.set_num_threads(int(threads))
        _WORKER_THREADS[:] = [threads]


def _model_spec(model: str) -> str:
    """What a worker passes to :func:`napari_pvs.pipeline.predict_array`: a name, or the
    checkpoint's absolute path (a worker's folder may not be the driver's).  The worker
    reads the checkpoint once (:func:`napari_pvs.pipeline.load_model`)."""
    from .model import STARTER_MODELS

    return model if model == "baseline" or model in STARTER_MODELS \
        else str(Path(model).resolve())


# ---------------------------------------------------------------------------- one image


def input_hash(image: Path, seg: Path | None) -> str:
    """SHA-256 of the image (and of its segmentation, when one is used)."""
    h = sha256_file(image)
    return h if seg is None else f"{h}+{sha256_file(seg)}"


def is_done(out_dir: Path, image: BidsImage, digest: str, model_id: str,
            model_hash: str | None = None) -> bool:
    """The image's outputs exist and were made from the same input by the same model
    (its id and, when given, the hash of its weights)."""
    paths = derivative_paths(out_dir, image)
    try:
        rec = json.loads(paths["record"].read_text())
    except (OSError, ValueError):
        return False
    if rec.get("InputHash") != digest or rec.get("ModelId") != model_id:
        return False
    if model_hash is not None and rec.get("ModelHash") != model_hash:
        return False
    return all(paths[k].is_file() for k in rec.get("Outputs", ()))


def region_stats(table) -> list[dict]:
    """Count, volume (mm³) and median cluster volume (mm³) of the PVS per region, from a
    cluster table (:func:`napari_pvs.clusters.cluster_table`: each cluster's volume and
    its dominant region)."""
    volume = np.asarray(table.columns["volume_mm3"], dtype=float)
    region = np.asarray(table.columns["region"])
    rows = []
    for name in REGIONS:
        s = volume if name == "all" else volume[region == name]
        rows.append({"region": name, "count": int(s.size), "volume_mm3": float(s.sum()),
                     "median_cluster_mm3": float(np.median(s)) if s.size else 0.0})
    return rows


def _tsv(rows: list[dict], columns) -> str:
    def fmt(v):
        if isinstance(v, float):
            return "n/a" if not np.isfinite(v) else f"{v:.6g}"
        return "n/a" if v is None or v == "" else str(v)

    lines = ["\t".join(columns)] + ["\t".join(fmt(r.get(c)) for c in columns) for r in rows]
    return "\n".join(lines) + "\n"


_STATS_SIDECAR = {
    "region": {"Description": "WM (white matter), BG (basal ganglia) or all (every PVS "
               "cluster); a cluster belongs to the region that holds most of its voxels "
               "(the cluster table's region column)"},
    "count": {"Description": "number of PVS clusters (26-connected components)"},
    "volume_mm3": {"Description": "total PVS volume", "Units": "mm^3"},
    "median_cluster_mm3": {"Description": "median volume of one cluster", "Units": "mm^3"},
}


def _cluster_sidecar(columns) -> dict:
    from .clusters import COLUMN_DESCRIPTIONS

    return {c: {"Description": COLUMN_DESCRIPTIONS.get(c, c)} for c in columns}


def process_image(image: BidsImage, out_dir: str, model: str, model_id: str, *,
                  seg: str | None = None, tta: int | None = None,
                  threads: int | None = None, digest: str | None = None,
                  model_hash: str | None = None) -> dict:
    """Segment one image and write its derivatives (the Dask task).

    Returns ``{"image", "stem", "seconds", "stats": [...], ...}``.  Raises on a bad
    image; the caller records the reason.
    """
    import warnings

    from ._nifti_save import save_labels, save_map
    from .inference import run
    from .io import load_volume
    from .pipeline import AutoRegionsWarning, predict_array

    t0 = time.perf_counter()
    out = Path(out_dir)
    _set_threads(threads)
    paths = derivative_paths(out, image)
    seg_path = Path(seg) if seg else None
    digest = digest or input_hash(image.path, seg_path)
    vol = load_volume(image.path)
    regions = brain = None
    regions_source = "estimated from the image (no segmentation)"
    if seg_path is not None:
        from .regions import from_segmentation

        mapped = from_segmentation(seg_path, vol, lut="freesurfer")
        regions, brain = mapped.regions, mapped.brain
        regions_source = f"segmentation {seg_path}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AutoRegionsWarning)  # the driver says it once
        pred = run(predict_array(vol.data, vol.spacing, model, affine=vol.affine, roi=regions,
                                 brain=brain, modality=image_modality(image), tta=tta))
    paths["mask"].parent.mkdir(parents=True, exist_ok=True)
    paths["montage"].parent.mkdir(parents=True, exist_ok=True)
    # the old set is incomplete from here until the new record lands
    paths["record"].unlink(missing_ok=True)
    written = ["mask"]
    save_labels(paths["mask"], pred.labels, like=vol)
    if pred.probability is not None:
        save_map(paths["probseg"], pred.probability, like=vol)
        save_map(paths["uncertainty"], pred.uncertainty, like=vol)
        written += ["probseg", "uncertainty"]
    else:  # a model without maps (Frangi): no stale maps of an earlier model stay behind
        for key in ("probseg", "uncertainty"):
            paths[key].unlink(missing_ok=True)
            sidecar_path(paths[key]).unlink(missing_ok=True)
    if pred.probability is not None:
        for key, desc in (("probseg", "P(PVS) per voxel, on the source grid"),
                          ("uncertainty", "predictive uncertainty per voxel: the binary "
                           "entropy of P(PVS) (bits, 0-1), plus the variance over the "
                           "mirror flips when TTA runs")):
            _sidecar(paths[key], {"Description": desc, "Sources": [_source(out, image)]})
    columns = list(pred.table.columns)
    rows = [pred.table.row(i) for i in range(len(pred.table))]
    atomic_write_text(paths["clusters"], _tsv(rows, columns))
    _sidecar(paths["clusters"], _cluster_sidecar(columns))
    stats = region_stats(pred.table)
    atomic_write_text(paths["stats"], _tsv(stats, STATS_COLUMNS))
    _sidecar(paths["stats"], _STATS_SIDECAR)
    from ._bids_report import montage_png

    montage_png(paths["montage"], vol.data, pred.labels, vol.spacing)
    written += ["clusters", "stats", "montage"]
    seconds = time.perf_counter() - t0
    record = {"Description": "PVS labels (1) inside the WM and BG", "Type": "Label",
              "Sources": [_source(out, image)], "InputHash": digest, "ModelId": model_id,
              "ModelHash": model_hash,
              "Regions": regions_source, "Seconds": round(seconds, 2),
              "Outputs": written}
    atomic_write_text(paths["record"], json.dumps(record, indent=1))  # the commit point
    return {"image": str(image.path), "stem": image.stem, "entities": image.entities,
            "seconds": seconds, "stats": stats}


def image_task(image: BidsImage, out_dir: str, model: str, model_id: str, **kw) -> dict:
    """:func:`process_image`, with a failure returned as ``{"failed": reason}`` rather
    than raised: the worker then logs no traceback for a bad image.  An unexpected error
    (a bug, not bad input) keeps its traceback in ``logs/tracebacks/<stem>.txt``."""
    try:
        return process_image(image, out_dir, model, model_id, **kw)
    except Exception as exc:
        reason = _reason(exc)
        if not isinstance(exc, INPUT_ERRORS):
            import traceback

            tb = Path(out_dir) / "logs" / "tracebacks" / f"{image.stem}.txt"
            tb.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(tb, traceback.format_exc())
            reason += f" (traceback: {tb})"
        return {"failed": reason}


def image_modality(image: BidsImage) -> str:
    return "T1w" if image.suffix == "T1w" else "T2w"


def _source(out: Path, image: BidsImage) -> str:
    return f"bids:raw:{image.path.name}"


def sidecar_path(path: Path) -> Path:
    """The JSON sidecar of a ``.nii.gz`` or ``.tsv`` derivative."""
    name = path.name
    for ext in (".nii.gz", ".tsv"):
        if name.endswith(ext):
            name = name[: -len(ext)]
    return path.with_name(name + ".json")


def _sidecar(path: Path, content: dict) -> None:
    atomic_write_text(sidecar_path(path), json.dumps(content, indent=1))


def _dataset_description(out: Path, bids_dir: Path, ident: dict) -> None:
    from . import __version__

    desc = {"Name": "napari-pvs perivascular space segmentation", "BIDSVersion": "1.9.0",
            "DatasetType": "derivative",
            "GeneratedBy": [{"Name": "napari-pvs", "Version": __version__,
                             "Description": f"model {ident['id']}",
                             "ModelId": ident["id"], "ModelCard": ident["card"]}],
            "SourceDatasets": [{"URL": bids_dir.resolve().as_uri()}]}
    atomic_write_text(out / "dataset_description.json", json.dumps(desc, indent=1))
    ignore = out / ".bidsignore"
    if not ignore.exists():
        atomic_write_text(ignore, "logs/\ngroup/\n")


# ---------------------------------------------------------------------------- driver


def resolve_seg(seg: str, bids_dir: Path, image: BidsImage) -> Path | None:
    """The segmentation of ``image``: ``none``; ``auto`` (FreeSurfer, SynthSeg or
    fMRIPrep in the dataset's derivatives, :func:`napari_pvs.dataset.find_segmentation`,
    else None: regions estimated from the image); or a pattern relative to the dataset
    with ``{subject}`` and ``{session}`` (a missing file fails that image)."""
    if seg == "none":
        return None
    if seg == "auto":
        from .dataset import find_segmentation

        return find_segmentation(bids_dir, image.subject, image.session)
    try:
        rel = seg.format(subject=image.subject, session=image.session or "")
    except (KeyError, IndexError, ValueError) as exc:
        raise PVSInputError(f"--seg {seg!r}: only {{subject}} and {{session}} may be "
                            f"filled in ({exc})") from None
    path = Path(rel) if Path(rel).is_absolute() else bids_dir / rel
    if not path.is_file():
        raise PVSInputError(f"--seg: {path} (for {image.path.name}) does not exist; fix "
                            "the pattern, or use --seg auto or none")
    return path


def default_workers() -> int:
    """Workers of the local cluster: 1, with every core's thread.  Measured on this
    project's 2-core machine (``benchmarks/bench_cohort.py``, 12 phantoms of 160 mm):
    1 worker x 2 threads 5.3 images/min, 2 workers x 1 thread 4.7.  On bigger nodes, try
    ``--workers`` (each worker gets ``cores / workers`` threads)."""
    return 1


class _Cluster:
    """A Dask client: on a new ``LocalCluster``, or joining a scheduler."""

    def __init__(self, workers: int, threads: int, scheduler: str | None,
                 scheduler_file: str | None):
        import logging

        from dask.distributed import Client, LocalCluster

        self.cluster = None
        if scheduler_file:
            self.client = Client(scheduler_file=str(scheduler_file), timeout="30s")
        elif scheduler:
            self.client = Client(scheduler, timeout="30s")
        else:
            self.cluster = LocalCluster(n_workers=workers, threads_per_worker=1,
                                        processes=True, dashboard_address=None,
                                        silence_logs=logging.ERROR,
                                        env={"OMP_NUM_THREADS": str(threads)})
            self.client = Client(self.cluster)

    def __enter__(self):
        return self.client

    def __exit__(self, *exc):
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()


def _read_failed(out: Path) -> dict[str, str]:
    try:
        data = json.loads((out / FAILED_LOG).read_text())
        return {str(k): str(v) for k, v in data.items()}
    except (OSError, ValueError, AttributeError):
        return {}


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    if type(exc).__name__ == "KilledWorker":
        return "its worker died on every try (out of memory?): " + text
    if isinstance(exc, INPUT_ERRORS):
        return text
    return f"{type(exc).__name__}: {text}"


def run_participant(bids_dir, out_dir, *, model: str = "starter", participants=None,
                    sessions=None, seg: str = "auto", tta: int | None = None,
                    workers: int | None = None, scheduler: str | None = None,
                    scheduler_file: str | None = None, reader: str = "pybids",
                    suffix: str | None = None, log=print, progress=None) -> ParticipantResult:
    """The participant level (see the module docstring); returns what it did.

    ``log(line)``: a line per image (and the plan); ``progress(event)``: an
    :class:`~napari_pvs.inference.Progress` per finished image (the CLI's bar).
    """
    t0 = time.perf_counter()
    bids_dir, out = Path(bids_dir), Path(out_dir)
    ident = model_identity(model)
    suffix = suffix or ident["modality"] or "T2w"
    images = find_images(bids_dir, suffix, participants=participants, sessions=sessions,
                         reader=reader)
    if not images:
        raise PVSInputError(f"{bids_dir}: no anat/*_{suffix}.nii[.gz] image"
                            + (" of the given participants/sessions" if participants
                               or sessions else "") + "; check the dataset and --modality")
    if out.resolve() == bids_dir.resolve():
        raise PVSInputError("OUTPUT_DIR is the BIDS dataset itself; give a derivatives "
                            "folder, e.g. BIDS_DIR/derivatives/napari-pvs")
    out.mkdir(parents=True, exist_ok=True)
    _dataset_description(out, bids_dir, ident)
    res = ParticipantResult(found=len(images))
    failed = _read_failed(out)
    todo = []
    for im in images:
        key = str(im.path)
        try:
            seg_path = resolve_seg(seg, bids_dir, im)
            digest = input_hash(im.path, seg_path)
        except (PVSInputError, OSError) as exc:
            res.failed[key] = _reason(exc)
            continue
        if is_done(out, im, digest, ident["id"], ident["hash"]):
            res.skipped.append(key)
            failed.pop(key, None)
        else:
            todo.append((im, seg_path, digest))
    estimated = sum(seg_path is None for _, seg_path, _ in todo)
    if estimated:
        import warnings

        from .pipeline import AutoRegionsWarning

        warnings.warn(f"{estimated} of the images to compute have no segmentation (--seg "
                      f"{seg}): their WM and BG are estimated from the image, so their "
                      "counts are not those of real regions", AutoRegionsWarning, stacklevel=2)
    log(f"{len(images)} {suffix} images: {len(todo)} to compute, {len(res.skipped)} "
        f"already done with model {ident['id']}, {len(res.failed)} failed before starting")
    if todo:
        n_workers = workers or default_workers()
        # a local cluster shares this machine's cores; a remote one's workers keep the
        # threads their cluster gave them (dask-jobqueue sets them per job)
        threads = None if scheduler or scheduler_file \
            else max(1, (os.cpu_count() or 1) // n_workers)
        with _Cluster(n_workers, threads, scheduler, scheduler_file) as client:
            _compute(client, todo, out, model, ident, tta, threads, res, log, progress)
    for key in res.computed:
        failed.pop(key, None)
    failed.update(res.failed)
    (out / FAILED_LOG).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / FAILED_LOG, json.dumps(failed, indent=1))
    res.seconds = time.perf_counter() - t0
    return res


def _compute(client, todo, out: Path, model: str, ident: dict, tta, threads,
             res: ParticipantResult, log, progress) -> None:
    from dask.distributed import as_completed

    from .inference import Progress

    futures = {}
    spec = _model_spec(model)
    for im, seg_path, digest in todo:
        fut = client.submit(image_task, im, str(out), spec, ident["id"],
                            seg=None if seg_path is None else str(seg_path), tta=tta,
                            threads=threads, digest=digest, model_hash=ident["hash"],
                            pure=False,
                            key=f"pvs-{im.stem}-{digest[:12]}")
        futures[fut] = im
    for done, fut in enumerate(as_completed(futures), start=1):
        im = futures[fut]
        try:
            r = fut.result()
        except Exception as exc:  # the worker died on every try: recorded, go on
            r = {"failed": _reason(exc)}
        if "failed" in r:
            res.failed[str(im.path)] = r["failed"]
            log(f"FAILED {im.path.name}: {r['failed']}")
        else:
            res.computed.append(str(im.path))
            n = {s["region"]: s["count"] for s in r["stats"]}
            log(f"{im.stem}: {n.get('all', 0)} PVS (WM {n.get('WM', 0)}, BG {n.get('BG', 0)}) "
                f"in {r['seconds']:.1f} s")
        if progress is not None:
            progress(Progress(done, len(futures), im.stem))
        fut.release()


def _read_tsv(path: Path) -> list[dict]:
    lines = path.read_text().splitlines()
    head = lines[0].split("\t")
    return [dict(zip(head, line.split("\t"), strict=True)) for line in lines[1:] if line]


GROUP_COLUMNS = ("image", "subject", "session", "acquisition", "run", "model",
                 *(f"{k}_{r}" for r in REGIONS for k in ("count", "volume_mm3",
                                                          "median_cluster_mm3")),
                 "z_count", "z_volume", "outlier", "seconds")


def run_group(bids_dir, out_dir, *, participants=None, sessions=None, suffix: str = "T2w",
              reader: str = "pybids", log=print) -> tuple[int, int]:
    """The group level: ``group/pvs_stats.tsv``, ``group/failed.tsv`` and
    ``group/report.html`` from the participant level's outputs.  Returns
    ``(images with outputs, images failed or missing)``."""
    from ._bids_report import robust_z, write_report

    bids_dir, out = Path(bids_dir), Path(out_dir)
    if not (out / "dataset_description.json").is_file():
        raise PVSInputError(f"{out}: no participant-level outputs (no "
                            "dataset_description.json); run the participant level first")
    images = find_images(bids_dir, suffix, participants=participants, sessions=sessions,
                         reader=reader)
    reasons = _read_failed(out)
    rows, failed = [], []
    for im in images:
        paths = derivative_paths(out, im)
        base = {"image": im.path.name, "subject": im.subject, "session": im.session or "",
                "acquisition": im.entities.get("acquisition", ""),
                "run": im.entities.get("run", "")}
        try:
            rec = json.loads(paths["record"].read_text())
            stats = {s["region"]: s for s in _read_tsv(paths["stats"])}
        except (OSError, ValueError, KeyError):
            reason = reasons.get(str(im.path), "no outputs: the participant level has not "
                                 "processed it (run it for this participant)")
            failed.append({**base, "reason": reason})
            continue
        row = {**base, "model": rec.get("ModelId", ""), "seconds": rec.get("Seconds"),
               "montage": paths["montage"]}
        for r in REGIONS:
            for k in ("count", "volume_mm3", "median_cluster_mm3"):
                row[f"{k}_{r}"] = float(stats.get(r, {}).get(k, "nan"))
            row[f"count_{r}"] = int(row[f"count_{r}"]) if np.isfinite(row[f"count_{r}"]) \
                else None
        rows.append(row)
    zc = robust_z([r["count_all"] for r in rows])
    zv = robust_z([r["volume_mm3_all"] for r in rows])
    for r, c, v in zip(rows, zc, zv, strict=True):
        r["z_count"], r["z_volume"] = float(c), float(v)
        r["flags"] = [f for f, z in (("count outlier", c), ("volume outlier", v)) if abs(z) > 3]
        r["outlier"] = int(bool(r["flags"]))
    group = out / "group"
    group.mkdir(parents=True, exist_ok=True)
    atomic_write_text(group / "pvs_stats.tsv", _tsv(rows, GROUP_COLUMNS))
    atomic_write_text(group / "failed.tsv",
                      _tsv(failed, ("image", "subject", "session", "reason")))
    models = sorted({r["model"] for r in rows}) or ["none"]
    write_report(group / "report.html", rows, failed,
                 f"napari-pvs QC: {bids_dir.resolve().name}", ", ".join(models))
    log(f"group: {len(rows)} images in group/pvs_stats.tsv, {len(failed)} in "
        f"group/failed.tsv, {sum(r['outlier'] for r in rows)} outliers; report: "
        f"{group / 'report.html'}")
    return len(rows), len(failed)
