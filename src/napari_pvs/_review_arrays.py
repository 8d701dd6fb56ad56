"""Array checks and voxel indexing for :mod:`napari_pvs.review` (no Qt).

- :func:`check_labels`: the labels a review session may edit in place;
- :func:`flat_indices`: painted voxels, as flat indices or a numpy multi-index, to
  sorted unique flat indices;
- :func:`painted_voxels`: the voxels a napari Labels ``paint`` event changed.
"""

from __future__ import annotations

import numpy as np

__all__ = ["check_labels", "flat_indices", "painted_voxels"]


def check_labels(labels) -> None:
    """Raise ValueError unless ``labels`` is a writable 3D integer numpy array."""
    if not isinstance(labels, np.ndarray):
        raise ValueError(f"labels must be a numpy array (got {type(labels).__name__}); load it "
                         "into memory first")
    if labels.ndim != 3:
        raise ValueError(f"labels must be 3D, got shape {labels.shape}")
    if labels.dtype != bool and not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got {labels.dtype}")
    if not labels.flags.writeable:
        raise ValueError("labels array is read-only; pass a writable copy")


def flat_indices(voxels, shape: tuple[int, ...]) -> np.ndarray:
    """Sorted unique flat (C-order) indices of ``voxels``: flat indices, or a tuple of
    one index array per axis; ValueError for indices outside ``shape``."""
    size = int(np.prod(shape))
    if isinstance(voxels, tuple):
        try:
            idx = np.ravel_multi_index(tuple(np.ravel(v) for v in voxels), shape)
        except ValueError as exc:
            raise ValueError(f"painted voxel indices outside the labels' shape {shape}: "
                             f"{exc}") from None
    else:
        idx = np.asarray(voxels).ravel()
        if idx.size and (not np.issubdtype(idx.dtype, np.integer) or idx.min() < 0
                         or idx.max() >= size):
            raise ValueError(f"painted voxels must be flat indices in 0..{size - 1}")
    return np.unique(idx.astype(np.int64))


def painted_voxels(atoms, shape: tuple[int, ...]) -> tuple[np.ndarray, int | None]:
    """Flat indices of the voxels a napari Labels ``paint`` event changed.

    Parameters
    ----------
    atoms : sequence
        ``event.value`` of a Labels layer's ``paint`` event: napari records brush and
        fill strokes as ``(slice_key, mask, old_values, new_value)`` (``mask`` None when
        the whole box changed) and ``data_setitem`` edits as
        ``(indices, old_values, new_value)``.
    shape : tuple of int
        Shape of the labels array.

    Returns
    -------
    indices : ndarray of int64
        Sorted, unique flat (C-order) indices of the changed voxels.
    value : int or None
        The painted value when the event painted one value, else None.
    """
    parts, values = [np.zeros(0, np.int64)], set()
    for atom in atoms:
        if len(atom) == 4:
            key, mask, _old, new = atom
            ranges = [np.arange(*s.indices(n)) for s, n in zip(key, shape, strict=True)]
            if mask is None:
                where = np.meshgrid(*ranges, indexing="ij")
            else:
                where = [r[i] for r, i in zip(ranges, np.nonzero(np.asarray(mask)), strict=True)]
        else:
            idx, _old, new = atom
            where = [np.asarray(i) for i in idx]
        flat = np.ravel_multi_index(tuple(np.ravel(w) for w in where), shape)
        parts.append(flat.astype(np.int64))
        values.update(int(v) for v in np.unique(np.asarray(new)))
    return np.unique(np.concatenate(parts)), (values.pop() if len(values) == 1 else None)
