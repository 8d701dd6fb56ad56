"""Input checks for :mod:`napari_pvs.io`: SHA-256, gzip integrity and dimensions.

Every failure raises :class:`~napari_pvs.PVSInputError` with a one-line message.
"""

from __future__ import annotations

import hashlib
import os
import zlib
from pathlib import Path
from typing import Any

from ._errors import PVSInputError

__all__ = ["hash_and_check_gzip", "one_line", "pick_volume", "sha256_file"]

_CHUNK = 1 << 20
_GZIP_MAGIC = b"\x1f\x8b"


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def hash_and_check_gzip(path: Path) -> str:
    """Hash *path* and, for ``.gz``, run its whole gzip stream through zlib.

    nibabel stops reading once it has the voxels it needs, so a flipped byte
    that still decompresses would go unnoticed; the CRC-32 at the end of each
    gzip member catches it.  Decompressed bytes are discarded chunk by chunk.
    """
    digest = hashlib.sha256()
    is_gzip = path.name.lower().endswith(".gz")
    inflater = None
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
            if is_gzip:
                inflater = _inflate(path, inflater, chunk)
    if inflater is not None:
        try:
            inflater.flush()
        except zlib.error as exc:
            raise PVSInputError(_corrupt_gzip(path, exc)) from None
        if not inflater.eof:
            raise PVSInputError(
                f"{path} is truncated (its gzip stream ends early); re-export or copy it again"
            )
    return digest.hexdigest()


def _corrupt_gzip(path: Path, exc: BaseException) -> str:
    return f"{path} is a corrupt gzip file ({exc}); re-export or copy it again"


def _inflate(path: Path, inflater: Any, chunk: bytes) -> Any:
    """Feed *chunk* to the gzip *inflater* (None before the first chunk)."""
    if inflater is None:
        if not chunk.startswith(_GZIP_MAGIC):
            raise PVSInputError(
                f"{path} ends in .gz but is not gzip-compressed, so it is not a NIfTI "
                "file (if it is an uncompressed NIfTI, rename it to .nii)"
            )
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    data = chunk
    try:
        while data:
            if inflater.eof:  # another gzip member follows, or zero padding
                if not data.strip(b"\x00"):
                    break
                inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
            inflater.decompress(data, _CHUNK)
            data = inflater.unused_data if inflater.eof else inflater.unconsumed_tail
    except zlib.error as exc:
        raise PVSInputError(_corrupt_gzip(path, exc)) from None
    return inflater


def one_line(exc: BaseException) -> str:
    """``Type: message`` of *exc* on a single line."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def pick_volume(img: Any, path: Path, volume: int | None) -> tuple[Any, ...] | None:
    """Check the image's dimensions; return the slicer for the 3D volume to read."""
    full = tuple(int(n) for n in img.shape)
    shape = full
    while len(shape) > 4 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) < 3:
        raise PVSInputError(f"{path} is {len(shape)}D (shape {full}); napari-pvs needs a 3D volume")
    if len(shape) > 4:
        raise PVSInputError(
            f"{path} is {len(shape)}D (shape {full}); napari-pvs reads 3D volumes or one "
            "volume of a 4D series - split it into 3D files first"
        )
    extra = (0,) * (len(full) - len(shape))
    if len(shape) == 3:
        if volume not in (None, 0):
            raise PVSInputError(f"{path} is 3D (shape {full}); volume={volume} does not exist")
        return (Ellipsis, *extra) if extra else None
    n_vol = shape[3]
    if volume is None and n_vol == 1:
        volume = 0
    if volume is None:
        raise PVSInputError(
            f"{path} is 4D with {n_vol} volumes (shape {full}); pick one with volume=N "
            f"(CLI: --volume N), 0 <= N < {n_vol}, or extract it with `fslroi IN OUT N 1`"
        )
    if not 0 <= volume < n_vol:
        raise PVSInputError(
            f"{path} is 4D with {n_vol} volumes (shape {full}); volume={volume} is out of "
            f"range, pick 0 <= N < {n_vol}"
        )
    return (slice(None), slice(None), slice(None), volume, *extra)
