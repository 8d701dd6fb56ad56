"""Window backends: torch equals the network, runtimes agree with torch, export cache."""

from __future__ import annotations

import gc
import os
import time

import numpy as np
import pytest

from napari_pvs import _backends, _onnx_cache
from napari_pvs._backends import (
    AUTO_ORDER,
    available_backends,
    default_cache_dir,
    make_runner,
)

WINDOW = (32, 32, 32)
RUNTIMES = ["onnxruntime", "openvino"]


@pytest.fixture(scope="module")
def net():
    import torch

    from napari_pvs.model import arch_config, build_network

    torch.manual_seed(0)
    return build_network(arch_config("XS", 3)).eval()


@pytest.fixture(scope="module")
def batch_and_logits(net):
    import torch

    x = np.random.default_rng(0).standard_normal((2, 1, *WINDOW)).astype(np.float32)
    with torch.inference_mode():
        y = np.stack([net(torch.from_numpy(x[i : i + 1]))[0].numpy() for i in range(2)])
    return x, y


def _need(backend):
    if backend not in available_backends():
        pytest.skip(f"{backend} is not installed")


def test_torch_runner_equals_the_network(net):
    import torch

    x = np.random.default_rng(1).standard_normal((2, 1, *WINDOW)).astype(np.float32)
    runner = make_runner(net, window=WINDOW, batch_size=2, backend="torch")
    out = runner(x)
    with torch.inference_mode():
        ref = net(torch.from_numpy(x)).numpy()
    assert (runner.name, runner.batch_size, runner.window) == ("torch", 2, WINDOW)
    assert out.dtype == np.float32 and out.shape == (2, 2, *WINDOW)
    np.testing.assert_array_equal(out, ref)


@pytest.mark.parametrize("backend", RUNTIMES)
def test_runtime_agrees_with_torch_for_full_and_padded_batches(net, batch_and_logits, backend,
                                                               tmp_path):
    _need(backend)
    x, ref = batch_and_logits
    runner = make_runner(net, window=WINDOW, batch_size=2, backend=backend, cache_key="xs",
                         cache_dir=tmp_path)
    assert runner.name == backend and runner.exported
    one, two = runner(x[:1]), runner(x)  # a batch of 1 is padded to the static batch 2
    assert one.dtype == two.dtype == np.float32
    assert one.shape == (1, 2, *WINDOW) and two.shape == (2, 2, *WINDOW)
    np.testing.assert_allclose(one, ref[:1], atol=1e-4, rtol=0)
    np.testing.assert_allclose(two, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("backend", RUNTIMES)
def test_second_runner_reuses_the_cached_export(net, batch_and_logits, backend, tmp_path,
                                                monkeypatch):
    _need(backend)
    calls = []
    export = _backends.export_onnx
    monkeypatch.setattr(_backends, "export_onnx", lambda *a: calls.append(1) or export(*a))
    first = make_runner(net, window=WINDOW, batch_size=2, backend=backend, cache_key="k",
                        cache_dir=tmp_path)
    mtime = os.stat(first.export_path).st_mtime_ns
    # another window and batch size reuse the same (shape-dynamic) export
    second = make_runner(net, window=(48, 32, 32), batch_size=1, backend=backend,
                         cache_key="k", cache_dir=tmp_path)
    assert len(calls) == 1 and first.exported and not second.exported
    assert second.export_path == first.export_path
    assert os.stat(second.export_path).st_mtime_ns == mtime
    assert first.export_path.is_relative_to(tmp_path / "exports" / "k")
    x, ref = batch_and_logits
    np.testing.assert_allclose(make_runner(net, window=WINDOW, backend=backend, cache_key="k",
                                           cache_dir=tmp_path)(x[1:]), ref[1:], atol=1e-4)
    assert len(calls) == 1


@pytest.mark.parametrize("damage", ["truncate", "delete manifest"])
def test_corrupt_cached_export_is_exported_again(net, batch_and_logits, tmp_path, damage):
    backend = next((b for b in RUNTIMES if b in available_backends()), None)
    if backend is None:
        pytest.skip("no ONNX runtime installed")
    path = make_runner(net, window=WINDOW, backend=backend, cache_key="k",
                       cache_dir=tmp_path).export_path
    if damage == "truncate":
        with open(path, "r+b") as fh:
            fh.truncate(path.stat().st_size // 2)
    else:
        (path.parent / "manifest.json").unlink()
    with pytest.warns(RuntimeWarning, match="discarding the cached export"):
        runner = make_runner(net, window=WINDOW, backend=backend, cache_key="k",
                             cache_dir=tmp_path)
    assert runner.exported and runner.export_path == path
    x, ref = batch_and_logits
    np.testing.assert_allclose(runner(x[:1]), ref[:1], atol=1e-4)


def test_other_weights_under_the_same_key_are_exported_again(net, tmp_path):
    import torch

    backend = next((b for b in RUNTIMES if b in available_backends()), None)
    if backend is None:
        pytest.skip("no ONNX runtime installed")
    make_runner(net, window=WINDOW, backend=backend, cache_key="k", cache_dir=tmp_path)
    from napari_pvs.model import arch_config, build_network

    torch.manual_seed(1)
    other = build_network(arch_config("XS", 3)).eval()
    with pytest.warns(RuntimeWarning, match="other weights"):
        runner = make_runner(other, window=WINDOW, backend=backend, cache_key="k",
                             cache_dir=tmp_path)
    assert runner.exported


def test_without_cache_key_the_export_is_temporary(net):
    backend = next((b for b in RUNTIMES if b in available_backends()), None)
    if backend is None:
        pytest.skip("no ONNX runtime installed")
    runner = make_runner(net, window=WINDOW, backend=backend)
    path = runner.export_path
    assert runner.exported and path.is_file()
    del runner
    gc.collect()
    assert not path.exists()


def test_auto_on_cpu_picks_the_measured_fastest_runtime(net, tmp_path):
    assert AUTO_ORDER == ("openvino", "onnxruntime", "torch")
    expected = next(b for b in AUTO_ORDER if b in available_backends())
    runner = make_runner(net, window=WINDOW, device="cpu", cache_key="k", cache_dir=tmp_path)
    assert runner.name == expected


def test_auto_falls_back_to_torch_when_the_export_fails(net, tmp_path, monkeypatch):
    import torch

    if len(available_backends()) == 1:
        pytest.skip("no ONNX runtime installed")

    def broken(*args, **kwargs):
        raise RuntimeError("exporter exploded")

    monkeypatch.setattr(torch.onnx, "export", broken)
    with pytest.warns(RuntimeWarning, match="exporter exploded"):
        runner = make_runner(net, window=WINDOW, cache_key="k", cache_dir=tmp_path)
    assert runner.name == "torch"
    with pytest.raises(RuntimeError, match="exporter exploded"):
        make_runner(net, window=WINDOW, backend=available_backends()[1], cache_key="k2",
                    cache_dir=tmp_path)


def test_runtime_that_disagrees_with_torch_is_not_used(net, tmp_path, monkeypatch):
    if len(available_backends()) == 1:
        pytest.skip("no ONNX runtime installed")
    monkeypatch.setattr(_backends, "_PROBE_RTOL", -1.0)  # every comparison fails
    with pytest.warns(RuntimeWarning, match="differ from torch"):
        runner = make_runner(net, window=WINDOW, cache_key="k", cache_dir=tmp_path)
    assert runner.name == "torch"
    with pytest.raises(RuntimeError, match="differ from torch"):
        make_runner(net, window=WINDOW, backend=available_backends()[1])


def test_bad_backend_device_and_batch_raise_valueerror(net, monkeypatch):
    import torch

    with pytest.raises(ValueError, match="unknown backend 'tensorrt'"):
        make_runner(net, window=WINDOW, backend="tensorrt")
    with pytest.raises(ValueError, match="window must be"):
        make_runner(net, window=(32, 32), backend="torch")
    with pytest.raises(ValueError, match="unknown device"):
        make_runner(net, window=WINDOW, device="tpu9")
    monkeypatch.setattr(_backends, "_importable", lambda name: name == "torch")
    with pytest.raises(ValueError, match=r"not installed; pip install .*napari-pvs\[cpu\]"):
        make_runner(net, window=WINDOW, backend="openvino")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match="CPU only"):
        make_runner(net, window=WINDOW, backend="onnxruntime", device="cuda:0")
    runner = make_runner(net, window=WINDOW, batch_size=2, backend="torch")
    for shape in [(3, 1, *WINDOW), (1, 1, 32, 32, 16), (1, 2, *WINDOW), (1, *WINDOW)]:
        with pytest.raises(ValueError, match="expected"):
            runner(np.zeros(shape, np.float32))


def test_available_backends_and_cache_dir(monkeypatch, tmp_path):
    assert available_backends()[0] == "torch"
    assert set(available_backends()) <= {"torch", "onnxruntime", "openvino"}
    monkeypatch.setenv("NAPARI_PVS_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("NAPARI_PVS_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "napari-pvs"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == default_cache_dir().home() / ".cache" / "napari-pvs"


def test_killed_export_leaves_no_entry_and_old_temp_folders_are_swept(net, tmp_path):
    backend = next((b for b in RUNTIMES if b in available_backends()), None)
    if backend is None:
        pytest.skip("no ONNX runtime installed")
    folder = _onnx_cache.export_dir(tmp_path, "k")
    stale = folder.parent / f".tmp-{folder.name}-deadbeef"
    stale.mkdir(parents=True)
    (stale / "model.onnx").write_bytes(b"half")  # what a killed export leaves behind
    old = time.time() - 2 * _onnx_cache._STALE_TMP_S
    os.utime(stale, (old, old))
    assert not folder.exists()
    runner = make_runner(net, window=WINDOW, backend=backend, cache_key="k", cache_dir=tmp_path)
    assert runner.exported and not stale.exists()
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "model.onnx",
                                                        "probe.npz"]


@pytest.mark.parametrize(("blocked", "why", "fix"), [
    (("openvino", "onnxruntime"), "OpenVINO is not installed", "pip install openvino onnx"),
    (("onnx",), "onnx (which torch's ONNX exporter needs) is not installed",
     "pip install openvino onnx"),
    (("openvino", "onnxruntime", "no wheels"), "OpenVINO is not installed",
     "OpenVINO publishes no wheels for this platform"),
])
def test_auto_without_a_runtime_says_why_once_on_stderr(net, monkeypatch, capfd, blocked, why,
                                                        fix):
    import sys
    import warnings

    capfd.readouterr()
    try:
        with monkeypatch.context() as mp, warnings.catch_warnings():
            warnings.simplefilter("error")  # the notice is a line, not a warning
            for module in blocked:
                if module == "no wheels":
                    mp.setattr(_backends, "_wheels_here", lambda: False)
                else:
                    mp.setitem(sys.modules, module, None)  # `import module` raises ImportError
            mp.setattr(_backends, "_noted", False)
            _backends._importable.cache_clear()
            assert available_backends() == ["torch"]
            runners = [make_runner(net, window=WINDOW, device="cpu") for _ in range(3)]
            assert make_runner(net, window=WINDOW, backend="torch").name == "torch"
    finally:
        _backends._importable.cache_clear()
    assert [r.name for r in runners] == ["torch"] * 3
    out, err = capfd.readouterr()
    assert out == "" and "Traceback" not in err
    (line,) = err.splitlines()  # once per process, however many runners
    assert line.startswith(f"napari-pvs: warning: {why}: running on torch, 1.6-4.4x slower")
    assert fix in line.split("; ", 1)[1]


def test_a_working_runtime_prints_nothing(net, tmp_path, capfd, monkeypatch):
    if len(available_backends()) == 1:
        pytest.skip("no ONNX runtime installed")
    monkeypatch.setattr(_backends, "_noted", False)
    capfd.readouterr()
    assert make_runner(net, window=WINDOW, cache_key="k", cache_dir=tmp_path).name != "torch"
    assert capfd.readouterr().err == ""
