"""A compact supervised training loop for MedNeXt on (image, labels, ROI) volumes.

This is the core that incremental fine-tuning builds on: patch sampling with positive
oversampling, MONAI's Dice + cross-entropy loss, AdamW with a polynomial learning-rate
decay, and a generator interface that yields progress events and returns the trained
network.  It runs on CPU with small patches and the small ``XS`` configuration.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["TrainEvent", "TrainingVolume", "fit", "sample_patch"]


@dataclass
class TrainingVolume:
    """One training subject on its model-spacing grid (already normalised)."""

    image: np.ndarray  # float32 (X, Y, Z), z-scored
    labels: np.ndarray  # uint8 (X, Y, Z)
    roi: np.ndarray | None = None  # bool (X, Y, Z)


@dataclass(frozen=True)
class TrainEvent:
    """Progress of :func:`fit`: iteration ``done`` of ``total`` with the batch loss."""

    done: int
    total: int
    loss: float
    lr: float


def sample_patch(vol: TrainingVolume, patch: Sequence[int], rng: np.random.Generator,
                 positive: bool) -> tuple[np.ndarray, np.ndarray]:
    """A patch centred on a random PVS voxel (``positive``) or on a random ROI voxel."""
    shape = np.array(vol.image.shape)
    p = np.array(patch)
    pool = vol.labels if positive and vol.labels.any() else vol.roi
    if pool is None or not np.any(pool):
        centre = rng.integers(0, shape)
    else:
        idx = np.flatnonzero(pool)
        centre = np.array(np.unravel_index(idx[rng.integers(idx.size)], vol.image.shape))
    lo = np.clip(centre - p // 2, 0, np.maximum(shape - p, 0))
    sl = tuple(slice(a, a + n) for a, n in zip(lo, p))
    img, lab = vol.image[sl], vol.labels[sl]
    short = [(0, max(n - s, 0)) for n, s in zip(p, img.shape)]
    if any(b for _, b in short):
        img, lab = np.pad(img, short), np.pad(lab, short)
    return img.astype(np.float32), lab.astype(np.int64)


def fit(
    net,
    volumes: Sequence[TrainingVolume],
    *,
    iterations: int = 200,
    patch: Sequence[int] = (48, 48, 48),
    batch_size: int = 2,
    lr: float = 3e-4,
    pos_fraction: float = 0.5,
    seed: int = 0,
    device: str = "cpu",
) -> Generator[TrainEvent, None, object]:
    """Train ``net`` on patches of ``volumes``; yields :class:`TrainEvent`, returns ``net``.

    At least ``pos_fraction`` of the patches (rounded up per batch) are centred on PVS
    voxels.  Loss: MONAI ``DiceCELoss`` (softmax, one-hot targets); optimiser AdamW;
    learning rate ``lr * (1 - i / iterations) ** 0.9`` (nnU-Net's poly schedule).
    """
    import torch
    from monai.losses import DiceCELoss

    if not volumes:
        raise ValueError("fit needs at least one training volume")
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    net = net.to(device).train()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-5)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    n_pos = int(np.ceil(pos_fraction * batch_size))
    for it in range(iterations):
        cur_lr = lr * (1 - it / iterations) ** 0.9
        for group in opt.param_groups:
            group["lr"] = cur_lr
        pairs = [sample_patch(volumes[rng.integers(len(volumes))], patch, rng, k < n_pos)
                 for k in range(batch_size)]
        x = torch.from_numpy(np.stack([p[0] for p in pairs])[:, None]).to(device)
        y = torch.from_numpy(np.stack([p[1] for p in pairs])[:, None]).to(device)
        out = net(x)
        if isinstance(out, (tuple, list)):  # deep supervision: main head only here
            out = out[0]
        loss = loss_fn(out, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        yield TrainEvent(it + 1, iterations, float(loss.detach()), cur_lr)
    return net.eval()
