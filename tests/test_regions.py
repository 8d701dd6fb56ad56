"""Regions from whole-brain segmentations (napari_pvs.regions): FreeSurfer / SynthSeg /
fMRIPrep label volumes on any grid, MGZ and NIfTI, the default table and --lut files,
and the refusals (4D, not an aseg, no overlap)."""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from _helpers import assert_clean_failure, run_cli

from napari_pvs._errors import PVSInputError
from napari_pvs._volume import Volume
from napari_pvs.dataset import find_segmentation, read_cohort, write_phantom_cohort
from napari_pvs.io import load_volume
from napari_pvs.phantom import CONFORMED_AFFINE, conformed_aseg, make_phantom
from napari_pvs.pipeline import prediction_from_labels
from napari_pvs.regions import FREESURFER_REGIONS, from_segmentation, load_table

NIBABEL_MGZ = Path(__file__).parent / "data" / "nibabel" / "test.mgz"


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(3, size_mm=96, site=1)


@pytest.fixture(scope="module")
def aseg_mgz(phantom, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("fs") / "aseg.mgz"
    nib.save(conformed_aseg(phantom), path)
    return path


def _like(ph) -> Volume:
    return Volume(ph.image, ph.affine, ph.spacing)


def test_conformed_aseg_is_freesurfers_grid(aseg_mgz):
    img = nib.load(aseg_mgz)
    assert isinstance(img, nib.MGHImage)
    assert img.shape == (256, 256, 256)
    assert nib.aff2axcodes(img.affine) == ("L", "I", "A")
    assert np.allclose(img.header.get_zooms(), 1.0)
    assert img.get_data_dtype().kind == "i"


def test_same_grid_aseg_gives_the_phantoms_regions_exactly(phantom):
    seg = Volume(phantom.aseg, phantom.affine, phantom.spacing)
    out = from_segmentation(seg, _like(phantom))
    np.testing.assert_array_equal(out.regions, phantom.regions)
    assert out.meta["resampled"] is False
    assert out.brain.dtype == bool and out.brain[phantom.regions > 0].all()


def test_conformed_lia_aseg_maps_back_to_the_phantom_grid(phantom, aseg_mgz):
    """The aseg on FreeSurfer's 1 mm LIA grid comes back onto the 1.0 mm RAS phantom grid
    (site 1) through the two affines: only voxels at the tissue borders may differ."""
    out = from_segmentation(aseg_mgz, _like(phantom))
    assert out.regions.shape == phantom.regions.shape and out.regions.dtype == np.uint8
    for code in (1, 2):
        assert _dice(out.regions == code, phantom.regions == code) > 0.9, code
    # left stays left: a flipped axis would swap hemispheres, which Dice per class would miss
    x = (np.arange(phantom.regions.shape[0]) * phantom.spacing[0] + phantom.affine[0, 3])
    left = x < 0
    for hemi in (left, ~left):
        truth = (phantom.regions[hemi] == 2).sum()
        got = (out.regions[hemi] == 2).sum()
        assert abs(got - truth) < 0.15 * truth
    assert out.meta["resampled"] is True and out.meta["overlap"] == 1.0
    assert out.meta["table"]["name"] == "freesurfer"
    assert out.meta["segmentation_sha256"] == load_volume(aseg_mgz, as_labels=True).sha256


def test_default_table_is_the_documented_one():
    wm = {k for k, v in FREESURFER_REGIONS.items() if v == 1}
    bg = {k for k, v in FREESURFER_REGIONS.items() if v == 2}
    assert wm == {2, 41, 77, 78, 79}
    assert bg == {11, 50, 12, 51, 13, 52, 26, 58}


def _grid(labels: np.ndarray, spacing=1.0) -> Volume:
    return Volume(labels, np.diag([spacing, spacing, spacing, 1.0]), (spacing,) * 3)


def test_every_wm_and_bg_label_and_wmparc_maps():
    values = [2, 41, 77, 78, 79, 11, 50, 12, 51, 13, 52, 26, 58, 3, 42, 10, 4, 3012, 5001]
    labels = np.array(values, np.int32).reshape(len(values), 1, 1)
    out = from_segmentation(_grid(labels), _grid(np.zeros_like(labels, np.float32)))
    assert out.regions.ravel().tolist() == [1] * 5 + [2] * 8 + [0] * 4 + [1, 1]
    assert out.brain.all()


def test_mgz_round_trip_keeps_labels_and_affine(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.choice([0, 2, 41, 12, 51], size=(6, 7, 8)).astype(np.int32)
    affine = np.array([[0, 0, -1.2, 10], [0.9, 0, 0, -5], [0, 1.1, 0, 3], [0, 0, 0, 1]])
    nib.save(nib.MGHImage(data, affine), tmp_path / "seg.mgz")
    vol = load_volume(tmp_path / "seg.mgz", as_labels=True)
    np.testing.assert_array_equal(vol.data, data)
    np.testing.assert_allclose(vol.affine, affine, atol=1e-5)
    assert vol.spacing == pytest.approx((0.9, 1.1, 1.2), abs=1e-5)
    assert vol.sform_code == 1 and vol.qform_code == 1


def test_nibabel_mgz_header_is_read_with_its_geometry():
    """nibabel's own test.mgz: a real MGZ header, 4D, sheared affine."""
    ref = nib.load(NIBABEL_MGZ)
    vol = load_volume(NIBABEL_MGZ, volume=1)
    assert vol.shape == ref.shape[:3]
    np.testing.assert_allclose(vol.affine, ref.affine)
    np.testing.assert_allclose(vol.data, np.asarray(ref.dataobj)[..., 1])
    with pytest.raises(PVSInputError, match="4D with 2 volumes"):
        load_volume(NIBABEL_MGZ)


def test_4d_segmentation_is_refused(phantom):
    with pytest.raises(PVSInputError, match="4D"):
        from_segmentation(NIBABEL_MGZ, _like(phantom))


def test_region_map_passed_as_aseg_is_refused(phantom):
    """A 0/1/2 map holds label 1, which no aseg has: refused instead of 2 read as WM."""
    seg = Volume(phantom.regions, phantom.affine, phantom.spacing)
    with pytest.raises(PVSInputError, match=r"labels 1 that are not in the freesurfer table.*--roi"):
        from_segmentation(seg, _like(phantom))


def test_segmentation_elsewhere_in_world_is_refused(phantom):
    seg = Volume(phantom.aseg, phantom.affine + np.array([[0, 0, 0, 1000.0]] + [[0] * 4] * 3),
                 phantom.spacing)
    with pytest.raises(PVSInputError, match="does not overlap the image in world space"):
        from_segmentation(seg, _like(phantom))


def test_partial_overlap_warns_and_maps_what_overlaps(phantom):
    shift = np.eye(4)
    shift[0, 3] = 0.6 * phantom.regions.shape[0] * phantom.spacing[0]
    seg = Volume(phantom.aseg, shift @ phantom.affine, phantom.spacing)
    with pytest.warns(UserWarning, match="of the image's field of view lies inside"):
        out = from_segmentation(seg, _like(phantom))
    n = phantom.regions.shape[0]
    assert not out.brain[: int(0.55 * n)].any()


@pytest.mark.parametrize("values, match", [
    ([0, 3, 42], "no WM/BG voxel"),  # cortex only
    ([0, -2], "negative labels"),
])
def test_segmentation_without_scored_regions_is_refused(values, match):
    labels = np.array(values, np.int32).reshape(-1, 1, 1)
    with pytest.raises(PVSInputError, match=match):
        from_segmentation(_grid(labels), _grid(np.zeros(labels.shape, np.float32)))


def test_non_integer_segmentation_is_refused(tmp_path, phantom):
    img = nib.Nifti1Image(np.full((4, 4, 4), 2.5, np.float32), np.eye(4))
    nib.save(img, tmp_path / "prob.nii.gz")
    with pytest.raises(PVSInputError, match="prob.nii.gz"):
        from_segmentation(tmp_path / "prob.nii.gz", _like(phantom))


def _lut(path: Path, rows: list[tuple], header: bool = True) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh, delimiter="\t")
        if header:
            w.writerow(["label", "region"])
        w.writerows(rows)
    return path


def test_lut_file_replaces_the_table(tmp_path):
    labels = np.array([0, 5, 6, 7], np.int32).reshape(4, 1, 1)
    lut = _lut(tmp_path / "lut.tsv", [(5, "WM"), (6, "bg"), (7, "other"), ("# a comment", "")])
    out = from_segmentation(_grid(labels), _grid(np.zeros(labels.shape, np.float32)), lut=lut)
    assert out.regions.ravel().tolist() == [0, 1, 2, 0]
    assert out.meta["table"] == {"name": str(lut), "sha256": load_table(lut).sha256, "WM": [5],
                                 "BG": [6]}
    labels[3] = 9  # a label the file does not list
    with pytest.raises(PVSInputError, match="labels 9 that are not in"):
        from_segmentation(_grid(labels), _grid(np.zeros(labels.shape, np.float32)), lut=lut)


@pytest.mark.parametrize("rows, match", [
    ([(5, "grey")], "region 'grey' is not WM, BG or other"),
    ([("x", "WM")], "label 'x' is not a non-negative integer"),
    ([(5,)], "has no region column"),
    ([(5, "other")], "names no WM or BG label"),
])
def test_bad_lut_rows_are_refused(tmp_path, rows, match):
    with pytest.raises(PVSInputError, match=match):
        load_table(_lut(tmp_path / "lut.tsv", rows, header=False))


def test_missing_lut_file_is_refused(tmp_path):
    with pytest.raises(PVSInputError, match="does not exist"):
        load_table(tmp_path / "nope.tsv")


# ---------------------------------------------------------------------- cohorts and CLI


@pytest.fixture(scope="module")
def aseg_cohort(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cohort")
    write_phantom_cohort(root, n_sites=1, per_site=1, size_mm=64, aseg=True)
    return root


def test_phantom_cli_writes_a_conformed_aseg(tmp_path):
    rc, out, err = run_cli("phantom", "-o", tmp_path / "c", "--sites", "1", "--per-site", "1",
                           "--size-mm", "48", "--aseg")
    assert rc == 0, err
    seg = tmp_path / "c/derivatives/freesurfer/sub-siteA01/mri/aseg.mgz"
    assert nib.load(seg).shape == (256, 256, 256)
    np.testing.assert_allclose(nib.load(seg).affine, CONFORMED_AFFINE)


def test_find_segmentation_prefers_fmriprep_t1w_space(tmp_path):
    anat = tmp_path / "derivatives/fmriprep/sub-01/anat"
    anat.mkdir(parents=True)
    for name in ("sub-01_space-MNI152NLin2009cAsym_desc-aseg_dseg.nii.gz",
                 "sub-01_desc-aseg_dseg.nii.gz"):
        (anat / name).write_bytes(b"")
    fs = tmp_path / "derivatives/freesurfer/sub-01/mri"
    fs.mkdir(parents=True)
    (fs / "aseg.mgz").write_bytes(b"")
    assert find_segmentation(tmp_path, "01") == anat / "sub-01_desc-aseg_dseg.nii.gz"
    (anat / "sub-01_desc-aseg_dseg.nii.gz").unlink()
    assert find_segmentation(tmp_path, "01") == fs / "aseg.mgz"
    assert find_segmentation(tmp_path, "02") is None


def test_regions_cli_writes_map_sidecar_and_brain(aseg_cohort, tmp_path):
    image = aseg_cohort / "sub-siteA01/anat/sub-siteA01_T2w.nii.gz"
    seg = aseg_cohort / "derivatives/freesurfer/sub-siteA01/mri/aseg.mgz"
    truth = load_volume(read_cohort(aseg_cohort)[0].regions, as_labels=True)
    rc, out, err = run_cli("regions", seg, "--like", image, "-o", tmp_path / "r.nii.gz",
                           "--brain", tmp_path / "brain.nii.gz")
    assert rc == 0 and "Traceback" not in err, err
    got = load_volume(tmp_path / "r.nii.gz", as_labels=True)
    np.testing.assert_allclose(got.affine, truth.affine)
    for code in (1, 2):
        assert _dice(got.data == code, truth.data == code) > 0.85
    side = json.loads((tmp_path / "r.json").read_text())
    assert side["table"]["WM"][:2] == [2, 41] and side["segmentation"] == str(seg)
    assert load_volume(tmp_path / "brain.nii.gz", as_labels=True).data[truth.data > 0].all()


@pytest.mark.parametrize("args, needle", [
    (("--roi", "ROI", "--seg", "SEG"), "not both"),
    (("--lut", "LUT"), "--lut maps the labels of --seg"),
])
def test_predict_refuses_roi_with_seg_and_lut_alone(aseg_cohort, tmp_path, args, needle):
    image = aseg_cohort / "sub-siteA01/anat/sub-siteA01_T2w.nii.gz"
    rc, out, err = run_cli("predict", image, "-o", tmp_path, *args)
    assert_clean_failure(rc, out, err, needle)


def test_regions_cli_refuses_region_map_as_segmentation(aseg_cohort, tmp_path):
    files = read_cohort(aseg_cohort)[0]
    rc, out, err = run_cli("regions", files.regions, "--like", files.image, "-o",
                           tmp_path / "r.nii.gz")
    assert_clean_failure(rc, out, err, "not in the freesurfer table")
    assert not (tmp_path / "r.nii.gz").exists()


def test_predict_with_seg_names_wm_and_bg_clusters(aseg_cohort, tmp_path):
    """`predict IMAGE --seg aseg.mgz`: the aseg on the conformed LIA grid names each cluster's
    region as the phantom's own region map does."""
    files = read_cohort(aseg_cohort)[0]
    seg = aseg_cohort / "derivatives/freesurfer/sub-siteA01/mri/aseg.mgz"
    rc, out, err = run_cli("predict", files.image, "--seg", seg, "-o", tmp_path)
    assert rc == 0 and "Traceback" not in err, err
    stem = "sub-siteA01_T2w"
    truth = load_volume(files.regions, as_labels=True).data
    labels = load_volume(tmp_path / f"{stem}_pvs.nii.gz", as_labels=True).data
    regions = load_volume(tmp_path / f"{stem}_regions.nii.gz", as_labels=True).data
    assert labels.any() and not labels[regions == 0].any()
    with open(tmp_path / f"{stem}_clusters.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert rows and {r["region"] for r in rows} <= {"WM", "BG"}
    # the clusters that hit a real PVS are named as the phantom's true region map names them
    # (false positives hugging a tissue border may fall on either side of it: the 1 mm
    # conformed grid moves borders by up to a voxel)
    ours = prediction_from_labels(labels, regions=regions)
    named_true = np.asarray(prediction_from_labels(labels, regions=truth).table.columns["region"])
    named = np.asarray(ours.table.columns["region"])
    assert named.tolist() == [r["region"] for r in rows]
    gt = load_volume(files.labels, as_labels=True).data
    hits = np.array([gt[ours.clusters == i].any() for i in ours.table.columns["id"]])
    assert hits.sum() >= 5
    assert np.mean(named[hits] == named_true[hits]) >= 0.95
    assert json.loads((tmp_path / f"{stem}_regions.json").read_text())["resampled"] is True


def test_store_import_maps_the_aseg_when_no_region_map(aseg_cohort, tmp_path):
    import shutil

    from napari_pvs.store import CorrectionsStore

    root = tmp_path / "cohort"
    shutil.copytree(aseg_cohort, root)
    files = read_cohort(root)[0]
    truth = load_volume(files.regions, as_labels=True).data
    for p in files.regions.parent.glob("*regions_dseg*"):
        p.unlink()
    store = tmp_path / "s.pvs.zarr"
    assert run_cli("store", "init", store)[0] == 0
    rc, out, err = run_cli("store", "import", store, root)
    assert rc == 0 and "regions from aseg.mgz" in out, out + err
    with CorrectionsStore.open(store) as s:
        regions = s.read_regions("siteA01")
        provenance = dict(s.regions("siteA01").attrs)["provenance"]
    for code in (1, 2):
        assert _dice(regions == code, truth == code) > 0.85
    assert provenance["table"]["name"] == "freesurfer"
    assert provenance["segmentation"].endswith("aseg.mgz")


def test_reader_opens_mgz_as_labels_with_geometry(aseg_mgz):
    from napari_pvs._reader import get_reader

    reader = get_reader(str(aseg_mgz))
    assert reader is not None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ((data, kwargs, kind),) = reader(str(aseg_mgz))
    assert kind == "labels" and data.shape == (256, 256, 256)
    np.testing.assert_allclose(kwargs["metadata"]["nifti_affine"], CONFORMED_AFFINE)


def test_brain_mask_is_the_nonzero_mask_of_imported_models(imported_release):
    """MedNet-PVS was trained on skull-stripped images: with a segmentation's brain mask, an
    imported nnU-Net model sees the image zeroed outside the brain, so its "nonzero"
    normalisation runs inside the brain, exactly as on a skull-stripped input."""
    from napari_pvs.inference import run
    from napari_pvs.pipeline import predict_array

    ph = make_phantom(5, size_mm=40, site=0, spacing=0.8)  # the model grid: no resampling
    brain = ph.aseg > 0
    fold = str(imported_release / "fold_0.safetensors")

    def predict(image, **kw):
        return run(predict_array(image, ph.spacing, fold, roi=ph.regions, tta=1, backend="torch",
                                 **kw))

    masked = predict(ph.image, brain=brain)
    stripped = predict(np.where(brain, ph.image, 0).astype(np.float32))
    whole = predict(ph.image)
    np.testing.assert_allclose(masked.probability, stripped.probability, atol=1e-6)
    assert np.abs(masked.probability - whole.probability).max() > 1e-3


# ------------------------------------------------- prediction without a segmentation


def test_predict_without_regions_stays_inside_estimated_wm_bg_and_says_so_once(
        aseg_cohort, tmp_path):
    """No --seg and no --roi: the prediction keeps to the WM and BG estimated from the image,
    writes that region map with its method, and says once (for two images) that the
    results are not those of a real segmentation, and how to give one."""
    import shutil

    files = read_cohort(aseg_cohort)[0]
    second = tmp_path / "copy_T2w.nii.gz"
    shutil.copy(files.image, second)
    rc, out, err = run_cli("predict", files.image, second, "-o", tmp_path / "auto")
    assert rc == 0 and "Traceback" not in err, err
    notes = [line for line in err.splitlines() if line.startswith("napari-pvs: warning:")]
    assert len(notes) == 1 and "not comparable with MedNet-PVS" in notes[0] and "--seg" in notes[0]
    stem = "sub-siteA01_T2w"
    regions = load_volume(tmp_path / "auto" / f"{stem}_regions.nii.gz", as_labels=True).data
    labels = load_volume(tmp_path / "auto" / f"{stem}_pvs.nii.gz", as_labels=True).data
    assert labels.any() and not labels[regions == 0].any()
    side = json.loads((tmp_path / "auto" / f"{stem}_regions.json").read_text())
    assert side["source"] == "automatic" and side["method"]

    rc, out, err = run_cli("predict", second, "-o", tmp_path / "whole", "--whole-image")
    assert rc == 0 and "warning" not in err, err
    whole = load_volume(tmp_path / "whole" / "copy_T2w_pvs.nii.gz", as_labels=True).data
    assert not (tmp_path / "whole" / "copy_T2w_regions.nii.gz").exists()
    assert np.count_nonzero(whole) > 2 * np.count_nonzero(labels)


def test_whole_image_with_seg_is_refused(aseg_cohort, tmp_path):
    files = read_cohort(aseg_cohort)[0]
    rc, out, err = run_cli("predict", files.image, "--seg", files.image, "--whole-image", "-o",
                           tmp_path)
    assert_clean_failure(rc, out, err, "--whole-image")


def test_an_image_without_contrast_is_predicted_whole_with_a_warning():
    from napari_pvs.inference import run
    from napari_pvs.pipeline import AutoRegionsWarning, predict_array

    image = np.full((24, 24, 24), 7.0, np.float32)
    with pytest.warns(AutoRegionsWarning, match="could not estimate the brain's regions"):
        pred = run(predict_array(image, (1.0, 1.0, 1.0), "baseline"))
    assert pred.regions is None and pred.regions_meta["source"] == "whole image"
