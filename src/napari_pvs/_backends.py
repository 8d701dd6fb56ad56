"""Run the segmentation network on fixed-size windows, as fast as this machine allows.

:func:`make_runner` turns a network (a torch module in eval mode) into a
:class:`WindowRunner`, a callable mapping a float32 batch ``(B, C_in, *window)`` to
float32 logits ``(B, C_out, *window)``.  Backends:

``torch``
    PyTorch eager under ``torch.inference_mode`` on any device; float16 autocast on CUDA.
``openvino``, ``onnxruntime``
    CPU only.  The network is exported once to ONNX (TorchScript exporter, opset 17,
    batch and spatial axes dynamic, traced on a small input: a static 128^3 export of
    MedNeXt-L needed over 23 GB of RAM).  OpenVINO reshapes the model to the static
    ``(batch_size, C_in, *window)`` and computes in float32 (on CPUs with bfloat16 its
    default precision changes logits by ~5e-2).  ONNX Runtime runs the dynamic model
    without its memory arena (which took 12 GB for one 128^3 MedNeXt-L window).

``backend="auto"`` on the CPU takes the first of :data:`AUTO_ORDER` that is installed
and works (the measured speed order, ``benchmarks/bench_backends.py``).  A runtime that
fails to export, load or reproduce torch's logits is skipped with a ``RuntimeWarning``.
When none is installed (OpenVINO and onnx are requirements of the package, but only
where they publish wheels), the first such runner of the process prints one line on
stderr saying so, how much slower torch is, and how to install OpenVINO.

Export cache: with a ``cache_key`` (e.g. the checkpoint's sha256) the export lives in
``<cache_dir>/exports/<cache_key>/<exporter tag>/`` as ``model.onnx``, ``probe.npz``
(a fixed input and torch's logits for it) and ``manifest.json`` (size and sha256 of
the ONNX file, fingerprint of the weights).  The folder is written under a temporary
name and renamed into place, so a killed process never leaves a partial export.  Each
new runner checks the file against the manifest and the runtime's logits for the probe
against torch's; a failed check deletes the folder and exports again.  Without a
``cache_key`` the export goes to a temporary folder removed with the runner.

CPU threads: ``torch.get_num_threads()`` (PyTorch's default, the physical cores
available to the process) unless ``NAPARI_PVS_NUM_THREADS`` is set.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import warnings
import weakref
from functools import cache
from pathlib import Path

import numpy as np

from ._device import num_threads, pick_device
from ._onnx_cache import (
    ExportError,
    OnnxExport,
    export_dir,
    export_onnx,
    in_channels,
    read_export,
    weights_fingerprint,
)

__all__ = [
    "AUTO_ORDER",
    "BACKENDS",
    "WindowRunner",
    "available_backends",
    "default_cache_dir",
    "make_runner",
    "pick_device",
]

BACKENDS = ("torch", "onnxruntime", "openvino")
#: Preference of ``backend="auto"`` on the CPU, fastest first (measured, see module doc).
AUTO_ORDER = ("openvino", "onnxruntime", "torch")
_INSTALL = {
    "openvino": 'pip install "napari-pvs[cpu]"  (installs openvino and onnx)',
    "onnxruntime": "pip install onnxruntime onnx",
}
#: torch's time per window over OpenVINO's on the CPU (README, "Seconds per window, by
#: runtime": XS 1.6x, S 3.9x, L-k5 4.4x)
_TORCH_SLOWER = "1.6-4.4x slower"
_PROBE_RTOL = 1e-3  # allowed |runtime - torch| relative to max(1, max |torch logits|)


# ----------------------------------------------------------------------------- public


class WindowRunner:
    """Computes the network's logits for a batch of windows.

    Attributes
    ----------
    name : str
        ``"torch"``, ``"onnxruntime"`` or ``"openvino"``.
    batch_size : int
        Largest batch accepted by :meth:`__call__`.
    window : tuple of int
        Spatial shape ``(z, y, x)`` of every window.
    device : str
        Where the network runs (``"cpu"`` for the export-based backends).
    in_channels : int
        Number of input channels the network expects.
    exported : bool
        True when making this runner exported the network (no cached export used).
    export_path : pathlib.Path or None
        The ONNX file run by an export-based backend.

    Notes
    -----
    A runner is not thread-safe: call it from one thread at a time.
    """

    name = "torch"

    def __init__(self, *, window, batch_size, in_channels, device="cpu"):
        self.window = tuple(int(w) for w in window)
        self.batch_size = int(batch_size)
        self.in_channels = int(in_channels)
        self.device = str(device)
        self.exported = False
        self.export_path: Path | None = None

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """Logits of a batch.

        Parameters
        ----------
        batch : numpy.ndarray
            ``(B, C_in, *window)`` with ``1 <= B <= batch_size``; converted to float32.

        Returns
        -------
        numpy.ndarray
            float32 logits ``(B, C_out, *window)``.
        """
        x = np.ascontiguousarray(batch, dtype=np.float32)
        want = f"(B <= {self.batch_size}, {self.in_channels}, {', '.join(map(str, self.window))})"
        if (x.ndim != 5 or tuple(x.shape[2:]) != self.window or x.shape[1] != self.in_channels
                or not 1 <= x.shape[0] <= self.batch_size):
            raise ValueError(f"{self.name} runner: batch has shape {x.shape}, expected {want}")
        return self._run(x)

    def _run(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _probe(self, x: np.ndarray) -> np.ndarray:
        """Logits of ``x`` of any shape (used to check an export against torch)."""
        return self._run(x)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, window={self.window}, "
                f"batch_size={self.batch_size}, device={self.device!r})")


def default_cache_dir() -> Path:
    """Folder for napari-pvs caches.

    Returns
    -------
    pathlib.Path
        ``$NAPARI_PVS_CACHE``, else ``$XDG_CACHE_HOME/napari-pvs``, else
        ``~/.cache/napari-pvs`` (not created here).
    """
    env = os.environ.get("NAPARI_PVS_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "napari-pvs"


def available_backends() -> list[str]:
    """Backends usable in this environment, ``"torch"`` first.

    Returns
    -------
    list of str
        ``"torch"``, plus ``"onnxruntime"`` and ``"openvino"`` when the runtime and
        the ``onnx`` package (needed by torch's ONNX exporter) import.
    """
    return ["torch"] + [name for name in BACKENDS[1:] if _importable(name)]


def make_runner(net, *, window, batch_size: int = 1, device: str = "cpu",
                backend: str = "auto", cache_key: str | None = None,
                cache_dir: str | os.PathLike[str] | None = None) -> WindowRunner:
    """Make a :class:`WindowRunner` for ``net`` on windows of one fixed shape.

    Parameters
    ----------
    net : torch.nn.Module
        The network, in eval mode; it is moved to ``device``.
    window : sequence of 3 int
        Spatial shape of the windows.
    batch_size : int
        Largest batch the runner is called with.
    device : str
        ``"cpu"``, ``"cuda"``, ``"cuda:0"``, ``"mps"`` ...
    backend : {"auto", "torch", "onnxruntime", "openvino"}
        ``"auto"``: on the CPU the fastest working backend of :data:`AUTO_ORDER`,
        elsewhere torch.
    cache_key : str, optional
        Identifies the weights (e.g. the checkpoint's sha256); exports are cached
        under it.  None exports into a temporary folder, every time.
    cache_dir : path-like, optional
        Cache root; :func:`default_cache_dir` when None.

    Returns
    -------
    WindowRunner

    Raises
    ------
    ValueError
        Unknown backend or device, a backend that is not installed, or an
        export-based backend on a device other than the CPU.
    RuntimeError
        An explicitly requested ONNX Runtime or OpenVINO backend failed to export,
        load, or reproduce torch's logits.
    """
    # 37 lines of code: over 60 lines only through the numpydoc docstring above
    window = tuple(int(w) for w in window)
    if len(window) != 3 or min(window) < 1 or int(batch_size) < 1:
        raise ValueError(f"window must be 3 positive sizes and batch_size >= 1, got "
                         f"{window} and {batch_size}")
    backend = str(backend).lower()
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose 'auto' or one of {list(BACKENDS)}")
    dev = pick_device(device).split(":")[0]
    net.eval()
    if backend == "torch" or (backend == "auto" and dev != "cpu"):
        return _TorchRunner(net, window=window, batch_size=batch_size, device=device)
    if backend != "auto":
        if dev != "cpu":
            raise ValueError(f"backend {backend!r} runs on the CPU only, but device is "
                             f"{device!r}; use backend='torch' (or 'auto') on {device!r}")
        if not _importable(backend):
            raise ValueError(f"backend {backend!r} is not installed; {_INSTALL[backend]}")
        try:
            return _export_runner(backend, net, window, batch_size, cache_key, cache_dir)
        except Exception as exc:  # runtimes raise their own types; report them as one
            raise RuntimeError(f"the {backend} backend failed ({type(exc).__name__}: {exc}); "
                               "backend='torch' always works") from exc
    runtimes = [name for name in AUTO_ORDER if name != "torch" and _importable(name)]
    if not runtimes:
        _note_not_installed()
    for name in runtimes:
        try:
            return _export_runner(name, net, window, batch_size, cache_key, cache_dir)
        except ExportError as exc:
            warnings.warn(f"napari-pvs: cannot export the network for {name} ({exc}); "
                          f"using torch ({_TORCH_SLOWER} than OpenVINO)", RuntimeWarning,
                          stacklevel=2)
            break  # every other runtime needs the same export
        except Exception as exc:  # an optional runtime must never fail the prediction
            warnings.warn(f"napari-pvs: the {name} backend failed ({type(exc).__name__}: "
                          f"{exc}); trying the next backend", RuntimeWarning, stacklevel=2)
    return _TorchRunner(net, window=window, batch_size=batch_size, device=device)


# ----------------------------------------------------------------------------- runners


class _TorchRunner(WindowRunner):
    name = "torch"

    def __init__(self, net, *, window, batch_size, device):
        import torch

        super().__init__(window=window, batch_size=batch_size, in_channels=in_channels(net),
                         device=device)
        self._device = torch.device(device)
        self._net = net.to(self._device).eval()

    def _run(self, x: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            t = torch.from_numpy(x).to(self._device)
            if self._device.type == "cuda":
                with torch.autocast("cuda", dtype=torch.float16):
                    y = self._net(t)
            else:
                y = self._net(t)
            if isinstance(y, (list, tuple)):  # deep supervision in training mode
                y = y[0]
            return y.float().cpu().numpy()


class _OrtRunner(WindowRunner):
    name = "onnxruntime"

    def __init__(self, path: Path, *, window, batch_size, in_channels):
        import onnxruntime as ort

        super().__init__(window=window, batch_size=batch_size, in_channels=in_channels)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = num_threads()
        opts.inter_op_num_threads = 1
        opts.enable_cpu_mem_arena = False
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        self._session = ort.InferenceSession(str(path), opts,
                                             providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0].name

    def _run(self, x: np.ndarray) -> np.ndarray:  # the model is dynamic: no padding
        return np.asarray(self._session.run(None, {self._input: x})[0], dtype=np.float32)


class _OvRunner(WindowRunner):
    name = "openvino"

    def __init__(self, path: Path, *, window, batch_size, in_channels):
        import openvino as ov

        super().__init__(window=window, batch_size=batch_size, in_channels=in_channels)
        self._path = path
        self._core = ov.Core()
        self._request = self._compile((self.batch_size, in_channels, *self.window))

    def _compile(self, shape):
        model = self._core.read_model(str(self._path))
        model.reshape(list(shape))  # static shapes: OpenVINO's fast path
        config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY",
                  "INFERENCE_NUM_THREADS": num_threads()}
        return self._core.compile_model(model, "CPU", config).create_infer_request()

    def _run(self, x: np.ndarray) -> np.ndarray:
        n = x.shape[0]
        if n < self.batch_size:  # the compiled batch is fixed: pad with zeros
            pad = np.zeros((self.batch_size - n, *x.shape[1:]), np.float32)
            x = np.concatenate([x, pad])
        out = self._request.infer({0: x})[0]  # a copy (share_outputs=False)
        return np.asarray(out[:n], dtype=np.float32)

    def _probe(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self._compile(x.shape).infer({0: x})[0], dtype=np.float32)


_RUNNERS = {"onnxruntime": _OrtRunner, "openvino": _OvRunner}


# ----------------------------------------------------------------------------- export


def _export_runner(backend, net, window, batch_size, cache_key, cache_dir) -> WindowRunner:
    """Runner of an export-based backend; a bad cached export is deleted and redone."""
    net.to("cpu")
    c_in = in_channels(net)
    fingerprint = weights_fingerprint(net)
    if cache_key is None:
        scratch = Path(tempfile.mkdtemp(prefix="napari-pvs-export-"))
        try:
            entry = export_onnx(net, scratch / "export", fingerprint)
            runner = _checked_runner(backend, entry, window, batch_size, c_in)
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            raise
        weakref.finalize(runner, shutil.rmtree, scratch, True)
        runner.exported = True
        return runner
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    folder = export_dir(root, cache_key)
    if folder.exists():
        try:
            return _checked_runner(backend, read_export(folder, fingerprint), window,
                                   batch_size, c_in)
        except Exception as exc:  # corrupt or stale entry, whatever error the runtime raises
            warnings.warn(f"napari-pvs: discarding the cached export {folder} "
                          f"({type(exc).__name__}: {exc}); exporting again",
                          RuntimeWarning, stacklevel=3)
            shutil.rmtree(folder, ignore_errors=True)
    entry = export_onnx(net, folder, fingerprint)
    runner = _checked_runner(backend, entry, window, batch_size, c_in)
    runner.exported = True
    return runner


def _checked_runner(backend, entry: OnnxExport, window, batch_size, c_in) -> WindowRunner:
    """Load ``entry`` in ``backend`` and check its logits for the probe against torch's."""
    runner = _RUNNERS[backend](entry.onnx, window=window, batch_size=batch_size,
                               in_channels=c_in)
    got = runner._probe(entry.probe_x)
    if got.shape != entry.probe_y.shape:
        raise RuntimeError(f"{backend} returned shape {got.shape} for the probe, torch "
                           f"{entry.probe_y.shape}")
    err = float(np.max(np.abs(got - entry.probe_y)))
    tol = _PROBE_RTOL * max(1.0, float(np.max(np.abs(entry.probe_y))))
    if not err <= tol:  # also catches NaN
        raise RuntimeError(f"{backend} logits differ from torch's by {err:.3g} (> {tol:.3g})")
    runner.export_path = entry.onnx
    return runner


# ----------------------------------------------------------------------------- helpers

_noted = False  # the "not installed" line has been printed in this process


def _note_not_installed() -> None:
    """One line on stderr, the first time CPU prediction runs on torch because neither
    OpenVINO nor ONNX Runtime imports: why, the cost, and the fix."""
    global _noted
    if _noted:
        return
    _noted = True
    what = {"openvino": "OpenVINO is not installed",
            "onnx": "onnx (which torch's ONNX exporter needs) is not installed",
            }.get(_missing("openvino"), "OpenVINO does not load")
    fix = ("pip install openvino onnx" if _wheels_here() else
           "OpenVINO publishes no wheels for this platform; use a GPU or the XS/S models")
    print(f"napari-pvs: warning: {what}: running on torch, {_TORCH_SLOWER} on the CPU than "
          f"OpenVINO (benchmarks/bench_backends.py); {fix}", file=sys.stderr, flush=True)


def _wheels_here() -> bool:
    """Whether the package's openvino requirement applies to this platform (its marker);
    True when the installed metadata cannot be read."""
    from importlib import metadata

    try:
        from packaging.requirements import InvalidRequirement, Requirement

        reqs = metadata.requires("napari-pvs") or []
    except (ImportError, metadata.PackageNotFoundError):
        return True
    for text in reqs:
        try:
            req = Requirement(text)
        except InvalidRequirement:
            continue
        if req.name == "openvino" and (req.marker is None
                                       or "extra" not in str(req.marker)):
            return req.marker is None or req.marker.evaluate({"extra": ""})
    return True


def _missing(name: str) -> str | None:
    """The module that keeps the runtime ``name`` from importing, or None; ``"?"`` for
    a runtime that is installed but fails to load (OSError: missing shared libraries)."""
    for module in (name, "onnx"):  # torch's ONNX exporter needs onnx
        try:
            __import__(module)
        except ImportError:
            return module
        except OSError:
            return "?"
    return None


@cache
def _importable(name: str) -> bool:
    return name == "torch" or _missing(name) is None
