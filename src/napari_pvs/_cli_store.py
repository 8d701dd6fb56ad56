"""``napari-pvs store ...``: create, import into, commit to, export, list and verify a store."""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ._cli_common import ProgressReport, add_out
from ._errors import PVSInputError
from .dataset import read_cohort
from .inference import Progress
from .io import geometry_from_affine, load_volume, save_labels
from .pipeline import load_roi
from .store import (
    CorrectionsStore,
    StoreCorruptError,
    StoreWarning,
    StoreWriteError,
    _sha256,
)

__all__ = ["ImportReport", "add_store_parser", "export_store", "import_folder"]


@dataclass
class ImportReport:
    """What :func:`import_folder` did: subject ids imported / skipped, and one
    ``"<subject>: <file and reason>"`` line per subject that could not be imported."""

    imported: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


def _same_image(store, sid: str, info: dict, vol) -> bool:
    if info.get("image_sha256") and vol.sha256:
        return info["image_sha256"] == vol.sha256
    data = np.asarray(vol.data, dtype=np.float32)
    recorded = store.image(sid).attrs.get("sha256")
    if recorded is not None:
        return recorded == _sha256(data)
    return tuple(info["shape"]) == data.shape and np.array_equal(store.read_image(sid), data)


def _import_one(store, s, have: set, report: ImportReport, progress) -> None:
    """Import (or skip, or complete) one subject of the cohort; record it in ``report``."""
    try:
        vol = load_volume(s.image)
        if s.subject in have:
            info = store.info(s.subject)
            if not _same_image(store, s.subject, info, vol):
                raise PVSInputError(
                    f"{s.image}: subject {s.subject} is already in the store with another "
                    f"image (imported from {info.get('source') or 'elsewhere'}); rename one "
                    "of them")
            if s.labels is not None and info["latest"] is None:  # imported by an older version
                lab = load_volume(s.labels, as_labels=True)
                store.commit_labels(s.subject, lab.data, author="import", source="import",
                                    affine=lab.affine)
                progress(f"completed {s.subject}: added its labels")
            else:
                progress(f"skipped {s.subject}: already imported (same image)")
            report.skipped.append(s.subject)
            return
        regions, regions_meta = _regions_of(s, vol)
        lab = None if s.labels is None else load_volume(s.labels, as_labels=True)
        store.add_subject(s.subject, vol, site=s.site, modality=s.modality, regions=regions,
                          regions_meta=regions_meta, labels=None if lab is None else lab.data,
                          labels_affine=None if lab is None else lab.affine)
    except StoreWriteError:
        raise  # the disk is full or the store unwritable: the next subjects would fail too
    except PVSInputError as exc:
        report.failed.append(f"{s.subject}: {exc}")
        progress(f"failed {s.subject} (reported at the end)")
        return
    have.add(s.subject)
    report.imported.append(s.subject)
    regions_from = (", regions" if s.regions else
                    f", regions from {s.segmentation.name}" if s.segmentation else "")
    progress(f"imported {s.subject} (site {s.site}, {s.modality}"
             f"{', labels' if s.labels else ''}{regions_from})")


def _regions_of(s, vol) -> tuple[np.ndarray | None, dict | None]:
    """The subject's region map: its regions file, else one mapped from its aseg-style
    segmentation (:func:`napari_pvs.regions.from_segmentation`), with where it came from."""
    if s.regions is not None:
        return load_roi(s.regions, vol), {"source": str(s.regions)}
    if s.segmentation is not None:
        from .regions import from_segmentation

        mapped = from_segmentation(s.segmentation, vol)
        return mapped.regions, mapped.meta
    return None, None


def import_folder(store, folder: str | Path, progress=print,
                  tick: Callable[[Progress], None] | None = None) -> ImportReport:
    """Import every subject of a BIDS-like / phantom folder into a writable store.

    Each subject (image, regions, labels) is imported in one atomic step.  Subjects
    already in the store with the same image are skipped (one imported before its
    labels existed gets them now), so a re-run finishes an interrupted or partly
    failed import.  Subjects whose files cannot be read, or whose id is taken by
    another image, are collected in the report; the others are imported.  ``progress``
    gets one line per subject; ``tick``, after each subject, a :class:`Progress`
    (subjects done of all).
    """
    report = ImportReport()
    have = set(store.subjects())
    cohort = read_cohort(folder)
    for i, s in enumerate(cohort):
        _import_one(store, s, have, report, progress)
        if tick is not None:
            tick(Progress(i + 1, len(cohort)))
    return report


def export_store(store, outdir: str | Path) -> list[Path]:
    """Write each subject's latest labels to ``OUTDIR/<subject>_pvs.nii.gz`` (source geometry).

    Only checked labels are written: subjects whose latest version is damaged are not
    exported, and a :class:`~napari_pvs.store.StoreCorruptError` (one subject) or a
    :class:`PVSInputError` (several) names them after the others are written.
    """
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    written, damaged = [], []
    for sid in store.subjects():
        try:
            info = store.info(sid)
            if info["latest"] is None:
                continue
            labels = store.read_labels(sid)
        except StoreCorruptError as exc:
            damaged.append(exc)
            continue
        qform = None if info.get("qform") is None else np.asarray(info["qform"])
        like = geometry_from_affine(np.asarray(info["affine"]), tuple(info["shape"]),
                                    sform_code=int(info.get("sform_code") or 0),
                                    qform_code=int(info.get("qform_code") or 0), qform=qform)
        written.append(save_labels(outdir / f"{sid}_pvs.nii.gz", labels, like=like))
    others = f"; the other {len(written)} subjects were exported to {outdir}" if written else ""
    if len(damaged) == 1:
        raise PVSInputError(f"not exported: {damaged[0]}{others}")
    if damaged:
        listed = "; ".join(f"{e.where} ({e.detail})" for e in damaged)
        raise PVSInputError(f"not exported, damaged: {listed}{others}; restore the store folder "
                            f"from a backup (`napari-pvs store verify {store.path}` lists all "
                            "damage)")
    return written


def _verify(path: str) -> int:
    if not (Path(path) / "zarr.json").is_file():
        CorrectionsStore.open(path)  # raises the usual "not a store" error
    try:
        store = CorrectionsStore.open(path)
    except PVSInputError as exc:
        print(f"store metadata: {exc}")
        print(f"{path}: 1 problem found")
        return 1
    problems, counts = store.verify()
    for line in problems:
        print(line, flush=True)
    checked = ", ".join(f"{counts.get(k, 0)} {k}" for k in
                        ("subjects", "label versions", "predictions", "models", "events"))
    notes = "".join(f"; {counts[k]} {k}" for k in ("not checksummed", "leftovers",
                                                   "torn last event line") if counts.get(k))
    verdict = (f"{len(problems)} problem{'s' * (len(problems) != 1)} found" if problems
               else "no damage found")
    print(f"{path}: checked {checked}{notes}: {verdict}")
    return 1 if problems else 0


def _show_store_warnings():
    """Show :class:`StoreWarning` as one ``napari-pvs: warning:`` line on stderr."""
    shown = warnings.showwarning

    def show(message, category, *args, **kwargs):
        if issubclass(category, StoreWarning):
            print(f"napari-pvs: warning: {message}", file=sys.stderr, flush=True)
        else:
            shown(message, category, *args, **kwargs)

    warnings.simplefilter("always", StoreWarning)
    warnings.showwarning = show


def _cmd(args: argparse.Namespace) -> int:
    with warnings.catch_warnings():
        _show_store_warnings()
        return _run(args)


def _ls(store) -> None:
    """One line per subject; ``labels`` is the latest version's kind (full, review: only
    the reviewed clusters and painted voxels are known, or none)."""
    print(f"{'subject':<16} {'site':<10} {'modality':<8} {'status':<11} {'versions':>8} "
          f"{'latest':>6} {'labels':<7}  predictions")
    for sid in store.subjects():
        info = store.info(sid)
        print(f"{sid:<16} {info['site']:<10} {info['modality']:<8} {info['status']:<11} "
              f"{len(store.version_numbers(sid)):>8} {info['latest'] or '-':>6} "
              f"{store.labels_kind(sid):<7}  {', '.join(store.predictions(sid)) or '-'}")


def _import(store, args: argparse.Namespace) -> int:
    bar = ProgressReport("import")
    report = import_folder(store, args.folder, progress=bar.note, tick=bar)
    for line in report.failed:
        print(f"napari-pvs: error: could not import {line}", file=sys.stderr)
    print(f"{args.store}: imported {len(report.imported)}, skipped {len(report.skipped)} "
          f"already imported, failed {len(report.failed)}"
          + ("; fix the files above and run the same import again (imported subjects "
             "are skipped)" if report.failed else ""), flush=True)
    return 1 if report.failed else 0


def _run(args: argparse.Namespace) -> int:
    if args.store_command == "init":
        CorrectionsStore.create(args.store).close()
        print(f"created {args.store}")
        return 0
    if args.store_command == "verify":
        return _verify(args.store)
    if args.store_command == "ls":
        _ls(CorrectionsStore.open(args.store))
        return 0
    if args.store_command == "export":
        files = export_store(CorrectionsStore.open(args.store), args.out)
        print(f"exported the latest labels of {len(files)} subjects to {args.out}")
        return 0
    with CorrectionsStore.open(args.store, writable=True, wait=args.wait) as store:
        if args.store_command == "import":
            return _import(store, args)
        lab = load_volume(args.labels, as_labels=True)
        v = store.commit_labels(args.subject, lab.data, author=args.author, source="manual",
                                affine=lab.affine)
        print(f"{args.subject}: committed label version {v}")
    return 0


_STORE = "store folder (NAME.pvs.zarr)"


def add_store_parser(sub) -> None:
    """Register ``store`` and its subcommands."""
    p = sub.add_parser("store", help="the zarr corrections store (NAME.pvs.zarr)")
    ssub = p.add_subparsers(dest="store_command", required=True)
    c = ssub.add_parser("init", help="create an empty store")
    c.add_argument("store", help="new store folder (NAME.pvs.zarr)")
    c = ssub.add_parser("import", help="import a BIDS-like / phantom folder (re-run to resume)")
    c.add_argument("store", help=_STORE)
    c.add_argument("folder", help="BIDS-like folder: sub-*/anat/*_T2w.nii.gz (or _T1w), with "
                                  "participants.tsv naming the sites")
    c = ssub.add_parser("commit", help="add a new label version from a NIfTI file")
    c.add_argument("store", help=_STORE)
    c.add_argument("subject", help="subject id in the store (e.g. siteA01)")
    c.add_argument("labels", help="PVS labels (NIfTI) on the subject's image grid")
    c.add_argument("--author", required=True, help="who made the labels (kept with the version)")
    c = ssub.add_parser("export", help="write the latest labels to NIfTI")
    c.add_argument("store", help=_STORE)
    add_out(c, "output folder: <subject>_pvs.nii.gz each", positional="OUTDIR")
    c = ssub.add_parser("ls", help="list subjects, sites, status, versions and the latest "
                        "labels' kind (full, review, none)")
    c.add_argument("store", help=_STORE)
    c = ssub.add_parser("verify", help="check every version, image, prediction, model and the "
                        "event log; exit 1 if anything is damaged")
    c.add_argument("store", help=_STORE)
    for name in ("import", "commit"):
        ssub.choices[name].add_argument("--wait", type=float, default=0.0,
                                        help="seconds to wait for another writer's lock")
    p.set_defaults(func=_cmd)
