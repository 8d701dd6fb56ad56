"""Training never blocks saving and never registers a broken model; bad settings,
checkpoints, ensembles and resume states end in one clear line."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest
from _helpers import PickleBomb, assert_clean_failure, run_cli

from napari_pvs._errors import PVSInputError
from napari_pvs.store import CorrectionsStore
from napari_pvs.training.finetune import FinetuneConfig, TrainingDiverged, finetune

COHORT = {"n_sites": 1, "per_site": 3, "size_mm": 40}  # phantom_store's cohort (conftest.py)


@pytest.fixture(scope="module")
def cohort(phantom_cohort):
    return phantom_cohort(**COHORT)


@pytest.fixture
def fresh_store_path(phantom_store, tmp_path):
    """A closed store of the cohort, every subject corrected, at ``tmp_path/s.pvs.zarr``."""
    path = tmp_path / "s.pvs.zarr"
    phantom_store(**COHORT, path=path).close()
    return path


def _cfg(**kw):
    return FinetuneConfig(**{**dict(iterations=2, iterations_per_epoch=2, patch=(32, 32, 32),
                                    batch_size=1, lr=3e-3, val_fraction=0.0, cache_budget_mb=64,
                                    target_spacing=(1.0, 1.0, 1.0)), **kw})


def _drain(gen):
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value


# ---------------------------------------------------------------- settings
@pytest.mark.parametrize("kw, needle", [
    ({"iterations": 0}, "iterations"), ({"iterations": -5}, "iterations"),
    ({"iterations_per_epoch": 0}, "--epoch"),
    ({"patch": (7, 7, 7)}, "multiples of 16"), ({"patch": (0, 0, 0)}, "multiples of 16"),
    ({"patch": (16, 16, 16)}, "from 32"),
    ({"lr": math.inf}, "learning rate"), ({"lr": math.nan}, "learning rate"),
    ({"lr": 0.0}, "learning rate"), ({"lr": -1e-3}, "learning rate"),
    ({"device": "bogus"}, "bogus"), ({"device": "cuda:99"}, "cuda:99"),
    ({"target_spacing": (0.001, 1.0, 1.0)}, "target_spacing"),
])
def test_config_refuses_bad_settings_before_any_work(kw, needle):
    with pytest.raises(PVSInputError, match="^[^\n]*$") as err:
        _cfg(**kw).validate()
    assert needle in str(err.value)


def test_config_accepts_sane_settings():
    assert _cfg().validate() == _cfg()


@pytest.fixture(scope="module")
def store_path(phantom_store):
    """One closed store for the tests that only read it."""
    store = phantom_store(**COHORT)
    store.close()
    return store.path


@pytest.mark.parametrize("args, needle", [
    (["--iterations", "0"], "iterations (--iterations)"), (["--iterations", "-5"], "got -5"),
    (["--patch", "7"], "got (7, 7, 7)"), (["--patch", "0"], "got (0, 0, 0)"),
    (["--lr", "inf"], "got inf"), (["--lr", "nan"], "got nan"), (["--lr", "0"], "got 0.0"),
    (["--epoch", "0"], "--epoch"), (["--device", "bogus"], "'bogus'"),
    (["--device", "cuda"], "'cuda'"), (["--wait", "nan"], "nan"), (["--wait", "-1"], "-1"),
])
def test_train_cli_bad_settings_fail_in_one_line(store_path, args, needle):
    if args == ["--device", "cuda"]:
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has a GPU: --device cuda is valid here")
    rc, out, err = run_cli("train", "--store", store_path, *args)
    assert_clean_failure(rc, out, err, needle)
    assert CorrectionsStore.open(store_path).models.list() == []


# ---------------------------------------------------------------- divergence
@pytest.mark.slow
@pytest.mark.parametrize("lr", ["inf", "1e30"])
def test_train_with_a_diverging_lr_registers_nothing(fresh_store_path, lr):
    path = fresh_store_path
    rc, out, err = run_cli("train", "--store", path, "--iterations", "3", "--epoch", "3",
                           "--patch", "32", "--lr", lr)
    assert_clean_failure(rc, out, err, lr if lr == "inf" else "--lr")
    if lr == "1e30":  # a finite but absurd rate: training starts and stops at the bad iteration
        assert "diverged at iteration" in err and "nothing was registered" in err
    assert CorrectionsStore.open(path).models.list() == []


def test_a_non_finite_loss_stops_the_run_in_process(tmp_path, fresh_store_path):
    path = fresh_store_path
    with CorrectionsStore.open(path) as store:
        with pytest.raises(TrainingDiverged, match=r"diverged at iteration \d+.*lower --lr"):
            _drain(finetune(store, config=_cfg(iterations=3, iterations_per_epoch=3, lr=1e30),
                            work_dir=tmp_path / "w"))
        assert store.models.list() == []


# ---------------------------------------------------------------- lock-free training
_LONG_RUNS = {  # (argv after the store, the first stdout line once the store is open)
    "train": (["train", "--iterations", "40", "--epoch", "40", "--patch", "32", "--lr", "3e-3",
               "--wait", "60"], "start:"),
    "evaluate": (["evaluate", "--scheme", "kfold:2", "--iterations", "20", "--patch", "32",
                  "--batch-size", "1", "--wait", "60", "--keep-models"], "kfold:2: 2 folds"),
}


@pytest.mark.slow
@pytest.mark.parametrize("command", sorted(_LONG_RUNS))
def test_a_commit_succeeds_while_train_runs(tmp_path, fresh_store_path, cohort, command):
    from napari_pvs.io import load_volume, save_labels

    path = fresh_store_path
    subject = cohort[0].subject
    labels = load_volume(cohort[0].labels, as_labels=True)
    edited = labels.data.copy()
    centre = tuple(n // 2 for n in edited.shape)
    edited[centre] = 1 - edited[centre]
    fixed = save_labels(tmp_path / "fixed.nii.gz", edited, labels)
    argv, first = _LONG_RUNS[command]
    train = subprocess.Popen(
        [sys.executable, "-m", "napari_pvs.cli", argv[0], "--store", str(path), *argv[1:]],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        seen = []  # until the line saying the run has opened the store and read its versions
        while not (seen and seen[-1].startswith(first)):
            seen.append(train.stdout.readline())
            assert seen[-1], "".join(seen) + train.stderr.read()
        t0 = time.monotonic()
        with CorrectionsStore.open(path, writable=True, wait=0):  # the lock is free at once
            assert train.poll() is None
        rc, out, err = run_cli("store", "commit", path, subject, fixed, "--author", "annotator")
        seconds = time.monotonic() - t0
        still_training = train.poll() is None
        assert rc == 0, out + err
        assert still_training, "training ended before the commit: make the run longer"
        out_train, err_train = train.communicate(timeout=600)
    finally:
        if train.poll() is None:
            train.kill()
    assert train.returncode == 0, err_train
    assert "done: mednext-" in out_train or "results:" in out_train
    print(f"commit during {command} took {seconds:.1f} s")
    with CorrectionsStore.open(path) as store:
        assert store.latest_version(subject) == 2
        assert len(store.models.list()) == (1 if command == "train" else 2)  # one per fold


def test_resume_after_a_finished_run_registers_no_duplicate(tmp_path, fresh_store_path):
    path = fresh_store_path
    work = tmp_path / "w"
    with CorrectionsStore.open(path) as store:  # read-only: registering takes the lock briefly
        first = _drain(finetune(store, config=_cfg(), work_dir=work))
        again = _drain(finetune(store, config=_cfg(), work_dir=work, resume=True))
        assert again == first
        assert [m["id"] for m in store.models.list()] == [first]
        assert [e["model_id"] for e in store.events() if e["kind"] == "model"] == [first]
        assert not store.writable


def test_two_runs_never_share_a_work_folder(tmp_path, fresh_store_path):
    path = fresh_store_path
    with CorrectionsStore.open(path) as store:
        running = finetune(store, config=_cfg(), work_dir=tmp_path / "w")
        next(running)
        with pytest.raises(PVSInputError, match="another training run is using"):
            next(finetune(store, config=_cfg(), work_dir=tmp_path / "w"))
        running.close()
        next(finetune(store, config=_cfg(), work_dir=tmp_path / "w"))  # free again


def _corrupt_state(state, content, marker):
    import torch

    state.parent.mkdir(parents=True, exist_ok=True)
    if content == "garbage":
        state.write_bytes(b"PK\x03\x04 not a zip archive at all")
    elif content == "bomb":
        torch.save({"model": PickleBomb(str(marker))}, state)
    else:
        torch.save([1, 2, 3], state)


@pytest.mark.parametrize("content", ["garbage", "bomb", "list"])
def test_a_corrupt_state_with_resume_fails_in_one_line(tmp_path, fresh_store_path, content):
    path = fresh_store_path
    marker = tmp_path / "pwned"
    _corrupt_state(tmp_path / "w" / "state.pt", content, marker)
    with CorrectionsStore.open(path) as store:
        with pytest.raises(PVSInputError, match=r"^[^\n]*state\.pt.*without --resume[^\n]*$"):
            _drain(finetune(store, config=_cfg(), work_dir=tmp_path / "w", resume=True))
    assert not marker.exists()


@pytest.mark.slow
def test_train_cli_with_a_corrupt_state_fails_in_one_line(tmp_path, fresh_store_path):
    path = fresh_store_path
    _corrupt_state(path / "training" / "current" / "state.pt", "bomb", tmp_path / "pwned")
    rc, out, err = run_cli("train", "--store", path, "--iterations", "2", "--patch", "32",
                           "--resume")
    assert_clean_failure(rc, out, err, "state.pt", "without --resume")
    assert not (tmp_path / "pwned").exists()


# ---------------------------------------------------------------- checkpoints
def _xs_checkpoint(path):
    import torch

    from napari_pvs.model import arch_config, build_network, default_meta, save_checkpoint

    torch.manual_seed(0)
    net = build_network(arch_config("XS", 3))
    meta = default_meta(arch_config("XS", 3), target_spacing=[1.0] * 3, patch_size=[32] * 3)
    return net, meta, save_checkpoint(path, net, meta)


def _raw_checkpoint(path, meta_text: str):
    """A safetensors file whose napari-pvs metadata is ``meta_text`` verbatim."""
    import torch
    from safetensors.torch import save_file

    save_file({"stem.conv_out.weight": torch.zeros(1)}, str(path),
              metadata={"napari_pvs": meta_text})
    return path


def _with_weights(src, dst, change):
    """Copy checkpoint ``src`` to ``dst`` (same metadata) with ``change(state)`` applied."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(src), framework="pt") as fh:
        metadata = fh.metadata()
    state = load_file(str(src))
    change(state)
    save_file(state, str(dst), metadata=metadata)
    return dst


def test_load_checkpoint_refuses_non_finite_weights(tmp_path):
    from napari_pvs.model import load_checkpoint

    _, _, good = _xs_checkpoint(tmp_path / "good.safetensors")

    def one_nan(state):
        key = sorted(state)[3]
        state[key] = state[key].clone().fill_(float("nan"))

    bad = _with_weights(good, tmp_path / "bad.safetensors", one_nan)
    load_checkpoint(good)
    with pytest.raises(PVSInputError, match=r"bad\.safetensors.*NaN or infinite"):
        load_checkpoint(bad)


def test_prediction_refuses_nan_outputs(tmp_path):
    import torch

    from napari_pvs.inference import predict_volume, run

    net, meta, _ = _xs_checkpoint(tmp_path / "m.safetensors")
    meta["id"] = "mednext-broken"
    with torch.no_grad():
        next(net.parameters()).fill_(float("nan"))
    image = np.random.default_rng(0).normal(size=(24, 24, 24)).astype(np.float32)
    with pytest.raises(PVSInputError, match="mednext-broken produced NaN"):
        run(predict_volume(image, (1.0, 1.0, 1.0), net.eval(), meta, backend="torch", device="cpu"))


def _meta_doc(**changes):
    from napari_pvs.model import FORMAT, arch_config, default_meta

    meta = default_meta(arch_config("XS", 3), target_spacing=[1.0] * 3, patch_size=[32] * 3)
    meta.update(format=FORMAT, id="m", created="now")
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        meta.setdefault(section, {})[key] = value
    return json.dumps(meta)


BAD_META = {
    "json-list": json.dumps([{"format": "napari-pvs-model"}]),
    "deeply-nested": "[" * 100_000 + "]" * 100_000,
    "n-channels-100000": _meta_doc(arch__n_channels=100_000),
    "spacing-0": _meta_doc(preprocessing__target_spacing=[0, 0, 0]),
    "spacing-0.001": _meta_doc(preprocessing__target_spacing=[0.001, 0.001, 0.001]),
    "exp-r-huge": _meta_doc(arch__exp_r=[10**6] * 9),
    "patch-7": _meta_doc(preprocessing__patch_size=[7, 7, 7]),
    "min-spacing-0.001": _meta_doc(preprocessing__min_spacing=[0.001] * 3),
    "min-cluster-negative": _meta_doc(postprocessing__min_cluster_mm3=-1),
    "min-cluster-text": _meta_doc(postprocessing__min_cluster_mm3="big"),
    "postprocessing-list": _meta_doc(arch__n_channels=32).replace(
        '"provenance"', '"postprocessing": [1], "provenance"'),
}


@pytest.mark.parametrize("case", sorted(BAD_META))
def test_bad_checkpoint_metadata_is_refused_before_anything_is_built(tmp_path, case):
    from napari_pvs.model import load_checkpoint, read_meta

    path = _raw_checkpoint(tmp_path / f"{case}.safetensors", BAD_META[case])
    for loader in (read_meta, load_checkpoint):
        with pytest.raises(PVSInputError, match="^" + re.escape(str(path))) as err:
            loader(path)
        assert "\n" not in str(err.value)


def test_work_grid_refuses_terabyte_grids():
    from napari_pvs.preprocess import work_grid

    assert work_grid((64, 64, 64), (1.0, 1.0, 1.0), (0.5, 0.5, 0.5)) == (128, 128, 128)
    for target in ((0.001,) * 3, (0.0,) * 3):
        with pytest.raises(PVSInputError, match="target spacing|over the limit"):
            work_grid((256, 256, 256), (1.0, 1.0, 1.0), target)


@pytest.mark.slow
def test_predict_cli_with_bad_models_fails_in_one_line(tmp_path):
    import nibabel as nib

    image = tmp_path / "sub-01_T2w.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).normal(size=(24, 24, 24)).astype(np.float32),
                             np.eye(4)), image)
    _, _, good = _xs_checkpoint(tmp_path / "good.safetensors")

    def all_nan(state):
        for v in state.values():
            v.fill_(float("nan"))

    nan_weights = _with_weights(good, tmp_path / "nan.safetensors", all_nan)
    models = [nan_weights]
    for case in ("json-list", "deeply-nested", "n-channels-100000", "spacing-0", "spacing-0.001"):
        models.append(_raw_checkpoint(tmp_path / f"{case}.safetensors", BAD_META[case]))
    ens = tmp_path / "ens" / "ensemble.json"
    ens.parent.mkdir()
    ens.write_text(json.dumps(["fold_0.safetensors"]))
    models.append(ens)
    for model in models:
        rc, out, err = run_cli("predict", image, "-o", tmp_path / f"out-{model.stem}",
                               "--model", model)
        assert_clean_failure(rc, out, err, model.name)


# ---------------------------------------------------------------- ensembles
def _ensemble(folder, members):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "ensemble.json"
    path.write_text(json.dumps({"format": "napari-pvs-ensemble", "format_version": 1,
                                "members": members}))
    return path


def test_ensemble_members_must_lie_in_its_folder(tmp_path):
    from napari_pvs.model import load_checkpoint, load_ensemble

    _xs_checkpoint(tmp_path / "outside" / "m.safetensors")
    _xs_checkpoint(tmp_path / "ens" / "fold_0.safetensors")
    (tmp_path / "ens" / "link.safetensors").symlink_to(tmp_path / "outside" / "m.safetensors")
    assert load_ensemble(_ensemble(tmp_path / "ens", ["fold_0.safetensors"])) == \
        [tmp_path / "ens" / "fold_0.safetensors"]
    for member in ("../outside/m.safetensors", str(tmp_path / "outside" / "m.safetensors"),
                   "link.safetensors"):
        path = _ensemble(tmp_path / "ens", ["fold_0.safetensors", member])
        with pytest.raises(PVSInputError, match="outside the ensemble's folder"):
            load_ensemble(path)
        with pytest.raises(PVSInputError, match="outside the ensemble's folder"):
            load_checkpoint(path)


@pytest.mark.parametrize("doc", [["fold_0.safetensors"], "[" * 100_000 + "]" * 100_000,
                                 {"format": "napari-pvs-ensemble", "members": "fold_0.safetensors"},
                                 {"format": "napari-pvs-ensemble", "members": [{"a": 1}]}])
def test_malformed_ensembles_fail_in_one_line(tmp_path, doc):
    from napari_pvs.model import load_ensemble

    path = tmp_path / "ensemble.json"
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    with pytest.raises(PVSInputError, match=r"^[^\n]*ensemble\.json"):
        load_ensemble(path)
