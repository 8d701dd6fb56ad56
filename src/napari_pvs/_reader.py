"""npe2 reader: open NIfTI volumes as napari layers in world (RAS+ mm) space.

The reader never raises on a file it cannot use.  It reports the one-line
reason through napari's notifications and returns None, so napari can try
another reader.  Layers carry ``scale=spacing`` and the rest of the NIfTI
affine as ``affine``; their metadata keep what the writer needs to put labels
back on the same grid.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ._errors import PVSInputError
from .io import Volume, as_label_array, is_mgh_path, is_nifti_path, load_volume, strip_nifti_suffix

__all__ = ["get_reader", "layer_data_from_volume", "read_nifti"]

PathOrPaths = str | os.PathLike[str] | Sequence[str | os.PathLike[str]]
LayerData = tuple[Any, dict[str, Any], str]

#: Name parts that mark a label map (BIDS ``_dseg``/``_mask``, ``label``, ``labels``).
_LABEL_NAME = re.compile(r"(_dseg|_mask|label)", re.IGNORECASE)
#: An integer volume with at most this many distinct values opens as labels.
_MAX_LABEL_VALUES = 128


def get_reader(path: PathOrPaths) -> Callable[[PathOrPaths], list[LayerData] | None] | None:
    """Return :func:`read_nifti` if every path ends in ``.nii``, ``.nii.gz`` or FreeSurfer's
    ``.mgz`` / ``.mgh`` (opened with their geometry, e.g. ``aseg.mgz`` as labels).

    Parameters
    ----------
    path : str, os.PathLike or sequence of them
        What napari asks to open.

    Returns
    -------
    callable or None
        The reader function, or None when this plugin does not handle *path*.
    """
    paths = _as_list(path)
    if not paths or not all(is_nifti_path(p) or is_mgh_path(p) for p in paths):
        return None
    return read_nifti


def _as_list(path: Any) -> list[str | os.PathLike[str]]:
    if isinstance(path, (str, os.PathLike)):
        return [path]
    if isinstance(path, (list, tuple)) and all(isinstance(p, (str, os.PathLike)) for p in path):
        return list(path)
    return []


def read_nifti(path: PathOrPaths) -> list[LayerData] | None:
    """Read one or more NIfTI files into napari layer data.

    Parameters
    ----------
    path : str, os.PathLike or sequence of them
        NIfTI files to open.

    Returns
    -------
    list of (data, kwargs, layer_type) or None
        One layer per readable file; None when no file could be read.  The
        reason each unreadable file was skipped is shown as a warning.
    """
    layers = []
    for one in _as_list(path):
        try:
            layers.append(_read_one(one))
        except PVSInputError as exc:
            _report(str(exc))
    return layers or None


def _report(message: str) -> None:
    """Show *message* as a napari warning, or a Python warning without napari."""
    try:
        from napari.utils.notifications import show_warning
    except ImportError:
        warnings.warn(message, stacklevel=3)
        return
    show_warning(message)


def _read_one(path: str | os.PathLike[str]) -> LayerData:
    vol = load_volume(path)
    name = strip_nifti_suffix(os.path.basename(os.fspath(path)))
    if _looks_like_labels(vol, name):
        return layer_data_from_volume(vol, name=name, labels=as_label_array(vol.data, path))
    return layer_data_from_volume(vol, name=name)


def layer_data_from_volume(
    vol: Volume, *, name: str | None = None, labels: np.ndarray | None = None
) -> LayerData:
    """Build an image (or, given *labels*, a labels) layer tuple for *vol*.

    Parameters
    ----------
    vol : Volume
        Source of the data and the geometry.
    name : str, optional
        Layer name; defaults to the file name without its NIfTI suffix.
    labels : numpy.ndarray, optional
        Integer data on the grid of *vol*; when given, a ``"labels"`` layer
        is returned instead of an image.

    Returns
    -------
    tuple
        ``(data, kwargs, layer_type)`` for napari.
    """
    if name is None:
        name = strip_nifti_suffix(vol.path.name) if vol.path is not None else "volume"
    scale, affine = vol.napari_transform()
    kwargs: dict[str, Any] = {
        "name": name,
        "scale": scale,
        "affine": affine,
        "metadata": _geometry_metadata(vol),
    }
    if labels is not None:
        return labels, kwargs, "labels"
    kwargs["colormap"] = "gray"
    kwargs["contrast_limits"] = _contrast_limits(vol.data)
    return vol.data, kwargs, "image"


def _geometry_metadata(vol: Volume) -> dict[str, Any]:
    """Everything the writer needs to restore the NIfTI geometry exactly."""
    sform, sform_code = vol.header.get_sform(coded=True)
    qform, qform_code = vol.header.get_qform(coded=True)
    return {
        "nifti_affine": vol.affine.tolist(),
        "nifti_sform": None if sform is None else np.asarray(sform).tolist(),
        "nifti_qform": None if qform is None else np.asarray(qform).tolist(),
        "sform_code": int(sform_code),
        "qform_code": int(qform_code),
        "nifti_version": 2 if int(vol.header["sizeof_hdr"]) == 540 else 1,
        "spacing": list(vol.spacing),
        "shape": list(vol.shape),
        "source_path": None if vol.path is None else str(vol.path),
        "sha256": vol.sha256,
    }


def _contrast_limits(data: np.ndarray) -> tuple[float, float]:
    if data.size == 0:
        return (0.0, 1.0)
    low, high = (float(v) for v in np.percentile(data, [0.5, 99.5]))
    if high <= low:
        low, high = float(data.min()), float(data.max())
    if high <= low:
        high = low + 1.0
    return (low, high)


def _looks_like_labels(vol: Volume, name: str) -> bool:
    """Integer-valued data that are integers on disk with few values, or named like labels."""
    data = vol.data
    by_name = _LABEL_NAME.search(name) is not None
    int_on_disk = np.issubdtype(vol.header.get_data_dtype(), np.integer)
    if data is None or data.size == 0 or not (by_name or int_on_disk):
        return False
    if not np.array_equal(data, np.round(data)):
        return False
    if by_name:
        return True
    low, high = float(data.min()), float(data.max())
    if high - low > 1 << 16:
        return False
    counts = np.bincount((data - low).astype(np.int64).ravel())
    return int(np.count_nonzero(counts)) <= _MAX_LABEL_VALUES
