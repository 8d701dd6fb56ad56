"""napari_pvs.training: learning from the corrections store (no Qt).

Installed from the top-level ``training/`` folder through a setuptools
``package-dir`` mapping.

* :mod:`.data`: corrected label versions only, a memory-budgeted subject cache,
  patch sampling with PVS / recent-edit oversampling and MONAI augmentation;
* :mod:`.trainer`: the one training loop (AdamW, poly learning rate, Dice + CE),
  with hooks for validation, checkpoints and registration;
* :mod:`.finetune`: incremental fine-tuning with checkpoints, resume, cancel,
  registration, and DDP under ``torchrun`` (``python -m napari_pvs.training``);
* :mod:`.evaluate`: k-fold and leave-one-site-out evaluation reports;
* :mod:`.splits`: seeded, saved and reused cross-validation splits;

Submodules import torch lazily, so importing this package stays light.
"""

from __future__ import annotations

from .splits import kfold_splits, load_or_create_splits, losocv_splits

__all__ = ["kfold_splits", "load_or_create_splits", "losocv_splits"]
