"""Small helpers shared by several test modules."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

ATOL = 1e-5


def assert_same_geometry(written: Path, source: Path, atol: float = ATOL) -> None:
    """``written`` has the affine, sform and qform (with their codes) of ``source``."""
    back, original = nib.load(written), nib.load(source)
    np.testing.assert_allclose(back.affine, original.affine, atol=atol)
    for getter in ("get_sform", "get_qform"):
        want, want_code = getattr(original.header, getter)(coded=True)
        got, got_code = getattr(back.header, getter)(coded=True)
        assert int(got_code) == int(want_code)
        np.testing.assert_allclose(got, want, atol=atol)


#: The MedNet-PVS release-format fixture (tests/data/mednext_v1/README.md).
MEDNEXT_FIXTURE = Path(__file__).parent / "data" / "mednext_v1"
MEDNEXT_RELEASE = (MEDNEXT_FIXTURE / "nnUNet/3d_fullres/Task900_PVSTiny"
                   / "nnUNetTrainerV2_MedNeXt_tiny_kernel5__nnUNetPlansv2.1_trgSp_0.8x0.8x0.8")


def write_raw_nifti(path: Path, header, payload: bytes) -> Path:
    """NIfTI-1 header bytes + payload, written as they are (nibabel's save would repair a
    broken header); gzip-compressed when ``path`` ends in ``.gz``."""
    import gzip

    header["vox_offset"] = 352
    raw = header.binaryblock + b"\x00" * 4 + payload
    path.write_bytes(gzip.compress(raw) if path.name.endswith(".gz") else raw)
    return path


def oversized_nifti(path: Path) -> Path:
    """A header claiming 1000 x 1000 x 750 float32 voxels (3e9 bytes) over 1 KB of data."""
    header = nib.Nifti1Header()
    header.set_data_shape((1000, 1000, 750))
    header.set_data_dtype(np.float32)
    header.set_sform(np.eye(4), code=1)
    return write_raw_nifti(path, header, np.zeros(256, np.float32).tobytes())


def flip_middle_bytes(path: Path, n: int = 16) -> Path:
    """Invert ``n`` bytes in the middle of the file (a corrupt copy)."""
    raw = bytearray(path.read_bytes())
    mid = len(raw) // 2
    raw[mid : mid + n] = bytes(b ^ 0xFF for b in raw[mid : mid + n])
    path.write_bytes(bytes(raw))
    return path


def truncate_half(path: Path) -> Path:
    """Keep the first half of the file (an interrupted copy)."""
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    return path


def store_from_cohort(path, cohort, corrected=None):
    """A new store at ``path`` holding each phantom of ``cohort`` (image and regions), with
    its true labels committed for the subjects in ``corrected`` (default: all); returns
    the store, open and writable (close it, or use it as a context manager).  Prefer the
    ``phantom_store`` fixture (conftest.py), which builds through the same function."""
    from napari_pvs.dataset import store_from_cohort as build

    return build(path, cohort, corrected, author="t")


class PickleBomb:
    """Unpickling this would run ``touch <marker>``: loaders must refuse it."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def run_cli(*args: str, tty: bool = False, timeout: float = 600, cwd=None, env=None):
    """Run ``napari-pvs ARGS`` in a child process; returns ``(returncode, stdout, stderr)``.

    With ``tty=True`` the child's stdin, stdout and stderr are a pseudo-terminal, as for
    a person at a terminal (progress bars draw only then); stdout and stderr then come
    back together in ``stdout`` and ``stderr`` is ``""``.
    """
    import os
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "napari_pvs.cli", *map(str, args)]
    environ = {**os.environ, **(env or {})}
    if not tty:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd,
                           env=environ, stdin=subprocess.DEVNULL)
        return r.returncode, r.stdout, r.stderr
    import pty
    import select
    import time

    master, slave = pty.openpty()
    proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, cwd=cwd, env=environ,
                            close_fds=True)
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while True:
            if time.monotonic() > deadline:
                proc.kill()
                raise TimeoutError(f"napari-pvs {' '.join(map(str, args))} ran over {timeout} s")
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    data = b""
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
    finally:
        os.close(master)
    rc = proc.wait()
    return rc, b"".join(chunks).decode(errors="replace").replace("\r\n", "\n"), ""


def assert_clean_failure(rc: int, out: str, err: str, *needles: str) -> None:
    """A bad input: non-zero exit, no traceback, one ``napari-pvs[ SUBCOMMAND]: error:`` line
    naming ``needles``."""
    text = out + err
    assert rc != 0, f"expected failure, got exit 0:\n{text}"
    assert "Traceback" not in text, text
    import re

    # ours ("napari-pvs: error: ...") or argparse's ("napari-pvs predict: error: argument ...")
    lines = [line for line in text.splitlines() if re.match(r"napari-pvs( [a-z-]+)*: error: ", line)]
    assert lines, f"no 'napari-pvs: error:' line in:\n{text}"
    for needle in needles:
        assert needle in lines[-1], f"{needle!r} not in {lines[-1]!r}"
