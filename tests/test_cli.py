"""The napari-pvs command: phantom layout, predict, errors, and the demo."""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from _helpers import run_cli

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
    """Each subject is segmented by the shipped MedNeXt model and by Frangi: a row each,
    printed and in scores.json, and a mean +/- sd line per method."""
    assert shutil.which("napari-pvs"), "the console script must be installed"
    r = subprocess.run(["napari-pvs", "demo", "--out", str(tmp_path), "--sites", "2",
                        "--per-site", "1", "--size-mm", "64", "--tta", "1", "--no-viewer"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    scores = json.loads((tmp_path / "scores.json").read_text())
    methods = ["MedNeXt(starter)", "Frangi"]
    assert [(s["site"], s["method"]) for s in scores] == [
        (site, m) for site in ("siteA", "siteB") for m in methods]
    for s in scores:
        assert 0 <= s["voxel_dice"] <= 1 and 0 <= s["cluster_dice"] <= 1 and s["seconds"] > 0
        assert s["n_ref"] > 0 and s["n_pred"] > 0
        if s["method"] == "Frangi":
            assert 0.2 < s["voxel_dice"] < 0.95 and 0.2 < s["cluster_dice"] <= 1.0
    rows = [line.split() for line in r.stdout.splitlines() if line.startswith("site")]
    assert [(row[0], row[3]) for row in rows] == [("siteA01", m) for m in methods] + [
        ("siteB01", m) for m in methods]
    assert [float(row[4]) for row in rows] == [round(s["voxel_dice"], 3) for s in scores]
    means = [line.split()[3] for line in r.stdout.splitlines() if line.startswith("mean +/- sd")]
    assert means == methods
    stem = "sub-siteA01_T2w"
    for kind in ("pvs", "prob", "uncertainty"):
        assert (tmp_path / "predictions" / "starter" / f"{stem}_{kind}.nii.gz").is_file()
    assert (tmp_path / "predictions" / "frangi" / f"{stem}_pvs.nii.gz").is_file()
    assert not (tmp_path / "predictions" / "frangi" / f"{stem}_prob.nii.gz").exists()


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


# ----------------------------------------------------------------------------- terminals, pipes


class _Terminal(io.StringIO):
    """A text stream that says it is a terminal, as stderr is for a person at one."""

    def isatty(self) -> bool:
        return True


def test_progress_bar_draws_inference_and_training_events():
    from napari_pvs._cli_common import ProgressReport
    from napari_pvs.inference import Progress
    from napari_pvs.training.finetune import FinetuneEvent

    term = _Terminal()
    bar = ProgressReport("job", stream=term)
    bar(Progress(1, 4, "windows"))
    bar(FinetuneEvent(kind="iteration", iteration=2, total=4, loss=0.5))
    bar(FinetuneEvent(kind="iteration", iteration=4, total=4, loss=0.4))
    frames = term.getvalue().split("\r")[1:]
    assert [f.split("] ")[1].split()[0] for f in frames] == ["1/4", "2/4", "4/4"]
    assert frames[1].startswith("job [" + "#" * 15 + " " * 15 + "]")
    assert frames[2].endswith("s\n")  # the finished bar ends its line
    for total in (0, None, float("nan")):  # no total: the count alone, never a crash
        term = _Terminal()
        ProgressReport("job", stream=term)(Progress(3, total))
        assert term.getvalue().startswith("\rjob 3 ")
    term = _Terminal()
    ProgressReport("job", stream=term)(Progress(9, 4))  # over the total: a full bar
    assert "[" + "#" * 30 + "] 9/4" in term.getvalue()
    log = io.StringIO()  # not a terminal: log lines, never a bar drawn in place
    ProgressReport("job", stream=log)(Progress(1, 4))
    assert log.getvalue().startswith("job:  25% (1/4), ") and "\r" not in log.getvalue()
    log = io.StringIO()  # ... and without a total, nothing
    ProgressReport("job", stream=log)(Progress(1, 0))
    assert log.getvalue() == ""


@pytest.fixture(scope="module")
def small_store(tmp_path_factory):
    """A 2-site phantom cohort (48 mm) imported into a store, and a tiny MedNeXt checkpoint."""
    root = tmp_path_factory.mktemp("tty")
    assert main(["phantom", str(root / "cohort"), "--sites", "2", "--per-site", "1",
                 "--size-mm", "48"]) == 0
    assert main(["store", "init", str(root / "s.pvs.zarr")]) == 0
    assert main(["store", "import", str(root / "s.pvs.zarr"), str(root / "cohort")]) == 0
    assert main(["model", "create", str(root / "tiny.safetensors"), "--variant", "XS",
                 "--kernel", "3", "--patch", "32", "--spacing", "1.0"]) == 0
    return root


def _image(root):
    return root / "cohort" / "sub-siteA01" / "anat" / "sub-siteA01_T2w.nii.gz"


_LONG_COMMANDS = {
    "predict-baseline": (lambda r, t: ("predict", _image(r), "-o", t / "out"), "_pvs.nii.gz"),
    "predict-mednext": (lambda r, t: ("predict", _image(r), "-o", t / "out", "--model",
                                      r / "tiny.safetensors", "--backend", "torch"), "] 8/8"),
    "store-import": (lambda r, t: ("store", "import", _fresh_store(t), r / "cohort"),
                     "imported siteB01"),
    "train": (lambda r, t: ("train", "--store", r / "s.pvs.zarr", "--patch", "32",
                            "--iterations", "3", "--epoch", "3"), "] 3/3"),
    "evaluate": (lambda r, t: ("evaluate", "--store", r / "s.pvs.zarr", "--scheme", "kfold:2",
                               "--iterations", "1", "--patch", "32", "--out", t / "ev"),
                 "results:"),
}


def _fresh_store(tmp_path):
    assert main(["store", "init", str(tmp_path / "new.pvs.zarr")]) == 0
    return tmp_path / "new.pvs.zarr"


@pytest.mark.slow
@pytest.mark.parametrize("name", list(_LONG_COMMANDS))
def test_long_commands_run_on_a_terminal(small_store, tmp_path, name):
    """Progress bars draw only on a terminal, so run each long command under a pty."""
    make_args, expected = _LONG_COMMANDS[name]
    rc, out, _ = run_cli(*make_args(small_store, tmp_path), tty=True, timeout=300)
    assert rc == 0 and "Traceback" not in out, out
    assert expected in out, out


def _tiny_store(path):
    from napari_pvs.io import geometry_from_affine
    from napari_pvs.store import CorrectionsStore

    like = geometry_from_affine(np.eye(4), (4, 4, 4))
    vol = type(like)(data=np.ones((4, 4, 4), np.float32), affine=like.affine,
                     spacing=like.spacing, header=like.header)
    store = CorrectionsStore.create(path)
    store.add_subject("sub01", vol, site="siteA")
    store.close()
    return path


def test_closed_stdout_pipe_ends_quietly(tmp_path):
    """`napari-pvs store ls S | head -1`: the reader goes away before the listing is written."""
    store = _tiny_store(tmp_path / "s.pvs.zarr")
    proc = subprocess.Popen([sys.executable, "-m", "napari_pvs.cli", "store", "ls", str(store)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # the read end is gone before the child prints
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 141, err
    assert err == "", err  # no traceback, no "Exception ignored ... BrokenPipeError"
    r = subprocess.run(["bash", "-c", f"set -o pipefail; {sys.executable} -m napari_pvs.cli "
                        f"store ls {store} | head -1"], capture_output=True, text=True, timeout=120)
    assert r.stdout.startswith("subject") and "Error" not in r.stderr, r.stderr


def test_full_disk_on_stdout_is_one_line(tmp_path):
    store = _tiny_store(tmp_path / "s.pvs.zarr")
    with open("/dev/full", "w") as full:
        r = subprocess.run([sys.executable, "-m", "napari_pvs.cli", "store", "ls", str(store)],
                           stdout=full, stderr=subprocess.PIPE, text=True, timeout=120)
    assert r.returncode == 1
    assert r.stderr.strip() == ("napari-pvs: error: No space left on device; free some disk "
                                "space and run it again")


def test_os_error_names_the_file(tmp_path):
    """mkdir under /proc fails in the OS, not in our checks: one line with the path."""
    r = _run(["phantom", "/proc/napari-pvs-test/cohort", "--sites", "1", "--per-site", "1",
              "--size-mm", "32"])
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("napari-pvs: error: /proc/napari-pvs-test"), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_ctrl_c_prints_interrupted(tmp_path):
    import signal

    # pytest-xdist's workers ignore SIGINT, and children inherit that: restore Ctrl-C
    proc = subprocess.Popen([sys.executable, "-m", "napari_pvs.cli", "phantom", str(tmp_path),
                             "--sites", "3", "--per-site", "2", "--size-mm", "96"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert proc.stdout.readline().startswith("[1/6]")  # at work
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (out, err)
    assert err.strip() == "napari-pvs: interrupted"


def test_predict_refuses_two_inputs_with_one_name(cohort, tmp_path):
    s = read_cohort(cohort)[0]
    other = tmp_path / "b" / s.image.name
    other.parent.mkdir()
    shutil.copy(s.image, other)
    r = _run(["predict", str(s.image), str(other), "-o", str(tmp_path / "out")])
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert str(s.image) in r.stderr and str(other) in r.stderr and "-o folders" in r.stderr
    assert not (tmp_path / "out").exists()  # refused before any work


@pytest.mark.parametrize("command", ["predict", "phantom", "demo"])
def test_output_folder_that_is_a_file_is_refused(cohort, tmp_path, command):
    taken = tmp_path / "taken"
    taken.write_text("keep me")
    argv = {"predict": ["predict", str(read_cohort(cohort)[0].image), "-o", str(taken)],
            "phantom": ["phantom", str(taken)],
            "demo": ["demo", "--out", str(taken), "--no-viewer"]}[command]
    r = _run(argv)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert f"{taken} is an existing file, not a folder" in r.stderr
    assert taken.read_text() == "keep me"
