"""Export a network to ONNX once and keep it in a cache folder that checks itself.

Used by :mod:`napari_pvs._backends`.  One export serves every window and batch size:
batch and spatial axes are dynamic, and the trace runs on a small input (a static
128^3 export of MedNeXt-L needed more than 23 GB of RAM).  A cache entry is a folder
``model.onnx``, ``probe.npz`` (a fixed input and torch's logits for it) and
``manifest.json`` (size and sha256 of the ONNX file, fingerprint of the weights),
written under a temporary name and renamed into place.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import re
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ._fs import atomic_dir, sha256_file

__all__ = [
    "CacheInvalid",
    "ExportError",
    "OnnxExport",
    "cached_exports",
    "clean_exports",
    "export_dir",
    "export_onnx",
    "in_channels",
    "read_export",
    "weights_fingerprint",
]

_OPSET = 17
_EXPORT_FORMAT = 1  # bump to invalidate every cached export
_TRACE_SPATIAL = (32, 32, 48)  # traced input (batch 2); distinct sizes keep axes dynamic
_PROBE_SPATIAL = (48, 32, 32)  # checked input (batch 1); differs from the traced one
_STALE_TMP_S = 24 * 3600


class ExportError(RuntimeError):
    """torch could not export the network to ONNX (no ONNX runtime can help)."""


class CacheInvalid(RuntimeError):
    """A cached export is unreadable, corrupt or made from other weights."""


@dataclass
class OnnxExport:
    """An ONNX file and the probe that checks a runtime against torch."""

    onnx: Path
    probe_x: np.ndarray
    probe_y: np.ndarray


def export_onnx(net, folder: Path, fingerprint: str) -> OnnxExport:
    """Export ``net`` into ``folder`` (written under a temporary name, then renamed)."""
    import torch

    c_in = in_channels(net)
    folder.parent.mkdir(parents=True, exist_ok=True)
    _sweep_tmp(folder.parent)
    try:
        with atomic_dir(folder) as tmp:
            tmp.mkdir()
            gen = torch.Generator().manual_seed(0)
            trace_x = torch.randn((2, c_in, *_TRACE_SPATIAL), generator=gen)
            probe_x = torch.randn((1, c_in, *_PROBE_SPATIAL), generator=gen)
            axes = {0: "batch", 2: "z", 3: "y", 4: "x"}
            kwargs = {"opset_version": _OPSET, "input_names": ["image"], "output_names": ["logits"],
                      "dynamic_axes": {"image": axes, "logits": axes}}
            if "dynamo" in inspect.signature(torch.onnx.export).parameters:  # torch >= 2.5
                kwargs["dynamo"] = False  # the TorchScript exporter: needs onnx, not onnxscript
            try:
                with warnings.catch_warnings(), torch.no_grad():
                    warnings.simplefilter("ignore")  # exporter deprecation and tracer chatter
                    torch.onnx.export(net, (trace_x,), str(tmp / "model.onnx"), **kwargs)
            except Exception as exc:  # the exporter raises many types; report them as one
                raise ExportError(f"{type(exc).__name__}: {exc}") from exc
            with torch.inference_mode():
                probe_y = net(probe_x)
            if isinstance(probe_y, (list, tuple)):
                probe_y = probe_y[0]
            np.savez(tmp / "probe.npz", x=probe_x.numpy(), y=probe_y.float().numpy())
            manifest = {"format": _EXPORT_FORMAT, "torch": torch.__version__, "opset": _OPSET,
                        "weights": fingerprint, "onnx_size": (tmp / "model.onnx").stat().st_size,
                        "onnx_sha256": sha256_file(tmp / "model.onnx"), "created": time.time()}
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    except OSError:  # another process published it first: keep theirs if it is good
        if not folder.is_dir():
            raise
    return read_export(folder, fingerprint)


def read_export(folder: Path, fingerprint: str) -> OnnxExport:
    """Check a cached export against its manifest; raise :class:`CacheInvalid` if bad."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
        onnx_path = folder / "model.onnx"
        size = onnx_path.stat().st_size
        with np.load(folder / "probe.npz") as probe:
            entry = OnnxExport(onnx_path, probe["x"], probe["y"])
    except (OSError, ValueError, KeyError) as exc:
        raise CacheInvalid(f"unreadable ({type(exc).__name__}: {exc})") from None
    if manifest.get("format") != _EXPORT_FORMAT or manifest.get("weights") != fingerprint:
        raise CacheInvalid("made by another napari-pvs version or from other weights")
    if size != manifest.get("onnx_size") or sha256_file(onnx_path) != manifest.get("onnx_sha256"):
        raise CacheInvalid("model.onnx does not match its manifest (truncated or modified)")
    return entry


def export_dir(root: Path, cache_key: str) -> Path:
    """Cache folder of the export of the weights called ``cache_key`` under ``root``."""
    import torch

    key = str(cache_key)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", key):
        key = hashlib.sha256(key.encode()).hexdigest()
    tag = re.sub(r"[^A-Za-z0-9._-]", "_",
                 f"onnx{_OPSET}-f{_EXPORT_FORMAT}-torch{torch.__version__}")
    return Path(root) / "exports" / key / tag


def _size(path: Path) -> int:
    """Bytes of the files under ``path`` (files that vanish meanwhile count as 0)."""
    total = 0
    for f in path.rglob("*"):
        try:
            total += f.stat().st_size if f.is_file() else 0
        except OSError:
            continue
    return total


def cached_exports(root: Path) -> list[tuple[Path, int]]:
    """Every export folder under ``root`` (and every temporary one a killed export left
    behind), with its size in bytes, largest first."""
    exports = Path(root) / "exports"
    if not exports.is_dir():
        return []
    found = [p for key in exports.iterdir() if key.is_dir() for p in key.iterdir() if p.is_dir()]
    return sorted(((p, _size(p)) for p in found), key=lambda e: (-e[1], str(e[0])))


def clean_exports(root: Path, dry_run: bool = False) -> list[tuple[Path, int]]:
    """Remove the cached exports under ``root`` (see :func:`cached_exports`); returns
    what was (with ``dry_run``: would be) removed.  A later prediction exports again."""
    entries = cached_exports(root)
    if dry_run:
        return entries
    for path, _ in entries:
        shutil.rmtree(path)
        try:
            path.parent.rmdir()  # the weights' folder, once it holds no export
        except OSError:
            pass
    return entries


def _sweep_tmp(parent: Path) -> None:
    """Remove temporary export folders left behind by killed processes."""
    now = time.time()
    for tmp in parent.glob(".tmp-*"):
        try:
            if now - tmp.stat().st_mtime > _STALE_TMP_S:
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            continue


def in_channels(net) -> int:
    """Input channels of a network whose first 5-D parameter is its stem convolution."""
    for p in net.parameters():
        if p.ndim == 5:
            return int(p.shape[1])
    raise ValueError("cannot tell the network's input channels: it has no 3-D convolution")


def weights_fingerprint(net) -> str:
    """sha256 over the names, dtypes, shapes and bytes of the state dict."""
    import torch

    h = hashlib.sha256(type(net).__name__.encode())
    for name, t in net.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()
