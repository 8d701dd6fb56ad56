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
