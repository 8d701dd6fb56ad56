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
import warnings
import zlib
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError

from ._errors import PVSInputError
from ._fs import sha256_file
from ._nifti_checks import (
    affine_problem,
    check_data_size,
    one_line,
    pick_volume,
    scan_nifti,
    usable_affine,
)
from ._nifti_save import save_labels, save_map
from ._volume import (
    NIFTI_SUFFIXES,
    Volume,
    _spacing,
    as_label_array,
    check_same_grid,
    geometry_from_affine,
    is_mgh_path,
    is_nifti_path,
    strip_nifti_suffix,
)

__all__ = [
    "NIFTI_SUFFIXES",
    "NonFiniteVoxelsWarning",
    "Volume",
    "as_label_array",
    "check_same_grid",
    "geometry_from_affine",
    "is_mgh_path",
    "is_nifti_path",
    "load_volume",
    "save_labels",
    "save_map",
    "sha256_file",
    "strip_nifti_suffix",
]


class NonFiniteVoxelsWarning(UserWarning):
    """A volume held NaN or infinite voxels; they were set to 0."""


def load_volume(
    path: str | os.PathLike[str],
    *,
    volume: int | None = None,
    dtype: Any = np.float32,
    as_labels: bool = False,
) -> Volume:
    """Load a 3D NIfTI-1 or NIfTI-2 volume (``.nii`` or ``.nii.gz``), or a FreeSurfer
    MGH volume (``.mgz`` or ``.mgh``, e.g. ``aseg.mgz``).

    An MGH volume gets a NIfTI-1 header with its affine as sform and qform (code 1,
    scanner), so it is saved against, compared and displayed as a NIfTI volume is.

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
    path = _check_path(Path(path))
    if is_mgh_path(path):
        return _load_mgh(path, volume, dtype, as_labels)
    scan = scan_nifti(path)
    img = _open_nifti(path)
    slicer = pick_volume(img, path, volume)
    check_data_size(img, scan, path)
    affine, note = usable_affine(img, scan, path)
    if note:
        warnings.warn(note, UserWarning, stacklevel=2)
    data = _zero_non_finite(_read_voxels(img, slicer, path, dtype, as_labels), path)
    if as_labels:
        data = as_label_array(data, path)
    header = img.header.copy()
    return Volume(data=data, affine=affine, spacing=_spacing(header, affine), path=path,
                  sha256=scan.sha256, header=header)


def _check_path(path: Path) -> Path:
    """Refuse a missing, non-NIfTI or empty file before reading a byte of it."""
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise PVSInputError(f"{path} {what}; check the path and try again")
    if not (is_nifti_path(path) or is_mgh_path(path)):
        raise PVSInputError(
            f"{path} is not a NIfTI file (.nii or .nii.gz) or a FreeSurfer .mgz/.mgh; "
            "convert it first, e.g. with dcm2niix or mri_convert"
        )
    if path.stat().st_size == 0:
        raise PVSInputError(f"{path} is empty (0 bytes); re-export or copy the file again")
    return path


_MAX_MGH_BYTES = 2**32  # 4 GiB of voxels: far above any brain volume; a corrupt header
_MGH_HEADER_BYTES = 284  # fixed header before the voxels of an uncompressed .mgh


def _load_mgh(path: Path, volume: int | None, dtype: Any, as_labels: bool) -> Volume:
    """:func:`load_volume` of a FreeSurfer ``.mgz`` / ``.mgh`` file."""
    try:
        img = nib.load(path, mmap=False)
    except (ImageFileError, HeaderDataError, OSError, EOFError, zlib.error, ValueError) as exc:
        raise PVSInputError(
            f"{path} is not a readable FreeSurfer MGH/MGZ file ({one_line(exc)}); check that "
            "it is the file FreeSurfer wrote, or convert it with mri_convert"
        ) from None
    if not isinstance(img, nib.MGHImage):
        raise PVSInputError(f"{path} was read as {type(img).__name__}, not MGH; convert it to "
                            ".nii.gz")
    slicer = pick_volume(img, path, volume)
    n_bytes = int(np.prod(img.shape, dtype=np.float64)) * img.get_data_dtype().itemsize
    if n_bytes > _MAX_MGH_BYTES or (
            path.suffix.lower() == ".mgh"
            and path.stat().st_size < _MGH_HEADER_BYTES + n_bytes):
        raise PVSInputError(
            f"{path}: the header claims shape {img.shape} ({n_bytes} bytes of voxels), which "
            "the file does not hold; it is truncated or its header is corrupt")
    affine = np.asarray(img.affine, dtype=np.float64)
    problem = affine_problem(affine)
    if problem:
        raise PVSInputError(f"{path} has no usable affine ({problem}); fix the header "
                            "(mri_convert) before use")
    data = _zero_non_finite(_read_voxels(img, slicer, path, dtype, as_labels), path)
    if as_labels:
        data = as_label_array(data, path)
    header = nib.Nifti1Header()
    header.set_data_dtype(img.get_data_dtype().newbyteorder("="))  # the dtype on disk
    header.set_data_shape(data.shape)
    header.set_zooms(tuple(float(z) for z in img.header.get_zooms()[:3]))
    header.set_qform(affine, code=1)
    header.set_sform(affine, code=1)
    header.set_xyzt_units("mm")
    return Volume(data=data, affine=affine, spacing=_spacing(header, affine), path=path,
                  sha256=sha256_file(path), header=header)


def _open_nifti(path: Path) -> Any:
    """The nibabel image of *path* (header only; voxels are read by :func:`_read_voxels`)."""
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
    return img


def _read_voxels(img: Any, slicer, path: Path, dtype: Any, as_labels: bool) -> np.ndarray:
    """The voxels (of one volume of a series), with a clear message when they cannot be read."""
    try:
        raw = img.dataobj if slicer is None else img.dataobj[slicer]
        return np.asarray(raw) if as_labels else np.asarray(raw, dtype=dtype)
    except MemoryError:
        raise PVSInputError(
            f"{path}: not enough memory for shape {img.shape} - the header may be "
            "corrupt, or the volume is too large for this machine"
        ) from None
    except (OSError, EOFError, zlib.error, ValueError) as exc:
        raise PVSInputError(
            f"{path} is truncated or corrupt ({one_line(exc)}); re-export or copy the file again"
        ) from None


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
