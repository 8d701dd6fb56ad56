"""``napari-pvs store ...``: create, import into, commit to, export and list a store."""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["add_store_parser", "export_store", "import_folder"]


def import_folder(store, folder: str | Path, progress=print) -> int:
    """Import every subject of a BIDS-like / phantom folder; returns the count."""
    from .dataset import read_cohort
    from .io import load_volume
    from .pipeline import load_roi

    n = 0
    for s in read_cohort(folder):
        vol = load_volume(s.image)
        regions = None if s.regions is None else load_roi(s.regions, vol)
        store.add_subject(s.subject, vol, site=s.site, modality=s.modality, regions=regions)
        if s.labels is not None:
            lab = load_volume(s.labels, as_labels=True)
            store.commit_labels(s.subject, lab.data, author="import", source="import",
                                affine=lab.affine)
        n += 1
        progress(f"imported {s.subject} (site {s.site}, {s.modality}"
                 f"{', labels' if s.labels else ''}{', regions' if s.regions else ''})")
    return n


def export_store(store, outdir: str | Path) -> list[Path]:
    """Write each subject's latest labels to ``OUTDIR/<subject>_pvs.nii.gz`` (source geometry)."""
    import numpy as np

    from .io import geometry_from_affine, save_labels

    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    written = []
    for sid in store.subjects():
        info = store.info(sid)
        if info["latest"] is None:
            continue
        like = geometry_from_affine(np.asarray(info["affine"]), tuple(info["shape"]),
                                    sform_code=int(info.get("sform_code") or 0),
                                    qform_code=int(info.get("qform_code") or 0),
                                    qform=None if info.get("qform") is None else np.asarray(info["qform"]))
        labels = np.asarray(store.labels(sid)[...])
        written.append(save_labels(outdir / f"{sid}_pvs.nii.gz", labels, like=like))
    return written


def _cmd(args: argparse.Namespace) -> int:
    from .store import CorrectionsStore

    if args.store_command == "init":
        CorrectionsStore.create(args.store).close()
        print(f"created {args.store}")
        return 0
    if args.store_command in ("ls", "export"):
        store = CorrectionsStore.open(args.store)
        if args.store_command == "export":
            files = export_store(store, args.outdir)
            print(f"exported the latest labels of {len(files)} subjects to {args.outdir}")
            return 0
        print(f"{'subject':<16} {'site':<10} {'modality':<8} {'status':<11} {'versions':>8} "
              f"{'latest':>6}  predictions")
        for sid in store.subjects():
            info = store.info(sid)
            print(f"{sid:<16} {info['site']:<10} {info['modality']:<8} {info['status']:<11} "
                  f"{len(store.version_numbers(sid)):>8} {info['latest'] or '-':>6}  "
                  f"{', '.join(store.predictions(sid)) or '-'}")
        return 0
    with CorrectionsStore.open(args.store, writable=True, wait=args.wait) as store:
        if args.store_command == "import":
            n = import_folder(store, args.folder)
            print(f"imported {n} subjects into {args.store}")
        elif args.store_command == "commit":
            from .io import load_volume

            lab = load_volume(args.labels, as_labels=True)
            v = store.commit_labels(args.subject, lab.data, author=args.author, source="manual",
                                    affine=lab.affine)
            print(f"{args.subject}: committed label version {v}")
    return 0


def add_store_parser(sub) -> None:
    p = sub.add_parser("store", help="the zarr corrections store (NAME.pvs.zarr)")
    ssub = p.add_subparsers(dest="store_command", required=True)
    c = ssub.add_parser("init", help="create an empty store")
    c.add_argument("store")
    c = ssub.add_parser("import", help="import a BIDS-like / phantom folder")
    c.add_argument("store")
    c.add_argument("folder")
    c = ssub.add_parser("commit", help="add a new label version from a NIfTI file")
    c.add_argument("store")
    c.add_argument("subject")
    c.add_argument("labels")
    c.add_argument("--author", required=True)
    c = ssub.add_parser("export", help="write the latest labels to NIfTI")
    c.add_argument("store")
    c.add_argument("outdir")
    c = ssub.add_parser("ls", help="list subjects, sites, status and versions")
    c.add_argument("store")
    for name in ("import", "commit"):
        ssub.choices[name].add_argument("--wait", type=float, default=0.0,
                                        help="seconds to wait for another writer's lock")
    p.set_defaults(func=_cmd)
