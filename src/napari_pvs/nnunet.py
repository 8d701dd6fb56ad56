"""Import MedNet-PVS releases: nnU-Net v1 training folders of the official MedNeXt v1.

A release folder (e.g. ``nnUNetTrainerV2_MedNeXt_L_kernel5__nnUNetPlansv2.1_trgSp_0.8x0.8x0.8``)
holds ``plans.pkl`` and ``fold_N/model_final_checkpoint.model`` (+ ``.model.pkl``).
:func:`import_nnunet` converts every fold into a napari-pvs checkpoint and writes an
ensemble file that names them.  Nothing is unpickled freely:

* ``.model`` files load with ``torch.load(weights_only=True)``;
* ``.pkl`` files go through :class:`RestrictedUnpickler`, which allows only plain data
  (dict, OrderedDict, list, tuple, set, numbers, strings, numpy arrays, dtypes and
  scalars under ``numpy.core`` and ``numpy._core``).  Anything else is refused before
  it is imported, so no code from the file ever runs.

The architecture is inferred from the weights (channels, per-stage block counts and
expansion ratios, kernel size, deep-supervision heads); the trainer name is only a
hint, and a disagreement gives a warning.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from ._errors import PVSInputError

__all__ = [
    "ENSEMBLE_FORMAT",
    "RestrictedUnpickler",
    "import_nnunet",
    "infer_architecture",
    "load_ensemble",
    "read_plans",
    "safe_load_pickle",
]

ENSEMBLE_FORMAT = "napari-pvs-ensemble"
_NUMPY_OK = {
    ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"), ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
}
_BUILTINS_OK = {"dict", "list", "tuple", "set", "frozenset", "int", "float", "complex", "str",
                "bytes", "bytearray", "bool", "slice", "range"}


def _numpy_core(sub: str):
    """``numpy._core.<sub>`` (numpy 2), or ``numpy.core.<sub>`` on numpy 1."""
    import importlib

    try:
        return importlib.import_module(f"numpy._core.{sub}")
    except ImportError:
        return importlib.import_module(f"numpy.core.{sub}")


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only plain-data classes; everything else is refused.

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
        if module == "builtins" and name in _BUILTINS_OK:
            return getattr(__import__("builtins"), name)
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        if (module, name) in _NUMPY_OK:
            if module == "numpy":
                return getattr(np, name)
            return getattr(_numpy_core(module.rsplit(".", 1)[1]), name)
        if module in ("numpy.dtypes",) and re.fullmatch(r"[A-Za-z0-9]+DType", name):
            import numpy.dtypes

            return getattr(numpy.dtypes, name)
        raise PVSInputError(
            f"{self.source}: refusing to unpickle {module}.{name}; napari-pvs reads only plain "
            "data (dicts, lists, numbers, strings, numpy arrays) from .pkl files"
        )


def safe_load_pickle(path: str | os.PathLike[str]) -> Any:
    """Load a ``.pkl`` file through :class:`RestrictedUnpickler`."""
    path = Path(path)
    if not path.is_file():
        raise PVSInputError(f"{path} does not exist")
    data = path.read_bytes()
    try:
        return RestrictedUnpickler(io.BytesIO(data), str(path)).load()
    except PVSInputError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
        raise PVSInputError(f"{path} is not a readable pickle ({type(exc).__name__}: {exc}); "
                            "it may be truncated or corrupt") from None


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
    from .model import VARIANTS

    for name, cfg in VARIANTS.items():
        if cfg["n_channels"] == n and cfg["exp_r"] == exp and cfg["block_counts"] == counts:
            variant = name
    return {"variant": variant, "in_channels": in_ch, "out_channels": out_ch, "n_channels": n,
            "exp_r": exp, "block_counts": counts, "kernel_size": kernel, "deep_supervision": ds}


def _trainer_hint(trainer: str) -> tuple[str | None, int | None]:
    m = re.search(r"MedNeXt_([A-Za-z]+)_kernel(\d)", trainer)
    return (m.group(1).upper(), int(m.group(2))) if m else (None, None)


def import_nnunet(folder: str | os.PathLike[str], out: str | os.PathLike[str]) -> Path:
    """Convert an nnU-Net v1 MedNeXt training folder into napari-pvs checkpoints.

    Writes ``OUT/fold_N.safetensors`` per fold and ``OUT/ensemble.json`` naming them;
    returns the ensemble file, which :func:`napari_pvs.model.load_checkpoint` and
    ``napari-pvs predict --model`` accept.
    """
    import torch

    from .model import VARIANTS, build_network, map_official_state_dict, save_checkpoint

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
        if not ckpt.is_file():
            raise PVSInputError(f"{fold_dir} has no model_final_checkpoint.model; the fold is "
                                "incomplete (copy it again, or remove the fold folder)")
        try:
            saved = torch.load(ckpt, map_location="cpu", weights_only=True)
            state = saved["state_dict"]
        except Exception as exc:  # torch raises RuntimeError / UnpicklingError / EOFError
            raise PVSInputError(f"{ckpt} cannot be read with weights_only=True "
                                f"({type(exc).__name__}); it is truncated, corrupt or holds "
                                "objects other than tensors") from None
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
    ens = out / "ensemble.json"
    tmp = ens.with_name(".ensemble.json.tmp")
    tmp.write_text(json.dumps({"format": ENSEMBLE_FORMAT, "format_version": 1,
                               "members": members, "source_folder": str(folder.resolve()),
                               "trainer": trainer, "plans": plans_id}, indent=1))
    os.replace(tmp, ens)
    return ens


def load_ensemble(path: str | os.PathLike[str]) -> list[Path]:
    """Member checkpoint paths of an ensemble file (all must exist)."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise PVSInputError(f"{path} is not a readable ensemble file ({exc})") from None
    if doc.get("format") != ENSEMBLE_FORMAT or not doc.get("members"):
        raise PVSInputError(f"{path} is not a {ENSEMBLE_FORMAT} file with members")
    members = [path.parent / m for m in doc["members"]]
    missing = [m.name for m in members if not m.is_file()]
    if missing:
        raise PVSInputError(f"{path}: member checkpoint(s) {missing} are missing beside it")
    return members
