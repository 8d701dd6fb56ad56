"""Checkpoints, fold ensembles and the model registry: the one place models are read and written.

Checkpoints
-----------
One ``.safetensors`` file: the weights (safetensors never unpickles anything) and, in
its header metadata under ``"napari_pvs"``, a JSON document::

    format, format_version, id, created,
    arch:          variant, kernel_size, in_channels, out_channels, n_channels, exp_r,
                   block_counts, deep_supervision_heads
    preprocessing: target_spacing, modality, normalization, patch_size
    provenance:    parent, data_versions, iterations, metrics, note

:func:`load_checkpoint` is the one way models are loaded.

Ensembles
---------
An ``ensemble.json`` (``napari-pvs-ensemble``) names member checkpoints beside it
(:func:`write_ensemble`, :func:`load_ensemble`); it loads as one module whose output is
the log of the members' mean softmax.

Starter models
--------------
Trained checkpoints ship inside the package, in ``napari_pvs/models/``, named in
:data:`STARTER_MODELS`: ``--model starter`` on the command line, the predict widget's
default.  :func:`starter_path` finds one; :func:`starter_models` lists them.

The network architectures (:func:`arch_config`, :func:`build_network`, ...) live in
:mod:`napari_pvs.network` and are re-exported here.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
from copy import deepcopy
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ._errors import PVSInputError
from ._fs import atomic_path, atomic_write_text, sha256_file
from .network import (
    FORMAT,
    FORMAT_VERSION,
    VARIANTS,
    _whole,
    arch_config,
    build_network,
    check_meta,
    check_spacing,
    count_parameters,
    default_meta,
    map_official_state_dict,
    upkern,
)

__all__ = [
    "ENSEMBLE_FORMAT",
    "FORMAT",
    "FORMAT_VERSION",
    "STARTER_MODELS",
    "VARIANTS",
    "ModelRegistry",
    "arch_config",
    "build_network",
    "check_meta",
    "check_spacing",
    "checkpoint_hash",
    "count_parameters",
    "default_meta",
    "load_checkpoint",
    "load_ensemble",
    "map_official_state_dict",
    "modality_mismatch",
    "read_meta",
    "save_checkpoint",
    "starter_models",
    "starter_path",
    "upkern",
    "upkern_checkpoint",
    "write_ensemble",
]

_META_KEY = "napari_pvs"
ENSEMBLE_FORMAT = "napari-pvs-ensemble"
MAX_ENSEMBLE_BYTES = 2**20

#: The models shipped in the package (``napari_pvs/models/``): name -> file name.  A
#: name is what ``--model`` and the predict widget take; adding a model is one entry
#: here and its file there.
STARTER_MODELS: dict[str, str] = {"starter": "starter_t2w.safetensors",
                                  "starter-fast": "starter_t2w_fast.safetensors"}
_STARTER_FOLDER = Path(__file__).resolve().parent / "models"  # editable and wheel alike


def _new_id(arch: dict[str, Any]) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    return f"mednext-{arch['variant'].lower()}k{arch['kernel_size']}-{stamp}-{uuid.uuid4().hex[:6]}"


def save_checkpoint(path: str | os.PathLike[str], net, meta: dict[str, Any],
                    extra_state: dict | None = None) -> Path:
    """Write ``net``'s weights and ``meta`` to one safetensors file, atomically.

    ``meta["id"]`` and ``meta["created"]`` are filled in when missing.  ``extra_state``
    (e.g. deep-supervision heads not owned by ``net``) is stored beside the weights.
    Returns the written path.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise PVSInputError(f"{path}: checkpoints are .safetensors files; rename the output")
    meta = deepcopy(meta)
    meta["format"], meta["format_version"] = FORMAT, FORMAT_VERSION
    meta["id"] = meta.get("id") or _new_id(meta["arch"])
    meta["created"] = meta.get("created") or datetime.now(timezone.utc).isoformat(timespec="seconds")
    tensors = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    if extra_state:
        tensors.update({k: v.detach().cpu().contiguous() for k, v in extra_state.items()})
    meta["arch"]["deep_supervision_heads"] = any(k.startswith("out_blocks.") for k in tensors)
    check_meta(meta, str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={_META_KEY: json.dumps(meta)})
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # safetensors creates 0600 files; use normal permissions
    return path


def read_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a checkpoint's metadata without loading its weights."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise PVSInputError(f"checkpoint {path} does not exist; check the path or `napari-pvs model ls`")
    try:
        with safe_open(str(path), framework="numpy") as fh:  # the header only: no torch
            raw = (fh.metadata() or {}).get(_META_KEY)
    except Exception as exc:  # safetensors raises its own SafetensorError, or OSError
        raise PVSInputError(
            f"{path} is not a readable safetensors checkpoint ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else 'corrupt'}); it may be truncated or corrupt"
        ) from None
    if raw is None:
        raise PVSInputError(f"{path} has no napari-pvs metadata; it was not written by napari-pvs")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise PVSInputError(f"{path}: the metadata is not valid JSON ({exc})") from None
    except RecursionError:
        raise PVSInputError(f"{path}: the metadata is nested too deeply; the file is corrupt "
                            "or was not written by napari-pvs") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise PVSInputError(f"{path}: metadata is not a {FORMAT} document")
    version = meta.get("format_version", 0)
    if not _whole(version, 0, 10**6):
        raise PVSInputError(f"{path}: format_version must be a whole number, got {version!r}")
    if version > FORMAT_VERSION:
        raise PVSInputError(
            f"{path} has format version {meta['format_version']}, newer than this napari-pvs "
            f"({FORMAT_VERSION}); upgrade napari-pvs"
        )
    return check_meta(meta, str(path))


def starter_path(name: str = "starter") -> Path:
    """The file of a model shipped in the package.

    Parameters
    ----------
    name : str
        A key of :data:`STARTER_MODELS` (``"starter"``: MedNeXt-XS for T2w images).

    Returns
    -------
    pathlib.Path
        The checkpoint inside the installed package.

    Raises
    ------
    PVSInputError
        For an unknown name (the message lists the known ones), or when the file is
        missing from the installation.
    """
    known = ", ".join(STARTER_MODELS)
    if name not in STARTER_MODELS:
        raise PVSInputError(f"no shipped model {name!r}; the shipped models are: {known}")
    path = _STARTER_FOLDER / STARTER_MODELS[name]
    if not path.is_file():
        raise PVSInputError(f"the shipped model {name!r} is missing: {path} is not in this "
                            "installation of napari-pvs; reinstall it (pip install "
                            "--force-reinstall napari-pvs)")
    return path


def starter_models() -> list[dict[str, Any]]:
    """Metadata of every shipped model, in :data:`STARTER_MODELS` order, with ``"name"``
    and ``"path"`` added (read from the header: the weights are not loaded).

    A missing or unreadable file is listed with ``"error"`` (its message) instead.
    """
    out = []
    for name in STARTER_MODELS:
        try:
            path = starter_path(name)
            out.append({**read_meta(path), "name": name, "path": str(path)})
        except PVSInputError as exc:
            out.append({"name": name, "error": str(exc)})
    return out


def modality_mismatch(meta: dict[str, Any], modality: str, what: str,
                      name: str | None = None) -> str | None:
    """A one-line warning when a model made for one contrast is given another, else None.

    ``meta`` is a checkpoint's metadata, ``modality`` the image's (``"T1w"`` or
    ``"T2w"``), ``what`` names the image and ``name`` the model (default: its id) in the
    message.  Models that record no BIDS contrast (imported nnU-Net releases say
    ``"MRI"`` or ``"T2"``) never warn.
    """
    trained = (meta.get("preprocessing") or {}).get("modality")
    if trained not in ("T1w", "T2w") or modality not in ("T1w", "T2w") or trained == modality:
        return None
    name = name or meta.get("name") or meta.get("id")
    return (f"{what} is {modality} but the model {name!r} was trained on {trained} images (PVS "
            f"{'bright' if trained == 'T2w' else 'dark'}): expect missed or false PVS; use a "
            f"{modality} model, or the Frangi baseline")


def load_checkpoint(path: str | os.PathLike[str], device: str = "cpu"):
    """Load a checkpoint: returns ``(network in eval mode, metadata dict)``.

    ``path`` is a ``.safetensors`` checkpoint or an ensemble ``.json`` (as written by
    ``napari-pvs model import-nnunet``); an ensemble loads as one module whose output
    is the log of the softmax averaged over its members.

    The weights must match the architecture in the metadata exactly (same keys and
    shapes); otherwise :class:`~napari_pvs.PVSInputError` says which keys differ.
    Deep-supervision heads present in the file are loaded too (they are unused in
    eval mode).
    """
    if Path(path).suffix == ".json":
        return _load_ensemble(Path(path), device)
    return _load_single(path, device)


def checkpoint_hash(path: str | os.PathLike[str]) -> str:
    """sha256 identifying a checkpoint's content (of every member, for an ensemble)."""
    path = Path(path)
    if path.suffix != ".json":
        return sha256_file(path)
    return hashlib.sha256("".join(sha256_file(m) for m in load_ensemble(path)).encode()).hexdigest()


def _load_ensemble(path: Path, device: str):
    import torch

    loaded = [_load_single(m, "cpu") for m in load_ensemble(path)]
    first = loaded[0][1]
    for _, m in loaded[1:]:
        if m["arch"] != first["arch"] or m["preprocessing"] != first["preprocessing"]:
            raise PVSInputError(f"{path}: members differ in architecture or preprocessing "
                                f"({first['id']} vs {m['id']}); an ensemble needs identical folds")

    class FoldEnsemble(torch.nn.Module):
        """Members' softmax averaged; returns its log so a softmax recovers the mean."""

        def __init__(self, nets):
            super().__init__()
            self.members = torch.nn.ModuleList(nets)

        def forward(self, x):
            probs = torch.stack([torch.softmax(n(x), dim=1) for n in self.members]).mean(0)
            return torch.log(probs.clamp_min(1e-12))

    meta = deepcopy(first)
    meta["id"] = f"ensemble-{path.parent.name}"
    meta["ensemble"] = [m["id"] for _, m in loaded]
    meta["provenance"] = {**first["provenance"], "fold": "all"}
    return FoldEnsemble([n for n, _ in loaded]).eval().to(device), meta


def _load_single(path: str | os.PathLike[str], device: str = "cpu"):
    from safetensors.torch import load_file

    meta = read_meta(path)
    try:
        state = load_file(str(path), device="cpu")
    except Exception as exc:  # truncated data section
        raise PVSInputError(f"{path}: cannot read the weights ({type(exc).__name__}); the file "
                            "is truncated or corrupt") from None
    import torch

    broken = [k for k, v in state.items()
              if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if broken:
        raise PVSInputError(f"{path}: {len(broken)} weight tensors hold NaN or infinite values "
                            f"(e.g. {broken[0]}); the model is broken (its training diverged?): "
                            "use another model")
    has_ds = any(k.startswith("out_blocks.") for k in state)
    net = build_network(meta["arch"], deep_supervision=has_ds)
    expected = net.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if shapes:
            k = shapes[0]
            parts.append(f"{len(shapes)} with other shapes (e.g. {k}: file {tuple(state[k].shape)}, "
                         f"architecture {tuple(expected[k].shape)})")
        raise PVSInputError(
            f"{path}: the weights do not match the architecture in its metadata "
            f"({meta['arch'].get('variant')}, k{meta['arch'].get('kernel_size')}): "
            + "; ".join(parts)
        )
    net.load_state_dict(state, strict=True)
    net.eval()
    return net.to(device), meta


def upkern_checkpoint(src: str | os.PathLike[str], dst: str | os.PathLike[str],
                      kernel_size: int = 5) -> Path:
    """Write the ``kernel_size`` model built by UpKern from checkpoint ``src``."""
    net, meta = load_checkpoint(src)
    arch = {**meta["arch"], "kernel_size": int(kernel_size)}
    arch.pop("deep_supervision_heads", None)
    large = upkern(net, arch)
    new = deepcopy(meta)
    new["arch"] = arch
    new["id"] = new["created"] = None
    new["provenance"] = {**meta["provenance"], "parent": meta["id"],
                         "note": f"UpKern k{meta['arch']['kernel_size']} -> k{kernel_size}"}
    return save_checkpoint(dst, large, new)


class ModelRegistry:
    """A folder of checkpoints, one ``<id>.safetensors`` file per model."""

    def __init__(self, folder: str | os.PathLike[str]):
        self.folder = Path(folder)

    def register(self, net, meta: dict[str, Any], extra_state: dict | None = None) -> str:
        """Save a network into the registry; returns its id."""
        meta = deepcopy(meta)
        meta["id"] = meta.get("id") or _new_id(meta["arch"])
        if (self.folder / f"{meta['id']}.safetensors").exists():
            raise PVSInputError(f"model id {meta['id']} already exists in {self.folder}")
        save_checkpoint(self.folder / f"{meta['id']}.safetensors", net, meta, extra_state)
        return meta["id"]

    def list(self) -> list[dict[str, Any]]:
        """Metadata of every readable model, oldest first (unreadable files are skipped)."""
        out = []
        for path in sorted(self.folder.glob("*.safetensors")):
            try:
                meta = read_meta(path)
            except PVSInputError:
                continue
            meta["path"] = str(path)
            out.append(meta)
        return sorted(out, key=lambda m: (m.get("created") or "", m["id"]))

    def path(self, model_id: str) -> Path:
        if not re.fullmatch(r"[A-Za-z0-9._-]+", model_id or ""):
            raise PVSInputError(f"invalid model id {model_id!r}")
        path = self.folder / f"{model_id}.safetensors"
        if path.is_file():
            return path
        models = self.list()
        # a file not named by its id (import-nnunet writes fold_N.safetensors): `model ls`
        # shows the id, so the id names it too
        for m in models:
            if m["id"] == model_id:
                return Path(m["path"])
        known = ", ".join(m["id"] for m in models) or "none"
        raise PVSInputError(f"no model {model_id!r} in {self.folder} (known: {known})")

    def load(self, model_id: str, device: str = "cpu"):
        """``(network, metadata)`` of a registered model."""
        return load_checkpoint(self.path(model_id), device)

    def latest(self) -> dict[str, Any] | None:
        """Metadata of the newest model, or None for an empty registry."""
        models = self.list()
        return models[-1] if models else None

    def latest_id(self) -> str | None:
        """The newest model's id, or None for an empty registry."""
        latest = self.latest()
        return latest["id"] if latest else None

    def meta(self, model_id: str) -> dict[str, Any] | None:
        """Metadata of a registered model, or None when the registry has no such model
        (a removed one whose predictions are still saved, say)."""
        try:
            return read_meta(self.path(model_id))
        except PVSInputError:
            return None


def write_ensemble(path: str | os.PathLike[str], members, **provenance) -> Path:
    """Write an ensemble file naming ``members`` (file names beside it), atomically."""
    path = Path(path)
    atomic_write_text(path, json.dumps({"format": ENSEMBLE_FORMAT, "format_version": 1,
                                        "members": list(members), **provenance}, indent=1))
    return path


def load_ensemble(path: str | os.PathLike[str]) -> list[Path]:
    """Member checkpoint paths of an ensemble file (all must exist inside its folder)."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_ENSEMBLE_BYTES:
            raise PVSInputError(f"{path} is larger than {MAX_ENSEMBLE_BYTES // 1024} KB; it is not "
                                "an ensemble file")
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise PVSInputError(f"{path} is not a readable ensemble file ({type(exc).__name__}: "
                            f"{str(exc)[:120]})") from None
    members = doc.get("members") if isinstance(doc, dict) else None
    if not isinstance(doc, dict) or doc.get("format") != ENSEMBLE_FORMAT or not members \
            or not isinstance(members, list) or len(members) > 64:
        raise PVSInputError(f"{path} is not a {ENSEMBLE_FORMAT} file: it must be a JSON object "
                            "with a list of 1 to 64 member file names")
    folder = path.parent.resolve()
    out = []
    for m in members:
        if not isinstance(m, str) or not m.endswith(".safetensors"):
            raise PVSInputError(f"{path}: member {str(m)[:80]!r} is not a .safetensors file name")
        member = (path.parent / m).resolve()
        if Path(m).is_absolute() or member.parent != folder:
            raise PVSInputError(f"{path}: member {m!r} lies outside the ensemble's folder "
                                f"{folder}; members must be files beside ensemble.json")
        out.append(path.parent / m)
    missing = [m.name for m in out if not m.is_file()]
    if missing:
        raise PVSInputError(f"{path}: member checkpoint(s) {missing} are missing beside it")
    return out
