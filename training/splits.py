"""Cross-validation splits: seeded k-fold and leave-one-site-out (LOSOCV).

Splits follow nnU-Net's convention: a list of ``{"train": [...], "val": [...]}``
dicts, written to JSON once and reused afterwards, so every model of an experiment
is evaluated on the same held-out subjects even if the store grows.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from napari_pvs._fs import atomic_write_text

__all__ = ["kfold_splits", "load_or_create_splits", "losocv_splits"]

Split = dict[str, list[str]]


def _check_subjects(subjects: Sequence[str]) -> list[str]:
    subjects = [str(s) for s in subjects]
    if len(set(subjects)) != len(subjects):
        dup = sorted({s for s in subjects if subjects.count(s) > 1})
        raise ValueError(f"subject ids must be unique; duplicated: {dup}")
    return subjects


def kfold_splits(subjects: Sequence[str], k: int = 5, seed: int = 12345) -> list[Split]:
    """Seeded k-fold split of ``subjects``; every subject is validated exactly once.

    The order of ``subjects`` does not matter: they are sorted before shuffling.
    """
    subjects = sorted(_check_subjects(subjects))
    if not 2 <= k <= len(subjects):
        raise ValueError(f"k must be between 2 and the number of subjects ({len(subjects)}), got {k}")
    order = np.random.default_rng(seed).permutation(len(subjects))
    folds = np.array_split(order, k)
    out = []
    for f in folds:
        val = sorted(subjects[i] for i in f)
        out.append({"train": sorted(set(subjects) - set(val)), "val": val})
    return out


def losocv_splits(sites: Mapping[str, str]) -> list[Split]:
    """Leave-one-site-out: one fold per site, validating on all of its subjects.

    Parameters
    ----------
    sites : mapping of subject id to site name
    """
    subjects = _check_subjects(list(sites))
    by_site: dict[str, list[str]] = {}
    for s in subjects:
        by_site.setdefault(str(sites[s]), []).append(s)
    if len(by_site) < 2:
        raise ValueError(
            f"leave-one-site-out needs subjects from at least 2 sites, got {sorted(by_site)}"
        )
    return [
        {"site": site, "train": sorted(set(subjects) - set(val)), "val": sorted(val)}
        for site, val in sorted(by_site.items())
    ]


def load_or_create_splits(path: str | os.PathLike[str], make) -> list[Split]:
    """Return the splits saved at ``path``; create them with ``make()`` the first time.

    Writing goes through a temporary file and ``os.replace``, so a crash never leaves
    a half-written split file.  Reading validates the structure.
    """
    path = Path(path)
    if path.is_file():
        try:
            splits = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not valid JSON ({exc}); delete it to recreate the splits") from None
        if not isinstance(splits, list) or not all(
            isinstance(s, dict) and {"train", "val"} <= set(s) for s in splits
        ):
            raise ValueError(f"{path} is not a list of {{'train', 'val'}} splits; delete it to recreate")
        return splits
    splits = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(splits, indent=1))
    return splits
