"""The starter models shipped in the package: finding them, ``--model starter``, ``model ls``."""

from __future__ import annotations

import shutil
import warnings

import nibabel as nib
import numpy as np
import pytest
from _helpers import assert_clean_failure, assert_same_geometry, run_cli

import napari_pvs
from napari_pvs import model as M
from napari_pvs._cli_predict import resolve_model
from napari_pvs._errors import PVSInputError


def test_every_shipped_model_is_a_readable_checkpoint_in_the_package():
    assert "starter" in M.STARTER_MODELS
    folder = M.Path(napari_pvs.__file__).resolve().parent / "models"
    for name, file in M.STARTER_MODELS.items():
        path = M.starter_path(name)
        assert path == folder / file and path.is_file()
        meta = M.read_meta(path)
        assert meta["preprocessing"]["modality"] in ("T2w", "T1w")
    assert M.read_meta(M.starter_path())["preprocessing"]["modality"] == "T2w"  # the default
    listed = M.starter_models()
    assert [m["name"] for m in listed] == list(M.STARTER_MODELS)
    assert all("error" not in m and m["path"].endswith(".safetensors") for m in listed)


def test_an_unknown_or_missing_starter_is_one_clear_error(tmp_path, monkeypatch):
    with pytest.raises(PVSInputError, match=r"no shipped model 'startr'.*: starter"):
        M.starter_path("startr")
    monkeypatch.setattr(M, "_STARTER_FOLDER", tmp_path)  # an installation without the file
    with pytest.raises(PVSInputError, match=r"shipped model 'starter' is missing.*reinstall"):
        M.starter_path()
    entries = M.starter_models()
    assert [e["name"] for e in entries] == list(M.STARTER_MODELS)
    assert all("is missing" in e["error"] for e in entries)


def test_adding_an_entry_is_all_a_new_starter_model_takes(tmp_path, monkeypatch, capsys):
    """A T1w model beside the T2w one: named by --model, listed by model ls, warned about."""
    from napari_pvs.cli import main

    shutil.copy(M.starter_path(), tmp_path / "starter_t2w.safetensors")
    arch = M.arch_config("XS", 3)
    meta = M.default_meta(arch, target_spacing=[1.0] * 3, modality="T1w", patch_size=[32] * 3)
    meta["card"] = {"name": "starter-t1w", "modality": "T1w", "iterations": 7,
                    "held_out": {"site D": {"cluster_dice": 0.12345}}}
    M.save_checkpoint(tmp_path / "starter_t1w.safetensors", M.build_network(arch), meta)
    monkeypatch.setattr(M, "_STARTER_FOLDER", tmp_path)
    monkeypatch.setitem(M.STARTER_MODELS, "starter-t1w", "starter_t1w.safetensors")

    assert resolve_model("starter-t1w", None) == str(tmp_path / "starter_t1w.safetensors")
    assert main(["model", "ls"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    t1 = next(i for i, line in enumerate(lines) if line.startswith("starter-t1w "))
    assert "MedNeXt-XS k3, T1w, 1 mm" in lines[t1]
    assert lines[t1 + 1:t1 + 4] == ["    iterations: 7", "    held_out:",
                                    "      site D: cluster_dice 0.123"]
    starter = next(i for i, line in enumerate(lines) if line.startswith("starter "))
    assert starter < t1 and ", T2w, " in lines[starter]  # in STARTER_MODELS order


def test_model_ls_lists_the_shipped_models_before_a_store(tmp_path, capsys):
    from napari_pvs.cli import main

    assert main(["model", "ls"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("shipped with napari-pvs") and "\nstarter " in out
    reg = tmp_path / "reg"
    reg.mkdir()
    assert main(["model", "ls", str(reg)]) == 0
    out2 = capsys.readouterr().out
    assert out2.startswith(out) and out2.endswith(f"no models in {reg}\n"), out2
    assert main(["model", "ls", str(tmp_path / "nothing")]) == 2
    failed = capsys.readouterr()
    assert_clean_failure(2, failed.out, failed.err, "is not a folder")
    assert failed.out == ""  # the error comes alone, before any listing


@pytest.fixture(scope="module")
def subject(tmp_path_factory):
    from napari_pvs.dataset import write_phantom_cohort

    (s,) = write_phantom_cohort(tmp_path_factory.mktemp("cohort"), n_sites=1, per_site=1,
                                size_mm=48, seed=5)
    return s


@pytest.mark.slow
def test_predict_model_starter_writes_the_three_maps_in_the_source_geometry(subject, tmp_path):
    rc, out, err = run_cli("predict", subject.image, "-o", tmp_path, "--model", "starter",
                           "--roi", subject.regions, "--tta", "1")
    assert rc == 0, err
    assert "warning" not in err  # a T2w image for the T2w model
    stem = "sub-siteA01_T2w"
    src = nib.load(subject.image)
    regions = np.asarray(nib.load(subject.regions).dataobj)
    maps = {}
    for kind in ("pvs", "prob", "uncertainty"):
        path = tmp_path / f"{stem}_{kind}.nii.gz"
        assert_same_geometry(path, subject.image)
        maps[kind] = np.asarray(nib.load(path).dataobj)
        assert maps[kind].shape == src.shape
    assert maps["pvs"].dtype == np.uint8 and maps["prob"].dtype == np.float32
    assert not maps["pvs"][regions == 0].any()
    assert not maps["uncertainty"][regions == 0].any() and maps["uncertainty"].max() > 0
    np.testing.assert_array_equal(maps["pvs"] > 0, maps["prob"] >= 0.5)
    # the starter's triage classifier: every cluster has P(false positive), the priority
    import csv

    with open(tmp_path / f"{stem}_clusters.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows and all(0 <= float(r["p_false_positive"]) <= 1 for r in rows)
    assert all(r["priority"] == r["p_false_positive"] for r in rows)


def test_the_starter_carries_its_fitted_triage_and_temperature():
    from napari_pvs.triage import check_triage, temperature_of

    meta = M.read_meta(M.starter_path())
    t = check_triage(meta["triage"])
    assert t["clusters"] > 1000 and 0 < t["false_positives"] < t["clusters"]
    assert not set(t["subjects"]) & {"siteD-901", "siteD-902"}  # fitted away from site D
    assert 0.2 < temperature_of(meta) < 5 and meta["calibration"]["subjects"] == t["subjects"]
    assert meta["card"]["recipe"]["polish_iterations"] == meta["provenance"]["iterations"] - (
        meta["card"]["recipe"]["iterations"] + meta["card"]["recipe"]["refine_iterations"])


def test_the_starter_keeps_finer_images_on_their_own_grid_and_drops_specks(capsys):
    from napari_pvs.cli import main
    from napari_pvs.clusters import label_clusters
    from napari_pvs.inference import predict_volume, run
    from napari_pvs.pipeline import load_model

    net, meta, key = load_model("starter")
    assert meta["preprocessing"]["target_spacing"] == [0.8] * 3
    assert meta["preprocessing"]["min_spacing"] == [0.7] * 3
    assert meta["postprocessing"] == {"min_cluster_mm3": 1.0}
    assert meta["card"]["recipe"]["min_spacing"] == 0.7
    image = np.random.default_rng(0).normal(100, 10, (40, 40, 40)).astype(np.float32)
    roi = np.zeros(image.shape, bool)
    roi[8:32, 8:32, 8:32] = True
    work = {}
    for sp in (0.7, 0.6, 1.0):
        pred = run(predict_volume(image, (sp,) * 3, net, meta, roi=roi, overlap=0.25,
                                  cache_key=key))
        work[sp] = pred.info["work_shape"]
        # no label cluster under 1 mm³ (3 voxels at 0.7 mm)
        lab, n = label_clusters(pred.labels)
        assert n == 0 or np.bincount(lab.ravel())[1:].min() * sp**3 >= 1.0
    assert work == {0.7: [40, 40, 40], 0.6: [34, 34, 34], 1.0: [50, 50, 50]}
    assert main(["model", "ls"]) == 0
    out = capsys.readouterr().out
    assert "down to 0.7 mm" in out and "clusters of 1 mm³ or more" in out


def test_predict_unknown_model_name_is_one_line_naming_the_shipped_ones(subject, tmp_path):
    rc, out, err = run_cli("predict", subject.image, "-o", tmp_path, "--model", "startr")
    assert_clean_failure(rc, out, err, "'startr'", "shipped model (starter, starter-fast)",
                         "--store STORE")
    assert len(err.strip().splitlines()) == 1 and not list(tmp_path.iterdir())


def test_a_t1w_image_given_to_the_t2w_starter_warns_once(subject, tmp_path, capsys):
    from napari_pvs.cli import main

    t1w = tmp_path / "sub-x_T1w.nii.gz"  # a 32-voxel cube of it: one window to predict
    nib.save(nib.load(subject.image).slicer[14:46, 14:46, 14:46], t1w)
    assert main(["predict", str(t1w), "-o", str(tmp_path / "a"), "--model", "starter",
                 "--whole-image"]) == 0
    err = capsys.readouterr().err
    warned = [line for line in err.splitlines() if "trained on T2w" in line]
    assert len(warned) == 1 and warned[0].startswith("napari-pvs: warning: sub-x_T1w.nii.gz "
                                                     "(by its file name) is T1w"), err
    from napari_pvs._cli_predict import _warn_modality

    starter = str(M.starter_path())
    with pytest.warns(UserWarning, match=r"T2w.nii.gz \(--modality\) is T1w but the model "
                                         r"'starter' was trained on T2w"):
        _warn_modality("starter", starter, [str(subject.image)], "T1w")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _warn_modality("starter", starter, [str(subject.image)], None)  # T2w: no warning
        _warn_modality("baseline", "baseline", [str(t1w)], None)  # Frangi takes both


def test_only_a_known_contrast_that_differs_warns():
    meta = M.read_meta(M.starter_path())
    assert M.modality_mismatch(meta, "T2w", "x") is None
    assert "x is T1w but the model" in M.modality_mismatch(meta, "T1w", "x")
    nnunet = {**meta, "preprocessing": {**meta["preprocessing"], "modality": "MRI"}}
    assert M.modality_mismatch(nnunet, "T1w", "x") is None  # imported releases record no BIDS
