"""The napari-pvs command: phantom layout, predict, errors, and the demo."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from napari_pvs.cli import main
from napari_pvs.dataset import read_cohort, write_phantom_cohort


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("cohort")
    assert main(["phantom", str(root), "--sites", "2", "--per-site", "1", "--size-mm", "64",
                 "--seed", "3"]) == 0
    return root


def test_phantom_writes_the_documented_layout(cohort):
    with open(cohort / "participants.tsv") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    assert [(r["participant_id"], r["site"]) for r in rows] == [("sub-siteA01", "siteA"),
                                                                ("sub-siteB01", "siteB")]
    assert (cohort / "dataset_description.json").is_file()
    subjects = read_cohort(cohort)
    assert [(s.subject, s.site, s.modality) for s in subjects] == [
        ("siteA01", "siteA", "T2w"), ("siteB01", "siteB", "T2w")]
    for s in subjects:
        img = nib.load(s.image)
        lab = nib.load(s.labels)
        assert img.shape == lab.shape == nib.load(s.regions).shape
        np.testing.assert_allclose(img.affine, lab.affine)
        assert lab.get_data_dtype() == np.uint8
        assert float(rows[0]["voxel_size_mm"]) in (1.0, 0.8)
    # spacing differs between the sites
    assert nib.load(subjects[0].image).header.get_zooms() != nib.load(subjects[1].image).header.get_zooms()


def test_phantom_written_twice_is_identical(cohort, tmp_path):
    write_phantom_cohort(tmp_path, n_sites=2, per_site=1, size_mm=64, seed=3)
    a = nib.load(cohort / "sub-siteB01/anat/sub-siteB01_T2w.nii.gz").get_fdata()
    b = nib.load(tmp_path / "sub-siteB01/anat/sub-siteB01_T2w.nii.gz").get_fdata()
    np.testing.assert_array_equal(a, b)


def test_predict_writes_uint8_labels_with_source_geometry(cohort, tmp_path):
    s = read_cohort(cohort)[0]
    assert main(["predict", str(s.image), "-o", str(tmp_path), "--roi", str(s.regions)]) == 0
    out = tmp_path / "sub-siteA01_T2w_pvs.nii.gz"
    pred, src = nib.load(out), nib.load(s.image)
    assert pred.get_data_dtype() == np.uint8
    np.testing.assert_allclose(pred.affine, src.affine)
    assert pred.header["sform_code"] == src.header["sform_code"]
    data = np.asarray(pred.dataobj)
    regions = np.asarray(nib.load(s.regions).dataobj)
    assert data.any() and not data[regions == 0].any()
    truth = np.asarray(nib.load(s.labels).dataobj) > 0
    assert (data > 0)[truth].mean() > 0.2  # finds a good part of the PVS


def _run(args):
    return subprocess.run([sys.executable, "-m", "napari_pvs.cli", *args],
                          capture_output=True, text=True, timeout=300)


def test_bad_inputs_exit_nonzero_with_one_line(cohort, tmp_path, nibabel_data):
    s = read_cohort(cohort)[0]
    other = read_cohort(cohort)[1]
    cases = {
        "missing": ([str(tmp_path / "nope.nii.gz")], "does not exist"),
        "4d": ([str(nibabel_data / "example4d.nii.gz")], "--volume"),
        "roi grid": ([str(s.image), "--roi", str(other.regions)], "ROI shape"),
        "model": ([str(s.image), "--model", "mednext"], "neither 'baseline' nor an existing checkpoint"),
    }
    text = tmp_path / "notes.nii.gz"
    text.write_text("not an image")
    cases["text"] = ([str(text)], "not a NIfTI")
    for name, (args, expected) in cases.items():
        r = _run(["predict", *args, "-o", str(tmp_path / "out")])
        assert r.returncode == 2, name
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("napari-pvs: error:"), (name, r.stderr)
        assert expected in lines[0], (name, lines[0])


def test_predict_picks_a_volume_of_a_4d_file(tmp_path, nibabel_data):
    r = _run(["predict", str(nibabel_data / "example4d.nii.gz"), "--volume", "1",
              "-o", str(tmp_path)])
    assert r.returncode == 0, r.stderr
    out = nib.load(tmp_path / "example4d_pvs.nii.gz")
    assert out.shape == nib.load(nibabel_data / "example4d.nii.gz").shape[:3]


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path):
    assert shutil.which("napari-pvs"), "the console script must be installed"
    r = subprocess.run(["napari-pvs", "demo", "--out", str(tmp_path), "--sites", "2",
                        "--per-site", "1", "--size-mm", "80", "--no-viewer"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert [s["site"] for s in scores] == ["siteA", "siteB"]
    for s in scores:
        assert 0.2 < s["voxel_dice"] < 0.95 and 0.2 < s["cluster_dice"] <= 1.0
    assert "mean +/- sd" in r.stdout


@pytest.mark.gui
@pytest.mark.slow
def test_demo_opens_napari_with_the_prediction_under_review(tmp_path):
    shot = tmp_path / "demo.png"
    env = {k: v for k, v in __import__("os").environ.items() if k != "QT_QPA_PLATFORM"}
    r = subprocess.run(["napari-pvs", "demo", "--out", str(tmp_path), "--sites", "1",
                        "--per-site", "1", "--size-mm", "64", "--screenshot", str(shot)],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr
    from PIL import Image

    from napari_pvs.store import CorrectionsStore

    img = np.asarray(Image.open(shot))
    assert img.shape[0] >= 900 and img.shape[1] >= 1400  # the window with its docked widgets
    rgb = img[..., :3].astype(int)
    # the current cluster is ringed in yellow on the canvas
    assert np.any((rgb[..., 0] > 220) & (rgb[..., 1] > 220) & (rgb[..., 2] < 60))
    # the review widget's table is on the right: many rows of text
    right = rgb[:, int(img.shape[1] * 0.72):].mean(axis=2)
    assert right.std() > 15
    with CorrectionsStore.open(tmp_path / "demo.pvs.zarr") as store:  # Save goes here
        assert store.subjects() == ["siteA01"] and store.regions("siteA01") is not None


def test_site_from_the_bids_acq_entity_when_participants_tsv_lacks_it(tmp_path):
    anat = tmp_path / "sub-07" / "anat"
    anat.mkdir(parents=True)
    nib.save(nib.Nifti1Image(np.ones((8, 8, 8), np.float32), np.eye(4)),
             anat / "sub-07_acq-prisma_T2w.nii.gz")
    (s,) = read_cohort(tmp_path)
    assert (s.subject, s.site, s.modality, s.labels) == ("07", "prisma", "T2w", None)
