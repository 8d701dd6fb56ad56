"""Cross-validated evaluation: LOSOCV / k-fold splits, results, summary, plot, CLI."""

from __future__ import annotations

import csv
import json

import pytest

from napari_pvs import PVSInputError
from napari_pvs.cli import _parser
from napari_pvs.inference import run
from napari_pvs.io import load_volume
from napari_pvs.store import CorrectionsStore
from napari_pvs.training.evaluate import (
    COLUMNS,
    METRICS,
    evaluate,
    parse_scheme,
    scheme_name,
)
from napari_pvs.training.finetune import FinetuneConfig

CFG = FinetuneConfig(iterations=2, iterations_per_epoch=2, patch=(32, 32, 32), batch_size=1,
                     lr=3e-3, val_fraction=0.0, cache_budget_mb=256)


@pytest.fixture(scope="module")
def cohort(phantom_cohort):
    """The 2 sites x 2 subjects, 48 mm cohort of ``phantom_store()`` (conftest.py)."""
    return phantom_cohort()


@pytest.fixture(scope="module")
def losocv(tmp_path_factory, phantom_store):
    """One LOSOCV run: (store path, report, events, splits file bytes and mtime)."""
    root = tmp_path_factory.mktemp("losocv")
    with phantom_store(path=root / "s.pvs.zarr") as store:
        events = []
        report = run(evaluate(store, "losocv", config=CFG, out_dir=root / "out"), events.append)
    path = report.splits_path
    return root / "s.pvs.zarr", report, events, path.read_bytes(), path.stat().st_mtime_ns


@pytest.mark.parametrize("scheme, expected, name", [
    ("losocv", ("losocv", None), "losocv"),
    ("kfold:5", ("kfold", 5), "kfold5_seed7"),
    ("KFold:2", ("kfold", 2), "kfold2_seed7"),
])
def test_parse_scheme(scheme, expected, name):
    assert parse_scheme(scheme) == expected
    assert scheme_name(scheme, seed=7) == name


@pytest.mark.parametrize("bad", ["kfold", "kfold:1", "kfold:x", "loso", ""])
def test_bad_schemes_raise(bad):
    with pytest.raises(ValueError, match="kfold|fold"):
        parse_scheme(bad)


def test_losocv_never_trains_on_the_held_out_site(losocv, cohort):
    _, report, _, raw, _ = losocv
    sites = {s.subject: s.site for s in cohort}
    splits = json.loads(raw)
    assert report.splits_path.name == "losocv.json"
    assert [f["site"] for f in splits] == ["siteA", "siteB"]
    for f in splits:
        held = {sites[s] for s in f["val"]}
        assert held == {f["site"]}
        assert not held & {sites[s] for s in f["train"]}
    for i, f in enumerate(splits):
        rows = [r for r in report.rows if r["fold"] == i]
        assert sorted(r["subject"] for r in rows) == f["val"]
        assert {r["site"] for r in rows} == {f["site"]}
        assert not {r["site"] for r in rows} & {sites[s] for s in f["train"]}
    # one model per fold, trained without the held-out subjects' labels
    assert len({fd["model_id"] for fd in report.folds}) == 2


def test_events_report_folds_and_progress(losocv):
    _, report, events, _, _ = losocv
    kinds = [e.kind for e in events]
    assert kinds[0] == "splits" and kinds[-1] == "done"
    assert kinds.count("fold") == kinds.count("fold_done") == 2
    assert kinds.count("subject") == 4
    assert {e.fold for e in events if e.kind == "train"} == {0, 1}
    done = [e.done for e in events]
    assert done == sorted(done) and done[-1] == events[-1].total == 2 * CFG.iterations + 4


def test_results_csv_has_one_row_per_subject(losocv, cohort):
    _, report, _, _, _ = losocv
    with open(report.results_csv, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert tuple(rows[0]) == COLUMNS
    assert sorted(r["subject"] for r in rows) == sorted(s.subject for s in cohort)
    for r in rows:
        for c in COLUMNS[3:-1]:
            assert 0.0 <= float(r[c]) <= 1.0, (r["subject"], c, r[c])
        assert r["model_id"] == report.folds[int(r["fold"])]["model_id"]


def test_summary_has_fold_rows_a_mean_row_and_a_site_table(losocv):
    _, report, _, _, _ = losocv
    text = report.summary_md.read_text()
    assert text == report.markdown
    assert ("| Left-out site | n | WM voxel Dice | WM cluster Dice | BG voxel Dice "
            "| BG cluster Dice |") in text
    assert "## Per site" in text and "| Site | n |" in text
    mean_row = next(line for line in text.splitlines() if line.startswith("| mean ± sd |"))
    assert mean_row.count("±") == 1 + len(METRICS)  # the label and one mean ± sd per metric
    assert sum(line.startswith("| siteA | 2 |") for line in text.splitlines()) == 2
    assert "| all subjects | 4 |" in text
    for metric, _ in METRICS:
        mean, sd = report.overall[metric]
        assert 0.0 <= mean <= 1.0 and sd >= 0.0
        assert f"{mean:.3f} ± {sd:.3f}" in mean_row


def test_boxplot_is_a_png(losocv):
    from PIL import Image

    _, report, _, _, _ = losocv
    assert report.boxplot_png.stat().st_size > 10_000
    with Image.open(report.boxplot_png) as im:
        assert im.format == "PNG"
        assert im.width >= 800 and im.height >= 600


def test_splits_file_is_created_once_and_reused(losocv):
    store_path, report, _, raw, mtime = losocv
    with CorrectionsStore.open(store_path, writable=True) as store:
        gen = evaluate(store, "losocv", config=CFG, out_dir=report.out_dir / "again")
        first = next(gen)
        gen.close()  # the splits are settled before any training starts
    assert first.kind == "splits" and str(report.splits_path) in first.message
    assert report.splits_path.read_bytes() == raw
    assert report.splits_path.stat().st_mtime_ns == mtime
    assert sorted(p.name for p in report.splits_path.parent.iterdir()) == ["losocv.json"]


def test_saved_splits_must_fit_the_store(tmp_path, cohort, phantom_store):
    corrected = ("siteA01", "siteA02")
    with phantom_store(corrected=corrected, path=tmp_path / "s.pvs.zarr") as store:
        with pytest.raises(PVSInputError, match="at least 2 sites"):
            next(evaluate(store, "losocv", config=CFG, out_dir=tmp_path / "out"))
        gen = evaluate(store, "kfold:2", config=CFG, out_dir=tmp_path / "out", seed=3)
        assert next(gen).kind == "splits"
        gen.close()
        path = store.path / "splits" / "kfold2_seed3.json"
        saved = json.loads(path.read_text())
        assert sorted(s for f in saved for s in f["val"]) == list(corrected)
        # a subject corrected later is left out, with a warning, and the file is kept
        labels = load_volume(cohort[3].labels, as_labels=True).data
        store.commit_labels("siteB02", labels, author="t")
        gen = evaluate(store, "kfold:2", config=CFG, out_dir=tmp_path / "out", seed=3)
        with pytest.warns(UserWarning, match="siteB02"):
            assert "left out" in next(gen).message
        gen.close()
        assert json.loads(path.read_text()) == saved
        # a listed subject that lost its corrected labels is an error that says what to do
        saved[0]["val"].append("siteZ09")
        path.write_text(json.dumps(saved))
        with pytest.raises(PVSInputError, match="siteZ09.*delete"):
            next(evaluate(store, "kfold:2", config=CFG, out_dir=tmp_path / "out", seed=3))
        with pytest.raises(PVSInputError, match="unknown evaluation scheme"):
            next(evaluate(store, "leave-one-out", config=CFG, out_dir=tmp_path / "out"))
    assert not (tmp_path / "s.pvs.zarr" / "splits" / "losocv.json").exists()


def test_parser_defaults_and_bad_scheme(capsys):
    args = _parser().parse_args(["evaluate", "--store", "s.pvs.zarr", "--scheme", "kfold:5"])
    assert (args.scheme, args.iterations, args.patch, args.lr, args.seed) == (
        "kfold:5", 200, 48, 3e-4, 12345)
    assert args.out is None and args.init is None and args.batch_size == 2 and callable(args.func)
    with pytest.raises(SystemExit):
        _parser().parse_args(["evaluate", "--store", "s", "--scheme", "kfold:one"])
    assert "kfold" in capsys.readouterr().err


def test_cli_kfold2_writes_results_and_prints_the_summary(tmp_path, cohort, phantom_store,
                                                         capsys):
    phantom_store(path=tmp_path / "s.pvs.zarr").close()
    args = _parser().parse_args([
        "evaluate", "--store", str(tmp_path / "s.pvs.zarr"), "--scheme", "kfold:2",
        "--iterations", "1", "--batch-size", "1", "--patch", "32", "--out", str(tmp_path / "out")])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "fold 0 (1/2" in out and "fold 1 (2/2" in out
    assert "| Fold | n |" in out and "| mean ± sd |" in out and "| fold 1 |" in out
    splits = json.loads((tmp_path / "s.pvs.zarr" / "splits" / "kfold2_seed12345.json").read_text())
    assert len(splits) == 2 and sorted(s for f in splits for s in f["val"]) == sorted(
        s.subject for s in cohort)
    with open(tmp_path / "out" / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 4 and {r["fold"] for r in rows} == {"0", "1"}
    assert (tmp_path / "out" / "boxplot.png").is_file()
