"""Fine-tuning from the store: corrected data only, oversampling, resume, registration."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from napari_pvs.store import CorrectionsStore
from napari_pvs.training.data import PatchSampler, SubjectCache, corrected_versions
from napari_pvs.training.finetune import FinetuneConfig, finetune

COHORT = {"n_sites": 2, "per_site": 2, "size_mm": 56}  # phantom_store's cohort (conftest.py)
LABELLED = ("siteA01", "siteA02", "siteB01")  # siteB02 stays uncorrected


def test_training_never_sees_uncorrected_labels(tmp_path, phantom_store):
    store = phantom_store(**COHORT, corrected=("siteA01", "siteA02"),
                          path=tmp_path / "s.pvs.zarr")
    shape = tuple(store.info("siteB01")["shape"])
    p = np.zeros(shape, np.float32)
    store.save_prediction("siteB01", "m1", probability=p, uncertainty=p, labels=p.astype(np.uint8))
    # a raw model output committed on top of a correction is skipped too
    raw = np.ones(tuple(store.info("siteA02")["shape"]), np.uint8)
    store.commit_labels("siteA02", raw, author="bot", source="model:m1")
    assert corrected_versions(store) == {"siteA01": 1, "siteA02": 1}
    store.close()


def test_oversampling_hits_pvs_at_the_stated_rate(tmp_path, phantom_store):
    store = phantom_store(**COHORT, corrected=LABELLED, path=tmp_path / "s.pvs.zarr")
    versions = corrected_versions(store)
    cache = SubjectCache(store, versions, None, 2**30)
    sampler = PatchSampler(cache, sorted(versions), patch=(32, 32, 32), pos_fraction=0.5,
                           augment=False, seed=1)
    hits = []
    for _ in range(20):
        x, y, flags = sampler.batch(4)
        assert x.shape == (4, 1, 32, 32, 32) and y.shape == (4, 1, 32, 32, 32)
        hits += [bool(lab.any()) for lab in y[:2]]  # the positive half of each batch
        assert flags[:2] == [True, True]
    assert np.mean(hits) == 1.0  # every positive draw holds PVS: >= 50 % of all patches
    assert cache.loads == 3  # each subject decoded once, then served from memory
    store.close()


def _cfg(**kw):
    base = dict(iterations=6, iterations_per_epoch=3, patch=(32, 32, 32), batch_size=2, lr=3e-3,
                val_fraction=0.34, cache_budget_mb=256, seed=0)
    base.update(kw)
    return FinetuneConfig(**base)


def test_finetune_registers_a_model_that_names_its_parent_and_data(tmp_path, phantom_store):
    store = phantom_store(**COHORT, corrected=LABELLED, path=tmp_path / "s.pvs.zarr")
    events = []
    gen = finetune(store, config=_cfg())
    while True:
        try:
            events.append(next(gen))
        except StopIteration as stop:
            first = stop.value
            break
    kinds = [e.kind for e in events]
    assert kinds[0] == "start" and kinds[-1] == "done" and kinds.count("iteration") == 6
    assert kinds.count("validation") == 2 and kinds.count("checkpoint") == 2
    meta = store.models.latest()
    assert meta["id"] == first and meta["provenance"]["parent"] is None
    assert meta["provenance"]["data_versions"] == {"siteA01": 1, "siteA02": 1, "siteB01": 1}
    # a second round starts from the first model and names it
    second = list(finetune(store, init=first, config=_cfg(iterations=3)))[-1].message
    meta2 = [m for m in store.models.list() if m["id"] == second][0]
    assert meta2["provenance"]["parent"] == first
    store.close()


def test_finetune_starts_from_the_shipped_starter_model(tmp_path, phantom_store):
    """``init="starter"`` fine-tunes the packaged model: its architecture and grid, its
    id as the parent, and not its model card (the card's scores are not the child's)."""
    from napari_pvs.model import read_meta, starter_path

    store = phantom_store(**COHORT, corrected=LABELLED, path=tmp_path / "s.pvs.zarr")
    starter = read_meta(starter_path())
    events = list(finetune(store, init="starter", config=_cfg(iterations=2)))
    child = events[-1].message
    meta = [m for m in store.models.list() if m["id"] == child][0]
    assert meta["provenance"]["parent"] == starter["id"] and "card" not in meta
    # the parent's triage and temperature describe the parent: the child's are refitted on
    # its own validation subjects, or it has none and says why
    assert [e.kind for e in events].count("triage") == 1
    val = meta["provenance"]["validation_subjects"]
    if "triage" in meta:
        assert meta["triage"]["subjects"] == val == meta["calibration"]["subjects"]
        assert meta["triage"] != starter.get("triage")
    else:
        assert "calibration" not in meta
        assert meta["provenance"]["triage"].startswith("not fitted: the ")
    assert meta["arch"]["n_channels"] == starter["arch"]["n_channels"]
    assert meta["preprocessing"]["target_spacing"] == starter["preprocessing"]["target_spacing"]
    store.close()


_TRAINER = textwrap.dedent("""
    import sys
    from napari_pvs.store import CorrectionsStore
    from napari_pvs.training.finetune import FinetuneConfig, finetune
    store = CorrectionsStore.open(sys.argv[1], writable=True)
    cfg = FinetuneConfig(iterations=40, iterations_per_epoch=2, patch=(32, 32, 32), batch_size=1,
                         lr=3e-3, val_fraction=0.0, cache_budget_mb=256, seed=0)
    for e in finetune(store, config=cfg, work_dir=sys.argv[2]):
        print(e.kind, e.iteration, flush=True)
""")


def test_resume_after_a_kill_continues_from_the_checkpoint(tmp_path, phantom_store):
    path = tmp_path / "s.pvs.zarr"
    phantom_store(**COHORT, corrected=LABELLED, path=path).close()
    work = tmp_path / "work"
    proc = subprocess.Popen([sys.executable, "-c", _TRAINER, str(path), str(work)],
                            stdout=subprocess.PIPE, text=True)
    seen = []
    for line in proc.stdout:
        seen.append(line.split())
        if seen[-1][0] == "checkpoint" and int(seen[-1][1]) >= 4:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    import torch

    saved = torch.load(work / "state.pt", weights_only=True)["iteration"]
    assert saved >= 4
    with CorrectionsStore.open(path, writable=True, wait=10) as store:
        cfg = FinetuneConfig(iterations=saved + 2, iterations_per_epoch=2, patch=(32, 32, 32),
                             batch_size=1, lr=3e-3, val_fraction=0.0, cache_budget_mb=256, seed=0)
        with pytest.raises(Exception, match="another configuration"):
            next(finetune(store, config=cfg, work_dir=work, resume=True))
        cfg = FinetuneConfig(iterations=40, iterations_per_epoch=2, patch=(32, 32, 32), batch_size=1,
                             lr=3e-3, val_fraction=0.0, cache_budget_mb=256, seed=0)
        gen = finetune(store, config=cfg, work_dir=work, resume=True)
        start = next(gen)
        assert start.kind == "start" and start.iteration == saved
        first = next(gen)
        assert first.kind == "iteration" and first.iteration == saved + 1
        gen.close()


def test_cancel_stops_training(tmp_path, phantom_store):
    import threading

    from napari_pvs.training.finetune import TrainingCancelled

    store = phantom_store(**COHORT, corrected=LABELLED, path=tmp_path / "s.pvs.zarr")
    cancel = threading.Event()
    gen = finetune(store, config=_cfg(val_fraction=0.0), cancel=cancel)
    next(gen)
    next(gen)
    cancel.set()
    with pytest.raises(TrainingCancelled):
        next(gen)
    store.close()


def test_train_cli_registers_a_model(tmp_path, phantom_store, capsys):
    from napari_pvs.cli import main

    phantom_store(**COHORT, corrected=LABELLED, path=tmp_path / "s.pvs.zarr").close()
    assert main(["train", "--store", str(tmp_path / "s.pvs.zarr"), "--iterations", "2",
                 "--epoch", "2", "--patch", "32", "--lr", "3e-3"]) == 0
    out = capsys.readouterr().out
    assert "done: mednext-xsk3-" in out and "validation voxel Dice" in out
    assert len(CorrectionsStore.open(tmp_path / "s.pvs.zarr").models.list()) == 1


@pytest.mark.slow
def test_ddp_two_processes_keep_weights_in_sync(tmp_path, phantom_store):
    import os
    import shutil

    path = tmp_path / "s.pvs.zarr"
    phantom_store(**COHORT, corrected=LABELLED, path=path).close()
    torchrun = shutil.which("torchrun") or str(__import__("pathlib").Path(sys.executable).parent / "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([torchrun, "--nproc_per_node=2", "--master_port=29517", "-m",
                        "napari_pvs.training", "--store", str(path), "--iterations", "3",
                        "--epoch", "3", "--patch", "32", "--batch-size", "1", "--lr", "3e-3",
                        "--work-dir", str(tmp_path / "work")],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    hashes = {line.split()[1]: line.split()[3] for line in r.stdout.splitlines() if " weights " in line}
    assert set(hashes) == {"0]", "1]"}, r.stdout
    assert hashes["0]"] == hashes["1]"]  # DDP kept both processes' weights identical
    with CorrectionsStore.open(path) as store:
        assert len(store.models.list()) == 1  # registered once, by rank 0
