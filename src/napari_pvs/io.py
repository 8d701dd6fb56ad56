"""Read and write NIfTI volumes with their geometry intact.

Everything NIfTI goes through nibabel.  This module imports neither Qt nor
napari, so the CLI, the tests and batch jobs use it exactly as the plugin does.

Geometry conventions
--------------------
``Volume.affine`` is nibabel's ``img.affine``: it maps a voxel index
``(i, j, k)`` to world RAS+ millimetres.  napari applies a layer's ``scale``
first and its ``affine`` second, so :meth:`Volume.napari_transform` splits the
NIfTI affine into ``scale = spacing`` and ``affine = A @ diag(1 / spacing, 1)``.
"""

from __future__ import annotations

import os
import uuid
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError

from ._errors import PVSInputError
from ._nifti_checks import (
    affine_problem,
    check_data_size,
    one_line,
    pick_volume,
    scan_nifti,
    sha256_file,
    usable_affine,
)

__all__ = [
    "NIFTI_SUFFIXES",
    "NonFiniteVoxelsWarning",
    "Volume",
    "as_label_array",
    "check_same_grid",
    "geometry_from_affine",
    "is_nifti_path",
    "load_volume",
    "save_labels",
    "save_map",
    "sha256_file",
    "strip_nifti_suffix",
]

NIFTI_SUFFIXES = (".nii.gz", ".nii")


class NonFiniteVoxelsWarning(UserWarning):
    """A volume held NaN or infinite voxels; they were set to 0."""


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


def strip_nifti_suffix(name: str) -> str:
    """Return *name* without a trailing ``.nii`` or ``.nii.gz``."""
    for suffix in NIFTI_SUFFIXES:
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


def load_volume(
    path: str | os.PathLike[str],
    *,
    volume: int | None = None,
    dtype: Any = np.float32,
    as_labels: bool = False,
) -> Volume:
    """Load a 3D NIfTI-1 or NIfTI-2 volume (``.nii`` or ``.nii.gz``).

    Parameters
    ----------
    path : str or os.PathLike
        The file to read.
    volume : int, optional
        Index of the volume to take from a 4D series.  A 4D file with more
        than one volume needs it; a trailing singleton 4th axis is dropped.
    dtype : numpy dtype, optional
        Dtype of the returned image data (after nibabel applies scl_slope and
        scl_inter).  Ignored when ``as_labels`` is True.
    as_labels : bool, optional
        Keep an integer dtype for label maps; integer-valued float data are
        cast to the smallest integer type that holds them.

    Returns
    -------
    Volume
        The voxels with the file's affine, spacing, SHA-256 and header.

    Raises
    ------
    PVSInputError
        With a one-line message, for a missing file, a file that is not
        NIfTI, a truncated or corrupt file, a header that claims more voxel
        bytes than the file holds (checked before allocating), a file without
        a usable affine (sform, qform and voxel size all zero, NaN or
        singular), a 2D or >4D image, a 4D series without ``volume``, or
        non-integer data with ``as_labels``.

    Warns
    -----
    NonFiniteVoxelsWarning
        When NaN or infinite voxels were found; they are set to 0.
    UserWarning
        When the sform is unusable and the qform (or voxel size) is used instead.
    """
    path = Path(path)
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise PVSInputError(f"{path} {what}; check the path and try again")
    if not is_nifti_path(path):
        raise PVSInputError(
            f"{path} is not a NIfTI file (.nii or .nii.gz); convert it first, e.g. "
            "with dcm2niix or mri_convert"
        )
    if path.stat().st_size == 0:
        raise PVSInputError(f"{path} is empty (0 bytes); re-export or copy the file again")
    scan = scan_nifti(path)
    try:
        img = nib.load(path, mmap=False)  # own the voxels; the file may be replaced
    except (ImageFileError, HeaderDataError, OSError, EOFError, zlib.error, ValueError) as exc:
        raise PVSInputError(
            f"{path} is not a readable NIfTI-1/NIfTI-2 file ({one_line(exc)}); check "
            "that it is a NIfTI image and not e.g. a PNG or text file renamed to .nii"
        ) from None
    if not isinstance(img, nib.Nifti1Image):  # Nifti2Image subclasses Nifti1Image
        raise PVSInputError(
            f"{path} was read as {type(img).__name__}, not NIfTI; convert it to .nii.gz"
        )
    slicer = pick_volume(img, path, volume)
    check_data_size(img, scan, path)
    affine, note = usable_affine(img, scan, path)
    if note:
        warnings.warn(note, UserWarning, stacklevel=2)
    try:
        raw = img.dataobj if slicer is None else img.dataobj[slicer]
        data = np.asarray(raw) if as_labels else np.asarray(raw, dtype=dtype)
    except MemoryError:
        raise PVSInputError(
            f"{path}: not enough memory for shape {img.shape} - the header may be "
            "corrupt, or the volume is too large for this machine"
        ) from None
    except (OSError, EOFError, zlib.error, ValueError) as exc:
        raise PVSInputError(
            f"{path} is truncated or corrupt ({one_line(exc)}); re-export or copy the file again"
        ) from None
    data = _zero_non_finite(data, path)
    if as_labels:
        data = as_label_array(data, path)
    header = img.header.copy()
    return Volume(
        data=data,
        affine=affine,
        spacing=_spacing(header, affine),
        path=path,
        sha256=scan.sha256,
        header=header,
    )


def _zero_non_finite(data: np.ndarray, path: Path) -> np.ndarray:
    if not np.issubdtype(data.dtype, np.floating):
        return data
    bad = ~np.isfinite(data)
    n_bad = int(np.count_nonzero(bad))
    if n_bad:
        warnings.warn(
            f"{path}: {n_bad} of {data.size} voxels were NaN or infinite; they were set to 0",
            NonFiniteVoxelsWarning,
            stacklevel=3,
        )
        data = np.array(data, copy=True)
        data[bad] = 0
    return data


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


def save_labels(path: str | os.PathLike[str], labels: np.ndarray, like: Volume) -> Path:
    """Write a label volume on the voxel grid and geometry of *like*.

    The header of *like* is copied, so the affine, both qform and sform
    matrices and their codes, and NIfTI-1 versus NIfTI-2 are kept.  Scaling is
    reset (labels are never rescaled), the intent is set to ``label`` and the
    file is written to a temporary name and moved into place, so *path* is
    never left half-written.

    Parameters
    ----------
    path : str or os.PathLike
        Output ``.nii`` or ``.nii.gz`` file.
    labels : numpy.ndarray
        Integer or boolean array with ``like.shape``.  Stored as uint8 when
        the labels fit, else int16 or int32.
    like : Volume
        Source of the geometry, e.g. from :func:`load_volume` or
        :func:`geometry_from_affine`.

    Returns
    -------
    pathlib.Path
        The written file.

    Raises
    ------
    PVSInputError
        If the shapes differ, the labels are not integers, or *path* does
        not end in ``.nii`` / ``.nii.gz``.
    """
    path = Path(path)
    labels = np.asarray(labels)
    if not is_nifti_path(path):
        raise PVSInputError(f"{path}: label files must end in .nii.gz or .nii; rename the output")
    if labels.shape != like.shape:
        raise PVSInputError(
            f"{path}: labels have shape {labels.shape} but the reference volume has shape "
            f"{like.shape}; segment the same volume you save against"
        )
    if labels.dtype != bool and not np.issubdtype(labels.dtype, np.integer):
        raise PVSInputError(
            f"{path}: labels must be integers or booleans, got {labels.dtype}; round and "
            "cast them first"
        )
    dtype = _label_dtype(labels, path)
    labels = labels.astype(dtype, copy=False)
    header = _header_like(like, labels.shape, dtype)
    header["cal_min"] = 0
    header["cal_max"] = float(labels.max()) if labels.size else 0.0
    header.set_intent("label")
    header["descrip"] = b"napari-pvs labels"
    _atomic_save(labels, header, path, "labels")
    return path


def save_map(path: str | os.PathLike[str], data: np.ndarray, like: Volume) -> Path:
    """Write a float32 map (probability, uncertainty ...) in the geometry of *like*.

    Same guarantees as :func:`save_labels`: the header of *like* (affine, qform and
    sform with their codes) is kept and the file is written atomically.
    """
    path = Path(path)
    data = np.asarray(data, dtype=np.float32)
    if not is_nifti_path(path):
        raise PVSInputError(f"{path}: maps must end in .nii.gz or .nii; rename the output")
    if data.shape != like.shape:
        raise PVSInputError(
            f"{path}: map has shape {data.shape} but the reference volume has shape {like.shape}"
        )
    header = _header_like(like, data.shape, np.float32)
    header["cal_min"] = float(data.min()) if data.size else 0.0
    header["cal_max"] = float(data.max()) if data.size else 0.0
    header.set_intent("none")
    header["descrip"] = b"napari-pvs map"
    _atomic_save(data, header, path, "map")
    return path


def _header_like(like: Volume, shape: tuple[int, ...], dtype) -> Any:
    """A header with the geometry of *like* for data of ``shape`` and ``dtype``, unscaled."""
    if like.header is not None:
        header = like.header.copy()
    else:
        header = geometry_from_affine(like.affine, like.shape).header
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header.set_slope_inter(1.0, 0.0)
    if not np.allclose(header.get_best_affine(), like.affine, atol=1e-5):
        header.set_sform(like.affine, code=max(int(header["sform_code"]), 1))
        header.set_qform(like.affine, code=max(int(header["qform_code"]), 1))
    return header


def _atomic_save(data: np.ndarray, header: Any, path: Path, what: str) -> None:
    """Save through a temporary file in the same folder and ``os.replace``."""
    image_class = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
    image = image_class(data, None, header)
    suffix = ".nii.gz" if path.name.lower().endswith(".gz") else ".nii"
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp{suffix}")
    try:
        nib.save(image, tmp)
        os.replace(tmp, path)
    except OSError as exc:
        raise PVSInputError(
            f"{path}: cannot write the {what} ({one_line(exc)}); check that the folder "
            "exists and is writable"
        ) from None
    finally:
        if tmp.exists():
            tmp.unlink()
