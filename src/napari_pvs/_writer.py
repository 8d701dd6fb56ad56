"""npe2 writer: save a napari Labels layer as a NIfTI label volume.

Geometry comes from the layer metadata that :mod:`napari_pvs._reader` stores
(the source file's sform, qform and their codes) when the shapes agree, and
otherwise from the layer's own transform (``affine @ translate/rotate/shear @
scale``), written with qform and sform code 1 (scanner).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._errors import PVSInputError
from .io import Volume, geometry_from_affine, is_nifti_path, save_labels

__all__ = ["geometry_from_layer_meta", "write_labels"]


def write_labels(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """Write one Labels layer to ``.nii.gz`` (or ``.nii``).

    Parameters
    ----------
    path : str
        Target file; ``.nii.gz`` is appended when it has no NIfTI suffix.
    data : array-like
        The 3D label data (for a multiscale layer, the first level is used).
    meta : dict
        The layer state napari passes to writers (``scale``, ``translate``,
        ``affine`` ... and ``metadata``).

    Returns
    -------
    list of str
        The path written.

    Raises
    ------
    PVSInputError
        If the layer is not 3D or its values are not integers.
    """
    out = path if is_nifti_path(path) else f"{path}.nii.gz"
    if meta.get("multiscale") and isinstance(data, (list, tuple)):
        data = data[0]
    labels = np.asarray(data)
    if labels.ndim != 3:
        raise PVSInputError(
            f"{out}: napari-pvs saves 3D label volumes, but layer "
            f"{meta.get('name', '')!r} is {labels.ndim}D (shape {labels.shape})"
        )
    like = geometry_from_layer_meta(meta, labels.shape)
    return [str(save_labels(out, labels, like))]


def geometry_from_layer_meta(meta: dict[str, Any], shape: tuple[int, ...]) -> Volume:
    """Recover NIfTI geometry for a layer of *shape* from its napari state.

    Parameters
    ----------
    meta : dict
        Layer state, as from ``layer.as_layer_data_tuple()[1]``.
    shape : tuple of int
        Shape of the data to be written.

    Returns
    -------
    Volume
        A data-less volume to pass as ``like`` to :func:`napari_pvs.io.save_labels`.
    """
    info = meta.get("metadata") or {}
    source_shape = info.get("shape")
    if "nifti_affine" in info and (source_shape is None or tuple(source_shape) == tuple(shape)):
        sform = info.get("nifti_sform")
        qform = info.get("nifti_qform")
        return geometry_from_affine(
            np.asarray(sform if sform is not None else info["nifti_affine"], dtype=float),
            shape,
            sform_code=int(info.get("sform_code", 1)),
            qform_code=int(info.get("qform_code", 1)),
            qform=None if qform is None else np.asarray(qform, dtype=float),
            nifti2=info.get("nifti_version") == 2,
        )
    return geometry_from_affine(_layer_data_to_world(meta), shape, sform_code=1, qform_code=1)


def _layer_data_to_world(meta: dict[str, Any]) -> np.ndarray:
    """napari's data-to-world matrix for a 3D layer: ``affine @ composite``."""
    from napari.utils.transforms import Affine, CompositeAffine

    ndim = 3
    composite = CompositeAffine(
        scale=meta.get("scale", (1.0,) * ndim),
        translate=meta.get("translate", (0.0,) * ndim),
        rotate=meta.get("rotate"),
        shear=meta.get("shear"),
        ndim=ndim,
    )
    physical_to_world = meta.get("affine")
    if physical_to_world is None:
        outer = np.eye(ndim + 1)
    elif isinstance(physical_to_world, Affine):
        outer = physical_to_world.affine_matrix
    else:
        outer = np.asarray(physical_to_world, dtype=float)
    return outer @ composite.affine_matrix
