"""Settings of a training run, checked before any work starts."""

from __future__ import annotations

import math
from dataclasses import dataclass

from napari_pvs._backends import pick_device
from napari_pvs._errors import PVSInputError
from napari_pvs.model import arch_config, check_spacing

from .data import REVIEW_GAP, REVIEW_RIM

__all__ = ["FinetuneConfig"]


@dataclass
class FinetuneConfig:
    iterations: int = 200
    iterations_per_epoch: int = 50
    patch: tuple[int, int, int] = (48, 48, 48)
    batch_size: int = 2
    lr: float = 3e-4
    pos_fraction: float = 0.5
    replay_fraction: float = 0.5
    val_fraction: float = 0.25
    variant: str = "XS"
    kernel_size: int = 3
    target_spacing: tuple[float, float, float] | None = None
    cache_budget_mb: int = 2048
    seed: int = 0
    augment: bool = True  # MONAI flips, rotations, intensity and bias-field augmentation
    # review-only labels: background voxels this close to a reviewed one count as known
    review_rim: int = REVIEW_RIM  # voxels; 0: the reviewed voxels only
    # ...except this many right outside an accepted cluster, left unknown
    review_gap: int = REVIEW_GAP
    device: str = "auto"  # CUDA, then MPS, then CPU (napari_pvs.inference.pick_device)

    def validate(self) -> FinetuneConfig:
        """Check every setting before any work starts; returns ``self``.

        Raises :class:`~napari_pvs.PVSInputError` with one line naming the bad value.
        The CLI, the training worker and :func:`finetune` all call it.
        """
        flags = {"iterations": "--iterations", "iterations_per_epoch": "--epoch",
                 "seed": "--seed"}

        def whole(name, low, high=None):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low or (high and v > high):
                rng = f">= {low}" if high is None else f"between {low} and {high}"
                flag = f" ({flags[name]})" if name in flags else ""
                raise PVSInputError(f"{name.replace('_', ' ')}{flag} must be a whole number {rng}, "
                                    f"got {v!r}")

        whole("iterations", 1)
        whole("iterations_per_epoch", 1)
        whole("batch_size", 1, 1024)
        whole("cache_budget_mb", 1)
        whole("seed", 0)
        whole("review_rim", 0, 16)
        whole("review_gap", 0, 16)
        patch = tuple(self.patch) if isinstance(self.patch, (tuple, list)) else (self.patch,)
        # MedNeXt halves the patch 4 times, and its GroupNorm needs more than one voxel
        # per channel at the 1/16 scale while training
        if len(patch) != 3 or any(isinstance(p, bool) or not isinstance(p, int) or p < 32 or p % 16
                                  or p > 1024 for p in patch):
            raise PVSInputError(f"patch must be 3 edges that are multiples of 16 from 32 to 1024, "
                                f"got {self.patch!r}; use e.g. --patch 32 or 48")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) \
                or not math.isfinite(self.lr) or self.lr <= 0:
            raise PVSInputError(f"learning rate must be a finite number > 0, got {self.lr!r}; "
                                "use e.g. --lr 3e-4")
        for name in ("pos_fraction", "replay_fraction", "val_fraction"):
            v = getattr(self, name)
            top = 0.9 if name == "val_fraction" else 1
            if not isinstance(v, (int, float)) or not 0 <= v <= top:
                raise PVSInputError(f"{name} must lie in [0, {top}], got {v!r}")
        if not isinstance(self.augment, bool):
            raise PVSInputError(f"augment must be True or False, got {self.augment!r}")
        arch_config(self.variant, self.kernel_size)
        if self.target_spacing is not None:
            check_spacing(self.target_spacing, "target_spacing")
        pick_device(str(self.device))
        return self
