"""Learned false-positive triage and temperature scaling (napari_pvs.triage and
napari_pvs.training.triage): the fitted numbers, how prediction applies them, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from napari_pvs import PVSInputError
from napari_pvs.clusters import cluster_table, label_clusters
from napari_pvs.inference import postprocess
from napari_pvs.model import read_meta, save_checkpoint
from napari_pvs.network import arch_config, build_network, default_meta
from napari_pvs.training.triage import (
    auroc, expected_calibration_error, fit_classifier, fit_temperature)
from napari_pvs.triage import FEATURES, apply_temperature, feature_matrix, p_false_positive


def _triage(coef=None, intercept=0.0):
    k = len(FEATURES)
    return {"features": list(FEATURES), "mean": [0.0] * k, "scale": [1.0] * k,
            "coef": list(coef if coef is not None else [0.0] * k), "intercept": intercept}


@settings(max_examples=50, deadline=None)
@given(p=st.lists(st.floats(0, 1, allow_nan=False), min_size=1, max_size=50),
       t=st.floats(0.1, 10))
def test_temperature_keeps_the_labels_and_the_order(p, t):
    p = np.asarray(p, np.float32)
    q = apply_temperature(p, t)
    assert np.array_equal(q >= 0.5, apply_temperature(p, 1.0) >= 0.5) or np.any(
        np.abs(p - 0.5) < 1e-6)  # only a probability of exactly 0.5 may round across
    assert np.all(np.diff(q[np.argsort(p, kind="stable")]) >= -1e-7)  # monotone
    assert np.all(q[p == 0] == 0)  # outside the ROI stays 0
    assert np.array_equal(apply_temperature(p, 1.0), p)


def test_temperature_above_one_softens_and_postprocess_applies_it():
    prob = np.array([0.0, 0.02, 0.3, 0.6, 0.99], np.float32).reshape(1, 1, 5)
    var = np.zeros_like(prob)
    a = postprocess(prob, var, None, 0.5, 1.0)
    b = postprocess(prob, var, None, 0.5, 2.0)
    assert np.array_equal(a.labels, b.labels)
    inside = prob > 0
    assert np.all(np.abs(b.probability - 0.5)[inside] < np.abs(a.probability - 0.5)[inside])
    assert np.all(b.uncertainty[inside] > a.uncertainty[inside])  # softer: more entropy


def test_fit_temperature_recovers_the_temperature_that_made_the_data():
    rng = np.random.default_rng(0)
    z = rng.normal(0, 4, (60, 60, 60))
    truth = rng.random(z.shape) < 1 / (1 + np.exp(-z / 2.5))  # the truth is 2.5x softer
    from napari_pvs.training.triage import ClusterSample

    s = ClusterSample("a", (1 / (1 + np.exp(-z))).astype(np.float32), np.zeros(z.shape, np.float32),
                      (z > 0).astype(np.uint8), truth.astype(np.uint8), np.ones(z.shape, bool),
                      None, np.eye(4))
    assert fit_temperature([s]) == pytest.approx(2.5, rel=0.05)


def test_auroc_and_ece_match_their_definitions():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(1)
    y = rng.random(500) < 0.3
    s = rng.normal(size=500) + y
    assert auroc(s, y) == pytest.approx(roc_auc_score(y, s))
    assert np.isnan(auroc(s, np.ones(500, bool)))
    p = rng.random(200_000)
    assert expected_calibration_error(p, rng.random(p.size) < p) < 0.01  # calibrated
    assert expected_calibration_error(np.full(1000, 0.9), np.zeros(1000)) == pytest.approx(0.9)


def test_the_fitted_classifier_is_sklearns_logistic_regression_applied_by_numpy():
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(2)
    n = 600
    x = rng.normal(size=(n, len(FEATURES))) * [0.2, 0.3, 0.1, 1.0, 0.5, 0.2, 0.5] + 1
    is_fp = (x[:, 5] - 1) * 4 + rng.normal(0, 0.5, n) < 0  # low linearity: false positive
    groups = np.repeat(np.arange(6), n // 6)
    t = fit_classifier(x, is_fp, groups, heuristic=rng.random(n))
    assert t["cv_auroc"] > 0.9 > 0.6 > t["cv_auroc_heuristic"] and "linearity" in t["features"]
    assert t["clusters"] == n and t["false_positives"] == int(is_fp.sum())
    cols = [FEATURES.index(f) for f in t["features"]]
    sc = StandardScaler().fit(x[:, cols])
    ref = LogisticRegression(C=t["C"], max_iter=2000).fit(sc.transform(x[:, cols]), is_fp)
    table = {"id": np.arange(n), "prob_mean": x[:, 0], "prob_max": x[:, 1], "unc_mean": x[:, 2],
             "volume_mm3": np.exp(x[:, 3]), "length_mm": np.exp(x[:, 4]), "linearity": x[:, 5],
             "region": np.where(x[:, 6] > 1, "BG", "WM")}
    xm = feature_matrix(table)
    ours = p_false_positive(table, t)
    np.testing.assert_allclose(ours, ref.predict_proba(sc.transform(xm[:, cols]))[:, 1],
                               atol=1e-6)


def test_one_class_of_clusters_cannot_be_fitted():
    with pytest.raises(ValueError, match="all false positives"):
        fit_classifier(np.zeros((10, len(FEATURES))), np.ones(10, bool), np.zeros(10))
    with pytest.raises(ValueError, match="no cluster"):
        fit_classifier(np.zeros((0, len(FEATURES))), np.zeros(0, bool), np.zeros(0))


def test_table_priority_is_p_false_positive_with_a_classifier_and_the_heuristic_without():
    labels = np.zeros((20, 20, 20), np.uint8)
    labels[2:12, 5, 5] = 1  # a tube
    labels[14:17, 14:17, 14:17] = 1  # a blob
    prob = np.where(labels > 0, 0.8, 0.0).astype(np.float32)
    unc = np.where(labels > 0, 0.5, 0.0).astype(np.float32)
    clusters, _ = label_clusters(labels)
    plain = cluster_table(clusters, probability=prob, uncertainty=unc)
    assert np.all(np.isnan(plain.columns["p_false_positive"]))
    lin = FEATURES.index("linearity")
    coef = [0.0] * len(FEATURES)
    coef[lin] = -8.0  # blob-like (linearity 0): false positive
    tri = cluster_table(clusters, probability=prob, uncertainty=unc,
                        triage=_triage(coef, intercept=4.0))
    pf = tri.columns["p_false_positive"]
    np.testing.assert_array_equal(tri.columns["priority"], pf)
    tube = int(np.argmax(tri.columns["linearity"]))
    assert pf[1 - tube] > 0.9 > 0.1 > pf[tube]
    # the baseline (no probability) keeps the heuristic even with a classifier
    base = cluster_table(clusters, triage=_triage(coef, intercept=4.0))
    assert np.all(np.isnan(base.columns["p_false_positive"]))


@pytest.mark.parametrize("bad, needle", [
    ({"coef": [1.0]}, "coefficient arrays"),
    ({"scale": [0.0] * len(FEATURES)}, "non-finite"),
    ({"features": ["prob_mean", "colour"]}, "unknown features"),
    ({"intercept": "x"}, "incomplete"),
])
def test_a_checkpoint_with_a_broken_classifier_is_refused_by_name(tmp_path, bad, needle):
    meta = default_meta(arch_config("XS", 3))
    net = build_network(meta["arch"])
    good = save_checkpoint(tmp_path / "good.safetensors", net,
                           {**meta, "triage": _triage(), "calibration": {"temperature": 1.3}})
    assert read_meta(good)["calibration"]["temperature"] == 1.3
    with pytest.raises(PVSInputError, match=needle):
        save_checkpoint(tmp_path / "bad.safetensors", net, {**meta, "triage": {**_triage(), **bad}})
    assert not (tmp_path / "bad.safetensors").exists()


@pytest.mark.parametrize("t", [0, -1, "nan", None])
def test_a_bad_temperature_is_refused(tmp_path, t):
    meta = default_meta(arch_config("XS", 3))
    cal = {"temperature": float(t) if t == "nan" else t}
    if t is None:
        cal = ["not", "a", "dict"]
    with pytest.raises(PVSInputError, match="temperature|calibration"):
        save_checkpoint(tmp_path / "bad.safetensors", build_network(meta["arch"]),
                        {**meta, "calibration": cal})
    json.dumps(meta)  # the caller's dict is untouched and still serialisable


def test_expected_false_positives_left_sums_the_unreviewed_clusters():
    from napari_pvs.review import ReviewSession

    labels = np.zeros((20, 20, 20), np.uint8)
    labels[2:12, 5, 5] = 1  # a tube
    labels[14:17, 14:17, 14:17] = 1  # a blob
    labels[2:5, 15:18, 2:5] = 1  # another blob
    prob = np.where(labels > 0, 0.8, 0.0).astype(np.float32)
    coef = [0.0] * len(FEATURES)
    coef[FEATURES.index("linearity")] = -8.0
    s = ReviewSession(labels.copy(), probability=prob, uncertainty=prob / 2,
                      triage=_triage(coef, intercept=4.0))
    pf = dict(zip(s.table.columns["id"].tolist(), s.table.columns["p_false_positive"]))
    assert s.expected_false_positives() == pytest.approx(sum(pf.values()))
    first = s.order()[0]
    assert pf[first] == max(pf.values())  # the review starts at the likeliest false positive
    s.reject(first)
    assert s.expected_false_positives() == pytest.approx(sum(pf.values()) - pf[first])
    s.undo()
    assert s.expected_false_positives() == pytest.approx(sum(pf.values()))
    assert ReviewSession(labels.copy(), probability=prob).expected_false_positives() is None


def test_the_queue_ranks_clusters_across_subjects_by_p_false_positive(tmp_path, phantom_store):
    from napari_pvs.active import rank_clusters

    store = phantom_store(2, 2, 48, corrected=("siteA01",), path=tmp_path / "s.pvs.zarr")
    meta = default_meta(arch_config("XS", 3))
    coef = [0.0] * len(FEATURES)
    coef[FEATURES.index("linearity")] = -8.0  # blobs are false positives
    model_id = store.models.register(build_network(meta["arch"]),
                                     {**meta, "triage": _triage(coef, intercept=4.0)})
    blobs = {"siteA01": 1, "siteA02": 2, "siteB01": 0, "siteB02": 3}
    for sid, n_blobs in blobs.items():
        shape = tuple(store.info(sid)["shape"])
        labels = np.zeros(shape, np.uint8)
        labels[4:16, 10, 10] = 1  # one tube each
        for b in range(n_blobs):
            labels[20 + 6 * b:23 + 6 * b, 30:33, 30:33] = 1
        prob = np.where(labels > 0, 0.8, 0.0).astype(np.float32)
        store.save_prediction(sid, model_id, probability=prob, uncertainty=prob / 3,
                              labels=labels)
    rows = rank_clusters(store)
    assert {r["subject"] for r in rows} == {"siteA02", "siteB01", "siteB02"}  # not corrected
    assert len(rows) == 3 + 2 + 3 - 0  # tubes: 3, blobs: 2 + 0 + 3
    pf = [r["p_false_positive"] for r in rows]
    assert pf == sorted(pf, reverse=True) and [r["priority"] for r in rows] == pf
    assert all(p > 0.9 for p in pf[:5]) and all(p < 0.1 for p in pf[5:])  # blobs first
    assert rows[0]["subject"] == "siteA02"  # ties: by subject, then cluster
    assert len(rank_clusters(store, limit=2)) == 2
    # site-aware: site B has no corrected subject, site A one: B's clusters first
    site_rows = rank_clusters(store, site_aware=True)
    assert [r["site"] for r in site_rows] == ["siteB"] * 5 + ["siteA"] * 3
    assert [r["site_corrected"] for r in site_rows] == [0] * 5 + [1] * 3
    assert site_rows[0]["subject"] == "siteB02" and site_rows[5]["subject"] == "siteA02"
    # a saved review decided one blob of siteB02: it leaves the queue, the rest stay
    shape = tuple(store.info("siteB02")["shape"])
    reviewed = np.zeros(shape, bool)
    reviewed[20:23, 30:33, 30:33] = True  # the first blob, rejected
    store.commit_labels("siteB02", np.zeros(shape, np.uint8), author="t", reviewed=reviewed)
    after = rank_clusters(store)
    assert len(after) == len(rows) - 1
    assert not any(r["subject"] == "siteB02" and 20 <= r["centroid_i"] < 23 for r in after)


@pytest.mark.parametrize("bad", [
    {"triage": {"features": ["prob_mean"], "mean": [0.0], "scale": [1.0], "coef": [1.0, 2.0],
                "intercept": 0.0}},
    {"triage": "not a classifier"},
    {"calibration": {"temperature": -2.0}},
])
def test_predict_with_a_crafted_checkpoint_whose_triage_is_broken_fails_cleanly(tmp_path, bad):
    """A checkpoint written by something else (not save_checkpoint) with a broken
    classifier or temperature: one error line naming the file, no traceback, no output."""
    from _helpers import assert_clean_failure, run_cli
    from safetensors.torch import save_file

    import nibabel as nib

    from napari_pvs.model import FORMAT, FORMAT_VERSION
    from napari_pvs.phantom import make_phantom

    meta = {**default_meta(arch_config("XS", 3)), "format": FORMAT,
            "format_version": FORMAT_VERSION, "id": "crafted", **bad}
    net = build_network(meta["arch"])
    ckpt = tmp_path / "crafted.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(ckpt),
              metadata={"napari_pvs": json.dumps(meta)})
    ph = make_phantom(1, size_mm=32)
    img = tmp_path / "sub-01_T2w.nii.gz"
    nib.save(nib.Nifti1Image(ph.image.astype(np.float32), ph.affine), str(img))
    out = tmp_path / "out"
    rc, so, se = run_cli("predict", str(img), "-o", str(out), "--model", str(ckpt))
    assert_clean_failure(rc, so, se, "crafted.safetensors")
    assert "triage" in se or "temperature" in se
    assert not any(out.glob("*_pvs.nii.gz"))
