"""Region maps from whole-brain segmentations: FreeSurfer, SynthSeg, FastSurfer, fMRIPrep.

MedNet-PVS scores and reviews PVS in the white matter (WM) and the basal ganglia (BG).
A lab has no ``0 other / 1 WM / 2 BG`` map, but it has an aseg-style segmentation:
FreeSurfer's ``mri/aseg.mgz`` (conformed 256³, 1 mm, LIA), SynthSeg's or FastSurfer's
output, or fMRIPrep's ``sub-X[_space-T1w]_desc-aseg_dseg.nii.gz``.  All of them use the
label values of FreeSurfer's colour table (``FreeSurferColorLUT.txt``).
:func:`from_segmentation` takes such a volume, on any grid, to the region map on the
grid of the image, and gives the brain mask (every label > 0) with it.

The default table (:data:`FREESURFER_REGIONS`):

=====  ====================================================================
WM     cerebral white matter 2 / 41; WM hypointensities 77, left / right
       WM hypointensities 78 / 79
BG     caudate 11 / 50, putamen 12 / 51, pallidum 13 / 52, accumbens 26 / 58
=====  ====================================================================

Every other label of the colour table counts as brain ("other").  A label that is in
neither (for example the 1 of a ``0/1/2`` region map passed as an aseg) is refused, so a
wrong file does not silently become a wrong region map.  A two-column TSV
(``label``, ``region``; region ``WM``, ``BG``, ``other`` or 1 / 2 / 0) replaces the
table; it must then list every label of the segmentation.
"""

from __future__ import annotations

import csv
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ._errors import PVSInputError
from ._regions import REGION_CODES, REGION_NAMES, SCORED_REGIONS
from ._volume import Volume

__all__ = [
    "FREESURFER_LABELS",
    "FREESURFER_REGIONS",
    "REGION_CODES",
    "REGION_NAMES",
    "SCORED_REGIONS",
    "RegionTable",
    "SegmentationRegions",
    "from_segmentation",
    "load_table",
    "save_region_map",
    "segmentation_overlap",
]

_WM, _BG = REGION_CODES["WM"], REGION_CODES["BG"]

#: FreeSurfer colour-table label -> region code for the labels that are WM or BG.
FREESURFER_REGIONS: dict[int, int] = {
    2: _WM, 41: _WM, 77: _WM, 78: _WM, 79: _WM,
    11: _BG, 50: _BG, 12: _BG, 51: _BG, 13: _BG, 52: _BG, 26: _BG, 58: _BG,
}

# The labels that aseg-style segmentations hold (FreeSurfer aseg / aparc+aseg / wmparc,
# SynthSeg 1.0/2.0 with --parc, FastSurfer, fMRIPrep desc-aseg): subcortical structures
# 0-89 and 91-99 (ventricles, cerebellum, brainstem, WM hypointensities, optic chiasm,
# vessel, choroid plexus ...), the corpus callosum 251-255, and the cortical
# parcellations 1000-1035 / 2000-2035 (aparc), 1100-1181 / 2100-2181 (aparc.a2005s),
# 11100-12175 (aparc.a2009s), 3000-4035 / 5001-5002 (wmparc).
_RANGES = ((0, 89), (91, 99), (251, 255), (1000, 1035), (2000, 2035), (1100, 1181),
           (2100, 2181), (3000, 3035), (4000, 4035), (5001, 5002), (11100, 11175),
           (12100, 12175))
#: Every label value the default table accepts: the FreeSurfer colour-table ranges above,
#: except 1 and 40 (Left/Right-Cerebral-Exterior), which no aseg-style tool writes.  So a
#: 0/1/2 region map or a 0/1 mask given as a segmentation is refused, not misread.
FREESURFER_LABELS: frozenset[int] = frozenset(
    v for lo, hi in _RANGES for v in range(lo, hi + 1)) - {1, 40}
# wmparc's cortical-WM parcels are WM as well (3000-4035: "wm-lh-*" / "wm-rh-*", and
# 5001/5002 "Left/Right-UnsegmentedWhiteMatter")
_WMPARC = {v: _WM for lo, hi in ((3000, 3035), (4000, 4035), (5001, 5002))
           for v in range(lo, hi + 1)}


@dataclass(frozen=True)
class RegionTable:
    """Segmentation label -> region code (0 other, 1 WM, 2 BG), and which labels exist.

    ``known`` is every label the table accepts; ``None`` accepts any label (labels not
    in ``regions`` are then "other").  ``name`` and ``sha256`` are recorded in the
    region map's metadata.
    """

    regions: dict[int, int]
    known: frozenset[int] | None
    name: str
    sha256: str | None = None

    def lookup(self, max_label: int) -> np.ndarray:
        """A ``(max_label + 1,)`` uint8 array: region code of each label value."""
        table = np.zeros(max_label + 1, np.uint8)
        for label, code in self.regions.items():
            if 0 <= label <= max_label:
                table[label] = code
        return table

    def describe(self) -> dict[str, Any]:
        """JSON-serialisable: the table's name, hash and WM / BG labels."""
        out: dict[str, Any] = {"name": self.name}
        if self.sha256:
            out["sha256"] = self.sha256
        for region, code in SCORED_REGIONS.items():
            out[region] = _runs(sorted(int(k) for k, v in self.regions.items() if v == code))
        return out


def _runs(values: list[int]) -> list[int | str]:
    """Sorted labels with runs of more than two written ``"first-last"``: ``[2, "3000-3035"]``."""
    out: list[int | str] = []
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[j] + 1:
            j += 1
        out.extend([f"{values[i]}-{values[j]}"] if j - i >= 2 else values[i:j + 1])
        i = j + 1
    return out


FREESURFER = RegionTable({**_WMPARC, **FREESURFER_REGIONS}, FREESURFER_LABELS, "freesurfer")

_REGION_WORDS = {"wm": _WM, "bg": _BG, "other": 0, **{str(c): c for c in REGION_NAMES}}


def load_table(lut: str | os.PathLike[str] | RegionTable | None = "freesurfer") -> RegionTable:
    """The region table: ``"freesurfer"`` (the default), a TSV file, or a table.

    The TSV has two columns, ``label`` and ``region``, tab-separated, optionally with that
    header line; ``#`` starts a comment.  ``region`` is ``WM``, ``BG``, ``other`` (or 1,
    2, 0).  Every label the segmentation holds must be listed.
    """
    if lut is None or lut == "freesurfer":
        return FREESURFER
    if isinstance(lut, RegionTable):
        return lut
    from ._fs import sha256_file

    path = Path(lut)
    if not path.is_file():
        raise PVSInputError(f"--lut {path} does not exist; give a TSV of label<TAB>region rows, "
                            "or leave --lut out for FreeSurfer's labels")
    regions: dict[int, int] = {}
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = [r for r in csv.reader(fh, delimiter="\t")
                    if r and r[0].strip() and not r[0].lstrip().startswith("#")]
    except (OSError, UnicodeDecodeError) as exc:
        raise PVSInputError(f"--lut {path} cannot be read ({exc}); give a UTF-8 TSV") from None
    if rows and rows[0][0].strip().lower() == "label":
        rows = rows[1:]
    for n, row in enumerate(rows, 1):
        if len(row) < 2:
            raise PVSInputError(f"--lut {path}: row {n} {row!r} has no region column; each row "
                                "is label<TAB>region (WM, BG or other)")
        label, region = row[0].strip(), row[1].strip().lower()
        if not label.lstrip("-").isdigit() or int(label) < 0:
            raise PVSInputError(f"--lut {path}: row {n}: label {label!r} is not a non-negative "
                                "integer")
        if region not in _REGION_WORDS:
            raise PVSInputError(f"--lut {path}: row {n}: region {row[1]!r} is not WM, BG or "
                                "other (or 1, 2, 0)")
        regions[int(label)] = _REGION_WORDS[region]
    if not any(regions.values()):
        raise PVSInputError(f"--lut {path} names no WM or BG label; nothing would be scored")
    return RegionTable(regions, frozenset(regions) | {0}, str(path), sha256_file(path))


@dataclass
class SegmentationRegions:
    """The result of :func:`from_segmentation`, on the image's grid.

    Attributes
    ----------
    regions : ndarray of uint8
        0 other, 1 WM, 2 BG.
    brain : ndarray of bool
        Every voxel whose segmentation label is > 0.
    meta : dict
        JSON-serialisable: the segmentation file and hash, the table used
        (:meth:`RegionTable.describe`), the voxel counts and whether it was resampled.
    """

    regions: np.ndarray
    brain: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)


def _as_volume(obj, as_labels: bool) -> Volume:
    """``obj`` if it is a :class:`Volume`, else the volume of that file."""
    if isinstance(obj, Volume):
        return obj
    from .io import load_volume

    return load_volume(obj, as_labels=as_labels)


def segmentation_overlap(seg: Volume, like: Volume) -> float:
    """Fraction of the image grid's voxel centres that lie inside the segmentation's grid."""
    shape = np.asarray(like.shape)
    axes = [np.linspace(0, n - 1, min(int(n), 24)) for n in shape]
    ijk = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    to_seg = np.linalg.inv(seg.affine) @ like.affine
    idx = ijk @ to_seg[:3, :3].T + to_seg[:3, 3]
    inside = np.all((idx > -0.5) & (idx < np.asarray(seg.shape) - 0.5), axis=1)
    return float(inside.mean())


def _resample(seg: Volume, like: Volume) -> tuple[np.ndarray, bool]:
    """The segmentation's labels at the image's voxel centres (nearest neighbour)."""
    if seg.shape == like.shape and np.allclose(seg.affine, like.affine, atol=1e-4):
        return np.asarray(seg.data), False
    import nibabel as nib
    from nibabel.processing import resample_from_to

    data = np.asarray(seg.data)
    if data.dtype.kind not in "iu" or data.dtype.itemsize > 4:
        data = data.astype(np.int32)
    img = nib.Nifti1Image(data, seg.affine)
    out = resample_from_to(img, (like.shape, like.affine), order=0, mode="constant", cval=0)
    return np.asarray(out.dataobj).astype(data.dtype, copy=False), True


def from_segmentation(seg, like, lut: str | os.PathLike[str] | RegionTable | None = "freesurfer",
                      ) -> SegmentationRegions:
    """Region map (0 other, 1 WM, 2 BG) and brain mask of an aseg-style segmentation.

    Parameters
    ----------
    seg : path or Volume
        The segmentation: ``.mgz`` / ``.mgh`` / ``.nii`` / ``.nii.gz`` on any grid
        (FreeSurfer's conformed LIA space, the T1w space ...).
    like : path or Volume
        The image whose grid the result lies on.
    lut : "freesurfer", path or RegionTable
        Which labels are WM and BG (:func:`load_table`).

    Returns
    -------
    SegmentationRegions

    Raises
    ------
    PVSInputError
        A 4D segmentation; one with non-integer values; one that does not overlap the
        image in world space; one whose labels are not in the table; one without any WM
        or BG voxel on the image grid.
    """
    table = load_table(lut)
    vol = _as_volume(seg, as_labels=True)
    target = _as_volume(like, as_labels=False)
    name = str(vol.path) if vol.path is not None else "segmentation"
    if vol.data is None or np.asarray(vol.data).ndim != 3:
        raise PVSInputError(f"{name}: a segmentation must be one 3D label volume")
    data = np.asarray(vol.data)
    if data.size and data.min() < 0:
        raise PVSInputError(f"{name} holds negative labels ({int(data.min())}); it is not an "
                            "aseg-style segmentation")
    present = np.unique(data)
    if table.known is not None:
        unknown = sorted(int(v) for v in present if int(v) not in table.known)
        if unknown:
            shown = ", ".join(map(str, unknown[:8])) + (" ..." if len(unknown) > 8 else "")
            raise PVSInputError(
                f"{name} holds labels {shown} that are not in the {table.name} table; pass an "
                "aseg-style segmentation (FreeSurfer aseg.mgz, SynthSeg, fMRIPrep desc-aseg), "
                "a 0/1/2 region map with --roi, or a --lut TSV that lists every label")
    overlap = segmentation_overlap(vol, target)
    if overlap == 0:
        raise PVSInputError(
            f"{name} does not overlap the image in world space (no image voxel lies inside "
            "its grid); give the segmentation of this subject and session, in a space that "
            "shares the scanner coordinates (e.g. FreeSurfer's or fMRIPrep's T1w space)")
    if overlap < 0.5:
        warnings.warn(f"{name}: only {overlap:.0%} of the image's field of view lies inside the "
                      "segmentation's grid; regions outside it count as 'other'",
                      UserWarning, stacklevel=2)
    labels, resampled = _resample(vol, target)
    brain = labels > 0
    lookup = table.lookup(int(max(int(present.max()) if present.size else 0, 0)))
    regions = lookup[labels]
    if not np.any(regions):
        raise PVSInputError(
            f"{name} has no {'/'.join(SCORED_REGIONS)} voxel on the image grid (table "
            f"{table.name}); check that it is the segmentation of this image and that the "
            "labels are FreeSurfer's (or give --lut)")
    counts = {r: int(np.count_nonzero(regions == c)) for r, c in SCORED_REGIONS.items()}
    meta = {"segmentation": name, "segmentation_sha256": vol.sha256, "table": table.describe(),
            "resampled": resampled, "overlap": round(overlap, 4),
            "brain_voxels": int(np.count_nonzero(brain)), "voxels": counts}
    return SegmentationRegions(regions=regions, brain=brain, meta=meta)


def save_region_map(path: str | os.PathLike[str], regions: np.ndarray, like: Volume,
                    meta: dict[str, Any]) -> tuple[Path, Path]:
    """Write a region map on the grid of ``like`` and its JSON sidecar ``<stem>.json``
    (where the map came from: the segmentation and table, or the estimate's method).

    Returns the two paths; both are written atomically.
    """
    import json

    from ._fs import atomic_write_text
    from ._nifti_save import save_labels
    from ._volume import strip_nifti_suffix

    out = save_labels(path, regions, like=like)
    sidecar = out.with_name(strip_nifti_suffix(out.name) + ".json")
    atomic_write_text(sidecar, json.dumps(meta, indent=1) + "\n")
    return out, sidecar
