"""Each stage of the prediction path on its own, and ``predict_volume`` as their composition.

Stages: preprocess (``napari_pvs.preprocess``), window plan and TTA merger
(``napari_pvs._sliding``), runner (``napari_pvs._backends``, tested in test_backends),
post-processing (``napari_pvs.inference.postprocess``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from napari_pvs import PVSInputError
from napari_pvs._backends import make_runner
from napari_pvs._sliding import FLIPS, TTAMerger, plan_windows
from napari_pvs.inference import postprocess, predict_preprocessed, predict_volume, run
from napari_pvs.model import arch_config, build_network, default_meta
from napari_pvs.preprocess import preprocess, work_grid, work_spacing

RNG = np.random.default_rng(0)


class _Fn:
    """A window runner computing a known function of its input (for the merger's arithmetic)."""

    name, device = "fn", "cpu"

    def __init__(self, fn, batch_size=2):
        self.fn, self.batch_size, self.calls = fn, batch_size, 0

    def __call__(self, x):
        self.calls += 1
        fg = self.fn(x[:, 0]).astype(np.float32)
        return np.stack([np.zeros_like(fg), fg], axis=1)  # logits: P(fg) = sigmoid(fg)


# ---------------------------------------------------------------- preprocess


def test_own_preprocessing_resamples_and_zscores_inside_the_roi():
    image = RNG.normal(100, 20, (30, 24, 20)).astype(np.float32)
    roi = np.zeros(image.shape, bool)
    roi[5:25, 4:20, 3:17] = True
    prep = preprocess(image, (1.2, 1.2, 1.5), roi, {"target_spacing": [0.8, 0.8, 1.0]})
    assert prep.work_shape == (45, 36, 30) == work_grid(image.shape, (1.2, 1.2, 1.5), (0.8, 0.8, 1.0))
    assert prep.image.shape == (1, 45, 36, 30) and prep.mask.shape == prep.work_shape
    inside = prep.image[0][prep.mask]
    assert abs(inside.mean()) < 1e-4 and abs(inside.std() - 1) < 1e-3
    assert not prep.nnunet
    back = prep.to_source(prep.image[0])
    assert back.shape == image.shape and back.dtype == np.float32
    # nearest neighbour: a mask keeps its values, only its grid changes
    labels = prep.mask_to_model(roi)
    assert labels.dtype == bool and np.array_equal(labels, prep.mask)


def test_min_spacing_keeps_finer_axes_at_their_own_size_down_to_the_floor():
    pre = {"target_spacing": [0.8, 0.8, 0.8], "min_spacing": [0.7, 0.7, 0.7]}
    # 0.7 mm stays, 0.5 mm goes to the floor, coarser axes go to the target, 0.795 is
    # within 1 % of the target and is resampled to it
    np.testing.assert_allclose(work_spacing((0.7, 0.5, 1.2), pre), (0.7, 0.7, 0.8))
    np.testing.assert_allclose(work_spacing((0.795, 0.9, 0.7), pre), (0.8, 0.8, 0.7))
    # without min_spacing (every other model) or for nnU-Net plans: the target, always
    np.testing.assert_allclose(work_spacing((0.7, 0.5, 1.2), {"target_spacing": [0.8] * 3}), 0.8)
    np.testing.assert_allclose(work_spacing((0.7,) * 3, {**pre, "normalization": "nnunet_v1"}), 0.8)
    # a floor above the target is never coarser than the target
    np.testing.assert_allclose(work_spacing((0.7,) * 3, {**pre, "min_spacing": [1.0] * 3}), 0.8)
    image = RNG.normal(100, 20, (40, 30, 20)).astype(np.float32)
    roi = np.ones(image.shape, bool)
    kept = preprocess(image, (0.7, 0.7, 1.2), roi, pre)
    assert kept.work_shape == (40, 30, 30)  # the 0.7 mm axes are not resampled
    assert kept.to_source(kept.image[0]).shape == image.shape
    plain = preprocess(image, (0.7, 0.7, 1.2), roi, {"target_spacing": [0.8] * 3})
    assert plain.work_shape == (35, 26, 30)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0.2, 3.0), min_size=3, max_size=3), st.floats(0.5, 2.0),
       st.floats(0.3, 2.0))
def test_work_spacing_never_resamples_coarser_than_the_target_or_finer_than_the_floor(
        spacing, target, floor):
    got = work_spacing(spacing, {"target_spacing": [target] * 3, "min_spacing": [floor] * 3})
    sp = np.asarray(spacing)
    assert np.all(got <= target) and np.all(got >= min(floor, target))
    # an axis is only ever moved towards the target: kept, clipped to the floor, or target
    assert np.all((got == target) | (got == sp) | (got == min(floor, target)))
    np.testing.assert_array_equal(got[sp >= target * 0.99], target)


def test_nnunet_preprocessing_transposes_and_normalises_inside_the_nonzero_mask():
    image = np.zeros((12, 16, 20), np.float32)
    image[2:10, 3:13, 4:16] = RNG.normal(50, 5, (8, 10, 12))
    pre = {"target_spacing": [1, 1, 1], "normalization": "nnunet_v1",
           "normalization_schemes": ["nonCT"], "use_mask_for_norm": [True],
           "transpose_forward": [2, 0, 1], "transpose_backward": [1, 2, 0]}
    prep = preprocess(image, (1, 1, 1), None, pre)
    assert prep.nnunet and prep.work_shape == (20, 12, 16)
    moved = image.transpose(2, 0, 1)
    nz = moved != 0
    np.testing.assert_allclose(prep.image[0][~nz], 0)
    v = moved[nz]
    np.testing.assert_allclose(prep.image[0][nz], (v - v.mean()) / (v.std() + 1e-8), atol=1e-5)
    np.testing.assert_allclose(prep.to_source(prep.image[0]) != 0, image != 0)
    with pytest.raises(PVSInputError, match="transpose_forward"):
        preprocess(image, (1, 1, 1), None, {**pre, "transpose_forward": [0, 0, 1]})


@pytest.mark.parametrize("bad, needle", [
    (dict(spacing=(1, 0, 1)), "invalid voxel spacing"),
    (dict(spacing=None), "spacing is missing"),
    (dict(roi=np.zeros((4, 4, 4), bool)), "ROI is empty"),
    (dict(roi=np.ones((4, 4, 5), bool)), "does not match"),
    (dict(image=np.zeros((2, 2))), "must be 3D"),
])
def test_preprocess_refuses_bad_input_clearly(bad, needle):
    args = {"image": np.ones((4, 4, 4), np.float32), "spacing": (1, 1, 1), "roi": None, **bad}
    with pytest.raises(PVSInputError, match=needle):
        preprocess(args["image"], args["spacing"], args["roi"], {})


# ---------------------------------------------------------------- window plan


@pytest.mark.parametrize("nnunet", [False, True])
def test_window_plan_covers_the_grid_and_pads_small_images_centred(nnunet):
    plan = plan_windows((40, 20, 33), (16, 32, 16), 0.5, nnunet=nnunet)
    assert plan.pad == [(0, 0), (6, 6), (0, 0)] and plan.shape == (40, 32, 33)
    hit = np.zeros(plan.shape, int)
    for w in plan.windows:
        assert all(s.stop - s.start == p for s, p in zip(w, plan.patch))
        hit[w] += 1
    assert hit.min() >= 1  # every voxel is covered
    assert plan.crop(hit).shape == (40, 20, 33)
    assert len(plan.windows) == plan.n_all


def test_window_plan_skips_windows_without_roi():
    mask = np.zeros((64, 64, 64), bool)
    mask[:20, :20, :20] = True
    full = plan_windows(mask.shape, (32, 32, 32), 0.5)
    skip = plan_windows(mask.shape, (32, 32, 32), 0.5, mask=mask)
    keep = plan_windows(mask.shape, (32, 32, 32), 0.5, mask=mask, skip_outside_roi=False)
    assert skip.n_all == full.n_all == len(keep.windows) == 27
    assert 0 < len(skip.windows) < 27 and all(mask[w].any() for w in skip.windows)
    with pytest.raises(PVSInputError, match="overlap"):
        plan_windows(mask.shape, (32, 32, 32), 1.0)


@settings(max_examples=60, deadline=None)
@given(shape=st.tuples(*[st.integers(8, 60)] * 3), patch=st.integers(8, 24),
       overlap=st.sampled_from([0.0, 0.25, 0.5]), seed=st.integers(0, 2**16), data=st.data())
def test_window_plan_tiles_the_roi_box_and_covers_every_roi_voxel(shape, patch, overlap, seed,
                                                                   data):
    """Own models tile only the ROI's bounding box (plus a margin): every ROI voxel is
    still inside a window, every window lies inside the (padded) grid, and there are never
    more windows than tiling the whole grid gives."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(shape, bool)
    lo = [int(rng.integers(0, n)) for n in shape]
    hi = [int(rng.integers(a, n)) + 1 for a, n in zip(lo, shape)]
    mask[tuple(slice(a, b) for a, b in zip(lo, hi))] = rng.random([b - a for a, b in
                                                                   zip(lo, hi)]) < 0.3
    mask[tuple(lo)] = True
    margin = data.draw(st.sampled_from([None, 0, 3]))
    plan = plan_windows(shape, (patch,) * 3, overlap, mask=mask, margin=margin)
    full = plan_windows(shape, (patch,) * 3, overlap, mask=mask, nnunet=False,
                        skip_outside_roi=False)
    hit = np.zeros(plan.shape, bool)
    for w in plan.windows:
        assert all(0 <= s.start and s.stop <= n and s.stop - s.start == patch
                   for s, n in zip(w, plan.shape))
        hit[w] = True
    assert plan.crop(hit)[mask].all()
    assert len(plan.windows) <= len(full.windows) == plan.n_all


def test_window_plan_of_a_small_roi_runs_fewer_windows_around_it():
    mask = np.zeros((200, 200, 200), bool)
    mask[70:130, 60:140, 80:120] = True  # 60 x 80 x 40 voxels in the middle
    plan = plan_windows(mask.shape, (64, 64, 64), 0.25, mask=mask)
    whole = plan_windows(mask.shape, (64, 64, 64), 0.25)
    assert plan.n_all == len(whole.windows) == 64
    assert len(plan.windows) == 2 * 2 * 1  # the box (+8 voxels each side) takes 2 x 2 x 1
    starts = np.array([[s.start for s in w] for w in plan.windows])
    assert starts.min(0).tolist() == [62, 52, 68]


# ---------------------------------------------------------------- TTA merger


def test_merger_of_a_constant_is_that_constant_with_zero_variance():
    plan = plan_windows((40, 40, 40), (16, 16, 16), 0.5)
    merger = TTAMerger(plan, tta=8)
    runner = _Fn(lambda x: np.full(x.shape, 1.5))
    img = np.zeros((1, 40, 40, 40), np.float32)
    for batch in plan.batches(2):
        x = np.stack([img[(slice(None), *w)] for w in batch])
        merger.add(batch, *merger.predict(runner, x))
    prob, var = merger.result()
    np.testing.assert_allclose(prob, 1 / (1 + np.exp(-1.5)), atol=1e-5)
    np.testing.assert_allclose(var, 0, atol=1e-7)
    assert runner.calls == 8 * len(plan.batches(2))  # every flip of every batch


def test_tta_variance_measures_what_flips_change():
    plan = plan_windows((16, 16, 16), (16, 16, 16), 0.5)
    ramp = np.linspace(-3, 3, 16, dtype=np.float32)[:, None, None]
    x = np.zeros((1, 1, 16, 16, 16), np.float32)
    for tta, expect_var in [(1, False), (2, True)]:  # FLIPS[1] mirrors axis 0
        merger = TTAMerger(plan, tta=tta)
        mean, var = merger.predict(_Fn(lambda a: a * 0 + ramp), x)
        assert (var.max() > 0.01) == expect_var
        if tta == 2:  # the mirrored ramp averages with the ramp: p(r) and p(-r)
            p = 1 / (1 + np.exp(-ramp[:, 0, 0]))
            np.testing.assert_allclose(mean[0, :, 3, 3], (p + p[::-1]) / 2, atol=1e-5)
    assert FLIPS[1] == (0,)


def test_merger_refuses_non_finite_outputs_and_bad_tta():
    plan = plan_windows((16, 16, 16), (16, 16, 16), 0.5)
    with pytest.raises(PVSInputError, match="NaN or infinite"):
        TTAMerger(plan, model="m1").predict(_Fn(lambda a: a * np.nan), np.ones((1, 1, 16, 16, 16)))
    with pytest.raises(PVSInputError, match="tta must be between 1 and 8"):
        TTAMerger(plan, tta=9)


# ---------------------------------------------------------------- post-processing


def test_postprocess_uncertainty_labels_and_roi():
    prob = np.array([[[0.5, 0.9, 0.1, 0.7]]], np.float32)
    var = np.array([[[0.0, 0.0, 0.1, 0.3]]], np.float32)
    roi = np.array([[[True, True, True, False]]])
    pred = postprocess(prob, var, roi, threshold=0.5)
    h = lambda p: -(p * np.log2(p) + (1 - p) * np.log2(1 - p))  # noqa: E731
    np.testing.assert_allclose(pred.uncertainty[0, 0], [1.0, h(0.9), min(h(0.1) + 0.4, 1), 0],
                               atol=1e-5)
    assert pred.labels[0, 0].tolist() == [1, 1, 0, 0]
    assert pred.probability[0, 0, 3] == 0 and pred.tta_variance[0, 0, 3] == 0


def test_postprocess_drops_label_clusters_under_the_minimum_volume_but_keeps_the_maps():
    prob = np.zeros((12, 12, 12), np.float32)
    prob[1, 1, 1] = 0.9                      # 1 voxel of 0.343 mm³: dropped
    prob[5, 5, 5] = prob[6, 6, 6] = 0.8      # 2 voxels, 26-connected (0.686 mm³): dropped
    prob[9, 2:5, 9] = 0.7                    # 3 voxels (1.029 mm³): kept
    var = np.zeros_like(prob)
    kept = postprocess(prob, var, None, min_cluster_mm3=1.0, spacing=(0.7, 0.7, 0.7))
    assert kept.labels.sum() == 3 and kept.labels[9, 2:5, 9].all()
    np.testing.assert_array_equal(kept.probability, prob)  # only the labels change
    assert postprocess(prob, var, None).labels.sum() == 6
    # at 1 mm every voxel is 1 mm³: nothing dropped at 1.0, the single voxel at 1.5
    assert postprocess(prob, var, None, min_cluster_mm3=1.0, spacing=(1, 1, 1)).labels.sum() == 6
    assert postprocess(prob, var, None, min_cluster_mm3=1.5, spacing=(1, 1, 1)).labels.sum() == 5
    with pytest.raises(ValueError, match="spacing"):
        postprocess(prob, var, None, min_cluster_mm3=1.0)


# ---------------------------------------------------------------- the composition


def test_predict_volume_is_the_composition_of_the_stages():
    torch.manual_seed(0)
    arch = arch_config("XS", 3)
    net = build_network(arch).eval()
    meta = default_meta(arch, target_spacing=[1.0] * 3, patch_size=[32] * 3)
    image = RNG.normal(0, 1, (30, 36, 28)).astype(np.float32)
    roi = np.zeros(image.shape, bool)
    roi[4:26, 6:30, 3:25] = True
    got = run(predict_volume(image, (1.25, 1.25, 1.25), net, meta, roi=roi, tta=2,
                             backend="torch", overlap=0.25))
    prep = preprocess(image, (1.25,) * 3, roi, meta["preprocessing"])
    plan = plan_windows(prep.work_shape, (32, 32, 32), 0.25, mask=prep.mask)
    runner = make_runner(net, window=(32, 32, 32), backend="torch")
    prob, var = run(predict_preprocessed(prep.image, plan, runner, tta=2))
    ref = postprocess(prep.to_source(prob), prep.to_source(var), roi)
    for name in ("probability", "uncertainty", "tta_variance", "labels"):
        np.testing.assert_array_equal(getattr(got, name), getattr(ref, name))
    assert got.info["windows"] == len(plan.windows) and got.info["work_shape"] == [38, 45, 35]
    # the model's own minimum cluster volume reaches the labels
    meta["postprocessing"] = {"min_cluster_mm3": 6.0}
    dusted = run(predict_volume(image, (1.25, 1.25, 1.25), net, meta, roi=roi, tta=2,
                                backend="torch", overlap=0.25))
    want = postprocess(prep.to_source(prob), prep.to_source(var), roi, min_cluster_mm3=6.0,
                       spacing=(1.25,) * 3)
    np.testing.assert_array_equal(dusted.labels, want.labels)
    np.testing.assert_array_equal(dusted.probability, got.probability)
