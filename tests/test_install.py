"""A plain ``pip install napari-pvs`` brings the fast CPU runtime where it has wheels."""

from __future__ import annotations

import platform
import sys
from importlib import metadata

import pytest
from packaging.requirements import Requirement

from napari_pvs import _backends

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
