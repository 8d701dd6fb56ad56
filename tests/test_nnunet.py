"""Importing MedNet-PVS releases (nnU-Net v1 MedNeXt folders) and matching nnU-Net v1."""

from __future__ import annotations

import json
import pickle
import shutil
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from _helpers import MEDNEXT_FIXTURE, MEDNEXT_RELEASE, PickleBomb

from napari_pvs import PVSInputError
from napari_pvs._sliding import importance, window_starts
from napari_pvs.inference import predict_volume, run
from napari_pvs.model import load_checkpoint, read_meta
from napari_pvs.nnunet import import_nnunet, infer_architecture, read_plans, safe_load_pickle
from napari_pvs.preprocess import nnunet_normalise, spline_resize

FIXTURE, TRAINER = MEDNEXT_FIXTURE, MEDNEXT_RELEASE


@pytest.fixture
def imported(imported_release):
    return imported_release


def _state(fold):
    return torch.load(TRAINER / f"fold_{fold}" / "model_final_checkpoint.model",
                      weights_only=True)["state_dict"]


@pytest.mark.parametrize("fold", [0, 1])
def test_imported_folds_reproduce_the_official_outputs(imported, fold):
    net, meta = load_checkpoint(imported / f"fold_{fold}.safetensors")
    x = torch.from_numpy(np.load(FIXTURE / "Task900_PVSTiny_input.npy"))
    with torch.no_grad():
        y = net(x).numpy()
    np.testing.assert_allclose(y, np.load(FIXTURE / f"Task900_PVSTiny_fold{fold}_expected.npy"),
                               atol=1e-5, rtol=0)
    prov = meta["provenance"]
    assert prov["fold"] == f"fold_{fold}" and prov["trainer"] == "nnUNetTrainerV2_MedNeXt_tiny_kernel5"
    assert prov["plans"] == "nnUNetPlansv2.1_trgSp_0.8x0.8x0.8"
    assert meta["arch"]["deep_supervision_heads"] is True  # kept for fine-tuning


def test_inferred_architecture_equals_the_constructor_arguments():
    a = json.loads((FIXTURE / "Task900_PVSTiny_architecture.json").read_text())
    arch = infer_architecture(_state(0))
    assert arch["in_channels"] == a["in_channels"] and arch["out_channels"] == a["n_classes"]
    assert arch["n_channels"] == a["n_channels"] and arch["kernel_size"] == a["kernel_size"]
    assert arch["exp_r"] == a["exp_r"] and arch["block_counts"] == a["block_counts"]
    assert arch["deep_supervision"] == a["deep_supervision"]


def test_plans_become_preprocessing_metadata(imported):
    pre = read_meta(imported / "fold_0.safetensors")["preprocessing"]
    assert pre["target_spacing"] == [0.8, 0.8, 0.8] and pre["patch_size"] == [128, 128, 128]
    assert pre["normalization_schemes"] == ["nonCT"] and pre["use_mask_for_norm"] == [True]
    assert pre["transpose_forward"] == [0, 1, 2] and pre["modality"] == "T2w"
    assert pre["tta"] == 8 and pre["overlap"] == 0.5 and pre["resample_order"] == 3


def test_ensemble_is_the_mean_of_the_fold_softmaxes(imported):
    ens, meta = load_checkpoint(imported / "ensemble.json")
    assert len(meta["ensemble"]) == 2
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        folds = [torch.softmax(load_checkpoint(imported / f"fold_{k}.safetensors")[0](x), 1)
                 for k in (0, 1)]
        got = torch.softmax(ens(x), 1)
    torch.testing.assert_close(got, (folds[0] + folds[1]) / 2, atol=1e-6, rtol=1e-5)


def test_trainer_name_that_disagrees_with_the_weights_warns(tmp_path):
    fake = tmp_path / "nnUNetTrainerV2_MedNeXt_L_kernel3__nnUNetPlansv2.1"
    shutil.copytree(TRAINER, fake)
    with pytest.warns(UserWarning, match="trainer name says MedNeXt-L k3"):
        import_nnunet(fake, tmp_path / "out")


def test_broken_releases_fail_clearly(tmp_path):
    cut = tmp_path / "cut" / TRAINER.name
    shutil.copytree(TRAINER, cut)
    model = cut / "fold_1" / "model_final_checkpoint.model"
    model.write_bytes(model.read_bytes()[:2000])
    with pytest.raises(PVSInputError, match="truncated, corrupt"):
        import_nnunet(cut, tmp_path / "o1")
    missing = tmp_path / "missing" / TRAINER.name
    shutil.copytree(TRAINER, missing)
    (missing / "fold_1" / "model_final_checkpoint.model").unlink()
    with pytest.raises(PVSInputError, match="fold is incomplete"):
        import_nnunet(missing, tmp_path / "o2")
    bad_plans = tmp_path / "plans" / TRAINER.name
    shutil.copytree(TRAINER, bad_plans)
    with open(bad_plans / "plans.pkl", "wb") as fh:
        pickle.dump({"num_stages": 1}, fh)
    with pytest.raises(PVSInputError, match="lacks the nnU-Net v1 plans key"):
        import_nnunet(bad_plans, tmp_path / "o3")
    ens = tmp_path / "o4"
    import_nnunet(TRAINER, ens)
    (ens / "fold_0.safetensors").unlink()
    with pytest.raises(PVSInputError, match="missing beside it"):
        load_checkpoint(ens / "ensemble.json")


def test_restricted_unpickler_refuses_code_and_runs_none(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    evil = tmp_path / "plans.pkl"
    evil.write_bytes(pickle.dumps({"plans_per_stage": PickleBomb("PICKLE_RAN")}))
    with pytest.raises(PVSInputError, match="refusing to unpickle posix.system|refusing to unpickle os.system"):
        safe_load_pickle(evil)
    assert not (tmp_path / "PICKLE_RAN").exists()
    # plain data, including numpy arrays and OrderedDicts, loads
    ok = tmp_path / "ok.pkl"
    ok.write_bytes(pickle.dumps(OrderedDict(a=np.arange(3), b=np.float32(2.5), c=[1, (2, 3)])))
    data = safe_load_pickle(ok)
    assert list(data["a"]) == [0, 1, 2] and data["b"] == np.float32(2.5)


def test_fixture_plans_read_through_the_restricted_unpickler():
    plans = read_plans(TRAINER / "plans.pkl")
    assert plans["num_classes"] == 2 and plans["modalities"] == ["T2w"]


# --- each nnU-Net v1 preprocessing / postprocessing step against a hand-computed value ---

def test_window_steps_follow_nnunet_v1():
    # 200 voxels, patch 128, step 0.5: ceil(72 / 64) + 1 = 3 windows, evenly at 0, 36, 72
    assert window_starts(200, 128, 0.5) == [0, 36, 72]
    assert window_starts(128, 128, 0.5) == [0]
    assert window_starts(256, 128, 0.5) == [0, 64, 128]


def test_gaussian_importance_map():
    w = importance((32, 32, 32))
    assert w.shape == (32, 32, 32)
    np.testing.assert_allclose(w, w[::-1, ::-1, ::-1], atol=1e-6)  # centred between 15 and 16
    # sigma = patch / 8 = 4 voxels: 4.5 voxels off the peak along one axis, relative to
    # the voxel 0.5 off it, is exp(-(4.5^2 - 0.5^2) / (2 * 4^2))
    ratio = w[16, 16, 20] / w[16, 16, 16]
    assert ratio == pytest.approx(np.exp(-(4.5**2 - 0.5**2) / 32), rel=0.02)
    assert w.min() > 0  # every voxel of a window gets some weight


def test_nonct_normalisation_inside_the_nonzero_mask():
    img = np.zeros((1, 4, 4, 4), np.float32)
    img[0, 1:3, 1:3, 1:3] = [[[1, 2], [3, 4]], [[5, 6], [7, 8]]]
    out = nnunet_normalise(img, {"normalization_schemes": ["nonCT"], "use_mask_for_norm": [True]})
    vals = np.arange(1, 9, dtype=float)
    expected = (vals - vals.mean()) / (vals.std() + 1e-8)
    np.testing.assert_allclose(np.sort(out[0][img[0] > 0]), expected, atol=1e-6)
    assert np.all(out[0][img[0] == 0] == 0)
    glob = nnunet_normalise(img, {"normalization_schemes": ["nonCT"], "use_mask_for_norm": [False]})
    np.testing.assert_allclose(glob[0], (img[0] - img[0].mean()) / (img[0].std() + 1e-8), atol=1e-6)


def test_third_order_spline_resampling_interpolates_the_samples():
    rng = np.random.default_rng(0)
    line = rng.normal(size=10).astype(np.float32)
    img = np.broadcast_to(line[:, None, None], (10, 4, 4))[None].copy()
    out = spline_resize(img, (30, 4, 4))[0, :, 2, 2]
    # x3 with pixel-centre mapping: new voxel 3k + 1 sits exactly on old voxel k, where an
    # interpolating spline must reproduce the sample
    np.testing.assert_allclose(out[1::3], line, atol=1e-4)
    # between the samples a cubic spline is not the linear interpolant
    linear = line[1:-2] + (line[2:-1] - line[1:-2]) / 3
    assert np.abs(out[5:-3:3][: linear.size] - linear).max() > 0.05


def test_transpose_is_applied_and_undone():
    torch.manual_seed(0)
    net = torch.nn.Conv3d(1, 2, 3, padding=1).eval()
    img = np.random.default_rng(0).normal(10, 2, (12, 16, 20)).astype(np.float32)
    base = {"target_spacing": [1, 1, 1], "patch_size": [16, 16, 16],
            "normalization": "nnunet_v1", "normalization_schemes": ["nonCT"],
            "use_mask_for_norm": [False]}
    meta_t = {"arch": {"in_channels": 1}, "preprocessing": {
        **base, "transpose_forward": [2, 0, 1], "transpose_backward": [1, 2, 0]}}
    meta_id = {"arch": {"in_channels": 1}, "preprocessing": {
        **base, "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2]}}
    got = run(predict_volume(img, (1, 1, 1), net, meta_t, backend="torch"))
    # hand-made: transpose the input ourselves, predict without transpose, transpose back
    ref = run(predict_volume(img.transpose(2, 0, 1).copy(), (1, 1, 1), net, meta_id, backend="torch"))
    assert got.probability.shape == img.shape
    np.testing.assert_allclose(got.probability, ref.probability.transpose(1, 2, 0), atol=1e-6)


def test_import_then_predict_on_a_phantom(imported, tmp_path):
    from napari_pvs.dataset import write_phantom_cohort
    from napari_pvs.pipeline import predict_file

    (s,) = write_phantom_cohort(tmp_path / "c", n_sites=1, per_site=1, size_mm=48)
    outs = predict_file(s.image, tmp_path / "o", model=str(imported / "ensemble.json"),
                        roi=s.regions, tta=2)
    import nibabel as nib

    for kind in ("labels", "probability", "uncertainty"):
        img = nib.load(outs[kind])
        assert img.shape == nib.load(s.image).shape
        np.testing.assert_allclose(img.affine, nib.load(s.image).affine)


class _Reduce:
    """Pickles as ``func(*args)`` (with ``state`` when given): a crafted plans.pkl."""

    def __init__(self, func, args, state=None):
        self.value = (func, args) if state is None else (func, args, state)

    def __reduce__(self):
        return self.value


def _bombs(folder: Path) -> dict[str, Path]:
    """Small files that would allocate gigabytes through a permissive unpickler."""
    import struct

    from napari_pvs.nnunet import _numpy_core

    rebuild = _numpy_core("multiarray")._reconstruct
    docs = {
        "list-range": pickle.dumps(_Reduce(list, (range(2**28),))),
        "bytes": pickle.dumps(_Reduce(bytes, (2**33,))),
        "memo-index": b"\x80\x04N" + b"r" + struct.pack("<I", 2**31 - 1) + b".",
        "ndarray-call": pickle.dumps(_Reduce(np.ndarray, ((2**40,),))),
        "reconstruct-shape": pickle.dumps(_Reduce(rebuild, (np.ndarray, (2**40,), b"b"))),
        "array-state": pickle.dumps(_Reduce(rebuild, (np.ndarray, (0,), b"b"),
                                            (1, (2**37,), np.dtype("f8"), False, b""))),
        "dtype-subarray": pickle.dumps(_Reduce(np.dtype, (("f8", (2**24,)),))),
    }
    out = {}
    for name, data in docs.items():
        assert len(data) < 200, name  # each is tiny
        out[name] = folder / f"{name}.pkl"
        out[name].write_bytes(data)
    return out


_LOAD_EACH = """
import json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (2 * 2**30, 2 * 2**30))  # a bomb fails, not the machine
from napari_pvs._errors import PVSInputError
from napari_pvs.nnunet import safe_load_pickle
out = {}
for path in sys.argv[1:]:
    try:
        safe_load_pickle(path)
        out[path] = "loaded"
    except PVSInputError as exc:
        out[path] = "PVSInputError: " + str(exc)
    except BaseException as exc:
        out[path] = type(exc).__name__
print(json.dumps(out))
"""


def test_restricted_unpickler_refuses_allocation_bombs(tmp_path):
    import os
    import subprocess
    import sys

    bombs = _bombs(tmp_path)
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", _LOAD_EACH, *map(str, bombs.values())],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads(r.stdout)
    for name, path in bombs.items():
        outcome = result[str(path)]
        assert outcome.startswith("PVSInputError: ") and "\n" not in outcome, (name, outcome)
        assert str(path) in outcome


def test_restricted_unpickler_bounds_file_size_and_shared_references(tmp_path):
    import time

    big = tmp_path / "plans.pkl"
    with open(big, "wb") as fh:  # sparse: no disk used
        fh.write(pickle.dumps({"a": 1}))
        fh.truncate(64 * 2**20)
    with pytest.raises(PVSInputError, match="plans.pkl is 64 MB"):
        safe_load_pickle(big)
    # 2**60 paths through 60 levels of shared lists: loading visits each list once
    shared: list = [np.arange(3)]
    for _ in range(60):
        shared = [shared, shared]
    dag = tmp_path / "dag.pkl"
    dag.write_bytes(pickle.dumps(shared))
    t = time.perf_counter()
    loaded = safe_load_pickle(dag)
    assert time.perf_counter() - t < 5
    inner = loaded
    for _ in range(60):
        assert inner[0] is inner[1]
        inner = inner[0]
    assert type(inner[0]) is np.ndarray and list(inner[0]) == [0, 1, 2]


def test_plans_of_every_protocol_since_python_3_load(tmp_path):
    plans = safe_load_pickle(TRAINER / "plans.pkl")
    for protocol in (3, 4, 5):
        path = tmp_path / f"plans{protocol}.pkl"
        path.write_bytes(pickle.dumps(plans, protocol=protocol))
        again = safe_load_pickle(path)
        stage = again["plans_per_stage"][0]
        assert type(stage["patch_size"]) is np.ndarray and list(stage["patch_size"]) == [128] * 3
        assert again["normalization_schemes"] == OrderedDict([(0, "nonCT")])


def test_import_nnunet_cli_with_a_bomb_fails_in_one_line(tmp_path):
    from _helpers import assert_clean_failure, run_cli

    folder = tmp_path / "nnUNetTrainerV2_MedNeXt_L_kernel5__nnUNetPlansv2.1"
    shutil.copytree(TRAINER, folder)
    (folder / "plans.pkl").write_bytes(pickle.dumps(_Reduce(list, (range(2**28),))))
    rc, out, err = run_cli("model", "import-nnunet", folder, tmp_path / "out")
    assert_clean_failure(rc, out, err, "plans.pkl", "builtins.list")


def test_a_fold_with_non_finite_weights_is_not_imported(tmp_path):
    folder = tmp_path / TRAINER.name
    shutil.copytree(TRAINER, folder)
    ckpt = folder / "fold_1" / "model_final_checkpoint.model"
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    saved["state_dict"]["stem.weight"][0] = float("nan")
    torch.save(saved, ckpt)
    with pytest.raises(PVSInputError, match=r"fold_1/model_final_checkpoint\.model: 1 weight"):
        import_nnunet(folder, tmp_path / "out")
