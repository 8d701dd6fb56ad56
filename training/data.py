"""Training data from the corrections store: corrected labels only, cached, augmented.

* :func:`corrected_versions` picks, per subject, the newest full label version that a
  person made or confirmed: the subject's status must be ``corrected``, versions
  whose ``source`` starts with ``model:`` (raw model output) and review-only versions
  are skipped.  Uncorrected predictions never reach training.
* :func:`training_versions` (what fine-tuning uses) adds the cluster decisions of
  review-only versions (status ``reviewed`` or ``corrected``): per subject the newest
  version a person made, full or review-only.  :func:`labels_as_of` reads what it
  says, the newest word on each voxel: the newest full version below it, with the
  reviewed voxels of each review-only version after that laid over it, oldest first.
  With a full version underneath, every voxel is known (a ``full`` subject); without
  one only the reviewed voxels are (a ``review`` subject: its ``reviewed`` mask), and
  the rim of :data:`REVIEW_RIM` voxels around them that the reviewer saw as background:
  a cluster is accepted or rejected with its outline.  Without the rim nothing holds
  an accepted cluster's boundary, and fine-tuning on decisions alone grows PVS into
  blobs (tests/test_review_labels.py measures both).
* :class:`SubjectCache` keeps decoded subjects in memory within a byte budget (least
  recently used out first), each prepared by :func:`napari_pvs.preprocess.preprocess`
  with the model's own preprocessing, as inference prepares it.
* :class:`PatchSampler` draws patches: at least ``pos_fraction`` centred on PVS
  voxels, and half of those, when the subject has them, on voxels that its latest
  correction changed (recent corrections weigh more).  Patches are augmented with
  MONAI transforms: flips, small rotations and scaling, intensity scale / shift,
  gamma, Gaussian noise and a bias field.  A review-only subject's patches centre on
  its reviewed voxels (its positive draws half on accepted or painted PVS, half on
  rejected clusters and erased voxels), and ``batch(size, masks=True)`` gives each
  patch its loss weights: 1 where the label is known, 0 elsewhere.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from napari_pvs.preprocess import Preprocessed, preprocess

__all__ = ["REVIEW_GAP", "REVIEW_RIM", "PatchSampler", "SubjectCache", "SubjectData",
           "corrected_versions", "label_kinds", "labels_as_of", "load_subject", "training_versions"]

#: Voxels (of the subject's grid) around the reviewed voxels of review-only labels that
#: count as known background, where they were background in the version reviewed.
REVIEW_RIM = 2
#: Voxels right outside accepted (or painted) PVS of review-only labels whose label stays
#: unknown: the reviewer accepted the cluster, not the exact voxel of its outline.
REVIEW_GAP = 1


def _human(attrs: Mapping[str, Any]) -> bool:
    """A version a person made or confirmed (not raw model output)."""
    return not str(attrs.get("source", "")).startswith("model:")


def corrected_versions(store, subjects: Sequence[str] | None = None) -> dict[str, int]:
    """``{subject: version}`` of the newest human-corrected full label version per subject
    (review-only versions are skipped: see :func:`training_versions`)."""
    out = {}
    for sid in subjects if subjects is not None else store.subjects():
        if store.info(sid).get("status") != "corrected":
            continue
        for attrs in reversed(store.versions(sid)):
            if _human(attrs) and attrs.get("kind", "full") == "full":
                out[sid] = int(attrs["version"])
                break
    return out


def training_versions(store, subjects: Sequence[str] | None = None) -> dict[str, int]:
    """``{subject: version}`` of what fine-tuning learns from: per subject whose status is
    ``corrected`` or ``reviewed``, its newest human label version, full or review-only
    (read it with :func:`labels_as_of`; :func:`label_kinds` tells which subjects are
    known in full)."""
    out = {}
    for sid in subjects if subjects is not None else store.subjects():
        if store.info(sid).get("status") not in ("corrected", "reviewed"):
            continue
        for attrs in reversed(store.versions(sid)):
            if _human(attrs):
                out[sid] = int(attrs["version"])
                break
    return out


def _layers(store, subject: str, version: int) -> tuple[int | None, list[int]]:
    """(the newest full human version <= ``version``, the review-only versions after it,
    oldest first)."""
    reviews = []
    for attrs in reversed(store.versions(subject)[:version]):
        if not _human(attrs):
            continue
        if attrs.get("kind", "full") == "full":
            return int(attrs["version"]), reviews[::-1]
        reviews.append(int(attrs["version"]))
    return None, reviews[::-1]


def label_kinds(store, versions: Mapping[str, int]) -> dict[str, str]:
    """``{subject: "full" | "review"}``: whether the labels :func:`labels_as_of` reads for
    ``versions`` are known everywhere (a full version underneath) or only where reviewed."""
    return {s: "full" if _layers(store, s, v)[0] is not None else "review"
            for s, v in versions.items()}


def labels_as_of(store, subject: str, version: int, rim: int = REVIEW_RIM,
                 gap: int = REVIEW_GAP) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """The labels a subject's ``version`` says, on the source grid: ``(labels, reviewed,
    recent)``, bool arrays.

    ``labels``: the newest full human version up to ``version`` with the reviewed voxels
    of every review-only version after it laid over it, oldest first (the newest word
    on each voxel wins).  ``reviewed``: None when a full version lies underneath (every
    voxel is known), else the union of the review masks and of their rims: the voxels
    within ``rim`` voxels (26-neighbourhood steps) of a reviewed voxel that were
    background in that version and that no review decided, less the ``gap`` voxels
    right outside a reviewed PVS voxel (accepted or painted), whose label stays unknown
    (training ignores the other voxels).  ``recent``: the voxels the newest corrections
    told about: for a full ``version``, those it changed against its parent (as before
    review-only versions existed); over a full version, the reviewed voxels; None for
    review-only labels (their reviewed voxels are all news).
    """
    from scipy import ndimage as ndi

    base, reviews = _layers(store, subject, version)
    labels = (store.read_labels(subject, base) > 0 if base is not None
              else np.zeros(tuple(store.info(subject)["shape"]), bool))
    decided = np.zeros(labels.shape, bool)
    around = np.zeros(labels.shape, bool)
    unsure = np.zeros(labels.shape, bool)
    cube = np.ones((3, 3, 3), bool)
    for v in reviews:
        known = store.read_reviewed(subject, v)
        seen = store.read_labels(subject, v) > 0
        labels[known] = seen[known]
        decided |= known
        if rim > 0 and base is None and known.any():
            around |= ndi.binary_dilation(known, cube, rim) & ~seen
            if gap > 0 and (known & seen).any():
                unsure |= ndi.binary_dilation(known & seen, cube, gap) & ~seen
    if base is None:
        around &= ~(decided | unsure)
        labels[around] = False
        return labels, decided | around, None
    if reviews:
        return labels, None, decided
    parent = store.labels(subject, version).attrs.get("parent")
    recent = None
    if parent is not None:
        recent = labels ^ (store.read_labels(subject, parent) > 0)
    return labels, None, recent


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
    # review-only labels: the voxels whose label is known (None: all of them)
    reviewed: np.ndarray | None = None

    @property
    def kind(self) -> str:
        """``"full"`` (every voxel's label is known) or ``"review"`` (only ``reviewed``)."""
        return "full" if self.reviewed is None else "review"

    @property
    def nbytes(self) -> int:
        arrays = (self.image, self.labels, self.roi, self.recent, self.source_labels,
                  self.source_roi, self.hard, self.reviewed)
        return sum(a.nbytes for a in arrays if a is not None)


def load_subject(store, subject: str, version: int, pre: Mapping[str, Any] | None,
                 rim: int = REVIEW_RIM, gap: int = REVIEW_GAP) -> SubjectData:
    """Decode one subject's image, ``version`` labels and ROI onto the model grid.

    The image goes through :func:`napari_pvs.preprocess.preprocess` with the model's
    preprocessing ``pre`` (its ``meta["preprocessing"]``; None: the source grid and a
    z-score), exactly as inference prepares it; labels (:func:`labels_as_of`, with its
    ``rim`` and ``gap``), ROI, recent edits and the reviewed mask of review-only labels follow with
    nearest-neighbour resampling.
    """
    info = store.info(subject)
    image = np.asarray(store.read_image(subject), dtype=np.float32)
    regions = store.read_regions(subject)
    roi = (regions > 0) if regions is not None else image != 0
    labels, reviewed, recent = labels_as_of(store, subject, version, rim, gap)
    prep = preprocess(image, info["spacing"], roi, pre)
    return SubjectData(subject, str(info.get("site", "unknown")), version, prep.image[0],
                       prep.mask_to_model(labels).astype(np.uint8), prep.mask,
                       None if recent is None or not recent.any() else prep.mask_to_model(recent),
                       prep, labels, roi,
                       reviewed=None if reviewed is None else prep.mask_to_model(reviewed))


class SubjectCache:
    """Decoded subjects in memory within ``budget_bytes`` (LRU eviction)."""

    def __init__(self, store, versions: dict[str, int], pre: Mapping[str, Any] | None,
                 budget_bytes: int = 2**30, rim: int = REVIEW_RIM, gap: int = REVIEW_GAP):
        self.store, self.versions, self.pre, self.rim = store, dict(versions), pre, int(rim)
        self.gap = int(gap)
        self.budget = int(budget_bytes)
        self._items: OrderedDict[str, SubjectData] = OrderedDict()
        self.loads = 0

    def get(self, subject: str) -> SubjectData:
        if subject in self._items:
            self._items.move_to_end(subject)
            return self._items[subject]
        data = load_subject(self.store, subject, self.versions[subject], self.pre, self.rim,
                            self.gap)
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
                    mode=("bilinear",) + ("nearest",) * (len(keys) - 1), padding_mode="border"),
        RandScaleIntensityd(img, factors=0.1, prob=0.3), RandShiftIntensityd(img, offsets=0.1, prob=0.3),
        RandAdjustContrastd(img, gamma=(0.8, 1.25), prob=0.3),
        RandGaussianNoised(img, std=0.05, prob=0.2), RandBiasFieldd(img, coeff_range=(0.0, 0.1), prob=0.2),
    ])


class PatchSampler:
    """Random training patches with positive oversampling and augmentation."""

    def __init__(self, cache: SubjectCache, subjects: Sequence[str], patch=(48, 48, 48),
                 pos_fraction: float = 0.5, augment: bool = True, seed: int = 0,
                 weights: Sequence[float] | None = None, hard_fraction: float = 0.0,
                 pos_balance: str = "voxel"):
        if not subjects:
            raise ValueError("no corrected subjects to train on; correct and save at least one")
        self.cache, self.subjects, self.patch = cache, list(subjects), tuple(int(p) for p in patch)
        self.pos_fraction = float(pos_fraction)
        self.hard_fraction = float(hard_fraction)
        if pos_balance not in ("voxel", "component"):
            raise ValueError(f"pos_balance must be 'voxel' or 'component', got {pos_balance!r}")
        # "voxel": a positive patch centres on a PVS voxel drawn uniformly, so long PVS
        # dominate; "component": on a PVS drawn uniformly (cc3d, 26-connected), then a
        # voxel of it, so that short PVS are centred as often as long ones
        self.pos_balance = pos_balance
        self._components: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.rng = np.random.default_rng(seed)
        w = np.ones(len(self.subjects)) if weights is None else np.asarray(weights, float)
        self.p = w / w.sum()
        self.transform = _augment() if augment else None
        # review-only subjects: the same augmentation, moving the loss weights with the labels
        self.masked_transform = _augment(("image", "label", "mask")) if augment else None
        if self.transform is not None:
            self.transform.set_random_state(seed=seed)
            self.masked_transform.set_random_state(seed=seed)

    def _reviewed_pool(self, d: SubjectData, kind: str) -> np.ndarray:
        """Where a review-only subject's patch centres: its reviewed voxels (the others
        carry no loss); positive draws half on reviewed PVS, half on reviewed background
        (rejected clusters, erased voxels), when it has both."""
        if kind == "positive":
            pvs, background = d.reviewed & (d.labels > 0), d.reviewed & (d.labels == 0)
            if pvs.any() and background.any():
                return pvs if self.rng.random() < 0.5 else background
        return d.reviewed

    def _centre(self, d: SubjectData, kind: str) -> np.ndarray:
        pool = d.roi
        if d.reviewed is not None and d.reviewed.any():
            pool = self._reviewed_pool(d, kind)
        elif kind == "positive" and d.labels.any():
            if d.recent is not None and self.rng.random() < 0.5:
                pool = d.recent
            elif self.pos_balance == "component":
                return self._component_voxel(d)
            else:
                pool = d.labels
        elif kind == "hard" and d.hard is not None and d.hard.any():
            pool = d.hard
        idx = np.flatnonzero(pool)
        if idx.size == 0:
            return self.rng.integers(0, d.image.shape)
        return np.array(np.unravel_index(idx[self.rng.integers(idx.size)], d.image.shape))

    def _component_voxel(self, d: SubjectData) -> np.ndarray:
        """A voxel of a PVS drawn uniformly among the subject's PVS (26-connected)."""
        from napari_pvs.clusters import label_clusters, voxels_by_cluster

        key = f"{d.subject}/v{d.version}"
        if key not in self._components:
            fg, first = voxels_by_cluster(label_clusters(d.labels)[0])
            self._components[key] = (fg, np.append(first, fg.size))
        flat, bounds = self._components[key]
        c = self.rng.integers(bounds.size - 1)
        i = self.rng.integers(bounds[c], bounds[c + 1])
        return np.array(np.unravel_index(flat[i], d.image.shape))

    def _count(self, expected: float) -> int:
        whole = int(np.floor(expected))
        return whole + int(self.rng.random() < expected - whole)

    def _window(self, d: SubjectData, centre) -> tuple[tuple[slice, ...], list]:
        """The patch's slices around ``centre`` (inside the volume) and the padding that
        completes it when the volume is smaller than the patch."""
        p = np.array(self.patch)
        shape = np.array(d.image.shape)
        lo = np.clip(np.asarray(centre) - p // 2, 0, np.maximum(shape - p, 0))
        sl = tuple(slice(a, a + n) for a, n in zip(lo, p))
        return sl, [(0, max(n - min(s, n), 0)) for n, s in zip(p, shape)]

    def patch_at(self, d: SubjectData, centre) -> tuple[np.ndarray, np.ndarray]:
        sl, pad = self._window(d, centre)
        return np.pad(d.image[sl], pad), np.pad(d.labels[sl], pad)

    def mask_at(self, d: SubjectData, centre) -> np.ndarray:
        """The loss weights of the patch at ``centre`` (float32): 1 where the label is
        known (everywhere for full labels, and on the padding beyond a small volume,
        which is background), 0 on unreviewed voxels."""
        sl, pad = self._window(d, centre)
        known = np.ones(d.image[sl].shape, bool) if d.reviewed is None else d.reviewed[sl]
        return np.pad(known, pad, constant_values=True).astype(np.float32)

    def batch(self, size: int, masks: bool = False):
        """``(images (B,1,...), labels (B,1,...), centred_on_pvs flags)``, and with
        ``masks=True`` a fourth item: the loss weights (B,1,...) float32, 1 where the
        label is known (all of a full subject's patch), 0 elsewhere.

        The first ``pos_fraction`` of the batch (rounded up) is centred on PVS, the next
        ``hard_fraction`` on hard negatives (when the subject marks them; rounded at
        random, so that small batches still see them), the rest anywhere in the ROI; a
        review-only subject's patches centre on its reviewed voxels instead.

        Raises
        ------
        ValueError
            A review-only subject was drawn without ``masks=True`` (its unreviewed voxels
            would be learnt as background).
        """
        imgs, labs, flags, weights = [], [], [], []
        n_pos = int(np.ceil(self.pos_fraction * size))
        n_hard = self._count(self.hard_fraction * size) if self.hard_fraction > 0 else 0
        for k in range(size):
            d = self.cache.get(self.subjects[self.rng.choice(len(self.subjects), p=self.p)])
            if d.reviewed is not None and not masks:
                raise ValueError(f"subject {d.subject} has review-only labels (v{d.version}): "
                                 "draw its patches with batch(size, masks=True) and train "
                                 "with a masked loss")
            positive = k < n_pos
            kind = "positive" if positive else "hard" if k < n_pos + n_hard else "random"
            centre = self._centre(d, kind)
            img, lab = self.patch_at(d, centre)
            mask = self.mask_at(d, centre) if masks else None
            if self.transform is not None and d.reviewed is not None:
                out = self.masked_transform({"image": img[None], "mask": mask[None],
                                             "label": lab[None].astype(np.float32)})
                img, lab = np.asarray(out["image"])[0], np.asarray(out["label"])[0]
                mask = (np.asarray(out["mask"])[0] > 0.5).astype(np.float32)
            elif self.transform is not None:
                out = self.transform({"image": img[None], "label": lab[None].astype(np.float32)})
                img, lab = np.asarray(out["image"])[0], np.asarray(out["label"])[0]
            imgs.append(img.astype(np.float32))
            labs.append((lab > 0.5).astype(np.int64))
            flags.append(positive and d.labels.any())
            weights.append(mask)
        out = np.stack(imgs)[:, None], np.stack(labs)[:, None], flags
        return (*out, np.stack(weights)[:, None]) if masks else out
