"""Input checks for :mod:`napari_pvs.io`: one-pass hash and gzip check, data size,
geometry, dimensions.

Every failure raises :class:`~napari_pvs.PVSInputError` with a one-line message.
"""

from __future__ import annotations

import hashlib
import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ._errors import PVSInputError

__all__ = [
    "NiftiScan",
    "affine_problem",
    "check_data_size",
    "one_line",
    "pick_volume",
    "scan_nifti",
    "usable_affine",
]

_CHUNK = 1 << 20
_GZIP_MAGIC = b"\x1f\x8b"


@dataclass(frozen=True)
class NiftiScan:
    """What one streamed pass over a NIfTI file found.

    Attributes
    ----------
    sha256 : str
        Hex SHA-256 of the bytes on disk.
    size : int
        Bytes of NIfTI content: the file size for ``.nii``, the decompressed
        size for ``.nii.gz``.
    head : bytes
        The first :data:`HEAD_BYTES` bytes of that content (the header).
    """

    sha256: str
    size: int
    head: bytes


#: Enough content for a NIfTI-2 header (540 bytes); NIfTI-1 needs 348.
HEAD_BYTES = 540


def scan_nifti(path: Path) -> NiftiScan:
    """Hash *path* and measure its content in one pass; for ``.gz``, check the gzip stream.

    nibabel stops reading once it has the voxels it needs, so a flipped byte
    that still decompresses would go unnoticed; the CRC-32 at the end of each
    gzip member catches it.  Decompressed bytes are counted and discarded chunk
    by chunk (only the header is kept), so memory stays at a few MiB whatever
    the file claims to hold.
    """
    digest = hashlib.sha256()
    is_gzip = path.name.lower().endswith(".gz")
    inflater, size, head = None, 0, b""
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
            if not is_gzip:
                size += len(chunk)
                head = head if len(head) >= HEAD_BYTES else (head + chunk)[:HEAD_BYTES]
                continue
            inflater, out = _inflate(path, inflater, chunk)
            for piece in out:
                size += len(piece)
                if len(head) < HEAD_BYTES:
                    head = (head + piece)[:HEAD_BYTES]
    if inflater is not None:
        try:
            size += len(inflater.flush())
        except zlib.error as exc:
            raise PVSInputError(_corrupt_gzip(path, exc)) from None
        if not inflater.eof:
            raise PVSInputError(
                f"{path} is truncated (its gzip stream ends early); re-export or copy it again"
            )
    return NiftiScan(sha256=digest.hexdigest(), size=size, head=head)


def check_data_size(img: Any, scan: NiftiScan, path: Path) -> None:
    """Refuse a file whose header claims more voxel bytes than the file holds.

    Checked before nibabel reads the voxels (``img.dataobj`` is the array proxy
    with the offset, shape and dtype it would read): a 1 KB file whose header
    claims 3e9 bytes would otherwise allocate 3 GB before failing.
    """
    proxy = img.dataobj
    shape = tuple(int(n) for n in proxy.shape)
    dtype = np.dtype(proxy.dtype)
    claimed = int(proxy.offset) + math.prod(shape) * dtype.itemsize
    if scan.size < claimed:
        what = "decompressed, it holds" if path.name.lower().endswith(".gz") else "the file holds"
        raise PVSInputError(
            f"{path} is truncated or corrupt: its header claims {claimed:,} bytes (shape {shape}, "
            f"{dtype}) but {what} only {scan.size:,} bytes; re-export or copy the file again"
        )


def affine_problem(affine: Any) -> str | None:
    """Why a 4x4 voxel-to-world matrix cannot place voxels in space; None when it can."""
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        return "has NaN or infinite entries"
    linear = affine[:3, :3]
    norms = np.sqrt((linear**2).sum(axis=0))
    if not np.any(norms > 0):
        return "is all zero"
    if not np.all(norms > 0):
        return f"has a zero voxel size (column norms {np.round(norms, 4).tolist()})"
    if abs(np.linalg.det(linear)) <= 1e-6 * float(np.prod(norms)):
        return "is singular (its axes are not independent)"
    return None


def usable_affine(img: Any, scan: NiftiScan, path: Path) -> tuple[np.ndarray, str | None]:
    """The voxel-to-world affine to use, and a note when a broken sform was skipped.

    nibabel's ``img.affine`` is the sform when its code is set, else the qform
    when its code is set, else a plain scaling by the voxel size (pixdim).  Any
    of them may be all zero, NaN or singular in a damaged header, and nibabel
    quietly turns a zero pixdim into 1 mm, so the voxel size is read from the
    raw header bytes.  The first usable one in nibabel's order is returned.

    Raises
    ------
    PVSInputError
        When no candidate is usable: loading would place the voxels nowhere, or
        silently at 1 mm.
    """
    header = img.header
    klass = type(header)
    raw = klass(binaryblock=scan.head[: klass.sizeof_hdr], check=False)
    pixdim = np.asarray(raw["pixdim"][1:4], dtype=np.float64)
    pix_problem = None
    if not np.all(np.isfinite(pixdim) & (pixdim != 0)):
        pix_problem = f"its voxel size (pixdim) is {pixdim.tolist()}"
    sform, scode = header.get_sform(coded=True)
    qcode = int(header["qform_code"])
    candidates = []
    if int(scode) > 0:
        candidates.append((f"sform (code {int(scode)})", lambda: sform, None))
    if qcode > 0:
        candidates.append((f"qform (code {qcode})", header.get_qform, pix_problem))
    if not candidates:
        candidates.append(("voxel size (no sform or qform code)", header.get_base_affine,
                           pix_problem))
    problems = []
    for name, get, known in candidates:
        try:
            problem = known or affine_problem(get())
        except (ValueError, ArithmeticError, np.linalg.LinAlgError) as exc:
            problem = one_line(exc)
        if problem is None:
            note = None if not problems else (
                f"{path}: its {problems[0]}; using the {name} instead")
            return np.asarray(get(), dtype=np.float64), note
        problems.append(f"{name} {problem}")
    raise PVSInputError(
        f"{path} has no usable voxel-to-world geometry: {'; '.join(problems)}; repair the "
        "header (e.g. copy the geometry of the scan it came from with `fslcpgeom`)"
    )


def _corrupt_gzip(path: Path, exc: BaseException) -> str:
    return f"{path} is a corrupt gzip file ({exc}); re-export or copy it again"


def _inflate(path: Path, inflater: Any, chunk: bytes) -> tuple[Any, list[bytes]]:
    """Feed *chunk* to the gzip *inflater* (None before the first chunk).

    Returns the inflater (a new one after each gzip member) and the
    decompressed pieces, each at most 1 MiB.
    """
    if inflater is None:
        if not chunk.startswith(_GZIP_MAGIC):
            raise PVSInputError(
                f"{path} ends in .gz but is not gzip-compressed, so it is not a NIfTI "
                "file (if it is an uncompressed NIfTI, rename it to .nii)"
            )
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    data, out = chunk, []
    try:
        while data:
            if inflater.eof:  # another gzip member follows, or zero padding
                if not data.strip(b"\x00"):
                    break
                inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
            out.append(inflater.decompress(data, _CHUNK))
            data = inflater.unused_data if inflater.eof else inflater.unconsumed_tail
    except zlib.error as exc:
        raise PVSInputError(_corrupt_gzip(path, exc)) from None
    return inflater, out


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
