"""The command line speaks one dialect: ``-o/--out`` wherever a command writes, help on
every option, one way to name a model, ``--device auto``, progress in a log, fold models
cleaned up after ``evaluate``, and ``cache clean``."""

from __future__ import annotations

import argparse
import csv
import io
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from _helpers import assert_clean_failure, run_cli, store_from_cohort

from napari_pvs._backends import BACKENDS
from napari_pvs._cli_common import ProgressReport
from napari_pvs.cli import _parser, main
from napari_pvs.dataset import write_phantom_cohort
from napari_pvs.inference import Progress, pick_device
from napari_pvs.model import load_checkpoint, read_meta
from napari_pvs.store import CorrectionsStore
from napari_pvs.training.finetune import FinetuneEvent

_LOG_LINE = re.compile(r"^(?P<label>[\w.-]+): +(?P<pct>\d+)% \((?P<done>\d+)/(?P<total>\d+)\), "
                       r"(?P<elapsed>[\d.]+ s|\d+ min \d+ s) elapsed(?P<left>, about .+ left)?$")


def _subparsers(parser: argparse.ArgumentParser, path=("napari-pvs",)):
    """``(command path, parser)`` for the parser and every subcommand below it."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _subparsers(sub, (*path, name))


def test_every_argument_of_every_command_has_help():
    missing, seen = [], 0
    for path, parser in _subparsers(_parser()):
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._VersionAction,
                                   argparse._SubParsersAction)):
                continue
            seen += 1
            if not (action.help or "").strip():
                missing.append(f"{' '.join(path)} {'/'.join(action.option_strings) or action.dest}")
    assert seen > 60  # the walk reached the nested commands (model create, store import...)
    assert missing == []


def test_backend_choices_are_the_runners_of_the_package(tmp_path):
    parser = _parser()
    for command in (["predict", "x.nii.gz", "-o", "o"],
                    ["evaluate", "--store", "s", "--scheme", "losocv"]):
        args = parser.parse_args([*command, "--backend", BACKENDS[-1]])
        assert args.backend == BACKENDS[-1]
    rc, out, err = run_cli("predict", "x.nii.gz", "-o", tmp_path, "--backend", "tensorrt")
    assert rc == 2
    assert_clean_failure(rc, out, err, "invalid choice: 'tensorrt'", *(repr(b) for b in BACKENDS))


# ----------------------------------------------------------------------------- -o/--out


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("dialect")
    return write_phantom_cohort(root / "cohort", n_sites=2, per_site=1, size_mm=48, seed=5)


def test_every_command_that_writes_takes_o_and_out(tmp_path, cohort):
    """Each spelling writes the same place; the old positional ones still work."""
    image = str(cohort[0].image)
    assert main(["phantom", "-o", str(tmp_path / "p1"), "--sites", "1", "--per-site", "1",
                 "--size-mm", "32"]) == 0
    assert main(["phantom", str(tmp_path / "p2"), "--sites", "1", "--per-site", "1",
                 "--size-mm", "32"]) == 0
    for p in ("p1", "p2"):
        assert (tmp_path / p / "sub-siteA01" / "anat" / "sub-siteA01_T2w.nii.gz").is_file()
    for flag in ("-o", "--out", "--output"):
        assert main(["predict", image, flag, str(tmp_path / flag)]) == 0
        assert (tmp_path / flag / "sub-siteA01_T2w_pvs.nii.gz").is_file()
    assert main(["model", "create", "-o", str(tmp_path / "a.safetensors"), "--variant", "XS",
                 "--kernel", "3"]) == 0
    assert main(["model", "upkern", str(tmp_path / "a.safetensors"), "--out",
                 str(tmp_path / "b.safetensors")]) == 0
    assert (tmp_path / "b.safetensors").is_file()
    with store_from_cohort(tmp_path / "s.pvs.zarr", cohort) as store:
        path = str(store.path)
    assert main(["store", "export", path, "-o", str(tmp_path / "labels")]) == 0
    assert sorted(p.name for p in (tmp_path / "labels").iterdir()) == [
        "siteA01_pvs.nii.gz", "siteB01_pvs.nii.gz"]
    parser = _parser()  # the long commands: parsed here, run in the slow tests below
    assert parser.parse_args(["evaluate", "--store", path, "--scheme", "losocv",
                              "-o", "ev"]).out == "ev"
    assert parser.parse_args(["demo", "-o", "d"]).out == "d"


@pytest.mark.parametrize("argv, needle", [
    (["phantom", "--sites", "1"], "required: -o/--out"),
    (["model", "create", "--variant", "XS"], "required: -o/--out"),
    (["phantom", "a", "-o", "b"], "two outputs given (a and -o b)"),
    (["store", "export", "s.pvs.zarr", "x", "--out", "y"], "two outputs given (x and -o y)"),
])
def test_a_missing_or_doubled_output_is_one_line(tmp_path, argv, needle):
    rc, out, err = run_cli(*argv, cwd=tmp_path)
    assert rc == 2 and list(tmp_path.iterdir()) == []
    assert_clean_failure(rc, out, err, needle)


# ----------------------------------------------------------------------------- progress


def test_progress_without_a_terminal_logs_every_5_percent_with_time_left():
    log = io.StringIO()
    report = ProgressReport("train", stream=log)
    for it in range(1, 201):
        report(FinetuneEvent(kind="iteration", iteration=it, total=200, loss=0.1))
    lines = log.getvalue().splitlines()
    parsed = [_LOG_LINE.match(line) for line in lines]
    assert all(parsed), lines
    assert [int(m["done"]) for m in parsed] == list(range(10, 201, 10))
    assert [int(m["pct"]) for m in parsed] == list(range(5, 101, 5))
    assert [bool(m["left"]) for m in parsed] == [True] * 19 + [False]  # nothing left at 100 %
    log = io.StringIO()  # a line at the very first event: no rate is known yet
    report = ProgressReport("train", stream=log)
    for it in range(1, 21):
        report(FinetuneEvent(kind="iteration", iteration=it, total=20, loss=0.1))
    parsed = [_LOG_LINE.match(line) for line in log.getvalue().splitlines()]
    assert [bool(m["left"]) for m in parsed] == [False] + [True] * 18 + [False]
    log = io.StringIO()  # a new total is a new stage: its percentages start again
    report = ProgressReport("x.nii.gz", stream=log)
    for done in range(0, 3):
        report(Progress(done, 2))
    for done in range(0, 5):
        report(Progress(done, 4))
    assert [m["pct"] for m in map(_LOG_LINE.match, log.getvalue().splitlines())] == [
        "50", "100", "25", "50", "75", "100"]


def _log_lines(err: str, label: str) -> list[re.Match]:
    found = [_LOG_LINE.match(line) for line in err.splitlines()]
    return [m for m in found if m and m["label"] == label]


def _check_log(lines: list[re.Match], total: int) -> None:
    """Lines every few percent, rising to 100 %, the middle ones with an estimate."""
    assert lines, "no progress lines"
    pcts = [int(m["pct"]) for m in lines]
    assert pcts == sorted(set(pcts)) and pcts[-1] == 100
    assert all(int(m["total"]) == total for m in lines)
    assert all(m["left"] for m in lines[1:-1])


@pytest.fixture(scope="module")
def store(tmp_path_factory, cohort):
    """A store of both phantoms with their true labels, and a tiny MedNeXt beside it."""
    root = tmp_path_factory.mktemp("dialect-store")
    store_from_cohort(root / "s.pvs.zarr", cohort).close()
    assert main(["model", "create", "-o", str(root / "tiny.safetensors"), "--variant", "XS",
                 "--kernel", "3", "--patch", "32", "--spacing", "1.0"]) == 0
    with CorrectionsStore.open(root / "s.pvs.zarr", writable=True) as opened:
        opened.models.register(*load_checkpoint(root / "tiny.safetensors"))
    return root / "s.pvs.zarr"


def test_store_import_through_a_pipe_logs_progress(tmp_path, cohort):
    assert main(["store", "init", str(tmp_path / "n.pvs.zarr")]) == 0
    rc, out, err = run_cli("store", "import", tmp_path / "n.pvs.zarr", cohort[0].image.parents[2])
    assert rc == 0, err
    assert "imported siteB01" in out
    assert [(m["pct"], m["done"]) for m in _log_lines(err, "import")] == [("50", "1"),
                                                                         ("100", "2")]


@pytest.mark.slow
def test_predict_through_a_pipe_logs_progress(store, cohort, tmp_path):
    rc, out, err = run_cli("predict", cohort[0].image, "-o", tmp_path, "--model",
                           store.parent / "tiny.safetensors", "--backend", "torch")
    assert rc == 0, err
    lines = _log_lines(err, cohort[0].image.name)
    _check_log(lines, int(lines[0]["total"]))
    assert int(lines[0]["total"]) > 1


# ----------------------------------------------------------------------------- models


@pytest.mark.slow
def test_a_trained_model_is_named_by_its_id_everywhere(store, cohort, tmp_path):
    """train prints the id and file; model ls STORE lists it; predict --model ID --store S
    runs it, as predict --model FILE does."""
    rc, out, err = run_cli("train", "--store", store, "--iterations", "4", "--epoch", "4",
                           "--patch", "32", "--lr", "3e-3")
    assert rc == 0, err
    assert f"(device {pick_device()})" in out  # --device auto, as predict has
    _check_log(_log_lines(err, "train"), 4)
    done = re.search(r"^done: (\S+) \((\S+)\)$", out, re.M)
    model_id, path = done[1], Path(done[2])
    assert path.is_file() and path.parent == store / "models"
    with CorrectionsStore.open(store) as opened:
        assert opened.models.path(model_id) == path
    rc, out, err = run_cli("model", "ls", store)
    assert rc == 0 and re.search(rf"^{re.escape(model_id)} +XS-k3", out, re.M), out + err
    by_id, by_file = tmp_path / "by-id", tmp_path / "by-file"
    image = cohort[0].image
    for model, extra, folder in ((model_id, ["--store", store], by_id), (path, [], by_file)):
        rc, out, err = run_cli("predict", image, "-o", folder, "--model", model, *extra,
                               "--backend", "torch", "--device", "cpu")
        assert rc == 0, err
    name = "sub-siteA01_T2w_prob.nii.gz"
    a, b = (np.asarray(nib.load(f / name).dataobj) for f in (by_id, by_file))
    assert a.shape == nib.load(image).shape and np.array_equal(a, b)
    rc, out, err = run_cli("predict", image, "-o", tmp_path / "x", "--model", "nope",
                           "--store", store)
    assert_clean_failure(rc, out, err, "no model 'nope'", model_id)
    rc, out, err = run_cli("predict", image, "-o", tmp_path / "x", "--model", model_id)
    assert_clean_failure(rc, out, err, "neither 'baseline' nor an existing checkpoint",
                         "--store STORE")


def test_model_ls_takes_a_store_its_models_folder_or_neither(store, tmp_path):
    tiny = read_meta(store.parent / "tiny.safetensors")["id"]
    rc, out, err = run_cli("model", "ls", store)
    rc2, out2, _ = run_cli("model", "ls", store / "models")
    assert rc == rc2 == 0 and out == out2
    assert re.search(rf"^{re.escape(tiny)} +XS-k3", out, re.M), out + err
    assert_clean_failure(*run_cli("model", "ls", tmp_path / "nothing"), "is not a folder")


@pytest.mark.skipif(pick_device() != "cpu", reason="needs a machine without CUDA and MPS")
def test_train_on_a_missing_gpu_is_one_line(store):
    assert_clean_failure(*run_cli("train", "--store", store, "--device", "cuda"),
                         "CUDA is not available")


# ----------------------------------------------------------------------------- evaluate


def _registry(store) -> set[str]:
    with CorrectionsStore.open(store) as opened:
        return {m["id"] for m in opened.models.list()}


@pytest.mark.slow
@pytest.mark.parametrize("keep", [False, True], ids=["default", "keep-models"])
def test_evaluate_removes_the_fold_models_unless_asked_to_keep_them(store, tmp_path, keep):
    before = _registry(store)
    rc, out, err = run_cli("evaluate", "--store", store, "--scheme", "kfold:2", "--iterations",
                           "1", "--patch", "32", "--batch-size", "1", "-o", tmp_path / "ev",
                           *(["--keep-models"] if keep else []))
    assert rc == 0, err
    assert f"evaluate kfold:2 on {pick_device()}" in out
    with open(tmp_path / "ev" / "results.csv") as fh:
        folds = {r["model_id"] for r in csv.DictReader(fh)}
    assert len(folds) == 2 and not folds & before
    _check_log(_log_lines(err, "evaluate"), 2 * 1 + 2)
    if keep:
        assert _registry(store) == before | folds
        assert "fold models kept" in out
    else:
        assert _registry(store) == before
        with CorrectionsStore.open(store) as opened:
            removed = {e["model_id"] for e in opened.events() if e["kind"] == "model_removed"}
        assert folds <= removed
        assert "removed the 2 fold models" in out


@pytest.mark.slow
def test_evaluate_interrupted_after_a_fold_removes_that_fold_model(store, tmp_path):
    import signal
    import subprocess
    import sys

    before = _registry(store)
    proc = subprocess.Popen([sys.executable, "-m", "napari_pvs.cli", "evaluate", "--store",
                             str(store), "--scheme", "kfold:2", "--iterations", "30", "--patch",
                             "32", "--batch-size", "1", "-o", str(tmp_path / "ev")],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            # pytest-xdist's workers ignore SIGINT; children inherit that
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for line in proc.stdout:
        if line.startswith("fold 1 (2/2"):  # fold 0 is registered; fold 1 trains 30 iterations
            break
    assert len(_registry(store) - before) == 1
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=300)
    assert proc.returncode == 130
    assert _registry(store) == before
    assert not (tmp_path / "ev" / "results.csv").exists()


# ----------------------------------------------------------------------------- cache


@pytest.mark.slow
def test_cache_clean_frees_the_onnx_exports(store, cohort, tmp_path):
    cache = tmp_path / "cache"
    rc, out, err = run_cli("predict", cohort[0].image, "-o", tmp_path / "out", "--model",
                           store.parent / "tiny.safetensors", "--backend", "onnxruntime",
                           env={"NAPARI_PVS_CACHE": str(cache)})
    assert rc == 0, err
    onnx = list(cache.glob("exports/*/*/model.onnx"))
    assert len(onnx) == 1
    folder = onnx[0].parent
    size = sum(f.stat().st_size for f in folder.iterdir())
    rc, out, err = run_cli("cache", "clean", "--dry-run", "--cache-dir", cache)
    assert rc == 0, err
    assert folder.is_dir() and str(folder) in out and "would free" in out
    rc, out, err = run_cli("cache", "clean", env={"NAPARI_PVS_CACHE": str(cache)})
    assert rc == 0, err
    assert not folder.exists() and list((cache / "exports").iterdir()) == []
    freed = re.search(r"freed ([\d.]+) (kB|MB) in 1 cached export$", out, re.M)
    assert freed and abs(float(freed[1]) * {"kB": 1e3, "MB": 1e6}[freed[2]] - size) < 0.01 * size
    rc, out, err = run_cli("cache", "clean", "--cache-dir", cache)
    assert rc == 0 and out.strip().endswith("freed 0 B in 0 cached exports"), out
