"""Training data from the corrections store: corrected labels only, cached, augmented.

* :func:`corrected_versions` picks, per subject, the newest label version that a
  person made or confirmed: the subject's status must be ``corrected`` and versions
  whose ``source`` starts with ``model:`` (raw model output) are skipped.  Uncorrected
  predictions never reach training.
* :class:`SubjectCache` keeps decoded subjects in memory within a byte budget (least
  recently used out first), each prepared by :func:`napari_pvs.preprocess.preprocess`
  with the model's own preprocessing, as inference prepares it.
* :class:`PatchSampler` draws patches: at least ``pos_fraction`` centred on PVS
  voxels, and half of those, when the subject has them, on voxels that its latest
  correction changed (recent corrections weigh more).  Patches are augmented with
  MONAI transforms: flips, small rotations and scaling, intensity scale / shift,
  gamma, Gaussian noise and a bias field.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from napari_pvs.preprocess import Preprocessed, preprocess

__all__ = ["PatchSampler", "SubjectCache", "SubjectData", "corrected_versions", "load_subject"]


def corrected_versions(store, subjects: Sequence[str] | None = None) -> dict[str, int]:
    """``{subject: version}`` of the newest human-corrected label version per subject."""
    out = {}
    for sid in subjects if subjects is not None else store.subjects():
        if store.info(sid).get("status") != "corrected":
            continue
        for attrs in reversed(store.versions(sid)):
            if not str(attrs.get("source", "")).startswith("model:"):
                out[sid] = int(attrs["version"])
                break
    return out


@dataclass
class SubjectData:
    """One subject on the model grid (image as the network sees it, labels, ROI, recent
    edits), with what validation needs to score it as prediction does: the way back to
    the source grid (``prep``) and the labels and ROI there."""

    subject: str
    site: str
    version: int
    image: np.ndarray
    labels: np.ndarray
    roi: np.ndarray
    recent: np.ndarray | None
    prep: Preprocessed | None = None
    source_labels: np.ndarray | None = None
    source_roi: np.ndarray | None = None
    hard: np.ndarray | None = None  # hard negatives: look-alikes and region borders


    @property
    def nbytes(self) -> int:
        arrays = (self.image, self.labels, self.roi, self.recent, self.source_labels,
                  self.source_roi, self.hard)
        return sum(a.nbytes for a in arrays if a is not None)


def load_subject(store, subject: str, version: int, pre: Mapping[str, Any] | None) -> SubjectData:
    """Decode one subject's image, ``version`` labels and ROI onto the model grid.

    The image goes through :func:`napari_pvs.preprocess.preprocess` with the model's
    preprocessing ``pre`` (its ``meta["preprocessing"]``; None: the source grid and a
    z-score), exactly as inference prepares it; labels, ROI and recent edits follow with
    nearest-neighbour resampling.
    """
    info = store.info(subject)
    image = np.asarray(store.read_image(subject), dtype=np.float32)
    regions = store.read_regions(subject)
    roi = (regions > 0) if regions is not None else image != 0
    labels = store.read_labels(subject, version) > 0
    parent = store.labels(subject, version).attrs.get("parent")
    recent = None
    if parent is not None:
        recent = labels ^ (store.read_labels(subject, parent) > 0)
    prep = preprocess(image, info["spacing"], roi, pre)
    return SubjectData(subject, str(info.get("site", "unknown")), version, prep.image[0],
                       prep.mask_to_model(labels).astype(np.uint8), prep.mask,
                       None if recent is None or not recent.any() else prep.mask_to_model(recent),
                       prep, labels, roi)


class SubjectCache:
    """Decoded subjects in memory within ``budget_bytes`` (LRU eviction)."""

    def __init__(self, store, versions: dict[str, int], pre: Mapping[str, Any] | None,
                 budget_bytes: int = 2**30):
        self.store, self.versions, self.pre = store, dict(versions), pre
        self.budget = int(budget_bytes)
        self._items: OrderedDict[str, SubjectData] = OrderedDict()
        self.loads = 0

    def get(self, subject: str) -> SubjectData:
        if subject in self._items:
            self._items.move_to_end(subject)
            return self._items[subject]
        data = load_subject(self.store, subject, self.versions[subject], self.pre)
        self.loads += 1
        self._items[subject] = data
        while len(self._items) > 1 and sum(d.nbytes for d in self._items.values()) > self.budget:
            self._items.popitem(last=False)
        return data

    @property
    def nbytes(self) -> int:
        return sum(d.nbytes for d in self._items.values())


def _augment(keys=("image", "label")):
    from monai.transforms import (
        Compose,
        RandAdjustContrastd,
        RandAffined,
        RandBiasFieldd,
        RandFlipd,
        RandGaussianNoised,
        RandScaleIntensityd,
        RandShiftIntensityd,
    )

    img = keys[0]
    return Compose([
        RandFlipd(keys, prob=0.5, spatial_axis=0), RandFlipd(keys, prob=0.5, spatial_axis=1),
        RandFlipd(keys, prob=0.5, spatial_axis=2),
        RandAffined(keys, prob=0.3, rotate_range=(0.26, 0.26, 0.26), scale_range=(0.1, 0.1, 0.1),
                    mode=("bilinear", "nearest"), padding_mode="border"),
        RandScaleIntensityd(img, factors=0.1, prob=0.3), RandShiftIntensityd(img, offsets=0.1, prob=0.3),
        RandAdjustContrastd(img, gamma=(0.8, 1.25), prob=0.3),
        RandGaussianNoised(img, std=0.05, prob=0.2), RandBiasFieldd(img, coeff_range=(0.0, 0.1), prob=0.2),
    ])


class PatchSampler:
    """Random training patches with positive oversampling and augmentation."""

    def __init__(self, cache: SubjectCache, subjects: Sequence[str], patch=(48, 48, 48),
                 pos_fraction: float = 0.5, augment: bool = True, seed: int = 0,
                 weights: Sequence[float] | None = None, hard_fraction: float = 0.0):
        if not subjects:
            raise ValueError("no corrected subjects to train on; correct and save at least one")
        self.cache, self.subjects, self.patch = cache, list(subjects), tuple(int(p) for p in patch)
        self.pos_fraction = float(pos_fraction)
        self.hard_fraction = float(hard_fraction)
        self.rng = np.random.default_rng(seed)
        w = np.ones(len(self.subjects)) if weights is None else np.asarray(weights, float)
        self.p = w / w.sum()
        self.transform = _augment() if augment else None
        if self.transform is not None:
            self.transform.set_random_state(seed=seed)

    def _centre(self, d: SubjectData, kind: str) -> np.ndarray:
        pool = d.roi
        if kind == "positive" and d.labels.any():
            pool = d.recent if d.recent is not None and self.rng.random() < 0.5 else d.labels
        elif kind == "hard" and d.hard is not None and d.hard.any():
            pool = d.hard
        idx = np.flatnonzero(pool)
        if idx.size == 0:
            return self.rng.integers(0, d.image.shape)
        return np.array(np.unravel_index(idx[self.rng.integers(idx.size)], d.image.shape))

    def _count(self, expected: float) -> int:
        whole = int(np.floor(expected))
        return whole + int(self.rng.random() < expected - whole)

    def patch_at(self, d: SubjectData, centre) -> tuple[np.ndarray, np.ndarray]:
        p = np.array(self.patch)
        shape = np.array(d.image.shape)
        lo = np.clip(np.asarray(centre) - p // 2, 0, np.maximum(shape - p, 0))
        sl = tuple(slice(a, a + n) for a, n in zip(lo, p))
        img, lab = d.image[sl], d.labels[sl]
        pad = [(0, max(n - s, 0)) for n, s in zip(p, img.shape)]
        return np.pad(img, pad), np.pad(lab, pad)

    def batch(self, size: int) -> tuple[np.ndarray, np.ndarray, list[bool]]:
        """``(images (B,1,...), labels (B,1,...), centred_on_pvs flags)``.

        The first ``pos_fraction`` of the batch (rounded up) is centred on PVS, the next
        ``hard_fraction`` on hard negatives (when the subject marks them; rounded at
        random, so that small batches still see them), the rest anywhere in the ROI.
        """
        imgs, labs, flags = [], [], []
        n_pos = int(np.ceil(self.pos_fraction * size))
        n_hard = self._count(self.hard_fraction * size) if self.hard_fraction > 0 else 0
        for k in range(size):
            d = self.cache.get(self.subjects[self.rng.choice(len(self.subjects), p=self.p)])
            positive = k < n_pos
            kind = "positive" if positive else "hard" if k < n_pos + n_hard else "random"
            img, lab = self.patch_at(d, self._centre(d, kind))
            if self.transform is not None:
                out = self.transform({"image": img[None], "label": lab[None].astype(np.float32)})
                img, lab = np.asarray(out["image"])[0], np.asarray(out["label"])[0]
            imgs.append(img.astype(np.float32))
            labs.append((lab > 0.5).astype(np.int64))
            flags.append(positive and d.labels.any())
        return np.stack(imgs)[:, None], np.stack(labs)[:, None], flags
