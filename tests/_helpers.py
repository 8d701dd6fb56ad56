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
