"""Sliding-window inference: geometry, TTA uncertainty, ROI skipping, cancellation, errors."""

from __future__ import annotations

import threading

import nibabel as nib
import numpy as np
import pytest
import torch

from napari_pvs import PVSInputError
from napari_pvs.inference import FLIPS, PredictionCancelled, predict_volume, run
from napari_pvs.model import arch_config, build_network, default_meta, save_checkpoint
from napari_pvs.pipeline import predict_file


def _meta(patch=16, spacing=1.0, in_channels=1):
    return {"id": "toy", "arch": {"in_channels": in_channels, "out_channels": 2},
            "preprocessing": {"target_spacing": [spacing] * 3, "patch_size": [patch] * 3}}


class _Counting(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.inner(x)


def _pointwise():
    torch.manual_seed(0)
    return torch.nn.Conv3d(1, 2, kernel_size=1).eval()


def _asymmetric():
    torch.manual_seed(1)
    net = torch.nn.Conv3d(1, 2, kernel_size=3, padding=1).eval()
    with torch.no_grad():
        net.weight[:, :, 0] *= 5.0  # clearly not mirror-symmetric
    return net


def _image(shape=(30, 26, 22), seed=0):
    return np.random.default_rng(seed).normal(100, 20, shape).astype(np.float32)


def test_flips_cover_all_eight_mirror_variants():
    assert len(FLIPS) == 8 and len(set(FLIPS)) == 8 and FLIPS[0] == ()


def test_flip_equivariant_network_has_zero_tta_variance():
    pred = run(predict_volume(_image(), (1, 1, 1), _pointwise(), _meta(), tta=8, backend="torch"))
    assert pred.tta_variance.max() < 1e-10
    assert pred.probability.shape == (30, 26, 22) and pred.probability.dtype == np.float32
    # uncertainty is then the predictive entropy alone
    p = np.clip(pred.probability, 1e-7, 1 - 1e-7)
    entropy = -(p * np.log2(p) + (1 - p) * np.log2(1 - p))
    np.testing.assert_allclose(pred.uncertainty, np.clip(entropy, 0, 1), atol=1e-5)


def test_asymmetric_network_has_tta_variance_that_grows_with_flips():
    one = run(predict_volume(_image(), (1, 1, 1), _asymmetric(), _meta(), tta=1, backend="torch"))
    eight = run(predict_volume(_image(), (1, 1, 1), _asymmetric(), _meta(), tta=8, backend="torch"))
    assert one.tta_variance.max() == 0
    assert eight.tta_variance.mean() > 1e-4
    assert np.all(eight.uncertainty >= 0) and np.all(eight.uncertainty <= 1)


@pytest.mark.parametrize("inner", [_pointwise, _asymmetric])
def test_roi_skipping_leaves_the_roi_unchanged(inner):
    """Windows only around the ROI: fewer network calls, the same ROI probabilities (to
    float rounding for a pointwise network; a 3x3x3 one sees zero padding at other window
    borders)."""
    img = _image((48, 48, 48))
    roi = np.zeros(img.shape, bool)
    roi[4:14, 5:15, 6:16] = True
    net = _Counting(inner())
    kw = dict(roi=roi, tta=2, backend="torch", overlap=0.5)
    full = run(predict_volume(img, (1, 1, 1), net, _meta(), skip_outside_roi=False, **kw))
    n_full = net.calls
    net.calls = 0
    skip = run(predict_volume(img, (1, 1, 1), net, _meta(), **kw))
    assert skip.info["windows"] < full.info["windows"] == skip.info["windows_total"]
    assert net.calls < n_full
    if inner is _pointwise:
        np.testing.assert_allclose(skip.probability[roi], full.probability[roi], atol=1e-6)
    else:
        np.testing.assert_allclose(skip.probability[roi], full.probability[roi], atol=0.05)
        assert np.mean(skip.probability[roi] == full.probability[roi]) > 0.5
    assert not skip.labels[~roi].any() and not skip.probability[~roi].any()


def test_cancel_stops_within_one_batch():
    net = _Counting(_pointwise())
    cancel = threading.Event()
    gen = predict_volume(_image((64, 64, 64)), (1, 1, 1), net, _meta(), backend="torch",
                         tta=1, cancel=cancel)
    first = next(gen)
    assert first.done == 0 and first.total > 4
    next(gen)  # one batch done
    cancel.set()
    with pytest.raises(PredictionCancelled):
        next(gen)
    assert net.calls == 1


def test_closing_the_generator_stops_the_work():
    net = _Counting(_pointwise())
    gen = predict_volume(_image((64, 64, 64)), (1, 1, 1), net, _meta(), backend="torch")
    next(gen)
    next(gen)
    gen.close()
    assert net.calls == 1


def test_small_volume_is_padded_and_resampling_returns_to_the_source_grid():
    img = _image((10, 12, 9))
    pred = run(predict_volume(img, (1.6, 1.6, 1.6), _pointwise(), _meta(patch=16, spacing=0.8),
                              backend="torch"))
    assert pred.probability.shape == img.shape
    assert pred.info["work_shape"] == [20, 24, 18]


@pytest.mark.parametrize("kwargs, match", [
    ({"spacing": None}, "spacing is missing"),
    ({"spacing": (1, 0, 1)}, "invalid voxel spacing"),
    ({"tta": 0}, "tta must be"),
    ({"tta": 9}, "tta must be"),
    ({"roi": np.ones((3, 3, 3))}, "ROI shape"),
    ({"image": np.ones((2, 8, 8, 8), np.float32)}, "expects 1 input channel"),
    ({"image": np.ones((8, 8), np.float32)}, "3D"),
])
def test_bad_inputs_raise_clear_errors(kwargs, match):
    args = {"image": _image((8, 8, 8)), "spacing": (1, 1, 1)}
    args.update({k: kwargs.pop(k) for k in list(kwargs) if k in args})
    with pytest.raises(PVSInputError, match=match):
        run(predict_volume(args["image"], args["spacing"], _pointwise(), _meta(), backend="torch",
                           **kwargs))


@pytest.fixture(scope="module")
def xs_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    arch = arch_config("XS", 3)
    path = tmp_path_factory.mktemp("ckpt") / "xs.safetensors"
    save_checkpoint(path, build_network(arch), default_meta(arch, target_spacing=[1.0] * 3,
                                                            patch_size=[32, 32, 32]))
    return path


def test_predict_file_writes_three_maps_in_the_source_geometry(tmp_path, oblique_nifti, xs_checkpoint):
    roi_img = nib.load(oblique_nifti)
    roi = np.zeros(roi_img.shape, np.uint8)
    roi[2:10, 2:8, 1:7] = 1
    roi_path = tmp_path / "roi.nii.gz"
    nib.save(nib.Nifti1Image(roi, roi_img.affine, roi_img.header), roi_path)
    outs = predict_file(oblique_nifti, tmp_path / "out", model=str(xs_checkpoint), roi=roi_path,
                        tta=2, backend="torch")
    assert set(outs) == {"labels", "probability", "uncertainty", "clusters"}
    rows = outs["clusters"].read_text().splitlines()
    assert rows[0].startswith("id,voxels,volume_mm3")
    n_clusters = len(rows) - 1
    src = nib.load(oblique_nifti)
    for kind, dtype in (("labels", np.uint8), ("probability", np.float32),
                        ("uncertainty", np.float32)):
        img = nib.load(outs[kind])
        assert img.shape == src.shape and img.get_data_dtype() == dtype, kind
        np.testing.assert_allclose(img.affine, src.affine, atol=1e-6)
        np.testing.assert_allclose(img.header.get_qform(), src.header.get_qform(), atol=1e-6)
        assert int(img.header["sform_code"]) == int(src.header["sform_code"])
        data = np.asarray(img.dataobj)
        assert not data[roi == 0].any(), kind
    prob = np.asarray(nib.load(outs["probability"]).dataobj)
    assert 0 <= prob.min() and prob.max() <= 1 and prob[roi > 0].std() > 0
    from napari_pvs.clusters import label_clusters

    assert label_clusters(np.asarray(nib.load(outs["labels"]).dataobj))[1] == n_clusters


def test_cli_model_create_then_predict_writes_three_maps(tmp_path, capsys):
    from napari_pvs.cli import main
    from napari_pvs.dataset import write_phantom_cohort

    (s,) = write_phantom_cohort(tmp_path / "c", n_sites=1, per_site=1, size_mm=48)
    ckpt = tmp_path / "xs.safetensors"
    assert main(["model", "create", "--variant", "XS", "--kernel", "3", "--patch", "32",
                 "--spacing", "1.0", str(ckpt)]) == 0
    assert main(["predict", str(s.image), "-o", str(tmp_path / "out"), "--model", str(ckpt),
                 "--roi", str(s.regions), "--tta", "2"]) == 0
    src = nib.load(s.image)
    for suffix in ("pvs", "prob", "uncertainty"):
        img = nib.load(tmp_path / "out" / f"sub-siteA01_T2w_{suffix}.nii.gz")
        assert img.shape == src.shape
        np.testing.assert_allclose(img.affine, src.affine)
    assert "sub-siteA01_T2w_prob.nii.gz" in capsys.readouterr().out
