"""A plain ``pip install napari-pvs`` brings the fast CPU runtime where it has wheels, and
the shipped starter models."""

from __future__ import annotations

import platform
import shutil
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

import napari_pvs
from napari_pvs import _backends
from napari_pvs.model import STARTER_MODELS, read_meta, starter_path

#: (sys_platform, platform_machine) where OpenVINO publishes wheels (checked for 2026.4.1)
WHEELS = {("linux", "x86_64"), ("linux", "aarch64"), ("win32", "AMD64"), ("darwin", "arm64")}
NO_WHEELS = {("darwin", "x86_64"), ("win32", "ARM64"), ("linux", "ppc64le"), ("linux", "s390x")}


def _plain(name: str) -> Requirement:
    """The installed distribution's requirement ``name`` outside any extra."""
    reqs = [Requirement(r) for r in metadata.requires("napari-pvs") or []]
    plain = [r for r in reqs if r.name == name
             and (r.marker is None or "extra" not in str(r.marker))]
    assert len(plain) == 1, f"napari-pvs does not require {name} (outside an extra): {reqs}"
    return plain[0]


def _env(plat: str, machine: str, python: str = "3.11") -> dict[str, str]:
    return {"sys_platform": plat, "platform_machine": machine, "python_version": python,
            "extra": ""}


@pytest.mark.parametrize("name", ["openvino", "onnx"])
def test_the_runtime_is_a_requirement_where_it_has_wheels(name):
    marker = _plain(name).marker
    assert marker is not None
    for plat, machine in WHEELS:
        for python in ("3.10", "3.11", "3.14"):
            assert marker.evaluate(_env(plat, machine, python)), (plat, machine, python)
    for plat, machine in NO_WHEELS:
        assert not marker.evaluate(_env(plat, machine)), (plat, machine)
    assert not marker.evaluate(_env("linux", "x86_64", "3.15"))  # no wheels published yet
    # the `cpu` extra stays, an alias asking for the same packages
    extra = [Requirement(r) for r in metadata.requires("napari-pvs")
             if r.startswith(name) and 'extra == "cpu"' in r]
    assert len(extra) == 1


@pytest.mark.skipif((sys.platform, platform.machine()) not in WHEELS,
                    reason="OpenVINO publishes no wheels for this platform")
def test_a_plain_install_imports_openvino_here():
    for name in ("openvino", "onnx"):
        req = _plain(name)
        assert req.marker.evaluate({"extra": ""})  # this platform
        assert req.specifier.contains(metadata.version(name), prereleases=True)
    import onnx  # noqa: F401
    import openvino  # noqa: F401

    assert _backends.available_backends()[-1] == "openvino"
    assert _backends._wheels_here()


def test_the_starter_models_are_in_the_installed_package():
    """``--model starter`` finds its file where napari_pvs is imported from; a regular
    (not editable) install lists it in its RECORD too."""
    package = Path(napari_pvs.__file__).resolve().parent
    for name, file in STARTER_MODELS.items():
        assert starter_path(name) == package / "models" / file
        assert read_meta(starter_path(name))["arch"]["variant"]
    record = {str(f).replace("\\", "/") for f in metadata.files("napari-pvs") or []}
    if "napari_pvs/model.py" in record:  # the package's files are the distribution's own
        assert {f"napari_pvs/models/{f}" for f in STARTER_MODELS.values()} <= record


@pytest.mark.slow
def test_a_wheel_built_from_the_source_ships_the_starter_models(tmp_path):
    """``pip install .`` (not editable) builds this wheel: the models are in it, and
    ``starter_path`` finds them in an installation made from it."""
    pytest.importorskip("setuptools", reason="builds without isolation, with the venv's")
    source = Path(__file__).resolve().parents[1]
    if not (source / "pyproject.toml").is_file():
        pytest.skip("needs the source tree")
    root = tmp_path / "source"  # a copy: setuptools writes build/ beside pyproject.toml
    for name in ("src", "training"):
        shutil.copytree(source / name, root / name, symlinks=True,
                        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md", "napari.yaml"):
        shutil.copy(source / name, root / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", str(root), "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "wheel")], check=True, cwd=tmp_path,
                   capture_output=True)
    (wheel,) = (tmp_path / "wheel").glob("napari_pvs-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"napari_pvs/models/{f}" for f in STARTER_MODELS.values()} <= names
    assert "napari_pvs/napari.yaml" in names
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target",
                    str(tmp_path / "site"), str(wheel)], check=True, capture_output=True)
    code = ("from napari_pvs.model import STARTER_MODELS, starter_path\n"
            "print(*(starter_path(n) for n in STARTER_MODELS), sep='\\n')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=tmp_path, env={"PYTHONPATH": str(tmp_path / "site"),
                                          "PATH": "/usr/bin:/bin"}, check=True)
    assert r.stdout.split() == [str(tmp_path / "site" / "napari_pvs" / "models" / f)
                                for f in STARTER_MODELS.values()]
