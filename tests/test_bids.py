"""``napari-pvs bids``: the BIDS App on Dask, on a phantom BIDS dataset.

Six images (two sessions of sub-01, two runs with an acquisition of sub-02, two more
subjects) and a corrupt seventh, on a 2-worker ``LocalCluster`` with the shipped starter
model: every output exists and pybids indexes it, the corrupt image lands in
``failed.tsv`` while the others complete, a killed worker's task is retried, and a
rerun computes nothing (no task submitted, no cluster started).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from napari_pvs._bids_io import derivative_paths, find_images
from napari_pvs._bids_report import robust_z
from napari_pvs._errors import PVSInputError
from napari_pvs._fs import sha256_file
from napari_pvs.dataset import write_bids_phantoms

from _helpers import assert_clean_failure, run_cli

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

IMAGES = [{"subject": "01", "session": "1"}, {"subject": "01", "session": "2"},
          {"subject": "02", "acquisition": "fast", "run": "1"},
          {"subject": "02", "acquisition": "fast", "run": "2"},
          {"subject": "03"}, {"subject": "04", "acquisition": "hi"}]
SIZE_MM = 72


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bids") / "ds"
    write_bids_phantoms(root, IMAGES, size_mm=SIZE_MM)
    return root


def _copy(dataset: Path, dest: Path) -> Path:
    import shutil

    shutil.copytree(dataset, dest)
    return dest


def test_pybids_and_the_builtin_reader_find_the_same_images(dataset, tmp_path):
    ds = _copy(dataset, tmp_path / "ds")
    # things neither may pick up: other contrasts, sidecars, non-anat data, stray names
    (ds / "sub-03" / "anat" / "sub-03_T2w.json").write_text("{broken")  # not read
    (ds / "sub-03" / "anat" / "sub-03_T1w.nii.gz").write_bytes(
        (ds / "sub-03" / "anat" / "sub-03_T2w.nii.gz").read_bytes())
    (ds / "sub-03" / "func").mkdir()
    (ds / "sub-03" / "func" / "sub-03_task-rest_bold.nii.gz").write_bytes(b"")
    (ds / "sub-03" / "anat" / "notes_T2w.nii.gz").write_bytes(b"")
    a = find_images(ds, "T2w", reader="pybids")
    b = find_images(ds, "T2w", reader="glob")
    assert [im.path.resolve() for im in a] == [im.path.resolve() for im in b]
    assert [im.stem for im in a] == ["sub-01_ses-1", "sub-01_ses-2", "sub-02_acq-fast_run-1",
                                     "sub-02_acq-fast_run-2", "sub-03", "sub-04_acq-hi"]
    assert [im.entities for im in a] == [im.entities for im in b]
    for reader in ("pybids", "glob"):
        only = find_images(ds, "T2w", participants=["sub-01"], sessions=["2"], reader=reader)
        assert [im.stem for im in only] == ["sub-01_ses-2"]
        two = find_images(ds, "T2w", participants=["02", "sub-04"], reader=reader)
        assert [im.stem for im in two] == ["sub-02_acq-fast_run-1", "sub-02_acq-fast_run-2",
                                           "sub-04_acq-hi"]
        with pytest.raises(PVSInputError, match="sub-02"):  # sub-02 has no session 2
            find_images(ds, "T2w", participants=["01", "02"], sessions=["2"], reader=reader)
        assert [im.stem for im in find_images(ds, "T1w", reader=reader)] == ["sub-03"]


@pytest.fixture(scope="module")
def participant_run(dataset, tmp_path_factory):
    """The participant level on the 6 images plus a corrupt 7th, 2 local workers, the
    starter model; run as the command, in a child process."""
    ds = _copy(dataset, tmp_path_factory.mktemp("run") / "ds")
    bad = ds / "sub-05" / "anat" / "sub-05_T2w.nii.gz"
    bad.parent.mkdir(parents=True)
    good = (ds / "sub-03" / "anat" / "sub-03_T2w.nii.gz").read_bytes()
    bad.write_bytes(good[: len(good) // 3])  # an interrupted copy
    out = ds / "derivatives" / "napari-pvs"
    rc, stdout, stderr = run_cli("bids", ds, out, "participant", "--workers", "2",
                                 timeout=900)
    return ds, out, rc, stdout, stderr


def test_participant_level_writes_bids_derivatives_that_pybids_indexes(participant_run):
    ds, out, rc, stdout, stderr = participant_run
    assert rc == 1, stdout + stderr  # the exit status counts the failed images
    assert "Traceback" not in stdout + stderr
    assert "7 images, 6 computed, 0 skipped (already done), 1 failed" in stdout
    assert "sub-05_T2w.nii.gz" in stderr and "failed" in stderr
    assert "bids: 100% (7/7)" in stderr  # without a terminal: a line every 5 %
    images = [im for im in find_images(ds, "T2w", reader="glob") if im.subject != "05"]
    for im in images:
        paths = derivative_paths(out, im)
        for key in ("mask", "record", "probseg", "uncertainty", "clusters", "stats", "montage"):
            assert paths[key].is_file(), paths[key]
        rec = json.loads(paths["record"].read_text())
        # the input is the image and the segmentation that gave its regions
        assert rec["ModelId"].startswith("starter-t2w")
        assert rec["InputHash"].split("+")[0] == sha256_file(im.path)
        assert "segmentation" in rec["Regions"]  # --seg auto found derivatives/phantom
        stats = paths["stats"].read_text().splitlines()
        assert stats[0].split("\t") == ["region", "count", "volume_mm3", "median_cluster_mm3"]
        counts = {r.split("\t")[0]: int(r.split("\t")[1]) for r in stats[1:]}
        assert counts["WM"] > 5 and counts["WM"] + counts["BG"] <= counts["all"]
        # the maps keep the source geometry
        import nibabel as nib

        src, mask = nib.load(im.path), nib.load(paths["mask"])
        assert mask.shape == src.shape and np.allclose(mask.affine, src.affine)
        assert np.asarray(mask.dataobj).sum() > 0
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative"
    gen = desc["GeneratedBy"][0]
    assert gen["Name"] == "napari-pvs" and gen["ModelId"].startswith("starter-t2w")
    assert gen["ModelCard"]["modality"] == "T2w"
    # pybids indexes every output (the derivatives are found by their GeneratedBy name)
    from bids import BIDSLayout

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layout = BIDSLayout(str(ds), derivatives=True, validate=False)
        get = lambda **q: layout.get(scope="napari-pvs", return_type="filename", **q)  # noqa: E731
        assert len(get(suffix="mask", extension=".nii.gz")) == 6
        assert len(get(suffix="probseg", extension=".nii.gz")) == 12
        assert len(get(suffix="probseg", desc="uncertainty", extension=".nii.gz")) == 6
        assert len(get(suffix="clusters", extension=".tsv")) == 6
        assert len(get(suffix="stats", extension=".tsv")) == 6
        assert len(get(suffix="stats", extension=".json")) == 6
        ses2 = layout.get(scope="napari-pvs", subject="01", session="2", suffix="mask",
                          extension=".nii.gz")
        assert len(ses2) == 1 and ses2[0].get_entities()["label"] == "PVS"
        assert ses2[0].get_entities()["space"] == "T2w"
        runs = get(subject="02", acquisition="fast", run=2, suffix="mask", extension=".nii.gz")
        assert len(runs) == 1
    sidecar = json.loads(derivative_paths(out, images[0])["clusters"].with_suffix(".json")
                         .read_text())
    assert "volume_mm3" in sidecar and "Description" in sidecar["p_false_positive"]


def test_group_level_lists_every_image_and_the_failure_in_a_report(participant_run):
    ds, out, *_ = participant_run
    rc, stdout, stderr = run_cli("bids", ds, out, "group")
    assert rc == 1 and "Traceback" not in stdout + stderr, stdout + stderr
    rows = (out / "group" / "pvs_stats.tsv").read_text().splitlines()
    head = rows[0].split("\t")
    assert len(rows) == 7 and {"count_WM", "volume_mm3_BG", "z_count", "outlier"} <= set(head)
    failed = (out / "group" / "failed.tsv").read_text().splitlines()
    assert len(failed) == 2 and failed[1].startswith("sub-05_T2w.nii.gz\t05")
    assert "sub-05_T2w.nii.gz" in failed[1] and len(failed[1].split("\t")[3]) > 10
    report = (out / "group" / "report.html").read_text()
    assert report.count("data:image/png;base64,") == 6
    assert "6 images processed, 1 failed" in report and "<script>" in report
    assert "http://" not in report and "https://" not in report  # self-contained


def test_a_rerun_submits_no_task(participant_run, monkeypatch):
    """Same input hash and model id: skipped before any task or cluster exists."""
    from napari_pvs import bids_app

    ds, out, *_ = participant_run
    ds_clean = [im for im in find_images(ds, "T2w", reader="glob") if im.subject != "05"]
    before = {im.stem: derivative_paths(out, im)["mask"].stat().st_mtime_ns
              for im in ds_clean}

    def no_cluster(*a, **k):
        raise AssertionError("a rerun must not start a cluster")

    monkeypatch.setattr(bids_app, "_Cluster", no_cluster)
    submitted = []
    monkeypatch.setattr(bids_app, "_compute", lambda client, todo, *a: submitted.extend(todo))
    res = bids_app.run_participant(ds, out, participants=["01", "02", "03", "04"],
                                   log=lambda m: None)
    assert res.computed == [] and len(res.skipped) == 6 and submitted == []
    assert before == {im.stem: derivative_paths(out, im)["mask"].stat().st_mtime_ns
                      for im in ds_clean}
    # a changed input (or another model) is computed again
    im = ds_clean[0]
    with open(im.path, "ab") as fh:
        fh.write(b"\0")  # a different file: another hash
    with pytest.raises(AssertionError, match="must not start a cluster"):
        bids_app.run_participant(ds, out, participants=["01"], log=lambda m: None)


def _workers(parent: int) -> list:
    """The Dask worker processes under ``parent`` (nanny children that run the worker)."""
    import psutil

    out = []
    for p in psutil.Process(parent).children(recursive=True):
        try:
            cmd = " ".join(p.cmdline())
        except psutil.Error:
            continue
        if "multiprocessing" in cmd and "resource_tracker" not in cmd:
            out.append(p)
    return out


def test_a_worker_killed_mid_run_has_its_task_retried(dataset, tmp_path):
    ds = _copy(dataset, tmp_path / "ds")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "napari_pvs.cli", "bids", str(ds), str(out), "participant",
           "--workers", "2", "--model", "starter"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL)
    records = lambda: sorted(out.rglob("*_label-PVS_mask.json"))  # noqa: E731
    killed = None
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        # the first image is done: the others are on the workers now
        if records():
            workers = _workers(proc.pid)
            if len(workers) >= 2:
                killed = workers[0].pid
                os.kill(killed, signal.SIGKILL)
                break
        time.sleep(0.2)
    stdout, stderr = proc.communicate(timeout=900)
    assert killed is not None, f"no worker to kill\n{stdout}\n{stderr}"
    assert proc.returncode == 0, stdout + stderr
    assert "6 images, 6 computed, 0 skipped (already done), 0 failed" in stdout
    assert len(records()) == 6
    assert "Traceback" not in stdout + stderr


def test_on_a_terminal_the_participant_level_draws_a_bar(dataset, tmp_path):
    rc, text, _ = run_cli("bids", dataset, tmp_path / "out", "participant", "--model",
                          "baseline", "--participant-label", "03", "04", tty=True)
    assert rc == 0 and "Traceback" not in text, text
    assert "bids [" in text and "2/2" in text and "sub-04_acq-hi:" in text


def test_t1w_and_t2w_outputs_of_one_subject_do_not_collide(dataset, tmp_path):
    from napari_pvs import bids_app

    ds = _copy(dataset, tmp_path / "ds")
    t2 = ds / "sub-03" / "anat" / "sub-03_T2w.nii.gz"
    (ds / "sub-03" / "anat" / "sub-03_T1w.nii.gz").write_bytes(t2.read_bytes())
    out = tmp_path / "out"
    for modality in ("T2w", "T1w"):
        res = bids_app.run_participant(ds, out, model="baseline", participants=["03"],
                                       suffix=modality, workers=1, log=lambda m: None)
        assert len(res.computed) == 1 and not res.failed
    masks = sorted(p.name for p in out.rglob("*_mask.nii.gz"))
    assert masks == ["sub-03_space-T1w_label-PVS_mask.nii.gz",
                     "sub-03_space-T2w_label-PVS_mask.nii.gz"]
    # the T2w run is still done: the T1w one did not overwrite its record
    again = bids_app.run_participant(ds, out, model="baseline", participants=["03"],
                                     suffix="T2w", log=lambda m: None)
    assert again.computed == [] and len(again.skipped) == 1


def test_an_ensemble_runs_and_other_weights_under_the_same_id_recompute(dataset, tmp_path):
    """--model ENSEMBLE.json: its members' T2w contrast picks the images, its id and the
    hash of every member go into the record; a member retrained (same file names, other
    weights) makes the image run again."""
    import shutil

    from napari_pvs import bids_app
    from napari_pvs.model import starter_path, write_ensemble

    folder = tmp_path / "folds"
    folder.mkdir()
    for name in ("fold0.safetensors", "fold1.safetensors"):
        shutil.copy(starter_path("starter"), folder / name)
    ens = write_ensemble(folder / "ensemble.json", ["fold0.safetensors", "fold1.safetensors"])
    ident = bids_app.model_identity(str(ens))
    assert ident["id"].startswith("ensemble-folds-") and ident["modality"] == "T2w"
    out = tmp_path / "out"
    res = bids_app.run_participant(dataset, out, model=str(ens), participants=["04"],
                                   workers=1, log=lambda m: None)
    assert len(res.computed) == 1 and not res.failed
    im = find_images(dataset, "T2w", participants=["04"], reader="glob")[0]
    rec = json.loads(derivative_paths(out, im)["record"].read_text())
    assert rec["ModelId"] == ident["id"] and rec["ModelHash"] == ident["hash"]
    assert derivative_paths(out, im)["probseg"].is_file()
    # fold 1 replaced by other weights: another hash, so the image is not skipped
    shutil.copy(starter_path("starter-fast"), folder / "fold1.safetensors")
    assert bids_app.model_identity(str(ens))["hash"] != ident["hash"]
    digest = bids_app.input_hash(im.path, bids_app.resolve_seg("auto", dataset, im))
    new = bids_app.model_identity(str(ens))
    assert not bids_app.is_done(out, im, digest, new["id"], new["hash"])
    assert bids_app.is_done(out, im, digest, ident["id"], ident["hash"])


def test_robust_z_flags_the_outlier_only():
    z = robust_z([100, 104, 96, 101, 99, 103, 97, 400])
    assert abs(z[-1]) > 3 and (np.abs(z[:-1]) < 3).all()
    assert np.isnan(robust_z([np.nan, np.nan])).all()
    assert list(robust_z([5, 5, 5])) == [0.0, 0.0, 0.0]


def test_bad_input_is_one_clear_line(dataset, tmp_path):
    out = tmp_path / "out"
    cases = [
        (("bids", tmp_path / "nowhere", out, "participant"), "no such folder"),
        (("bids", tmp_path, out, "participant"), "dataset_description.json"),
        (("bids", dataset, out, "participant", "--participant-label", "0_1"), "BIDS label"),
        (("bids", dataset, out, "participant", "--participant-label", "09"), "sub-09"),
        (("bids", dataset, dataset, "participant"), "derivatives folder"),
        (("bids", dataset, out, "participant", "--model", "nope.safetensors"), "nope"),
        (("bids", dataset, out, "group"), "participant level first"),
        (("bids", dataset, out, "participant", "--scheduler-file", tmp_path / "s.json"),
         "no such file"),
    ]
    for args, needle in cases:
        rc, stdout, stderr = run_cli(*args)
        assert rc == 2, (args, stdout, stderr)
        assert_clean_failure(rc, stdout, stderr, needle)
    assert not (out / "sub-01").exists()


def test_a_missing_segmentation_fails_that_image_only(dataset, tmp_path):
    from napari_pvs import bids_app

    ds = _copy(dataset, tmp_path / "ds")
    pattern = "derivatives/phantom/sub-{subject}/anat/sub-{subject}_desc-aseg_dseg.nii.gz"
    res = bids_app.run_participant(ds, tmp_path / "out", model="baseline",
                                   participants=["01", "03"], seg=pattern, workers=1,
                                   log=lambda m: None)
    # sub-01's segmentations are per session: the pattern misses them; sub-03 is found
    only = find_images(ds, "T2w", participants=["03"], reader="glob")[0].path
    assert [Path(p).resolve() for p in res.computed] == [only.resolve()]
    assert len(res.failed) == 2 and all("does not exist" in r for r in res.failed.values())
    logged = json.loads((tmp_path / "out" / "logs" / "failed.json").read_text())
    assert set(logged) == set(res.failed)


def test_joins_an_existing_scheduler_by_address_or_file(dataset, tmp_path):
    """--scheduler / --scheduler-file: the tasks run on that cluster's workers (here an
    in-process one), and the run leaves the cluster running."""
    from dask.distributed import Client, LocalCluster

    from napari_pvs import bids_app

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        res = bids_app.run_participant(dataset, tmp_path / "a", model="baseline",
                                       participants=["03"], scheduler=cluster.scheduler_address,
                                       log=lambda m: None)
        assert len(res.computed) == 1 and not res.failed
        client.write_scheduler_file(str(tmp_path / "scheduler.json"))
        res = bids_app.run_participant(dataset, tmp_path / "b", model="baseline",
                                       participants=["04"],
                                       scheduler_file=str(tmp_path / "scheduler.json"),
                                       log=lambda m: None)
        assert len(res.computed) == 1 and not res.failed
        assert len(client.scheduler_info()["workers"]) == 1  # still up


def test_another_model_recomputes_and_leaves_no_stale_maps(participant_run):
    """The starter's outputs of sub-03, rerun with Frangi (another model id): computed
    again, and the starter's probability maps are gone (Frangi has none)."""
    from napari_pvs import bids_app

    ds, out, *_ = participant_run
    im = find_images(ds, "T2w", participants=["03"], reader="glob")[0]
    paths = derivative_paths(out, im)
    assert paths["probseg"].is_file()
    res = bids_app.run_participant(ds, out, model="baseline", participants=["03"], workers=1,
                                   log=lambda m: None)
    assert len(res.computed) == 1 and not res.failed
    rec = json.loads(paths["record"].read_text())
    assert rec["ModelId"] == "frangi-baseline" and "probseg" not in rec["Outputs"]
    assert not paths["probseg"].exists() and not paths["uncertainty"].exists()
    assert not paths["probseg"].with_name(paths["probseg"].name.replace(".nii.gz", ".json")
                                          ).exists()
