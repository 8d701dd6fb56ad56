"""Active-learning queue: uncertainty statistics, ranking, store-wide prediction."""

from __future__ import annotations

import math

import numpy as np
import pytest

from napari_pvs import PVSInputError
from napari_pvs.active import predict_subjects, prediction_stats, rank_subjects
from napari_pvs.io import Volume
from napari_pvs.store import CorrectionsStore


def test_prediction_stats_are_the_stated_means():
    unc = np.zeros((10, 10, 10), np.float32)
    lab = np.zeros_like(unc, dtype=np.uint8)
    lab[1:3, 1:3, 1:3] = 1  # cluster 1: uncertainty 0.2
    unc[1:3, 1:3, 1:3] = 0.2
    lab[6, 6, 6:9] = 1  # cluster 2: uncertainty 0.6
    unc[6, 6, 6:9] = 0.6
    regions = np.zeros_like(lab)
    regions[:5] = 1
    s = prediction_stats(unc, lab, regions)
    assert s["n_clusters"] == 2
    assert s["clusters"] == pytest.approx(0.4)
    assert s["image"] == pytest.approx(8 * 0.2 / 500)  # the mean inside the regions only
    assert prediction_stats(np.zeros_like(unc), np.zeros_like(lab))["clusters"] == 0.0


def _store(tmp_path, n=4):
    store = CorrectionsStore.create(tmp_path / "q.pvs.zarr")
    rng = np.random.default_rng(0)
    for k in range(n):
        store.add_subject(f"s{k}", Volume(rng.random((12, 12, 12)).astype(np.float32), np.eye(4),
                                          (1.0, 1.0, 1.0)), site="A")
    return store


def _save(store, sid, model, unc_value):
    unc = np.full((12, 12, 12), unc_value, np.float32)
    lab = np.zeros((12, 12, 12), np.uint8)
    lab[3:5, 3:5, 3:8] = 1
    store.save_prediction(sid, model, probability=unc, uncertainty=unc, labels=lab)  # no stats


def test_ranking_puts_uncorrected_most_uncertain_first(tmp_path):
    store = _store(tmp_path)
    for sid, u in (("s0", 0.1), ("s1", 0.5), ("s2", 0.3)):
        _save(store, sid, "m1", u)
    _save(store, "s3", "m1", 0.9)
    store.commit_labels("s3", np.zeros((12, 12, 12), np.uint8), author="me")  # s3 is corrected
    store.close()
    store = CorrectionsStore.open(tmp_path / "q.pvs.zarr")  # ranking needs only read access
    rows = rank_subjects(store, "m1")
    assert [r["subject"] for r in rows] == ["s1", "s2", "s0", "s3"]
    assert rows[0]["uncertainty"] == pytest.approx(0.5) and rows[0]["status"] == "predicted"
    assert rows[-1]["status"] == "corrected"
    assert [r["subject"] for r in rank_subjects(store, "m1", by="image")][:3] == ["s1", "s2", "s0"]
    # another model's ranking: nobody has its prediction, all NaN, stable by name
    rows = rank_subjects(store, "m2")
    assert all(math.isnan(r["uncertainty"]) for r in rows)
    with pytest.raises(PVSInputError, match="unknown uncertainty score"):
        rank_subjects(store, "m1", by="size")


def test_site_aware_ranking_puts_the_least_corrected_site_first(tmp_path):
    """A new scanner's scans come before more of the sites the store already knows, then
    by uncertainty; the status order still comes first."""
    store = CorrectionsStore.create(tmp_path / "q.pvs.zarr")
    rng = np.random.default_rng(0)
    for sid, site in (("a0", "A"), ("a1", "A"), ("a2", "A"), ("d0", "D"), ("d1", "D")):
        store.add_subject(sid, Volume(rng.random((12, 12, 12)).astype(np.float32), np.eye(4),
                                      (1.0, 1.0, 1.0)), site=site)
    for sid, u in (("a1", 0.9), ("a2", 0.8), ("d0", 0.2), ("d1", 0.4)):
        _save(store, sid, "m1", u)
    store.commit_labels("a0", np.zeros((12, 12, 12), np.uint8), author="me")
    assert [r["subject"] for r in rank_subjects(store, "m1")] == ["a1", "a2", "d1", "d0", "a0"]
    rows = rank_subjects(store, "m1", site_aware=True)
    assert [r["subject"] for r in rows] == ["d1", "d0", "a1", "a2", "a0"]
    assert [r["site_corrected"] for r in rows] == [0, 0, 1, 1, 1]
    # once site D has more corrected subjects than A, A's come first again
    for sid in ("d0", "d1"):
        store.commit_labels(sid, np.zeros((12, 12, 12), np.uint8), author="me")
    assert [r["subject"] for r in rank_subjects(store, "m1", site_aware=True)][:2] == ["a1", "a2"]
    store.close()


def test_predict_subjects_saves_maps_with_statistics(tmp_path):
    from napari_pvs.inference import run
    from napari_pvs.model import arch_config, build_network, default_meta
    from napari_pvs.phantom import make_phantom

    store = CorrectionsStore.create(tmp_path / "p.pvs.zarr")
    for k in range(2):
        ph = make_phantom(seed=k, size_mm=40.0, site=0, subject=f"p{k}")
        store.add_subject(f"p{k}", Volume(ph.image, ph.affine, ph.spacing), site="A",
                          regions=ph.regions)
    arch = arch_config("XS", 3)
    model_id = store.models.register(build_network(arch),
                                     default_meta(arch, target_spacing=[1.0] * 3, patch_size=[32] * 3))
    done = run(predict_subjects(store, model_id, backend="torch"))
    assert done == ["p0", "p1"]
    for sid in done:
        stats = dict(store.prediction(sid, model_id).attrs["stats"])
        assert set(stats) == {"image", "clusters", "n_clusters"} and stats["image"] > 0
        assert store.info(sid)["status"] == "predicted"
    assert run(predict_subjects(store, model_id, backend="torch")) == []  # nothing left to do
    rows = rank_subjects(store)  # default: the newest model
    assert {r["model_id"] for r in rows} == {model_id}
    assert not any(math.isnan(r["uncertainty"]) for r in rows)
    store.close()


def test_predict_and_save_saves_a_store_subjects_mednext_prediction_only(tmp_path):
    from napari_pvs.active import predict_and_save
    from napari_pvs.inference import run
    from napari_pvs.model import arch_config, build_network, default_meta
    from napari_pvs.phantom import make_phantom

    path = tmp_path / "p.pvs.zarr"
    ph = make_phantom(seed=0, size_mm=40.0, site=0, subject="p0")
    with CorrectionsStore.create(path) as store:
        store.add_subject("p0", Volume(ph.image, ph.affine, ph.spacing), site="A",
                          regions=ph.regions)
        arch = arch_config("XS", 3)
        model_id = store.models.register(build_network(arch), default_meta(
            arch, target_spacing=[1.0] * 3, patch_size=[32] * 3))

    def predict(model, subject):
        return run(predict_and_save(ph.image, ph.spacing, model, affine=ph.affine, roi=ph.regions,
                                    store_path=path, subject=subject, backend="torch"))

    pred = predict(model_id, "p0")  # the model id resolves in the store's registry
    assert pred.model == model_id and pred.probability is not None
    with CorrectionsStore.open(path) as store:
        assert store.predictions("p0") == [model_id]
        np.testing.assert_array_equal(store.read_prediction("p0", model_id, "labels"), pred.labels)
        stats = dict(store.prediction("p0", model_id).attrs["stats"])
        assert stats == pytest.approx(prediction_stats(pred.uncertainty, pred.labels, ph.regions))
        assert store.info("p0")["status"] == "predicted"
        assert rank_subjects(store)[0]["uncertainty"] == pytest.approx(stats["clusters"])
    # a subject the store does not hold, and the baseline (no probability): nothing saved
    predict(model_id, "elsewhere")
    assert predict("baseline", "p0").probability is None
    with CorrectionsStore.open(path) as store:
        assert store.subjects() == ["p0"] and store.predictions("p0") == [model_id]
