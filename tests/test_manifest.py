"""Packaging: the npe2 manifest ships in the package and every python_name imports;
the core imports no Qt."""

from __future__ import annotations

import importlib
import subprocess
import sys
from importlib.metadata import entry_points

import npe2
import pytest


def _manifest() -> npe2.PluginManifest:
    return npe2.PluginManifest.from_distribution("napari-pvs")


def test_manifest_is_found_through_the_entry_point_and_validates():
    (ep,) = [e for e in entry_points(group="napari.manifest") if e.name == "napari-pvs"]
    assert ep.value == "napari_pvs:napari.yaml"
    mf = _manifest()
    assert mf.name == "napari-pvs"
    npe2.PluginManifest.validate(mf.model_dump() if hasattr(mf, "model_dump") else mf.dict())
    assert {r.command for r in mf.contributions.readers} == {"napari-pvs.read_nifti",
                                                             "napari-pvs.read_store"}
    assert {s.key for s in mf.contributions.sample_data} == {"phantom_t2w", "phantom_t1w"}
    assert {w.display_name for w in mf.contributions.widgets} == {
        "Predict", "Review clusters", "Retrain", "Active-learning queue"}


@pytest.mark.parametrize("command", _manifest().contributions.commands, ids=lambda c: c.id)
def test_every_python_name_imports(command):
    module, _, attr = command.python_name.partition(":")
    assert callable(getattr(importlib.import_module(module), attr))


def test_core_and_training_import_without_qt():
    code = (
        "import sys, napari_pvs.io, napari_pvs.training, napari_pvs.phantom, napari_pvs.baseline, "
        "napari_pvs.metrics, napari_pvs.dataset, napari_pvs.cli, napari_pvs._reader, napari_pvs._writer, "
        "napari_pvs.model, napari_pvs.inference, napari_pvs.nnunet, napari_pvs.store, "
        "napari_pvs.pipeline, napari_pvs._backends, napari_pvs._store_reader, "
        "napari_pvs.training.trainer, napari_pvs.training.finetune, napari_pvs.training.evaluate, "
        "napari_pvs.preprocess, napari_pvs.network, napari_pvs._sliding, napari_pvs.review, "
        "napari_pvs.active, napari_pvs.training.job, "
        "napari_pvs.training.worker\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in "
        "('PyQt5', 'PyQt6', 'PySide2', 'PySide6', 'qtpy', 'torch')]\n"
        "print(','.join(bad))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == ""


def test_training_is_installed_as_a_subpackage():
    import napari_pvs.training as t

    assert t.__name__ == "napari_pvs.training"
    assert callable(t.losocv_splits)
