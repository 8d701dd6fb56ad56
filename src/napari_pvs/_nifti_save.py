"""Writing NIfTI files in the geometry of a source volume (re-exported by
:mod:`napari_pvs.io`): labels and float maps keep the source header (affine, qform and
sform with their codes, NIfTI-1 or -2) and are written atomically."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from ._errors import PVSInputError
from ._fs import atomic_path
from ._nifti_checks import one_line
from ._volume import Volume, _label_dtype, geometry_from_affine, is_nifti_path

__all__ = ["save_labels", "save_map"]


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
    """Save through :func:`napari_pvs._fs.atomic_path` (a temporary file, then ``os.replace``)."""
    image_class = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
    image = image_class(data, None, header)
    suffix = ".nii.gz" if path.name.lower().endswith(".gz") else ".nii"
    try:
        with atomic_path(path, suffix=suffix) as tmp:
            nib.save(image, tmp)
    except OSError as exc:
        raise PVSInputError(
            f"{path}: cannot write the {what} ({one_line(exc)}); check that the folder "
            "exists and is writable"
        ) from None
