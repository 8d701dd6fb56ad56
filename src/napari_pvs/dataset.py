"""The BIDS-like folder layout of a cohort, as ``napari-pvs phantom`` writes it.

::

    OUTDIR/
      dataset_description.json
      participants.tsv            participant_id, site, modality, voxel_size_mm, ...
      participants.json           what each column means
      sub-<id>/anat/sub-<id>_<T2w|T1w>.nii.gz                    the image
      derivatives/napari-pvs-phantom/
        desc-regions_dseg.tsv                                     0 other, 1 WM, 2 BG
        sub-<id>/anat/sub-<id>_desc-pvs_mask.nii.gz               PVS labels (uint8)
        sub-<id>/anat/sub-<id>_desc-regions_dseg.nii.gz           region mask (uint8)
        sub-<id>/anat/sub-<id>_desc-phantom.json                  generator metadata

Subject ids are BIDS labels (letters and digits only).  :func:`read_cohort` reads
this layout back; the corrections store imports folders through it.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Collection, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import nibabel as nib
import numpy as np

from ._errors import PVSInputError
from ._regions import REGION_CODES
from .io import load_volume
from .phantom import conformed_aseg, make_cohort
from .store import CorrectionsStore

__all__ = ["DERIV", "FREESURFER_DERIV", "SubjectFiles", "find_segmentation", "read_cohort",
           "store_from_cohort", "subject_files", "write_phantom_cohort"]

DERIV = Path("derivatives") / "napari-pvs-phantom"
FREESURFER_DERIV = Path("derivatives") / "freesurfer"
_LABEL = re.compile(r"^[A-Za-z0-9]+$")
_COLUMNS = (
    "participant_id", "site", "modality", "voxel_size_mm", "snr", "seed",
    "n_pvs_wm", "n_pvs_bg", "pvs_volume_fraction_wm",
)


@dataclass(frozen=True)
class SubjectFiles:
    """Where one subject's files live; ``labels``/``regions`` may be missing."""

    subject: str
    site: str
    modality: str
    image: Path
    labels: Path | None
    regions: Path | None
    segmentation: Path | None = None  # an aseg-style segmentation (napari_pvs.regions)


def subject_files(root: Path, subject: str, modality: str, site: str = "unknown") -> SubjectFiles:
    """Paths of ``subject`` in the layout rooted at ``root`` (existing or not)."""
    if not _LABEL.match(subject):
        raise PVSInputError(f"subject id {subject!r} must contain only letters and digits (BIDS label)")
    anat = Path(root) / f"sub-{subject}" / "anat"
    der = Path(root) / DERIV / f"sub-{subject}" / "anat"
    return SubjectFiles(
        subject=subject,
        site=site,
        modality=modality,
        image=anat / f"sub-{subject}_{modality}.nii.gz",
        labels=der / f"sub-{subject}_desc-pvs_mask.nii.gz",
        regions=der / f"sub-{subject}_desc-regions_dseg.nii.gz",
    )


def _save(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(data, affine)
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    if np.issubdtype(data.dtype, np.integer):
        img.header.set_intent("label")
    nib.save(img, path)


def write_phantom_cohort(
    outdir: str | Path,
    *,
    n_sites: int = 3,
    per_site: int = 2,
    modality: str = "T2w",
    seed: int = 0,
    size_mm: float = 160.0,
    aseg: bool = False,
    progress=None,
) -> list[SubjectFiles]:
    """Generate a phantom cohort and write it in the documented layout.

    ``aseg`` also writes each subject's anatomy as FreeSurfer would, on its conformed
    256³ 1 mm LIA grid: ``derivatives/freesurfer/sub-<id>/mri/aseg.mgz``.
    ``progress``, if given, is called as ``progress(message, done, total)``.
    Returns the written subjects in order.
    """
    root = Path(outdir)
    root.mkdir(parents=True, exist_ok=True)
    total = n_sites * per_site
    rows, written = [], []
    for k, (sid, ph) in enumerate(
        make_cohort(n_sites, per_site, modality=modality, seed=seed, size_mm=size_mm)
    ):
        files = subject_files(root, sid, modality, ph.meta["site"])
        _save(files.image, ph.image, ph.affine)
        _save(files.labels, ph.labels, ph.affine)
        _save(files.regions, ph.regions, ph.affine)
        files.regions.with_name(f"sub-{sid}_desc-phantom.json").write_text(json.dumps(ph.meta, indent=1))
        if aseg:
            seg = root / FREESURFER_DERIV / f"sub-{sid}" / "mri" / "aseg.mgz"
            seg.parent.mkdir(parents=True, exist_ok=True)
            nib.save(conformed_aseg(ph), seg)
            files = replace(files, segmentation=seg)
        rows.append({
            "participant_id": f"sub-{sid}", "site": ph.meta["site"], "modality": modality,
            "voxel_size_mm": ph.spacing[0], "snr": round(ph.meta["snr"], 2), "seed": ph.meta["seed"],
            "n_pvs_wm": ph.meta["n_pvs_wm"], "n_pvs_bg": ph.meta["n_pvs_bg"],
            "pvs_volume_fraction_wm": round(ph.meta["pvs_volume_fraction_wm"], 5),
        })
        written.append(files)
        if progress is not None:
            progress(f"wrote sub-{sid}", k + 1, total)
    _write_sidecars(root, rows, f"sites={n_sites} per_site={per_site} modality={modality} "
                    f"seed={seed} size_mm={size_mm}")
    return written


def _write_sidecars(root: Path, rows: list[dict], generated_by: str) -> None:
    """participants.tsv / .json, the dataset descriptions and the region table."""
    with open(root / "participants.tsv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=_COLUMNS, delimiter="\t", lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    (root / "participants.json").write_text(json.dumps({
        "site": {"Description": "acquisition site (scanner); the unit of leave-one-site-out CV"},
        "modality": {"Description": "image contrast: T2w (PVS bright) or T1w (PVS dark)"},
        "voxel_size_mm": {"Description": "isotropic voxel size", "Units": "mm"},
        "snr": {"Description": "white-matter signal over Rician noise sigma"},
        "seed": {"Description": "seed of the phantom generator for this subject"},
        "pvs_volume_fraction_wm": {"Description": "PVS voxels / WM voxels"},
    }, indent=1))
    (root / "dataset_description.json").write_text(json.dumps({
        "Name": "napari-pvs synthetic PVS phantoms", "BIDSVersion": "1.9.0", "DatasetType": "raw",
        "GeneratedBy": [{"Name": "napari-pvs phantom", "Description": generated_by}],
    }, indent=1))
    der = root / DERIV
    der.mkdir(parents=True, exist_ok=True)
    (der / "desc-regions_dseg.tsv").write_text(
        "index\tname\n" + "".join(f"{v}\t{k}\n" for k, v in REGION_CODES.items())
    )
    (der / "dataset_description.json").write_text(json.dumps({
        "Name": "napari-pvs phantom ground truth", "BIDSVersion": "1.9.0",
        "DatasetType": "derivative", "GeneratedBy": [{"Name": "napari-pvs phantom"}],
    }, indent=1))


def store_from_cohort(path: str | Path, cohort: Iterable[SubjectFiles],
                      corrected: Collection[str] | None = None, *,
                      author: str = "truth") -> CorrectionsStore:
    """A new corrections store at ``path`` holding each subject of ``cohort`` (image,
    site, modality and region map), with its labels committed as version 1 by
    ``author`` for the subjects in ``corrected`` (default: every subject with labels).

    Returns the store, open and writable (close it, or use it as a context manager).
    The tests' ``phantom_store`` fixture and the benchmarks build their stores here.
    """
    store = CorrectionsStore.create(path)
    try:
        for s in cohort:
            regions = None if s.regions is None else load_volume(s.regions, as_labels=True).data
            store.add_subject(s.subject, load_volume(s.image), site=s.site, modality=s.modality,
                              regions=regions)
            if s.labels is not None and (corrected is None or s.subject in corrected):
                store.commit_labels(s.subject, load_volume(s.labels, as_labels=True).data,
                                    author=author)
    except BaseException:
        store.close()
        raise
    return store


def _entity(name: str, key: str) -> str | None:
    m = re.search(rf"_{key}-([A-Za-z0-9]+)", name)
    return m.group(1) if m else None


def find_segmentation(root: str | Path, subject: str, session: str | None = None) -> Path | None:
    """The aseg-style segmentation of ``subject`` in the dataset's derivatives, if any.

    Looked for, in this order: fMRIPrep's / SynthSeg's BIDS name
    ``derivatives/*/sub-<id>/anat/*desc-aseg_dseg.nii.gz`` (the T1w-space one first,
    MNI-space ones are skipped), then FreeSurfer's ``derivatives/*/sub-<id>/mri/aseg.mgz``
    and any ``derivatives/*/sub-<id>/anat/*aseg.mgz``.  With ``session``, the session's
    own ``derivatives/*/sub-<id>/ses-<session>/anat/*desc-aseg_dseg.nii.gz`` comes first.
    """
    der = Path(root) / "derivatives"
    if not der.is_dir():
        return None

    def bids(folder: str) -> list[Path]:
        found = [p for p in sorted(der.glob(f"{folder}/*desc-aseg_dseg.nii*"))
                 if "_space-MNI" not in p.name]
        found.sort(key=lambda p: "_space-" in p.name and "_space-T1w" not in p.name)
        return found

    own = bids(f"*/sub-{subject}/ses-{session}/anat") if session else []
    found = [*own, *bids(f"*/sub-{subject}/anat"),
             *sorted(der.glob(f"*/sub-{subject}/mri/aseg.mgz")),
             *sorted(der.glob(f"*/sub-{subject}/anat/*aseg.mgz"))]
    return found[0] if found else None


def write_bids_phantoms(root: str | Path, images: list[dict], *, modality: str = "T2w",
                        size_mm: float = 96.0, seed: int = 0, aseg: bool = True) -> list[Path]:
    """A phantom BIDS dataset: one phantom per entry of ``images``.

    Each entry gives the entities: ``{"subject": "01", "session": "1", "acquisition":
    "fast", "run": "1"}`` (all but ``subject`` optional) and optionally ``"site"`` (0-3).
    Writes ``dataset_description.json``, ``participants.tsv``, the images under
    ``sub-*/[ses-*/]anat/`` and, with ``aseg``, each image's FreeSurfer-style segmentation
    as ``derivatives/phantom/sub-*/[ses-*/]anat/<entities>_desc-aseg_dseg.nii.gz``
    (what ``--seg auto`` finds).  Returns the image paths.
    """
    from .phantom import make_phantom

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(json.dumps(
        {"Name": "napari-pvs phantoms", "BIDSVersion": "1.9.0", "DatasetType": "raw"}, indent=1))
    keys = (("subject", "sub"), ("session", "ses"), ("acquisition", "acq"), ("run", "run"))
    out, subjects = [], []
    for k, ents in enumerate(images):
        stem = "_".join(f"{short}-{ents[key]}" for key, short in keys if ents.get(key))
        folder = Path(f"sub-{ents['subject']}")
        if ents.get("session"):
            folder = folder / f"ses-{ents['session']}"
        ph = make_phantom(int(np.random.SeedSequence([seed, k]).generate_state(1)[0]),
                          modality=modality, site=int(ents.get("site", k % 3)),
                          size_mm=size_mm)
        path = root / folder / "anat" / f"{stem}_{modality}.nii.gz"
        _save(path, ph.image.astype(np.float32), ph.affine)
        if aseg:
            _save(root / "derivatives" / "phantom" / folder / "anat"
                  / f"{stem}_desc-aseg_dseg.nii.gz", np.asarray(ph.aseg, np.int32), ph.affine)
        out.append(path)
        if ents["subject"] not in subjects:
            subjects.append(ents["subject"])
    (root / "participants.tsv").write_text(
        "participant_id\n" + "".join(f"sub-{s}\n" for s in subjects))
    if aseg:
        (root / "derivatives" / "phantom" / "dataset_description.json").write_text(json.dumps(
            {"Name": "phantom segmentations", "BIDSVersion": "1.9.0",
             "DatasetType": "derivative", "GeneratedBy": [{"Name": "napari-pvs phantom"}]}))
    return out


def read_cohort(root: str | Path) -> list[SubjectFiles]:
    """List the subjects of a layout folder, with their site.

    The site comes from the ``site`` column of participants.tsv, else from the BIDS
    ``acq-<label>`` entity of the image name (``sub-01_acq-prisma_T2w.nii.gz``);
    subjects with neither get site ``unknown``.  Sessions (``ses-``) are not read.
    ``labels`` / ``regions`` are None where the files do not exist.
    """
    root = Path(root)
    if not root.is_dir():
        raise PVSInputError(f"{root} is not a folder; pass the folder that holds participants.tsv")
    sites: dict[str, str] = {}
    tsv = root / "participants.tsv"
    if tsv.is_file():
        with open(tsv, newline="") as fh:
            reader = csv.DictReader(fh, delimiter="\t")
            if reader.fieldnames is None or "participant_id" not in reader.fieldnames:
                raise PVSInputError(f"{tsv} has no participant_id column; add one (BIDS)")
            for row in reader:
                if row.get("site"):
                    sites[row["participant_id"].removeprefix("sub-")] = row["site"]
    out = []
    for anat in sorted(root.glob("sub-*/anat")):
        sid = anat.parent.name.removeprefix("sub-")
        for modality in ("T2w", "T1w"):
            files = subject_files(root, sid, modality, sites.get(sid, "unknown"))
            image = files.image
            if not image.is_file():  # BIDS names with entities: sub-X_acq-Y_T2w.nii.gz
                found = sorted(anat.glob(f"sub-{sid}_*{modality}.nii.gz"))
                if not found:
                    continue
                image = found[0]
            site = sites.get(sid) or _entity(image.name, "acq") or "unknown"
            out.append(SubjectFiles(
                sid, site, modality, image,
                files.labels if files.labels.is_file() else None,
                files.regions if files.regions.is_file() else None,
                find_segmentation(root, sid),
            ))
    if not out:
        raise PVSInputError(f"{root} holds no sub-*/anat/sub-*_T2w.nii.gz or _T1w.nii.gz images")
    return out
