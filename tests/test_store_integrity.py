"""Store integrity: damage is detected (never read as "no PVS"), import is atomic and
resumable, failures report the truth, inputs are checked before work starts."""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import zarr.storage._local as zarr_local
from _helpers import assert_clean_failure, run_cli

from napari_pvs import PVSInputError
from napari_pvs.cli import main
from napari_pvs.io import Volume
from napari_pvs.store import (CorrectionsStore, StoreCorruptError, StoreWarning, StoreWriteError,
                              check_site, check_subject_id)

SHAPE = (72, 40, 36)  # two chunks along the first axis


def _volume(seed=0) -> Volume:
    affine = np.diag([0.9, 0.9, 1.1, 1.0])
    data = np.random.default_rng(seed).normal(100, 10, SHAPE).astype(np.float32)
    return Volume(data, affine, (0.9, 0.9, 1.1), None, "ab" * 32, None)


def _labels(seed):
    return (np.random.default_rng(seed).random(SHAPE) < 0.01).astype(np.uint8)


@pytest.fixture
def store(tmp_path):
    """sub01 with labels v0001, v0002 and a prediction; closed (readers and the CLI use it)."""
    with CorrectionsStore.create(tmp_path / "t.pvs.zarr") as s:
        s.add_subject("sub01", _volume(), site="siteA", regions=np.ones(SHAPE, np.uint8))
        s.commit_labels("sub01", _labels(1), author="a")
        s.commit_labels("sub01", _labels(2), author="b")
        p = np.random.default_rng(3).random(SHAPE).astype(np.float32)
        s.save_prediction("sub01", "m1", probability=p, uncertainty=p / 2,
                          labels=(p > 0.5).astype(np.uint8))
    return CorrectionsStore.open(tmp_path / "t.pvs.zarr")


def _chunk(array_dir: Path) -> Path:
    return array_dir / "c" / "1" / "0" / "0"


def _damage(array_dir: Path, kind: str) -> None:
    chunk = _chunk(array_dir)
    assert chunk.is_file()
    if kind == "delete chunk":
        chunk.unlink()
    elif kind == "truncate chunk":
        chunk.write_bytes(chunk.read_bytes()[:40])
    elif kind == "garbage chunk":
        chunk.write_bytes(np.random.default_rng(0).bytes(len(chunk.read_bytes())))
    elif kind == "delete metadata":
        (array_dir / "zarr.json").unlink()


KINDS = ["delete chunk", "truncate chunk", "garbage chunk", "delete metadata"]


@pytest.mark.parametrize("kind", KINDS)
def test_damaged_label_version_is_refused_by_read_verify_and_export(store, kind, tmp_path, capsys):
    _damage(store.path / "subjects/sub01/labels/v0002", kind)
    np.testing.assert_array_equal(store.read_labels("sub01", 1), _labels(1))  # v1 is intact
    for version in (2, None):  # the latest is v0002: no silent fallback to v0001
        with pytest.raises(StoreCorruptError, match="subject sub01 labels v0002 is damaged") as e:
            store.read_labels("sub01", version)
        assert str(store.path) in str(e.value) and "store verify" in str(e.value)
    assert main(["store", "verify", str(store.path)]) == 1
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("subject sub01 labels v0002: ")
    assert out.splitlines()[-1].endswith("1 problem found")
    rc = main(["store", "export", str(store.path), str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert_clean_failure(rc, "", err, "sub01 labels v0002")
    assert rc == 2 and not (tmp_path / "out" / "sub01_pvs.nii.gz").exists()


def test_verify_and_export_in_a_child_process_exit_cleanly(store, tmp_path):
    _damage(store.path / "subjects/sub01/labels/v0002", "truncate chunk")
    rc, out, err = run_cli("store", "verify", store.path)
    assert rc == 1 and "Traceback" not in out + err
    assert "subject sub01 labels v0002: a chunk cannot be decoded" in out
    rc, out, err = run_cli("store", "export", store.path, tmp_path / "out")
    assert_clean_failure(rc, out, err, "sub01 labels v0002")
    assert rc == 2


@pytest.mark.parametrize("target", ["image", "regions", "predictions/m1/uncertainty"])
def test_damaged_image_regions_and_predictions_are_refused(store, target, capsys):
    _damage(store.path / "subjects/sub01" / target, "delete chunk")
    read = {"image": lambda: store.read_image("sub01"),
            "regions": lambda: store.read_regions("sub01"),
            "predictions/m1/uncertainty":
                lambda: store.read_prediction("sub01", "m1", "uncertainty")}
    where = {"image": "sub01 image", "regions": "sub01 regions",
             "predictions/m1/uncertainty": "sub01 prediction m1 uncertainty"}[target]
    with pytest.raises(StoreCorruptError, match=where):
        read[target]()
    assert main(["store", "verify", str(store.path)]) == 1
    assert f"subject {where}: its content does not match" in capsys.readouterr().out


def test_missing_versions_and_a_pointer_past_the_newest_are_damage(store, capsys):
    with CorrectionsStore.open(store.path, writable=True) as w:
        w.commit_labels("sub01", _labels(3), author="c")
    labels = store.path / "subjects/sub01/labels"
    shutil.rmtree(labels / "v0002")  # a gap: v0001, v0003
    with pytest.raises(StoreCorruptError, match="labels v0002 is damaged .*folder is missing"):
        store.read_labels("sub01", 2)
    np.testing.assert_array_equal(store.read_labels("sub01"), _labels(3))
    shutil.rmtree(labels / "v0003")  # the latest attribute (3) now points past v0001
    assert store.info("sub01")["latest"] == 3
    with pytest.raises(StoreCorruptError, match="labels v0003"):
        store.read_labels("sub01")
    assert main(["store", "verify", str(store.path)]) == 1
    out = capsys.readouterr().out
    assert "subject sub01 labels v0002: " in out and "subject sub01 labels v0003: " in out
    # a writer does not reuse the lost numbers, and can commit a repair
    with CorrectionsStore.open(store.path, writable=True) as w:
        assert w.commit_labels("sub01", _labels(4), author="fix") == 4
        assert "parent_damaged" in dict(w.labels("sub01", 4).attrs)["summary"]
    np.testing.assert_array_equal(store.read_labels("sub01"), _labels(4))


def test_leftovers_of_a_killed_writer_are_not_damage_and_clean_verify_exits_0(store, capsys):
    (store.path / "subjects/sub01/labels/.tmp-v0003-deadbeef").mkdir()
    (store.path / "subjects/.tmp-sub02-deadbeef").mkdir()
    with open(store.path / "events.jsonl", "a") as fh:
        fh.write('{"time": "2026-01-01", "kind": "comm')  # torn last line
    assert main(["store", "verify", str(store.path)]) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    assert "1 subjects, 2 label versions, 1 predictions" in last and "2 leftovers" in last
    assert "1 torn last event line" in last and last.endswith("no damage found")
    with open(store.path / "events.jsonl", "a") as fh:
        fh.write('\n{"kind": "later"}\n')  # the torn line is no longer the last one
    assert main(["store", "verify", str(store.path)]) == 1
    assert "events.jsonl line " in capsys.readouterr().out


def test_a_writer_cuts_a_torn_event_line_so_later_events_stay_readable(store, capsys):
    with open(store.path / "events.jsonl", "a") as fh:
        fh.write('{"kind": "comm')
    with CorrectionsStore.open(store.path, writable=True) as w:
        w.commit_labels("sub01", _labels(5), author="c")
    assert main(["store", "verify", str(store.path)]) == 0
    assert store.events("sub01")[-1]["kind"] == "commit"


def test_stores_without_checksums_still_open_and_verify_counts_them(store, capsys):
    for arr in ("image", "regions", "predictions/m1/probability"):
        meta = store.path / "subjects/sub01" / arr / "zarr.json"
        doc = json.loads(meta.read_text())
        doc["attributes"].pop("sha256")
        meta.write_text(json.dumps(doc))
    assert store.read_image("sub01").shape == SHAPE
    assert main(["store", "verify", str(store.path)]) == 0
    assert "3 not checksummed" in capsys.readouterr().out


def test_a_broken_model_file_is_reported(store, capsys):
    from napari_pvs.model import arch_config, build_network, default_meta

    arch = arch_config("XS", 3)
    model_id = store.models.register(build_network(arch), default_meta(arch))
    assert main(["store", "verify", str(store.path)]) == 0
    assert "1 models" in capsys.readouterr().out
    path = store.models.path(model_id)
    path.write_bytes(path.read_bytes()[:-1000])
    assert main(["store", "verify", str(store.path)]) == 1
    assert f"model {model_id}: " in capsys.readouterr().out


def test_the_napari_reader_and_training_refuse_damaged_labels(store, monkeypatch):
    from napari.utils import notifications

    from napari_pvs._store_reader import read_store
    from napari_pvs.training.data import load_subject

    _damage(store.path / "subjects/sub01/labels/v0002", "delete chunk")
    shown: list[str] = []
    monkeypatch.setattr(notifications, "show_warning", shown.append)
    layers = read_store(str(store.path))
    assert layers is None  # no layer of the damaged subject, certainly no empty labels
    assert len(shown) == 1 and "sub01 labels v0002 is damaged" in shown[0]
    with pytest.raises(StoreCorruptError, match="sub01 labels v0002"):
        load_subject(store, "sub01", 2, None)


# ---------------------------------------------------------------- failures report the truth
def _enospc(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.fixture
def full_disk(monkeypatch):
    """``full_disk(phase)``: writes fail with ENOSPC ``before`` the rename (zarr writes
    under ``.tmp-*``) or ``after`` it (zarr attribute writes and the event log)."""
    put, write = zarr_local._put, os.write

    def start(phase: str):
        def fake_put(path, value, exclusive=False):
            if (".tmp-" in str(path)) == (phase == "before"):
                _enospc()
            return put(path, value, exclusive)

        def fake_write(fd, data):
            if phase == "after" and os.readlink(f"/proc/self/fd/{fd}").endswith("events.jsonl"):
                return write(fd, data[: len(data) // 2]) and _enospc()  # a partial append
            return write(fd, data)

        monkeypatch.setattr(zarr_local, "_put", fake_put)
        monkeypatch.setattr(os, "write", fake_write)

    return start


def test_a_commit_that_cannot_be_written_leaves_no_version(store, full_disk):
    w = CorrectionsStore.open(store.path, writable=True)
    full_disk("before")
    with pytest.raises(StoreWriteError,
                       match="v0003 of subject sub01 .*No space left.*nothing was saved"):
        w.commit_labels("sub01", _labels(3), author="c")
    assert w.version_numbers("sub01") == [1, 2]
    assert not list((store.path / "subjects/sub01/labels").glob(".tmp-*"))
    w.close()


def test_a_failure_after_the_commit_point_is_a_warning_and_the_version_is_saved(store, full_disk):
    events = (store.path / "events.jsonl").read_bytes()
    with CorrectionsStore.open(store.path, writable=True) as w:
        full_disk("after")
        with pytest.warns(StoreWarning, match="v0003 of subject sub01 is saved"):
            assert w.commit_labels("sub01", _labels(3), author="c") == 3
    np.testing.assert_array_equal(store.read_labels("sub01"), _labels(3))
    assert (store.path / "events.jsonl").read_bytes() == events  # the partial append was cut


@pytest.mark.parametrize("phase", ["before", "after"])
def test_cli_commit_on_a_full_disk_reports_the_truth(store, full_disk, phase, tmp_path, capsys):
    lab = tmp_path / "fix.nii.gz"
    nib.save(nib.Nifti1Image(_labels(3), np.diag([0.9, 0.9, 1.1, 1.0])), lab)
    full_disk(phase)
    rc = main(["store", "commit", str(store.path), "sub01", str(lab), "--author", "ann"])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    if phase == "before":
        assert_clean_failure(rc, out, err, "No space left", "nothing was saved")
        assert store.version_numbers("sub01") == [1, 2]
    else:
        assert rc == 0 and "committed label version 3" in out
        assert err.startswith("napari-pvs: warning: label version v0003 of subject sub01 is saved")
        assert store.version_numbers("sub01") == [1, 2, 3]


def test_add_subject_and_save_prediction_on_a_full_disk_leave_nothing_behind(store, full_disk):
    w = CorrectionsStore.open(store.path, writable=True)
    before = store.read_prediction("sub01", "m1", "probability")
    full_disk("before")
    with pytest.raises(StoreWriteError, match="subject sub02"):
        w.add_subject("sub02", _volume(1), labels=_labels(1))
    p = np.zeros(SHAPE, np.float32)
    with pytest.raises(StoreWriteError, match="prediction of model m1"):
        w.save_prediction("sub01", "m1", probability=p, uncertainty=p, labels=p.astype(np.uint8))
    assert w.subjects() == ["sub01"] and not list((store.path / "subjects").glob(".tmp-*"))
    np.testing.assert_array_equal(store.read_prediction("sub01", "m1", "probability"), before)
    assert not list((store.path / "subjects/sub01/predictions").glob(".*"))
    w.close()


# ---------------------------------------------------------------- import: atomic, resumable
@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    from napari_pvs.dataset import write_phantom_cohort

    root = tmp_path_factory.mktemp("cohort")
    write_phantom_cohort(root, n_sites=1, per_site=3, size_mm=48)
    return root


def _copy(cohort, tmp_path) -> Path:
    return Path(shutil.copytree(cohort, tmp_path / "cohort"))


def test_import_keeps_good_subjects_reports_bad_files_and_resumes(cohort, tmp_path, capsys):
    folder = _copy(cohort, tmp_path)
    bad = folder / "sub-siteA02/anat/sub-siteA02_T2w.nii.gz"
    good = bad.read_bytes()
    bad.write_bytes(good[: len(good) // 2])
    st = tmp_path / "s.pvs.zarr"
    assert main(["store", "init", str(st)]) == 0
    rc = main(["store", "import", str(st), str(folder)])
    out, err = capsys.readouterr()
    assert rc == 1 and "Traceback" not in out + err
    lines = [x for x in err.splitlines() if x.startswith("napari-pvs: error:")]
    assert len(lines) == 1 and str(bad) in lines[0] and "truncated" in lines[0]
    s = CorrectionsStore.open(st)
    assert s.subjects() == ["siteA01", "siteA03"]
    assert all(s.version_numbers(x) == [1] for x in s.subjects())
    bad.write_bytes(good)  # the file is fixed: the same command finishes the job
    assert main(["store", "import", str(st), str(folder)]) == 0
    out = capsys.readouterr().out
    assert "imported siteA02" in out and "skipped siteA01: already imported (same image)" in out
    assert "imported 1, skipped 2" in out
    assert s.subjects() == ["siteA01", "siteA02", "siteA03"]
    truth = nib.load(folder / "derivatives/napari-pvs-phantom/sub-siteA02/anat/"
                     "sub-siteA02_desc-pvs_mask.nii.gz")
    np.testing.assert_array_equal(s.read_labels("siteA02"), np.asarray(truth.dataobj))
    assert [e["kind"] for e in s.events("siteA02")] == ["import", "commit"]


def test_import_refuses_a_subject_id_taken_by_another_image(cohort, tmp_path, capsys):
    folder = _copy(cohort, tmp_path)
    st = tmp_path / "s.pvs.zarr"
    CorrectionsStore.create(st).close()
    assert main(["store", "import", str(st), str(folder)]) == 0
    img = folder / "sub-siteA01/anat/sub-siteA01_T2w.nii.gz"
    vol = nib.load(img)
    nib.save(nib.Nifti1Image(np.asarray(vol.dataobj) + 1, vol.affine, vol.header), img)
    capsys.readouterr()
    assert main(["store", "import", str(st), str(folder)]) == 1
    err = capsys.readouterr().err
    assert "siteA01 is already in the store with another image" in err


_IMPORT_KILL = """
import sys
from napari_pvs.cli import main
sys.stdout.reconfigure(line_buffering=True)
print("start")
sys.exit(main(["store", "import", sys.argv[1], sys.argv[2]]))
"""


@pytest.mark.slow
def test_sigkill_during_import_never_leaves_a_subject_without_labels(cohort, tmp_path):
    """Kill ``store import`` at random moments; every subject present is complete, and
    re-running the import always finishes it.  Half the kills come at random times
    after the first subject was imported, the others at random times after start-up."""
    rng = np.random.default_rng(1)
    truth = {s: np.asarray(nib.load(cohort / f"derivatives/napari-pvs-phantom/sub-{s}/anat/"
                                    f"sub-{s}_desc-pvs_mask.nii.gz").dataobj)
             for s in ("siteA01", "siteA02", "siteA03")}
    partial = 0
    for trial in range(int(os.environ.get("PVS_KILL_REPEATS", "6"))):
        st = tmp_path / f"k{trial}.pvs.zarr"
        CorrectionsStore.create(st).close()
        proc = subprocess.Popen([sys.executable, "-c", _IMPORT_KILL, str(st), str(cohort)],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert proc.stdout.readline().strip() == "start"
        if trial % 2 == 0:  # somewhere in the writes of the 2nd or 3rd subject
            proc.stdout.readline()  # "imported siteA01 ..."
            time.sleep(float(rng.uniform(0.0, 0.2)) if trial else 0.0)
        else:  # anywhere, from start-up to the end
            time.sleep(float(rng.uniform(0.3, 1.0)))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        proc.stdout.close()
        s = CorrectionsStore.open(st)
        partial += 0 < len(s.subjects()) < 3
        for sid in s.subjects():  # whatever is there is complete
            np.testing.assert_array_equal(s.read_labels(sid), truth[sid])
            assert s.read_regions(sid) is not None and s.read_image(sid).shape == truth[sid].shape
        rc, out, err = run_cli("store", "import", st, cohort)
        assert rc == 0, out + err
        s = CorrectionsStore.open(st)
        assert s.subjects() == sorted(truth)
        assert all(np.array_equal(s.read_labels(x), truth[x]) for x in truth)
        assert not list(st.glob("subjects/.tmp-*"))
    assert partial >= 1  # at least one kill landed in the middle of the import


# ---------------------------------------------------------------- inputs checked first
@pytest.mark.parametrize("bad", ["evil\n", "sub01\n", "a\nb"])
def test_ids_and_sites_with_a_trailing_newline_are_refused(bad):
    with pytest.raises(PVSInputError, match="invalid subject id"):
        check_subject_id(bad)
    with pytest.raises(PVSInputError, match="invalid site"):
        check_site(bad)


def test_add_subject_validates_site_and_modality(tmp_path):
    with CorrectionsStore.create(tmp_path / "s.pvs.zarr") as s:
        with pytest.raises(PVSInputError, match="invalid site"):
            s.add_subject("sub01", _volume(), site="evil\n")
        with pytest.raises(PVSInputError, match="invalid site"):
            s.add_subject("sub01", _volume(), site="../x")
        with pytest.raises(PVSInputError, match="modality"):
            s.add_subject("sub01", _volume(), modality="FLAIR\n")
        assert s.subjects() == []


@pytest.mark.parametrize("wait", [math.nan, math.inf, -1.0, "soon"])
def test_wait_must_be_finite_and_not_negative(store, wait):
    t = time.monotonic()
    with pytest.raises(PVSInputError, match="not a finite number of seconds"):
        CorrectionsStore.open(store.path, writable=True, wait=wait)
    assert time.monotonic() - t < 5


@pytest.mark.parametrize("wait", ["nan", "inf", "-3"])
def test_cli_wait_nan_is_refused_before_waiting(store, wait, tmp_path, capsys):
    lab = tmp_path / "fix.nii.gz"
    nib.save(nib.Nifti1Image(_labels(3), np.diag([0.9, 0.9, 1.1, 1.0])), lab)
    holder = CorrectionsStore.open(store.path, writable=True)  # --wait nan used to hang here
    try:
        rc = main(["store", "commit", str(store.path), "sub01", str(lab), "--author", "a",
                   "--wait", wait])
    finally:
        holder.close()
    out, err = capsys.readouterr()
    assert_clean_failure(rc, out, err, repr(float(wait)))


def test_init_on_an_existing_file_or_a_foreign_folder_is_one_clear_line(tmp_path):
    f = tmp_path / "file.pvs.zarr"
    f.write_text("not a folder")
    rc, out, err = run_cli("store", "init", f)
    assert_clean_failure(rc, out, err, str(f), "is a file")
    d = tmp_path / "photos"
    d.mkdir()
    (d / "a.jpg").write_bytes(b"x")
    rc, out, err = run_cli("store", "init", d)
    assert_clean_failure(rc, out, err, str(d), "not empty")
    st = tmp_path / "s.pvs.zarr"
    CorrectionsStore.create(st).close()
    rc, out, err = run_cli("store", "init", st)
    assert_clean_failure(rc, out, err, "already a napari-pvs store")


def test_commit_records_summary_against_the_parent(store):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a healthy commit gives no warning
        with CorrectionsStore.open(store.path, writable=True) as w:
            w.commit_labels("sub01", _labels(3), author="c")
    v3 = store.versions("sub01")[2]
    old, new = _labels(2) > 0, _labels(3) > 0
    assert v3["summary"]["voxels_erased"] == int((old & ~new).sum())
