"""The masked training loss: MONAI's Dice + cross-entropy on the voxels whose label is known.

Review-only label versions (cluster decisions, see :mod:`napari_pvs.training.data`) know
the label of their reviewed voxels only.  :class:`MaskedDiceCELoss` is the loss that
:class:`~napari_pvs.training.trainer.Trainer` uses for every batch that comes with loss
weights (``mask``, 1 known, 0 unknown), built from MONAI's parts so that a mask of ones
gives MONAI's ``DiceCELoss(to_onehot_y=True, softmax=True)``:

* Dice: MONAI's ``DiceLoss`` on the softmax and the one-hot labels, both multiplied by
  the mask (MONAI's ``MaskedDiceLoss`` masks before the one-hot, so its background
  channel would count unknown voxels as background);
* cross-entropy: per voxel, averaged over the mask (the weighted mean).

A voxel whose weight is 0 adds nothing to the loss and gets no gradient; a patch
without any known voxel adds 0.  :func:`deep_supervision` applies it to every head of a
deep-supervision network as MONAI's ``DeepSupervisionLoss`` does (its head weights, the
labels and the mask resized to each head with nearest-exact interpolation).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["MaskedDiceCELoss", "deep_supervision"]


class MaskedDiceCELoss:
    """Dice + cross-entropy of logits (B, C, ...) against labels (B, 1, ...) on the voxels
    where ``mask`` (B, 1, ...) is 1 (see the module docstring).

    A plain callable (it holds no weights), so that importing it does not import torch.
    """

    def __init__(self):
        from monai.losses import DiceLoss

        # DiceCELoss's Dice settings; the softmax and the one-hot are done here, then masked
        self.dice = DiceLoss(include_background=True, to_onehot_y=False, softmax=False)

    def __call__(self, logits: torch.Tensor, target: torch.Tensor,
                 mask: torch.Tensor) -> torch.Tensor:
        import torch
        from monai.networks.utils import one_hot

        if mask.shape[0] != logits.shape[0] or mask.shape[1] != 1 \
                or mask.shape[2:] != logits.shape[2:]:
            raise ValueError(f"mask shape {tuple(mask.shape)} does not fit the logits "
                             f"{tuple(logits.shape)}: give one weight per voxel, (B, 1, ...)")
        mask = mask.to(logits.dtype)
        probs = torch.softmax(logits, 1)
        onehot = one_hot(target, num_classes=logits.shape[1], dim=1)
        dice = self.dice(probs * mask, onehot * mask)
        ce = torch.nn.functional.cross_entropy(logits, target[:, 0].long(), reduction="none")
        ce = (ce * mask[:, 0]).sum() / mask.sum().clamp_min(1.0)
        return dice + ce


def deep_supervision(loss, outputs: Sequence[torch.Tensor], target: torch.Tensor,
                     mask: torch.Tensor, weights: Sequence[float],
                     mode: str = "nearest-exact") -> torch.Tensor:
    """``sum(weights[l] * loss(outputs[l], target, mask))`` with ``target`` and ``mask``
    resized to each head (as MONAI's ``DeepSupervisionLoss`` resizes the labels)."""
    import torch
    import torch.nn.functional as F

    total = torch.tensor(0, dtype=torch.float, device=target.device)
    for w, out in zip(weights, outputs, strict=False):
        t, m = target, mask
        if out.shape[2:] != target.shape[2:]:
            t = F.interpolate(target, size=out.shape[2:], mode=mode)
            m = F.interpolate(mask, size=out.shape[2:], mode=mode)
        total += w * loss(out.float(), t, m)
    return total
