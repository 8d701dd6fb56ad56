"""The corrections store: versions, crash safety, locking, validation, CLI, reader."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import nibabel as nib
import numpy as np
import pytest

from napari_pvs import PVSInputError
from napari_pvs.io import Volume
from napari_pvs.store import CorrectionsStore, StoreLockedError, check_subject_id

SHAPE = (40, 36, 32)


def _volume(shape=SHAPE, seed=0) -> Volume:
    affine = np.diag([0.9, 0.9, 1.1, 1.0])
    affine[:3, 3] = [-10, -12, -8]
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_sform(affine, code=2)
    hdr.set_qform(affine, code=1)
    data = np.random.default_rng(seed).normal(100, 10, shape).astype(np.float32)
    return Volume(data, affine, (0.9, 0.9, 1.1), None, "ab" * 32, hdr)


def _labels(seed, shape=SHAPE):
    rng = np.random.default_rng(seed)
    return (rng.random(shape) < 0.01).astype(np.uint8)


@pytest.fixture
def store(tmp_path):
    s = CorrectionsStore.create(tmp_path / "t.pvs.zarr")
    s.add_subject("sub01", _volume(), site="siteA", regions=np.ones(SHAPE, np.uint8))
    yield s
    s.close()


def test_versions_are_immutable_and_never_overwritten(store):
    a, b = _labels(1), _labels(2)
    assert store.commit_labels("sub01", a, author="ann") == 1
    assert store.commit_labels("sub01", b, author="bob", summary={"clusters_rejected": 3}) == 2
    np.testing.assert_array_equal(store.labels("sub01", 1)[...], a)
    np.testing.assert_array_equal(store.labels("sub01")[...], b)
    v2 = store.versions("sub01")[1]
    assert v2["parent"] == 1 and v2["author"] == "bob" and v2["summary"]["clusters_rejected"] == 3
    painted = int(((b > 0) & (a == 0)).sum())
    assert v2["summary"]["voxels_painted"] == painted
    assert v2["summary"]["voxels_erased"] == int(((a > 0) & (b == 0)).sum())
    with pytest.raises(Exception):
        store.labels("sub01", 1)[0, 0, 0] = 1  # opened read-only
    info = store.info("sub01")
    assert info["latest"] == 2 and info["status"] == "corrected" and info["site"] == "siteA"
    kinds = [e["kind"] for e in store.events("sub01")]
    assert kinds == ["import", "commit", "commit"]


def test_mismatched_labels_are_refused(store):
    with pytest.raises(PVSInputError, match="shape"):
        store.commit_labels("sub01", np.zeros((4, 4, 4), np.uint8), author="x")
    with pytest.raises(PVSInputError, match="affine"):
        store.commit_labels("sub01", _labels(1), author="x", affine=np.eye(4))
    with pytest.raises(PVSInputError, match="drawn on an image"):
        store.commit_labels("sub01", _labels(1), author="x", image_sha256="cd" * 32)
    with pytest.raises(PVSInputError, match="integers"):
        store.commit_labels("sub01", _labels(1).astype(float), author="x")
    assert store.version_numbers("sub01") == []


@pytest.mark.parametrize("bad", ["", "..", "../x", "a/b", "a\\b", "x\x00y", "a..b", "tab\tid",
                                 ".hidden", "x" * 200])
def test_subject_ids_are_validated(bad):
    with pytest.raises(PVSInputError, match="invalid subject id"):
        check_subject_id(bad)


def test_images_are_read_only_after_import(store):
    with pytest.raises(PVSInputError, match="already exists"):
        store.add_subject("sub01", _volume())
    with pytest.raises(Exception):
        store.image("sub01")[0, 0, 0] = 0


def test_readers_ignore_and_writers_clean_half_written_versions(store, tmp_path):
    store.commit_labels("sub01", _labels(1), author="a")
    half = store.path / "subjects" / "sub01" / "labels" / ".tmp-v0002-deadbeef"
    half.mkdir()
    (half / "junk").write_bytes(b"partial")
    reader = CorrectionsStore.open(store.path)
    assert reader.version_numbers("sub01") == [1]
    store.close()
    CorrectionsStore.open(store.path, writable=True).close()
    assert not half.exists()


def test_second_writer_is_refused_with_the_pid_or_waits(store):
    with pytest.raises(StoreLockedError, match=f"locked by PID {os.getpid()}"):
        CorrectionsStore.open(store.path, writable=True)
    t = time.monotonic()
    with pytest.raises(StoreLockedError):
        CorrectionsStore.open(store.path, writable=True, wait=0.3)
    assert time.monotonic() - t >= 0.3
    # readers are not blocked
    assert CorrectionsStore.open(store.path).subjects() == ["sub01"]
    store.close()
    with CorrectionsStore.open(store.path, writable=True, wait=1.0) as again:
        assert again.commit_labels("sub01", _labels(3), author="c") == 1


def test_second_writer_process_gets_a_clear_error(store):
    code = textwrap.dedent(f"""
        from napari_pvs.store import CorrectionsStore, StoreLockedError
        try:
            CorrectionsStore.open({str(store.path)!r}, writable=True)
        except StoreLockedError as e:
            print("LOCKED:", e)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert f"LOCKED: store {store.path} is locked by PID {os.getpid()}" in out.stdout


_WRITER = textwrap.dedent("""
    import sys, time, numpy as np
    from napari_pvs.store import CorrectionsStore
    path = sys.argv[1]
    store = CorrectionsStore.open(path, writable=True, wait=30)
    while True:
        n = (store.latest_version("sub01") or 0) + 1
        rng = np.random.default_rng(n)
        lab = (rng.random((96, 96, 96)) < 0.02).astype(np.uint8)
        v = store.commit_labels("sub01", lab, author="killtest")
        print("committed", v, flush=True)
        time.sleep(float(rng.uniform(0.0, 0.1)))  # vary where the next kill lands
""")


def _expected(n):
    return (np.random.default_rng(n).random((96, 96, 96)) < 0.02).astype(np.uint8)


def test_sigkill_during_saves_never_corrupts_the_store(tmp_path):
    """Kill the writer at random points; committed versions stay bit-identical.

    After every kill: the store opens, every confirmed version is present, there are no
    gaps, the versions added since the last kill and a random sample of older ones are
    bit-identical to what was written; at the end every version is checked.
    """
    repeats = int(os.environ.get("PVS_KILL_REPEATS", "8"))
    path = tmp_path / "kill.pvs.zarr"
    with CorrectionsStore.create(path) as s:
        s.add_subject("sub01", _volume((96, 96, 96)))
    rng = np.random.default_rng(0)
    confirmed: set[int] = set()
    checked = 0
    for _ in range(repeats):
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)],
                                stdout=subprocess.PIPE, text=True)
        time.sleep(float(rng.uniform(1.0, 2.5)))
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate(timeout=60)
        confirmed |= {int(line.split()[1]) for line in out.splitlines() if line.startswith("committed")}
        reader = CorrectionsStore.open(path)
        present = reader.version_numbers("sub01")
        assert confirmed <= set(present)  # nothing committed is lost
        assert present == list(range(1, len(present) + 1))  # no gaps
        older = rng.choice(present[:checked], size=min(checked, 10), replace=False) if checked else []
        for n in [*present[checked:], *older]:  # new versions complete, old ones untouched
            np.testing.assert_array_equal(reader.labels("sub01", int(n))[...], _expected(int(n)))
        checked = len(present)
    assert len(confirmed) >= repeats  # the writer did get work done between kills
    reader = CorrectionsStore.open(path)
    for n in reader.version_numbers("sub01"):
        np.testing.assert_array_equal(reader.labels("sub01", n)[...], _expected(n))
    with CorrectionsStore.open(path, writable=True) as s:  # the lock died with the writer
        assert s.info("sub01")["latest"] == s.latest_version("sub01")
        assert not list((path / "subjects" / "sub01" / "labels").glob(".tmp-*"))


def test_cli_phantom_init_import_commit_export(tmp_path, capsys):
    from napari_pvs.cli import main

    cohort = tmp_path / "cohort"
    assert main(["phantom", str(cohort), "--sites", "2", "--per-site", "1", "--size-mm", "48"]) == 0
    st = tmp_path / "lab.pvs.zarr"
    assert main(["store", "init", str(st)]) == 0
    assert main(["store", "import", str(st), str(cohort)]) == 0
    img = nib.load(cohort / "sub-siteB01/anat/sub-siteB01_T2w.nii.gz")
    corrected = np.zeros(img.shape, np.uint8)
    corrected[10:14, 10:12, 8:20] = 1
    lab_path = tmp_path / "fix.nii.gz"
    nib.save(nib.Nifti1Image(corrected, img.affine), lab_path)
    assert main(["store", "commit", str(st), "siteB01", str(lab_path), "--author", "ann"]) == 0
    assert main(["store", "ls", str(st)]) == 0
    listing = capsys.readouterr().out
    assert "siteA01" in listing and "siteB" in listing and "corrected" in listing
    assert main(["store", "export", str(st), str(tmp_path / "out")]) == 0
    out = nib.load(tmp_path / "out" / "siteB01_pvs.nii.gz")
    np.testing.assert_array_equal(np.asarray(out.dataobj), corrected)
    np.testing.assert_allclose(out.affine, img.affine)
    truth = nib.load(cohort / "derivatives/napari-pvs-phantom/sub-siteA01/anat/"
                     "sub-siteA01_desc-pvs_mask.nii.gz")
    np.testing.assert_array_equal(np.asarray(nib.load(tmp_path / "out" / "siteA01_pvs.nii.gz")
                                             .dataobj), np.asarray(truth.dataobj))
    # a label file on another grid is refused, and nothing is written
    bad = tmp_path / "bad.nii.gz"
    nib.save(nib.Nifti1Image(corrected, np.eye(4)), bad)
    assert main(["store", "commit", str(st), "siteB01", str(bad), "--author", "x"]) == 2
    s = CorrectionsStore.open(st)
    assert s.version_numbers("siteB01") == [1, 2]


def test_prediction_maps_are_stored_per_model(store):
    p = np.random.default_rng(0).random(SHAPE).astype(np.float32)
    store.save_prediction("sub01", "mednext-xs", probability=p, uncertainty=p / 2,
                          labels=(p > 0.5).astype(np.uint8))
    assert store.predictions("sub01") == ["mednext-xs"]
    np.testing.assert_array_equal(store.prediction("sub01", "mednext-xs")["probability"][...], p)
    assert store.info("sub01")["status"] == "predicted"


def test_store_reader_opens_images_lazily_and_checks_labels(store):
    import zarr

    from napari_pvs._store_reader import get_store_reader

    store.commit_labels("sub01", _labels(1), author="a")
    p = np.random.default_rng(0).random(SHAPE).astype(np.float32)
    store.save_prediction("sub01", "m1", probability=p, uncertainty=p, labels=(p > 0.5).astype(np.uint8))
    reader = get_store_reader(str(store.path))
    assert reader is not None and get_store_reader(str(store.path.parent)) is None
    layers = reader(str(store.path))
    names = [kw["name"] for _, kw, _ in layers]
    assert names == ["sub01 image", "sub01 labels v1", "sub01 uncertainty (m1)"]
    for data, kw, kind in layers:  # image and maps lazy; labels read in full and checked
        assert isinstance(data, np.ndarray if kind == "labels" else zarr.Array)
        np.testing.assert_allclose(kw["affine"] @ np.diag([*kw["scale"], 1]), store.info("sub01")["affine"])


@pytest.mark.gui
def test_viewer_opens_a_store(make_napari_viewer, store):
    store.commit_labels("sub01", _labels(1), author="a")
    viewer = make_napari_viewer()
    viewer.open(str(store.path), plugin="napari-pvs")
    assert [layer.name for layer in viewer.layers] == ["sub01 image", "sub01 labels v1"]
    assert tuple(viewer.layers[0].scale) == pytest.approx((0.9, 0.9, 1.1))
