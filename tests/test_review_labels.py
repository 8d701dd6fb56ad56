"""Cluster decisions are training labels: review-only versions from the store to the loss."""

from __future__ import annotations

import json

import numpy as np
import pytest

from napari_pvs import PVSInputError
from napari_pvs.io import Volume
from napari_pvs.review import ReviewSession
from napari_pvs.store import CorrectionsStore, StoreCorruptError

SHAPE = (24, 20, 16)


@pytest.fixture
def store(tmp_path):
    s = CorrectionsStore.create(tmp_path / "r.pvs.zarr")
    rng = np.random.default_rng(0)
    for sid in ("a", "b", "c"):
        s.add_subject(sid, Volume(rng.normal(100, 10, SHAPE).astype(np.float32), np.eye(4),
                                  (1.0, 1.0, 1.0)), site="A", regions=np.ones(SHAPE, np.uint8))
    yield s
    s.close()


def _four_clusters() -> np.ndarray:
    """Labels with four separate clusters: 1 (27 voxels), 2 (8), 3 (4), 4 (2)."""
    lab = np.zeros(SHAPE, np.uint8)
    lab[2:5, 2:5, 2:5] = 1
    lab[10:12, 2:4, 2:4] = 1
    lab[2:4, 12:14, 10] = 1
    lab[18, 15, 12:14] = 1
    return lab


def _mask(*slices) -> np.ndarray:
    m = np.zeros(SHAPE, bool)
    for sl in slices:
        m[sl] = True
    return m


# ---------------------------------------------------------------------- the store


def test_a_review_only_version_round_trips_with_its_mask(store):
    lab, known = _four_clusters(), _mask(np.s_[2:5, 2:5, 2:5], np.s_[9:13, 1:5, 1:5])
    v = store.commit_labels("a", lab, author="ann", source="review", reviewed=known)
    np.testing.assert_array_equal(store.read_labels("a", v), lab)
    np.testing.assert_array_equal(store.read_reviewed("a", v), known)
    attrs = store.versions("a")[-1]
    assert attrs["kind"] == "review" and attrs["reviewed_voxels"] == int(known.sum())
    assert store.version_kind("a") == "review" and store.labels_kind("a") == "review"
    assert store.info("a")["status"] == "reviewed"  # decisions are not a full correction
    (commit,) = [e for e in store.events("a") if e["kind"] == "commit"]
    assert commit["version"] == v and commit["labels_kind"] == "review"
    # a full correction afterwards: kind full, every voxel known, status corrected
    v2 = store.commit_labels("a", lab, author="ann")
    assert store.version_kind("a", v2) == "full" and store.read_reviewed("a", v2).all()
    assert store.info("a")["status"] == "corrected"
    # decisions saved on a corrected subject keep it corrected
    store.commit_labels("a", lab, author="ann", reviewed=known)
    assert store.info("a")["status"] == "corrected" and store.labels_kind("a") == "review"
    assert store.verify()[0] == []


@pytest.mark.parametrize("bad, message", [
    (np.ones((3, 3, 3), bool), "reviewed mask shape"),
    (np.full(SHAPE, 2, np.uint8), "must be bool or 0/1"),
    (np.ones(SHAPE, np.float32), "must be bool or 0/1"),
])
def test_a_bad_reviewed_mask_is_refused_and_nothing_is_saved(store, bad, message):
    with pytest.raises(PVSInputError, match=message):
        store.commit_labels("a", _four_clusters(), author="ann", reviewed=bad)
    assert store.info("a")["latest"] is None


@pytest.mark.parametrize("damage", ["delete chunk", "delete metadata", "swap mask"])
def test_a_damaged_mask_is_refused_naming_the_version(store, damage, capsys):
    from napari_pvs.cli import main

    lab = _four_clusters()
    store.commit_labels("a", lab, author="ann", reviewed=_mask(np.s_[2:5, 2:5, 2:5]))
    folder = store.path / "subjects" / "a" / "labels" / "v0001" / "reviewed"
    if damage == "delete chunk":
        next(p for p in (folder / "c").rglob("*") if p.is_file()).unlink()
    elif damage == "delete metadata":
        (folder / "zarr.json").unlink()
    else:  # another valid mask with its own checksum: not the one committed with the version
        import zarr

        from napari_pvs._store_checks import _sha256

        other = np.ones(SHAPE, np.uint8)
        zarr.create_array(str(folder), shape=SHAPE, dtype=np.uint8, fill_value=0,
                          attributes={"sha256": _sha256(other)}, overwrite=True)[...] = other
    with pytest.raises(StoreCorruptError, match=r"subject a labels v0001 reviewed mask"):
        store.read_reviewed("a", 1)
    np.testing.assert_array_equal(store.read_labels("a", 1), lab)  # the labels are intact
    assert main(["store", "verify", str(store.path)]) == 1
    assert "subject a labels v0001 reviewed mask" in capsys.readouterr().out


def test_versions_written_before_kinds_existed_read_as_full(store):
    from napari_pvs.training.data import corrected_versions, training_versions

    lab = _four_clusters()
    store.commit_labels("a", lab, author="ann")
    meta = store.path / "subjects" / "a" / "labels" / "v0001" / "zarr.json"
    doc = json.loads(meta.read_text())
    del doc["attributes"]["kind"]  # as an older napari-pvs wrote it
    meta.write_text(json.dumps(doc))
    assert "kind" not in store.labels("a", 1).attrs
    assert store.version_kind("a") == "full" and store.versions("a")[0]["kind"] == "full"
    assert store.read_reviewed("a").all() and store.labels_kind("a") == "full"
    assert corrected_versions(store) == training_versions(store) == {"a": 1}
    assert store.verify()[0] == []


def test_store_ls_and_the_queue_show_the_latest_labels_kind(store, capsys):
    from napari_pvs.active import rank_subjects
    from napari_pvs.cli import main

    lab = _four_clusters()
    store.commit_labels("a", lab, author="ann")
    store.commit_labels("b", lab, author="ann", reviewed=_mask(np.s_[2:5, 2:5, 2:5]))
    assert main(["store", "ls", str(store.path)]) == 0
    lines = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()}
    assert "labels" in lines["subject"]
    assert lines["a"][3:7] == ["corrected", "1", "1", "full"]
    assert lines["b"][3:7] == ["reviewed", "1", "1", "review"]
    assert lines["c"][3:7] == ["unlabelled", "0", "-", "none"]
    rows = rank_subjects(store)
    assert [(r["subject"], r["labels"]) for r in rows] == [("c", "none"), ("b", "review"),
                                                          ("a", "full")]


# ---------------------------------------------------------------------- the review session


def test_saving_decisions_builds_the_reviewed_mask(store):
    lab = _four_clusters()
    s = ReviewSession(lab.copy())
    ids = {p: int(s.clusters[p]) for p in [(3, 3, 3), (10, 2, 2), (2, 12, 10), (18, 15, 12)]}
    accepted, rejected, left = ids[(3, 3, 3)], ids[(10, 2, 2)], ids[(2, 12, 10)]
    s.accept(accepted)
    s.reject(rejected)
    s.labels[8, 8, 8] = 1  # painted in napari: a PVS the model missed ...
    s.record_paint((np.array([8]), np.array([8]), np.array([8])), value=1)
    s.labels[18, 15, 13] = 0  # ... and one voxel of cluster 4 erased, the rest left alone
    s.record_paint((np.array([18]), np.array([15]), np.array([13])), value=0)
    v = s.save(store, "a", author="ann", review_only=True)
    labels, known = store.read_labels("a", v), store.read_reviewed("a", v)
    cluster = {c: s.clusters == c for c in ids.values()}
    assert known[cluster[accepted]].all() and labels[cluster[accepted]].all()  # PVS
    assert known[cluster[rejected]].all() and not labels[cluster[rejected]].any()  # background
    assert not known[cluster[left]].any() and labels[cluster[left]].all()  # kept, unknown
    assert known[8, 8, 8] and labels[8, 8, 8] == 1 and known[18, 15, 13] and labels[18, 15, 13] == 0
    assert not known[18, 15, 12]  # the unpainted voxel of the undecided cluster 4
    assert known.sum() == 27 + 8 + 2
    assert store.info("a")["status"] == "reviewed" and not s.dirty
    # a decision made before recomputing the clusters stays known
    s.recompute()
    assert s.reviewed_mask().sum() == 27 + 8 + 2
    # nothing decided: nothing to save
    with pytest.raises(ValueError, match="no decisions to save"):
        ReviewSession(lab.copy()).save(store, "b", author="ann", review_only=True)
    assert store.info("b")["latest"] is None


# ---------------------------------------------------------------------- training data


def test_training_reads_the_newest_word_on_each_voxel(store):
    from napari_pvs.training.data import (
        corrected_versions,
        label_kinds,
        labels_as_of,
        training_versions,
    )

    lab = _four_clusters()
    lab[6, 3, 3] = 1  # an undecided one-voxel cluster within 2 voxels of cluster 1
    first = _mask(np.s_[2:5, 2:5, 2:5])  # cluster 1 accepted
    store.commit_labels("a", lab, author="ann", reviewed=first)
    second = _mask(np.s_[10:12, 2:4, 2:4])  # then cluster 2 rejected
    lab2 = lab.copy()
    lab2[10:12, 2:4, 2:4] = 0
    store.commit_labels("a", lab2, author="ann", reviewed=second)
    store.commit_labels("b", lab, author="ann")  # full, then decisions over it
    store.commit_labels("b", lab2, author="ann", reviewed=second)
    store.commit_labels("c", lab, author="bot", source="model:m1")  # raw output only
    assert corrected_versions(store) == {"b": 1}  # full versions only
    versions = training_versions(store)
    assert versions == {"a": 2, "b": 2} and label_kinds(store, versions) == {"a": "review",
                                                                             "b": "full"}
    labels, known, recent = labels_as_of(store, "a", 2, rim=0)
    np.testing.assert_array_equal(known, first | second)
    np.testing.assert_array_equal(labels, lab2.astype(bool) & first)  # unknown voxels are 0
    assert recent is None
    labels, known, _ = labels_as_of(store, "a", 2, rim=2, gap=0)  # the background rim too
    rim = known & ~(first | second)
    assert rim[1, 1, 1] and rim[6, 6, 6] and not rim[7, 7, 7] and not labels[rim].any()
    assert not known[6, 3, 3] and not labels[6, 3, 3]  # an undecided cluster is not in the rim
    # with a gap the accepted cluster's outline stays unknown, the rim beyond it does not;
    # around the rejected cluster the first shell is background as before
    labels, known, _ = labels_as_of(store, "a", 2, rim=2, gap=1)
    gap_rim = known & ~(first | second)
    assert not known[1, 1, 1] and not known[5, 3, 3] and known[0, 0, 0] and known[6, 6, 6]
    assert known[9, 2, 2] and known[12, 3, 3] and not labels[gap_rim].any()
    np.testing.assert_array_equal(gap_rim, rim & ~_mask(np.s_[1:6, 1:6, 1:6]))
    labels, known, recent = labels_as_of(store, "b", 2)
    assert known is None  # over a full version every voxel is known
    np.testing.assert_array_equal(labels, lab2.astype(bool))
    np.testing.assert_array_equal(recent, second)


def test_patches_of_review_only_subjects_carry_their_loss_weights(store):
    from napari_pvs.training.data import PatchSampler, SubjectCache

    lab = _four_clusters()
    lab[10:12, 2:4, 2:4] = 0  # cluster 2 rejected
    store.commit_labels("a", lab, author="ann", reviewed=_mask(np.s_[2:5, 2:5, 2:5],
                                                               np.s_[10:12, 2:4, 2:4]))
    store.commit_labels("b", _four_clusters(), author="ann")
    cache = SubjectCache(store, {"a": 1, "b": 1}, None, rim=0)
    assert cache.get("a").kind == "review" and cache.get("b").kind == "full"
    sampler = PatchSampler(cache, ["a"], patch=(32, 32, 32), augment=False, seed=0)
    with pytest.raises(ValueError, match="review-only labels"):
        sampler.batch(2)
    known = cache.get("a").reviewed
    for _ in range(5):
        x, y, flags, w = sampler.batch(4, masks=True)
        assert w.shape == x.shape == y.shape and w.dtype == np.float32
        # every patch holds the whole small subject, and padding (background) around it
        assert w.sum() == 4 * (known.sum() + 32**3 - known.size)
        assert not y[w == 0].any()  # the unreviewed clusters 3 and 4 are not PVS to learn
    centres = [sampler._centre(cache.get("a"), kind) for kind in ("positive", "random") * 20]
    assert all(known[tuple(c)] for c in centres)  # every draw centres on a reviewed voxel
    full = PatchSampler(cache, ["b"], patch=(32, 32, 32), augment=True, seed=0)
    assert full.batch(2, masks=True)[3].all()  # a full subject's patches are all known
    augmented = PatchSampler(cache, ["a"], patch=(32, 32, 32), augment=True, seed=0)
    x, y, _, w = augmented.batch(4, masks=True)
    assert set(np.unique(w)) <= {0.0, 1.0} and 0 < w.sum() and not y[w == 0].any()


# ---------------------------------------------------------------------- the loss


def _heads(seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    heads = [torch.randn(2, 2, 16, 16, 16, generator=g, requires_grad=True),
             torch.randn(2, 2, 8, 8, 8, generator=g, requires_grad=True)]
    y = (torch.rand(2, 1, 16, 16, 16, generator=g) > 0.8).float()
    return heads, y


def test_a_mask_of_ones_gives_the_unmasked_loss_and_masked_voxels_get_no_gradient():
    import torch

    from napari_pvs.training.trainer import Trainer

    trainer = Trainer(torch.nn.Conv3d(1, 2, 1), lambda it: None, iterations=1, lr=1e-3)
    heads, y = _heads()
    plain = trainer.loss_fn(heads, y)
    ones = trainer.masked_loss(heads, y, np.ones(tuple(y.shape), np.float32))
    torch.testing.assert_close(ones, plain, rtol=1e-6, atol=0)
    mask = np.ones(tuple(y.shape), np.float32)
    mask[:, :, :8] = 0  # the first half of every patch is unreviewed
    trainer.masked_loss(heads, y, mask).backward()
    assert heads[0].grad[:, :, :8].abs().max() == 0 and heads[1].grad[:, :, :4].abs().max() == 0
    assert heads[0].grad[:, :, 8:].abs().max() > 0
    # and what the masked voxels hold does not change the loss
    changed = [h.detach().clone() for h in heads]
    changed[0][:, :, :8] = 50.0
    torch.testing.assert_close(trainer.masked_loss(changed, y, mask),
                               trainer.masked_loss([h.detach() for h in heads], y, mask))
    nothing = trainer.masked_loss(heads, y, np.zeros(tuple(y.shape), np.float32))
    assert float(nothing.detach()) == 0.0


# ---------------------------------------------------------------------- fine-tuning


def test_review_only_subjects_train_but_never_validate():
    from napari_pvs.training.finetune import FinetuneConfig, _split

    cfg = FinetuneConfig(val_fraction=0.5)
    versions = {"f1": 1, "f2": 1, "f3": 2, "f4": 1, "r1": 3, "r2": 1}
    kinds = {s: "review" if s.startswith("r") else "full" for s in versions}
    train, val, _ = _split(cfg, versions, None, None, kinds)
    assert len(val) == 2 and set(val) <= {"f1", "f2", "f3", "f4"}
    assert {"r1", "r2"} <= set(train) and not set(train) & set(val)
    # full subjects only: the same seeded split as before review-only versions existed
    full = {s: v for s, v in versions.items() if kinds[s] == "full"}
    assert _split(cfg, full, None, None, kinds)[:2] == _split(cfg, full, None, None)[:2]
    assert _split(cfg, {"r1": 3, "r2": 1}, None, None, kinds)[:2] == (["r1", "r2"], [])
    with pytest.raises(PVSInputError, match="review-only labels"):
        _split(cfg, versions, ["f1", "r2"], ["r1"], kinds)


def test_train_cli_learns_from_decisions_alone_and_says_it_cannot_validate(tmp_path, phantom_store,
                                                                           capsys):
    from napari_pvs.cli import main
    from napari_pvs.training.data import training_versions

    path = tmp_path / "s.pvs.zarr"
    store = phantom_store(n_sites=1, per_site=2, size_mm=48, corrected=(), path=path)
    for sid in store.subjects():  # half of each subject's PVS decided, nothing else
        image = store.read_image(sid)
        labels = np.zeros(image.shape, np.uint8)
        labels[image > np.percentile(image, 99.5)] = 1  # a crude candidate map
        known = np.zeros(image.shape, bool)
        known[: image.shape[0] // 2] = True
        store.commit_labels(sid, labels, author="ann", reviewed=known)
    assert len(training_versions(store)) == 2
    store.close()
    assert main(["train", "--store", str(path), "--iterations", "2", "--epoch", "2",
                 "--patch", "32", "--lr", "3e-3"]) == 0
    out = capsys.readouterr().out
    assert "2 review-only" in out and "no validation" in out and "done: mednext-" in out
    with CorrectionsStore.open(path) as store:
        meta = store.models.latest()
        assert meta["provenance"]["review_only_subjects"] == sorted(store.subjects())
        assert meta["provenance"]["validation_subjects"] == []
