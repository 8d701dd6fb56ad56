"""TrainingJob: fine-tuning in a child process (or a thread) that a GUI can follow."""

from __future__ import annotations

import os
import signal
import threading

import pytest
from _helpers import store_from_cohort

from napari_pvs.dataset import write_phantom_cohort
from napari_pvs.store import CorrectionsStore
from napari_pvs.training.finetune import FinetuneConfig, TrainingCancelled
from napari_pvs.training.job import TrainingFailed, TrainingJob
from napari_pvs.training.worker import _parse_config, config_args


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("job")
    cohort = write_phantom_cohort(tmp / "c", n_sites=1, per_site=2, size_mm=48)
    path = tmp / "j.pvs.zarr"
    store_from_cohort(path, cohort).close()
    return path


def _cfg(**kw):
    return FinetuneConfig(**{**dict(iterations=4, iterations_per_epoch=2, patch=(32, 32, 32),
                                    batch_size=1, lr=3e-3, val_fraction=0.0, cache_budget_mb=128,
                                    target_spacing=(1.0, 1.0, 1.0)), **kw})


def test_config_round_trips_through_the_command_line():
    cfg = _cfg(variant="S", seed=7)
    import argparse

    ap = argparse.ArgumentParser()
    import dataclasses

    for f in dataclasses.fields(FinetuneConfig):
        ap.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name)
    assert _parse_config(ap.parse_args(config_args(cfg))) == cfg


@pytest.mark.parametrize("mode", ["subprocess", "thread"])
def test_job_trains_and_registers_a_model(store_path, mode):
    job = TrainingJob(store_path, config=_cfg(), mode=mode)
    gen = job.events()
    kinds = []
    while True:
        try:
            kinds.append(next(gen).kind)
        except StopIteration as stop:
            model_id = stop.value
            break
    assert kinds.count("iteration") == 4 and kinds[0] == "start" and "trained" in kinds
    with CorrectionsStore.open(store_path) as store:
        assert model_id in [m["id"] for m in store.models.list()]


def test_cancel_stops_the_child_cleanly(store_path):
    job = TrainingJob(store_path, config=_cfg(iterations=500, iterations_per_epoch=500))
    seen = []
    with pytest.raises(TrainingCancelled):
        for ev in job.events():
            seen.append(ev.kind)
            if ev.kind == "iteration" and ev.iteration == 2:
                threading.Timer(0.0, job.cancel).start()
    assert "trained" not in seen
    with CorrectionsStore.open(store_path, writable=True, wait=5):  # the child released the lock
        pass


def test_a_killed_child_is_reported_not_hidden(store_path):
    job = TrainingJob(store_path, config=_cfg(iterations=500, iterations_per_epoch=500))
    with pytest.raises(TrainingFailed, match="killed by signal 9"):
        for ev in job.events():
            if ev.kind == "iteration":
                os.kill(job._proc.pid, signal.SIGKILL)  # as the OOM killer would


def test_errors_in_the_child_come_back_with_their_message(tmp_path):
    with pytest.raises(TrainingFailed, match="not a napari-pvs store"):
        list(TrainingJob(tmp_path, config=_cfg()).events())
    with pytest.raises(ValueError, match="mode"):
        TrainingJob(tmp_path, mode="fork")
