"""Cross-validation splits of napari_pvs.training."""

from __future__ import annotations

import json

import pytest

from napari_pvs.training import kfold_splits, load_or_create_splits, losocv_splits


def test_kfold_covers_every_subject_once_and_is_seeded():
    subjects = [f"s{i:02d}" for i in range(13)]
    splits = kfold_splits(subjects, k=5, seed=1)
    vals = [s for f in splits for s in f["val"]]
    assert sorted(vals) == subjects and len(splits) == 5
    for f in splits:
        assert not set(f["train"]) & set(f["val"])
        assert sorted(f["train"] + f["val"]) == subjects
    assert kfold_splits(list(reversed(subjects)), k=5, seed=1) == splits
    assert kfold_splits(subjects, k=5, seed=2) != splits


def test_losocv_holds_out_each_site():
    sites = {"a1": "A", "a2": "A", "b1": "B", "c1": "C", "c2": "C"}
    splits = losocv_splits(sites)
    assert [s["site"] for s in splits] == ["A", "B", "C"]
    assert splits[0]["val"] == ["a1", "a2"] and "a1" not in splits[0]["train"]
    with pytest.raises(ValueError, match="2 sites"):
        losocv_splits({"a": "A", "b": "A"})


def test_splits_are_saved_once_and_reused(tmp_path):
    path = tmp_path / "splits" / "kfold.json"
    first = load_or_create_splits(path, lambda: kfold_splits(["a", "b", "c", "d"], k=2))
    again = load_or_create_splits(path, lambda: pytest.fail("must reuse the saved splits"))
    assert again == first == json.loads(path.read_text())
    path.write_text("{not json")
    with pytest.raises(ValueError, match="delete it"):
        load_or_create_splits(path, lambda: [])


def test_bad_arguments():
    with pytest.raises(ValueError, match="unique"):
        kfold_splits(["a", "a", "b"], k=2)
    with pytest.raises(ValueError, match="k must"):
        kfold_splits(["a", "b"], k=3)
