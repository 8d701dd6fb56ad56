"""Shared pytest fixtures.

GUI tests (``-m gui``) open a real napari viewer, which needs an X server with
OpenGL: run them as ``xvfb-run -a pytest``.  Without any display, Qt is put on
the ``offscreen`` platform so that a missing display fails those tests instead
of aborting the whole run; ``pytest -m "not gui"`` runs the rest.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

_NO_DISPLAY = (
    sys.platform.startswith("linux")
    and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
    and "QT_QPA_PLATFORM" not in os.environ
)
if _NO_DISPLAY:
    os.environ["QT_QPA_PLATFORM"] = "offscreen"


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Fail GUI tests up front, with the fix, when there is no display at all."""
    if _NO_DISPLAY and item.get_closest_marker("gui") is not None:
        pytest.fail(
            "GUI test needs an X server with OpenGL for napari's canvas: run "
            "`xvfb-run -a pytest ...`, or deselect GUI tests with -m 'not gui'",
            pytrace=False,
        )


NIBABEL_DATA = Path(__file__).parent / "data" / "nibabel"


@pytest.fixture(autouse=True, scope="session")
def _private_export_cache(tmp_path_factory):
    """Keep the CPU runtimes' export cache of the tests out of ~/.cache."""
    old = os.environ.get("NAPARI_PVS_CACHE")
    os.environ["NAPARI_PVS_CACHE"] = str(tmp_path_factory.mktemp("napari-pvs-cache"))
    yield
    if old is None:
        os.environ.pop("NAPARI_PVS_CACHE", None)
    else:
        os.environ["NAPARI_PVS_CACHE"] = old


def _rotation(axis: int, degrees: float) -> np.ndarray:
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    i, j = [a for a in range(3) if a != axis]
    rot = np.eye(3)
    rot[i, i], rot[i, j], rot[j, i], rot[j, j] = c, -s, s, c
    return rot


def oblique_affines() -> tuple[np.ndarray, np.ndarray]:
    """An oblique sform (18 deg about x, then 15 deg about z, anisotropic zooms)
    and a qform with the same rotation but a different translation."""
    zooms = np.array([0.9, 1.1, 1.6])
    sform = np.eye(4)
    sform[:3, :3] = _rotation(2, 15.0) @ _rotation(0, 18.0) @ np.diag(zooms)
    sform[:3, 3] = [-80.5, -110.25, -60.0]
    qform = sform.copy()
    qform[:3, 3] = [-78.0, -105.0, -55.5]
    return sform, qform


@pytest.fixture
def nibabel_data() -> Path:
    """Folder with the nibabel test files (see its README.md)."""
    return NIBABEL_DATA


@pytest.fixture
def oblique_nifti(tmp_path: Path) -> Path:
    """A 3D float32 NIfTI-1 file: oblique sform (code 2) and qform (code 1)."""
    sform, qform = oblique_affines()
    rng = np.random.default_rng(0)
    data = rng.normal(100.0, 20.0, size=(12, 10, 8)).astype(np.float32)
    img = nib.Nifti1Image(data, sform)
    img.header.set_sform(sform, code=2)
    img.header.set_qform(qform, code=1)
    path = tmp_path / "oblique_T2w.nii.gz"
    nib.save(img, path)
    return path


sys.path.insert(0, str(Path(__file__).parent))  # test helpers such as _cluster_reference


@pytest.fixture(scope="session")
def phantom_cohort(tmp_path_factory):
    """``phantom_cohort(n_sites=2, per_site=2, size_mm=48, seed=0)``: a phantom cohort
    written in the dataset layout (a list of ``SubjectFiles``).  Each setting is written
    once per session and shared: do not modify its files (copy the folder first)."""
    from napari_pvs.dataset import write_phantom_cohort

    written: dict[tuple, list] = {}

    def make(n_sites: int = 2, per_site: int = 2, size_mm: float = 48, seed: int = 0) -> list:
        key = (n_sites, per_site, float(size_mm), seed)
        if key not in written:
            root = tmp_path_factory.mktemp(f"cohort{n_sites}x{per_site}_{size_mm:g}mm")
            written[key] = write_phantom_cohort(root, n_sites=n_sites, per_site=per_site,
                                                size_mm=size_mm, seed=seed)
        return written[key]

    return make


@pytest.fixture(scope="session")
def phantom_store(tmp_path_factory, phantom_cohort):
    """``phantom_store(n_sites=2, per_site=2, size_mm=48, *, seed=0, corrected=None,
    path=None)``: a new corrections store of a phantom cohort (see ``phantom_cohort``),
    each subject's image and region map imported and its true labels committed as
    version 1 for the subjects in ``corrected`` (default: all).  Returns the store,
    open and writable; every store still open is closed at the end of the session.
    ``path`` (default: a new folder) is where the store goes."""
    from napari_pvs.dataset import store_from_cohort

    opened = []

    def make(n_sites: int = 2, per_site: int = 2, size_mm: float = 48, *, seed: int = 0,
             corrected=None, path=None):
        cohort = phantom_cohort(n_sites, per_site, size_mm, seed)
        path = path or tmp_path_factory.mktemp("store") / "s.pvs.zarr"
        store = store_from_cohort(path, cohort, corrected, author="t")
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()


@pytest.fixture(scope="session")
def imported_release(tmp_path_factory) -> Path:
    """The release-format fixture imported once with ``napari-pvs model import-nnunet``:
    ``fold_0.safetensors``, ``fold_1.safetensors`` and ``ensemble.json`` in this folder."""
    from _helpers import MEDNEXT_RELEASE

    from napari_pvs.cli import main

    out = tmp_path_factory.mktemp("imported")
    assert main(["model", "import-nnunet", str(MEDNEXT_RELEASE), str(out)]) == 0
    return out
