"""Error types shared by the core modules."""

from __future__ import annotations

__all__ = ["PVSInputError"]


class PVSInputError(ValueError):
    """Bad input that the user can fix.

    The message is one line: it names the offending file or value, says what is
    wrong with it and what to do about it.  The CLI prints it as
    ``napari-pvs: error: <message>`` and exits with status 2.
    """
