"""napari_pvs.training: learning from the corrections store (no Qt).

Installed from the top-level ``training/`` folder through a setuptools
``package-dir`` mapping.  This version holds the cross-validation splits
(:mod:`napari_pvs.training.splits`); the fine-tuning loop and the k-fold / LOSOCV
evaluation build on them.
"""

from __future__ import annotations

from .splits import kfold_splits, load_or_create_splits, losocv_splits

__all__ = ["kfold_splits", "load_or_create_splits", "losocv_splits"]
