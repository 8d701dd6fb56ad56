"""napari-pvs: perivascular space segmentation in brain MRI.

The package root stays light: it holds the version and the public error type.
Import the core modules (``napari_pvs.io``, ``napari_pvs.phantom``,
``napari_pvs.baseline`` ...) directly; none of them imports Qt.
"""

from __future__ import annotations

from ._errors import PVSInputError

__version__ = "0.1.0"

__all__ = ["PVSInputError", "__version__"]
