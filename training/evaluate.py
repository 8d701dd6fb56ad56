"""Cross-validated evaluation of fine-tuning: k-fold or leave-one-site-out (LOSOCV).

:func:`evaluate` is a generator: for every fold it fine-tunes one model on the fold's
training subjects (:func:`napari_pvs.training.finetune.finetune`, no inner
validation), predicts each held-out subject's whole image and scores it against the
subject's newest corrected label version, by region (WM = 1, BG = 2 in the region
map).  It yields :class:`EvaluateEvent` and returns an :class:`EvaluationReport`.
Torch is seeded with ``config.seed`` before each fold, so a fold's network starts from
the same weights whatever ran before it in the process.

Splits
------
``kfold:K`` splits the corrected subjects with a seeded K-fold; ``losocv`` holds out
one site per fold.  The splits are saved in the store as
``splits/kfold<K>_seed<S>.json`` or ``splits/losocv.json`` on the first run and reused
afterwards (nnU-Net's ``splits_final.json`` convention), so repeated evaluations, and
models trained at different times, are scored on the same held-out subjects.

A saved file is trusted as long as it still fits the store:

* a subject it lists that no longer has corrected labels is an error
  (:class:`~napari_pvs.PVSInputError`): delete the file to recreate the splits, or
  use another seed;
* subjects corrected after the file was written are left out of the evaluation with
  a warning (they would change the folds); delete the file to include them;
* a fold that validates on a training subject, or (LOSOCV) on a site that it also
  trains on, is an error.

Outputs (in ``out_dir``)
------------------------
``results.csv``
    One row per held-out subject: fold, subject, site, WM / BG / all voxel and
    cluster Dice, model id.
``summary.md``
    Markdown tables laid out as the MedNet-PVS paper's: one row per fold (per
    left-out site for LOSOCV) holding the mean ± sd over its held-out subjects, a last
    ``mean ± sd`` row over the fold means; then the same metrics per site.
``boxplot.png``
    Per-site box plots of the four metrics (2 x 2 panels), drawn with Agg.
``fold_<k>/work``
    The fold's training folder (checkpoint); the fold models go to the store's registry.
"""

from __future__ import annotations

import os
import re
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from napari_pvs._errors import PVSInputError
from napari_pvs.inference import predict_volume, run
from napari_pvs.metrics import score
from napari_pvs.model import checkpoint_hash

from .data import corrected_versions
from .finetune import FinetuneConfig, FinetuneEvent, finetune
from .report import COLUMNS, METRICS, EvaluationReport, fold_stats, write_report
from .splits import kfold_splits, load_or_create_splits, losocv_splits
from .trainer import relay

__all__ = ["COLUMNS", "METRICS", "EvaluateEvent", "EvaluationReport", "evaluate",
           "parse_scheme", "scheme_name"]

@dataclass(frozen=True)
class EvaluateEvent:
    """Progress of :func:`evaluate`.

    Attributes
    ----------
    kind : str
        ``"splits"`` (splits loaded or created), ``"fold"`` (a fold starts),
        ``"train"`` (a fine-tuning event, in ``train``), ``"subject"`` (a held-out
        subject scored, its results row in ``row``), ``"fold_done"`` or ``"done"``.
    fold : int or None
        Fold index (0-based); None for ``"splits"`` and ``"done"``.
    n_folds : int
        Number of folds.
    done, total : int
        Overall progress in work units (training iterations + predicted subjects).
    message : str
        One line for a log or a status bar.
    train : FinetuneEvent, optional
        The fine-tuning event of a ``"train"`` event.
    row : dict, optional
        The results row of a ``"subject"`` event.
    """

    kind: str
    fold: int | None
    n_folds: int
    done: int
    total: int
    message: str = ""
    train: FinetuneEvent | None = None
    row: dict | None = None


def parse_scheme(scheme: str) -> tuple[str, int | None]:
    """``"kfold:K"`` -> ``("kfold", K)``; ``"losocv"`` -> ``("losocv", None)``.

    Raises
    ------
    ValueError
        Any other string, or K < 2.
    """
    s = str(scheme).strip().lower()
    if s == "losocv":
        return "losocv", None
    m = re.fullmatch(r"kfold:(\d+)", s)
    if m is None:
        raise ValueError(f"unknown evaluation scheme {scheme!r}; use 'kfold:K' (e.g. kfold:5) "
                         "or 'losocv'")
    k = int(m.group(1))
    if k < 2:
        raise ValueError(f"k-fold needs at least 2 folds, got {scheme!r}")
    return "kfold", k


def scheme_name(scheme: str, seed: int = 12345) -> str:
    """File stem of a scheme's splits: ``kfold5_seed12345`` or ``losocv``."""
    kind, k = parse_scheme(scheme)
    return "losocv" if kind == "losocv" else f"kfold{k}_seed{int(seed)}"


def _splits(path: Path, kind: str, k: int | None, seed: int, versions: dict, sites: dict):
    """Load or create the splits and check that they still fit the store."""
    def make():
        if kind == "losocv":
            return losocv_splits(sites)
        return kfold_splits(sorted(versions), k=k, seed=seed)

    try:
        splits = load_or_create_splits(path, make)
    except ValueError as exc:  # too few subjects / sites for the scheme, or a broken file
        raise PVSInputError(f"cannot use {kind} splits: {exc}") from None
    fix = f"delete {path} to recreate the splits"
    fix += " or use another seed" if kind == "kfold" else ""
    listed = set().union(*(set(f["train"]) | set(f["val"]) for f in splits))
    gone = sorted(listed - set(versions))
    if gone:
        raise PVSInputError(f"the saved splits {path} list subjects without corrected labels in "
                            f"the store: {gone}; {fix}")
    for i, f in enumerate(splits):
        if not f["val"] or set(f["train"]) & set(f["val"]):
            raise PVSInputError(f"fold {i} of {path} has no held-out subject or trains on one; "
                                f"{fix}")
        if kind == "losocv":
            held, trained = {sites[s] for s in f["val"]}, {sites[s] for s in f["train"]}
            if len(held) != 1 or held & trained:
                raise PVSInputError(f"fold {i} of {path} does not hold out exactly one site (held "
                                    f"out {sorted(held)}, trained on {sorted(trained)}); {fix}")
    new = sorted(set(versions) - listed)
    if new:
        warnings.warn(f"{len(new)} corrected subject(s) are not in the saved splits {path} and are "
                      f"left out of this evaluation: {new}; {fix} to include them (the folds then "
                      "change)", UserWarning, stacklevel=3)
    return splits, new


def _seed_torch(seed: int) -> None:
    import torch

    torch.manual_seed(int(seed))


def _score_subject(store, sid: str, version: int, net, meta, *, cache_key, backend, device,
                   cancel) -> dict:
    info = store.info(sid)
    regions = store.read_regions(sid)
    image = np.asarray(store.read_image(sid), dtype=np.float32)
    pred = run(predict_volume(image, tuple(info["spacing"]), net, meta, roi=regions > 0,
                              backend=backend, device=device, cache_key=cache_key, cancel=cancel))
    ref = store.read_labels(sid, version)
    s = score(pred.labels, ref, regions)
    return {f"{r.lower()}_{m}": float(s[r][m]) for r in ("WM", "BG", "all")
            for m in ("voxel_dice", "cluster_dice")}


def _fold(store, i, n, f, done, total, versions, sites, *, config, out, init, backend, cancel,
          wait):
    """Train fold ``i`` and score its held-out subjects; a generator returning
    ``(model id, rows)``."""
    _seed_torch(config.seed)  # finetune builds a new network before it seeds torch
    gen = finetune(store, init=init, config=config, work_dir=out / f"fold_{i}" / "work",
                   cancel=cancel, train_subjects=f["train"], val_subjects=[], wait=wait)
    model_id = yield from relay(gen, lambda ev: EvaluateEvent(
        "train", i, n, done + ev.iteration, total, ev.message, train=ev))
    done += config.iterations
    net, meta = store.models.load(model_id)
    key = checkpoint_hash(store.models.path(model_id))
    rows = []
    for sid in f["val"]:
        row = {"fold": i, "subject": sid, "site": sites[sid],
               **_score_subject(store, sid, versions[sid], net, meta, cache_key=key,
                                backend=backend, device=config.device, cancel=cancel),
               "model_id": model_id}
        rows.append(row)
        yield EvaluateEvent("subject", i, n, done + len(rows), total,
                            f"{sid} ({sites[sid]}): WM cluster Dice "
                            f"{row['wm_cluster_dice']:.3f}, BG cluster Dice "
                            f"{row['bg_cluster_dice']:.3f}", row=row)
    return model_id, rows


def evaluate(store, scheme: str, *, config: FinetuneConfig, out_dir: str | os.PathLike[str],
             seed: int = 12345, init=None, backend: str = "auto",
             cancel: threading.Event | None = None, wait: float = 30.0):
    """Cross-validate fine-tuning on the store's corrections; a generator.

    Parameters
    ----------
    store : CorrectionsStore
        Opened read-only (or writable): the label versions are read without the write
        lock, which is taken (waiting up to ``wait`` seconds) only to register each fold's
        model, so corrections can be saved while an evaluation runs.  The splits are
        saved under ``store.path / "splits"`` (atomically).
    scheme : str
        ``"kfold:K"`` or ``"losocv"``.
    config : FinetuneConfig
        Training settings of every fold (``val_fraction`` is not used: the folds fix
        the subjects); ``config.device`` also runs the predictions.
    out_dir : path-like
        Receives ``results.csv``, ``summary.md``, ``boxplot.png`` and the folds'
        training folders ``fold_<k>/work``.
    seed : int
        Seed of the k-fold split (part of the splits file name).
    init : str, optional
        Model id or checkpoint every fold starts from (default: a new network).
    backend : str
        Prediction backend (``"auto"``: OpenVINO / ONNX Runtime on the CPU when
        installed, else torch).
    cancel : threading.Event, optional
        Stops training or prediction when set.
    wait : float
        Seconds to wait for the store's write lock when registering a fold's model.

    Yields
    ------
    EvaluateEvent

    Returns
    -------
    EvaluationReport

    Raises
    ------
    PVSInputError
        Unknown scheme, too few corrected subjects or sites, a subject without a
        region map, or saved splits that no longer fit the store.
    """
    # 40 lines of code: over 60 lines only through the numpydoc docstring above
    try:
        kind, k = parse_scheme(scheme)
    except ValueError as exc:
        raise PVSInputError(str(exc)) from None
    versions = corrected_versions(store)
    if len(versions) < 2:
        raise PVSInputError(f"{store.path} has {len(versions)} corrected subject(s); "
                            "cross-validation needs at least 2")
    sites = {s: str(store.info(s).get("site", "unknown")) for s in versions}
    path = Path(store.path) / "splits" / f"{scheme_name(scheme, seed)}.json"
    splits, left_out = _splits(path, kind, k, seed, versions, sites)
    no_regions = sorted(s for f in splits for s in f["val"] if store.regions(s) is None)
    if no_regions:
        raise PVSInputError(f"subjects without a region map (WM = 1, BG = 2) cannot be scored by "
                            f"region: {no_regions}; import them with their regions")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n = len(splits)
    total = sum(config.iterations + len(f["val"]) for f in splits)
    done = 0
    yield EvaluateEvent("splits", None, n, done, total,
                        f"{scheme}: {n} folds from {path}"
                        + (f"; {len(left_out)} new subject(s) left out" if left_out else ""))
    rows, folds = [], []
    for i, f in enumerate(splits):
        label = f", {f['site']} left out" if kind == "losocv" else ""
        yield EvaluateEvent("fold", i, n, done, total,
                            f"fold {i} ({i + 1}/{n}{label}): training on {len(f['train'])} "
                            f"subjects, holding out {len(f['val'])}")
        model_id, fold_rows = yield from _fold(store, i, n, f, done, total, versions, sites, config=config,
                                     out=out, init=init, backend=backend, cancel=cancel, wait=wait)
        done += config.iterations + len(fold_rows)
        rows += fold_rows
        folds.append({"fold": i, "label": f.get("site", f"fold {i}"), "n": len(fold_rows),
                      "model_id": model_id, **fold_stats(fold_rows)})
        means = ", ".join(f"{lab} {folds[-1][m][0]:.3f}" for m, lab in METRICS)
        yield EvaluateEvent("fold_done", i, n, done, total, f"fold {i} ({i + 1}/{n}) done: {means}")
    report = write_report(scheme, kind, k, path, out, rows, folds, left_out)
    yield EvaluateEvent("done", None, n, total, total, f"wrote {report.summary_md}")
    return report


