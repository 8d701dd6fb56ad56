"""Import MedNet-PVS releases: nnU-Net v1 training folders of the official MedNeXt v1.

A release folder (e.g. ``nnUNetTrainerV2_MedNeXt_L_kernel5__nnUNetPlansv2.1_trgSp_0.8x0.8x0.8``)
holds ``plans.pkl`` and ``fold_N/model_final_checkpoint.model`` (+ ``.model.pkl``).
:func:`import_nnunet` converts every fold into a napari-pvs checkpoint and writes an
ensemble file that names them.  Nothing is unpickled freely:

* ``.model`` files load with ``torch.load(weights_only=True)``;
* ``.pkl`` files go through :class:`RestrictedUnpickler`, which allows only what
  nnU-Net v1 plans hold (dict, OrderedDict, list, tuple, numbers, strings, numpy
  arrays, dtypes and scalars under ``numpy.core`` and ``numpy._core``) and no builtin
  callable.  Anything else is refused before it is imported, so no code from the file
  ever runs.  Sizes are bounded before anything is allocated: the file (32 MB), each
  array (16 MB) and the memo indices (checked by walking the opcodes first).
* An ensemble file names member files inside its own folder; nothing else is loaded.

The architecture is inferred from the weights (channels, per-stage block counts and
expansion ratios, kernel size, deep-supervision heads); the trainer name is only a
hint, and a disagreement gives a warning.
"""

from __future__ import annotations

import io
import os
import pickle
import re
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from ._errors import PVSInputError
from .model import VARIANTS, build_network, map_official_state_dict, save_checkpoint, write_ensemble

__all__ = [
    "RestrictedUnpickler",
    "import_nnunet",
    "infer_architecture",
    "read_plans",
    "safe_load_pickle",
]

MAX_PICKLE_BYTES = 32 * 2**20  # a plans.pkl of thousands of cases is well under 1 MB
MAX_ARRAY_BYTES = 16 * 2**20
# What nnU-Net v1 plans are made of: besides the opcodes for dict, list, tuple, str,
# numbers and bytes, only OrderedDict and numpy arrays, dtypes and scalars.  No builtin
# callable is allowed: ``list(range(n))`` or ``bytes(n)`` would allocate without bound.
_NUMPY_OK = {
    ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"), ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
}
# Opcodes that plain data never needs: persistent ids, the extension registry,
# protocol-0/1 instance creation and protocol-5 out-of-band buffers.
_REFUSED_OPCODES = {"PERSID", "BINPERSID", "EXT1", "EXT2", "EXT4", "INST", "OBJ",
                    "NEXT_BUFFER", "READONLY_BUFFER", "NEWOBJ_EX"}


def _numpy_core(sub: str):
    """``numpy._core.<sub>`` (numpy 2), or ``numpy.core.<sub>`` on numpy 1."""
    import importlib

    try:
        return importlib.import_module(f"numpy._core.{sub}")
    except ImportError:
        return importlib.import_module(f"numpy.core.{sub}")


class _ArrayType:
    """Stands for ``numpy.ndarray`` in a pickle: only ``_reconstruct`` may use it."""

    def __new__(cls, *args, **kwargs):
        raise pickle.UnpicklingError("numpy.ndarray may only be rebuilt by _reconstruct")


class _BoundedArray(np.ndarray):
    """An array under construction whose ``__setstate__`` refuses oversized data."""

    def __setstate__(self, state):
        try:
            shape, dtype = tuple(int(n) for n in state[1]), np.dtype(state[2])
        except (TypeError, ValueError, IndexError) as exc:
            raise pickle.UnpicklingError(f"malformed array state ({exc})") from None
        if any(n < 0 for n in shape) or int(np.prod(shape, dtype=object)) * dtype.itemsize \
                > MAX_ARRAY_BYTES:
            raise pickle.UnpicklingError(f"an array of shape {shape[:8]} is larger than "
                                         f"{MAX_ARRAY_BYTES // 2**20} MB")
        super().__setstate__(state)


def _reconstruct(subtype, shape, dtype):
    if subtype is not _ArrayType or tuple(shape) != (0,):
        raise pickle.UnpicklingError("numpy _reconstruct with unexpected arguments")
    return np.ndarray.__new__(_BoundedArray, (0,), dtype)


def _dtype(*args):
    dt = np.dtype(*args)
    if dt.itemsize > 64 or dt.hasobject and dt.kind != "O":  # plain scalars only
        raise pickle.UnpicklingError(f"numpy dtype {dt} is not a plain scalar type")
    return dt


def _frombuffer(buf, dtype, shape, order):
    """Protocol-5 arrays: the data is already in the file, so the size is bounded by it."""
    if not isinstance(buf, (bytes, bytearray)) or len(buf) > MAX_ARRAY_BYTES:
        raise pickle.UnpicklingError("numpy _frombuffer with unexpected arguments")
    return _numpy_core("numeric")._frombuffer(buf, _dtype(dtype), tuple(shape), order)


def _scalar(dtype, data=None):
    return _numpy_core("multiarray").scalar(dtype, *(() if data is None else (data,)))


def _scan(data: bytes, source: str) -> None:
    """Walk the opcodes without running them: refuse what plain data never needs and
    memo indices beyond the number of opcodes (the C unpickler sizes its memo by them)."""
    import pickletools

    n = 0
    for op, arg, _ in pickletools.genops(data):
        n += 1
        if op.name in _REFUSED_OPCODES:
            raise PVSInputError(f"{source}: refusing pickle opcode {op.name}; napari-pvs reads "
                                "only plain data from .pkl files")
        if op.name in ("PUT", "BINPUT", "LONG_BINPUT", "GET", "BINGET", "LONG_BINGET") \
                and int(arg) > n:
            raise PVSInputError(f"{source}: pickle memo index {arg} is out of range; the file is "
                                "corrupt or crafted")


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only what nnU-Net v1 plans hold; the rest is refused.

    Allowed: ``collections.OrderedDict`` and numpy arrays (through ``_reconstruct`` or
    ``_frombuffer``, up to ``MAX_ARRAY_BYTES``), dtypes and scalars.  No builtin
    callable is allowed.

    Parameters
    ----------
    file : binary file
    source : str
        Named in error messages.
    """

    def __init__(self, file, source: str = "pickle"):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str):
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        if (module, name) in _NUMPY_OK:
            return {"ndarray": _ArrayType, "dtype": _dtype, "_reconstruct": _reconstruct,
                    "scalar": _scalar, "_frombuffer": _frombuffer}[name]
        raise PVSInputError(
            f"{self.source}: refusing to unpickle {module}.{name}; napari-pvs reads only plain "
            "data (dicts, lists, numbers, strings, numpy arrays) from .pkl files"
        )


def _unwrap(v, seen: set | None = None, depth: int = 0):
    """Plain numpy arrays instead of the bounded class used while loading; each shared
    container is visited once, so nothing grows."""
    seen = set() if seen is None else seen
    if isinstance(v, _BoundedArray):
        return v.view(np.ndarray)
    if depth > 64 or id(v) in seen or not isinstance(v, (dict, list, tuple)):
        return v
    seen.add(id(v))
    if isinstance(v, dict):
        for k in list(v):
            v[k] = _unwrap(v[k], seen, depth + 1)
    elif isinstance(v, list):
        v[:] = [_unwrap(x, seen, depth + 1) for x in v]
    elif any(isinstance(x, (_BoundedArray, dict, list)) for x in v):
        return tuple(_unwrap(x, seen, depth + 1) for x in v)
    return v


def safe_load_pickle(path: str | os.PathLike[str]) -> Any:
    """Load a ``.pkl`` file through :class:`RestrictedUnpickler`, after checking its size
    and its opcodes."""
    path = Path(path)
    if not path.is_file():
        raise PVSInputError(f"{path} does not exist")
    size = path.stat().st_size
    if size > MAX_PICKLE_BYTES:
        raise PVSInputError(f"{path} is {size / 2**20:.0f} MB; nnU-Net plans are far smaller "
                            f"(limit {MAX_PICKLE_BYTES // 2**20} MB): is it the plans.pkl of the "
                            "release?")
    data = path.read_bytes()
    try:
        _scan(data, str(path))
        return _unwrap(RestrictedUnpickler(io.BytesIO(data), str(path)).load())
    except PVSInputError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, KeyError,
            IndexError, MemoryError, RecursionError, OverflowError) as exc:
        raise PVSInputError(f"{path} is not a readable pickle ({type(exc).__name__}: "
                            f"{str(exc)[:120]}); it may be truncated, corrupt or crafted") from None


def _plain(v):
    """numpy values to JSON-friendly Python values."""
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def read_plans(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The preprocessing facts of an nnU-Net v1 plans file (3d_fullres = last stage)."""
    plans = safe_load_pickle(path)
    try:
        stages = plans["plans_per_stage"]
        stage = stages[max(stages)] if isinstance(stages, dict) else stages[-1]
        n_mod = int(plans["num_modalities"])
        out = {
            "target_spacing": [float(s) for s in stage["current_spacing"]],
            "patch_size": [int(s) for s in stage["patch_size"]],
            "normalization_schemes": [str(plans["normalization_schemes"][i]) for i in range(n_mod)],
            "use_mask_for_norm": [bool(plans["use_mask_for_norm"][i]) for i in range(n_mod)],
            "transpose_forward": [int(a) for a in plans["transpose_forward"]],
            "transpose_backward": [int(a) for a in plans["transpose_backward"]],
            "num_classes": int(plans["num_classes"]) + 1,  # nnU-Net v1 counts foreground only
            "modalities": [str(plans["modalities"][i]) for i in range(n_mod)],
        }
    except (KeyError, TypeError, IndexError, ValueError) as exc:
        raise PVSInputError(f"{path} lacks the nnU-Net v1 plans key {exc}; is it a plans.pkl of "
                            "an nnU-Net v1 training folder?") from None
    if sorted(out["transpose_forward"]) != [0, 1, 2]:
        raise PVSInputError(f"{path}: transpose_forward {out['transpose_forward']} is not a permutation")
    return out


def infer_architecture(state: dict) -> dict[str, Any]:
    """Official MedNeXt v1 constructor arguments, read off an official state dict."""
    try:
        stem = state["stem.weight"]
        n, in_ch = int(stem.shape[0]), int(stem.shape[1])
        out_ch = int(state["out_0.conv_out.weight"].shape[1])
        kernel = int(state["enc_block_0.0.conv1.weight"].shape[-1])
    except KeyError as exc:
        raise PVSInputError(f"not an official MedNeXt v1 state dict: no {exc}") from None
    counts, exp = [0] * 9, [0] * 9
    stages = [(f"enc_block_{i}", i, n * 2**i) for i in range(4)] + [("bottleneck", 4, n * 16)]
    stages += [(f"dec_block_{i}", 8 - i, n * 2**i) for i in range(4)]
    for prefix, idx, ch in stages:
        blocks = {int(m.group(1)) for k in state
                  if (m := re.match(rf"{prefix}\.(\d+)\.conv2\.weight$", k))}
        if not blocks:
            raise PVSInputError(f"not an official MedNeXt v1 state dict: no {prefix} blocks")
        counts[idx] = max(blocks) + 1
        exp[idx] = int(state[f"{prefix}.0.conv2.weight"].shape[0]) // ch
    for i in range(4):  # consistency: down_i expands by exp_r[i+1], up_i by exp_r[8-i]
        d = int(state[f"down_{i}.conv2.weight"].shape[0]) // (n * 2**i)
        u = int(state[f"up_{i}.conv2.weight"].shape[0]) // (n * 2 ** (i + 1))
        if d != exp[i + 1] or u != exp[8 - i]:
            raise PVSInputError(f"inconsistent expansion ratios at stage {i} (down {d}, up {u}, "
                                f"blocks {exp}); not a MedNeXt v1 network")
    ds = all(f"out_{i}.conv_out.weight" in state for i in range(1, 5))
    variant = "custom"
    for name, cfg in VARIANTS.items():
        if cfg["n_channels"] == n and cfg["exp_r"] == exp and cfg["block_counts"] == counts:
            variant = name
    return {"variant": variant, "in_channels": in_ch, "out_channels": out_ch, "n_channels": n,
            "exp_r": exp, "block_counts": counts, "kernel_size": kernel, "deep_supervision": ds}


def _trainer_hint(trainer: str) -> tuple[str | None, int | None]:
    m = re.search(r"MedNeXt_([A-Za-z]+)_kernel(\d)", trainer)
    return (m.group(1).upper(), int(m.group(2))) if m else (None, None)


def _fold_weights(fold_dir: Path, ckpt: Path) -> dict:
    """The fold's state dict, read with ``weights_only=True`` and checked finite."""
    import torch

    if not ckpt.is_file():
        raise PVSInputError(f"{fold_dir} has no model_final_checkpoint.model; the fold is "
                            "incomplete (copy it again, or remove the fold folder)")
    try:
        saved = torch.load(ckpt, map_location="cpu", weights_only=True)
        state = saved["state_dict"]
        if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
            raise TypeError("state_dict is not a mapping of tensors")
    except Exception as exc:  # torch raises RuntimeError / UnpicklingError / EOFError
        raise PVSInputError(f"{ckpt} cannot be read with weights_only=True "
                            f"({type(exc).__name__}); it is truncated, corrupt or holds "
                            "objects other than tensors") from None
    broken = [k for k, v in state.items()
              if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if broken:
        raise PVSInputError(f"{ckpt}: {len(broken)} weight tensors hold NaN or infinite values "
                            f"(e.g. {broken[0]}); this fold is broken, import a good copy")
    return state


def import_nnunet(folder: str | os.PathLike[str], out: str | os.PathLike[str]) -> Path:
    """Convert an nnU-Net v1 MedNeXt training folder into napari-pvs checkpoints.

    Writes ``OUT/fold_N.safetensors`` per fold and ``OUT/ensemble.json`` naming them;
    returns the ensemble file, which :func:`napari_pvs.model.load_checkpoint` and
    ``napari-pvs predict --model`` accept.
    """
    folder, out = Path(folder), Path(out)
    if not folder.is_dir():
        raise PVSInputError(f"{folder} is not a folder; pass the trainer folder that holds plans.pkl "
                            "and fold_0 ... fold_4")
    if not (folder / "plans.pkl").is_file():
        raise PVSInputError(f"{folder} has no plans.pkl; pass the trainer folder itself")
    plans = read_plans(folder / "plans.pkl")
    folds = sorted(p for p in folder.glob("fold_*") if p.is_dir())
    if not folds:
        raise PVSInputError(f"{folder} holds no fold_N folders")
    trainer, _, plans_id = folder.name.partition("__")
    hint_variant, hint_kernel = _trainer_hint(trainer)
    out.mkdir(parents=True, exist_ok=True)
    members = []
    for fold_dir in folds:
        ckpt = fold_dir / "model_final_checkpoint.model"
        state = _fold_weights(fold_dir, ckpt)
        arch = infer_architecture(state)
        known_hint = hint_variant in VARIANTS
        if (known_hint and hint_variant != arch["variant"]) or (
                hint_kernel is not None and hint_kernel != arch["kernel_size"]):
            warnings.warn(f"{folder.name}: the trainer name says MedNeXt-{hint_variant} "
                          f"k{hint_kernel} but the weights are {arch['variant']} "
                          f"k{arch['kernel_size']}; using the weights", stacklevel=2)
        if arch["out_channels"] != plans["num_classes"]:
            raise PVSInputError(f"{ckpt}: {arch['out_channels']} output channels but plans.pkl "
                                f"says {plans['num_classes']} classes")
        main, ds = map_official_state_dict(state)
        net = build_network(arch)
        net.load_state_dict(main, strict=True)
        meta = {
            "arch": {k: v for k, v in arch.items() if k != "deep_supervision"},
            "preprocessing": {
                "target_spacing": plans["target_spacing"], "patch_size": plans["patch_size"],
                "modality": plans["modalities"][0], "normalization": "nnunet_v1",
                "normalization_schemes": plans["normalization_schemes"],
                "use_mask_for_norm": plans["use_mask_for_norm"],
                "transpose_forward": plans["transpose_forward"],
                "transpose_backward": plans["transpose_backward"],
                "resample_order": 3, "tta": 8, "overlap": 0.5,
            },
            "provenance": {"parent": None, "data_versions": [], "iterations": None,
                           "metrics": {}, "source_folder": str(folder.resolve()),
                           "trainer": trainer, "plans": plans_id, "fold": fold_dir.name,
                           "note": "imported from nnU-Net v1 (MedNet-PVS release format)"},
        }
        path = save_checkpoint(out / f"{fold_dir.name}.safetensors", net, meta, extra_state=ds)
        members.append(path.name)
    return write_ensemble(out / "ensemble.json", members, source_folder=str(folder.resolve()),
                          trainer=trainer, plans=plans_id)
