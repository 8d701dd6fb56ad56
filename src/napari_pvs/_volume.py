"""Volumes with their geometry, independent of the file format: :class:`Volume`, label
arrays, geometry-only volumes, grid checks and NIfTI file names (re-exported by
:mod:`napari_pvs.io`, which reads and writes them; see its geometry conventions)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from ._errors import PVSInputError
from ._nifti_checks import affine_problem

__all__ = [
    "MGH_SUFFIXES",
    "NIFTI_SUFFIXES",
    "Volume",
    "as_label_array",
    "check_same_grid",
    "geometry_from_affine",
    "is_mgh_path",
    "is_nifti_path",
    "strip_nifti_suffix",
]

NIFTI_SUFFIXES = (".nii.gz", ".nii")
#: FreeSurfer MGH volumes (read only: ``aseg.mgz``, ``T1.mgz`` ...).
MGH_SUFFIXES = (".mgz", ".mgh")


@dataclass(frozen=True, eq=False)
class Volume:
    """A 3D volume with the geometry of the NIfTI file it came from.

    Attributes
    ----------
    data : numpy.ndarray or None
        The voxels, indexed ``(i, j, k)`` as on disk.  float32 for images, an
        integer dtype for label maps.  None for a geometry-only volume made by
        :func:`geometry_from_affine`.
    affine : numpy.ndarray
        4x4 float64 voxel-to-world (RAS+ mm) matrix, nibabel's ``img.affine``.
    spacing : tuple of float
        Voxel size in mm along i, j and k, from the header zooms.
    path : pathlib.Path or None
        The file the volume was read from.
    sha256 : str or None
        Hex SHA-256 of the file's bytes on disk.
    header : nibabel.nifti1.Nifti1Header
        A copy of the source header (``Nifti2Header`` for NIfTI-2); it keeps
        both qform and sform with their codes.
    """

    data: np.ndarray | None
    affine: np.ndarray
    spacing: tuple[float, float, float]
    path: Path | None = None
    sha256: str | None = None
    header: Any = None

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the 3D voxel grid."""
        source = self.data.shape if self.data is not None else self.header.get_data_shape()[:3]
        return tuple(int(n) for n in source)

    @property
    def qform_code(self) -> int:
        """NIfTI qform code of the source header (0 = unknown, 1 = scanner ...)."""
        return 0 if self.header is None else int(self.header["qform_code"])

    @property
    def sform_code(self) -> int:
        """NIfTI sform code of the source header (2 = aligned, 4 = MNI ...)."""
        return 0 if self.header is None else int(self.header["sform_code"])

    def napari_transform(self) -> tuple[tuple[float, float, float], np.ndarray]:
        """Split the NIfTI affine into napari's ``scale`` and ``affine``.

        Returns
        -------
        scale : tuple of float
            The voxel spacing in mm.
        affine : numpy.ndarray
            4x4 matrix ``A @ diag(1 / spacing, 1)``.  napari applies ``scale``
            first and ``affine`` second, which composes back to ``A``.
        """
        inverse_scale = np.diag([*(1.0 / np.asarray(self.spacing)), 1.0])
        return self.spacing, self.affine @ inverse_scale


def is_nifti_path(path: str | os.PathLike[str]) -> bool:
    """Whether *path* ends in ``.nii`` or ``.nii.gz`` (case-insensitive)."""
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def is_mgh_path(path: str | os.PathLike[str]) -> bool:
    """Whether *path* ends in ``.mgz`` or ``.mgh`` (case-insensitive): FreeSurfer's format."""
    return str(path).lower().endswith(MGH_SUFFIXES)


def strip_nifti_suffix(name: str) -> str:
    """Return *name* without a trailing ``.nii``, ``.nii.gz``, ``.mgz`` or ``.mgh``."""
    for suffix in (*NIFTI_SUFFIXES, *MGH_SUFFIXES):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _spacing(header: Any, affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size of *affine* (column norms); the header zooms when they agree with it."""
    norms = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    zooms = np.asarray(header.get_zooms()[:3], dtype=np.float64)
    if zooms.size == 3 and np.allclose(zooms, norms, rtol=1e-4, atol=0):
        norms = zooms  # the same up to float32 rounding; keep the stored values exactly
    return (float(norms[0]), float(norms[1]), float(norms[2]))


def as_label_array(data: np.ndarray, source: str | os.PathLike[str] = "labels") -> np.ndarray:
    """Return *data* as integer labels (bool becomes uint8).

    Integer arrays are returned as they are; integer-valued float arrays are
    cast to the smallest of uint8, int16 and int32 that holds them.

    Raises
    ------
    PVSInputError
        If *data* holds non-integer values; *source* names it in the message.
    """
    if data.dtype == bool:
        return data.astype(np.uint8)
    if np.issubdtype(data.dtype, np.integer):
        return data
    if not np.array_equal(data, np.round(data)):
        raise PVSInputError(
            f"{source} holds non-integer values ({data.dtype}), so it is not a label map; "
            "open it as an image instead"
        )
    return data.astype(_label_dtype(data, source))


def geometry_from_affine(
    affine: np.ndarray,
    shape: tuple[int, ...],
    *,
    sform_code: int = 1,
    qform_code: int = 1,
    qform: np.ndarray | None = None,
    nifti2: bool = False,
) -> Volume:
    """Build a data-less :class:`Volume` that carries only geometry.

    Parameters
    ----------
    affine : numpy.ndarray
        4x4 voxel-to-world matrix, stored as the sform.
    shape : tuple of int
        The 3D grid shape.
    sform_code, qform_code : int, optional
        NIfTI codes (1 = scanner, 2 = aligned ...).  When both are 0 the
        affine could not be recovered, so the sform code becomes 1 unless the
        affine equals nibabel's default for the grid.
    qform : numpy.ndarray, optional
        4x4 matrix for the qform when it differs from the sform; its shears
        are dropped, as NIfTI's qform cannot hold them.
    nifti2 : bool, optional
        Build a NIfTI-2 header instead of a NIfTI-1 one.

    Returns
    -------
    Volume
        ``data`` is None; use it as ``like`` in :func:`save_labels`.
    """
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or len(shape) != 3:
        raise ValueError(f"need a 4x4 affine and a 3D shape, got {affine.shape} and {shape}")
    problem = affine_problem(affine)
    if problem:
        raise ValueError(f"the affine {problem}, so it cannot place voxels in space")
    header = (nib.Nifti2Header if nifti2 else nib.Nifti1Header)()
    header.set_data_shape(tuple(int(n) for n in shape))
    if sform_code == 0 and qform_code == 0:
        header.set_zooms(np.sqrt((affine[:3, :3] ** 2).sum(axis=0)))
        if not np.allclose(header.get_base_affine(), affine, atol=1e-5):
            sform_code = 1
    header.set_qform(affine if qform is None else qform, code=int(qform_code))
    header.set_sform(affine, code=int(sform_code))
    best = np.asarray(header.get_best_affine(), dtype=np.float64)
    return Volume(data=None, affine=best, spacing=_spacing(header, best), header=header)


def check_same_grid(vol: Volume, like: Volume, what: str = "map") -> None:
    """Refuse *vol* unless it lies on the voxel grid of *like*.

    The same test as the corrections store: equal shapes, and affines equal
    within 1e-3 (mm).  *what* names *vol* in the message (``"ROI"``, ``"map"``).

    Raises
    ------
    PVSInputError
        Naming both files, the shapes or the largest affine difference.
    """
    name, other = vol.path or what, like.path or "the reference"
    if vol.shape != like.shape:
        raise PVSInputError(
            f"{name}: {what} shape {vol.shape} does not match {other} shape {like.shape}; "
            f"resample it to the grid of {other}"
        )
    if not np.allclose(vol.affine, like.affine, atol=1e-3):
        diff = float(np.abs(np.asarray(vol.affine) - np.asarray(like.affine)).max())
        raise PVSInputError(
            f"{name}: {what} affine differs from that of {other} by up to {diff:.3g} (mm), so "
            "it lies on another grid; resample it to that grid (e.g. with mri_vol2vol or "
            "antsApplyTransforms)"
        )


def _label_dtype(labels: np.ndarray, path: str | os.PathLike[str]) -> np.dtype:
    if labels.size == 0:
        return np.dtype(np.uint8)
    low, high = labels.min(), labels.max()
    if low >= 0 and high <= 255:
        return np.dtype(np.uint8)
    for candidate in (np.int16, np.int32):
        info = np.iinfo(candidate)
        if info.min <= low and high <= info.max:
            return np.dtype(candidate)
    raise PVSInputError(
        f"{path}: label values {low}..{high} do not fit in int32; renumber the labels"
    )
