"""The region table: the codes of a region map (the ``regions`` arrays of phantoms,
stores and predictions, and the ROI files the CLI reads).

0 is everything else, 1 the white matter (WM), 2 the basal ganglia (BG): MedNet-PVS
scores PVS separately in WM and BG.
"""

from __future__ import annotations

__all__ = ["REGION_CODES", "REGION_NAMES", "SCORED_REGIONS"]

#: Name -> code of every region of a region map.
REGION_CODES: dict[str, int] = {"other": 0, "WM": 1, "BG": 2}
#: Code -> name (the inverse of :data:`REGION_CODES`).
REGION_NAMES: dict[int, str] = {code: name for name, code in REGION_CODES.items()}
#: Name -> code of the regions that are scored separately (all but "other").
SCORED_REGIONS: dict[str, int] = {name: code for name, code in REGION_CODES.items() if code}
