"""MedNeXt as the MedNet-PVS paper defines it, checkpoints, UpKern and a model registry.

The network
-----------
MONAI ships the MedNeXt blocks and a ``MedNeXt`` class, but MONAI's class is not the
official MedNeXt v1 (MIC-DKFZ) for the B, M and L variants: its i-th down block
expands by ``encoder_expansion_ratio[i]`` whereas the official ``down_i`` expands by
``exp_r[i + 1]``.  :class:`MedNeXtV1` subclasses MONAI's class and rebuilds only those
down blocks with MONAI's own :class:`~monai.networks.blocks.MedNeXtDownBlock`, so it
has exactly the official architecture (L-k5: 62.993M parameters, 1 -> 2 channels) and
still uses MONAI's blocks and forward pass.

Architectures are described by the official constructor arguments: ``n_channels``
(initial filters), ``exp_r`` and ``block_counts`` (9 entries each: 4 encoder stages,
bottleneck, 4 decoder stages) and ``kernel_size``.  ``VARIANTS`` holds the paper's
S/B/M/L and ``XS``, a small configuration for tests and CPU demos.

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
"""

from __future__ import annotations

import json
import os
import re
import uuid
from copy import deepcopy
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ._errors import PVSInputError

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
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
    "map_official_state_dict",
    "read_meta",
    "save_checkpoint",
    "upkern",
    "upkern_checkpoint",
]

FORMAT = "napari-pvs-model"
FORMAT_VERSION = 1
_META_KEY = "napari_pvs"

# Official MedNeXt v1 configurations (nnunet_mednext/network_architecture/mednextv1).
VARIANTS: dict[str, dict[str, Any]] = {
    "S": {"n_channels": 32, "exp_r": [2] * 9, "block_counts": [2] * 9},
    "B": {"n_channels": 32, "exp_r": [2, 3, 4, 4, 4, 4, 4, 3, 2], "block_counts": [2] * 9},
    "M": {"n_channels": 32, "exp_r": [2, 3, 4, 4, 4, 4, 4, 3, 2],
          "block_counts": [3, 4, 4, 4, 4, 4, 4, 4, 3]},
    "L": {"n_channels": 32, "exp_r": [3, 4, 8, 8, 8, 8, 8, 4, 3],
          "block_counts": [3, 4, 8, 8, 8, 8, 8, 4, 3]},
    # small configuration for tests and CPU demos (not from the paper)
    "XS": {"n_channels": 8, "exp_r": [2] * 9, "block_counts": [1] * 9},
}


# Bounds that metadata must respect before anything is built from it (MedNeXt-L k5 has
# 63M parameters; a target spacing of 0.001 mm would ask for terabytes).
SPACING_MM = (0.05, 20.0)
MAX_PARAMETERS = 1_000_000_000
_ARCH_INTS = {"in_channels": (1, 16), "out_channels": (2, 64), "n_channels": (1, 512)}


def check_spacing(values, what: str = "target spacing") -> list[float]:
    """Three finite voxel sizes in mm within ``SPACING_MM``; returns them as floats."""
    lo, hi = SPACING_MM
    try:
        out = [float(v) for v in values]
    except (TypeError, ValueError):
        out = []
    if len(out) != 3 or not all(lo <= v <= hi for v in out):  # NaN fails the comparison
        raise PVSInputError(f"{what} must be 3 voxel sizes between {lo} and {hi} mm, "
                            f"got {values!r}")
    return out


def _whole(value, lo: int, hi: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi


def _estimated_parameters(arch: dict[str, Any]) -> int:
    """Parameters of a MedNeXt v1 architecture, within a few per cent (no allocation)."""
    n, k3 = arch["n_channels"], arch["kernel_size"] ** 3
    total = 0
    for s in range(9):  # blocks: depthwise k^3, expand by r, project back
        c, r = n * 2 ** min(s, 8 - s), arch["exp_r"][s]
        total += arch["block_counts"][s] * (2 * r * c * c + c * (k3 + r + 5))
    for i in range(4):  # down / up blocks change the width by 2 and carry a residual conv
        c = n * 2**i
        total += 3 * arch["exp_r"][i + 1] * c * c + 2 * c * c + c * k3
        total += 6 * arch["exp_r"][8 - i] * c * c + 2 * c * c + 2 * c * k3
    return total


def check_meta(meta, source: str = "metadata") -> dict[str, Any]:
    """Refuse metadata whose architecture or preprocessing is malformed or absurdly large.

    Runs before any network is built or any image resampled, so a crafted file cannot
    make napari-pvs allocate terabytes.  Returns ``meta``.
    """
    if not isinstance(meta, dict) or meta.get("format") != FORMAT \
            or not isinstance(meta.get("arch"), dict):
        raise PVSInputError(f"{source}: metadata is not a {FORMAT} document")
    arch = meta["arch"]
    for key, (lo, hi) in _ARCH_INTS.items():
        if not _whole(arch.get(key), lo, hi):
            raise PVSInputError(f"{source}: arch.{key} must be a whole number from {lo} to {hi}, "
                                f"got {arch.get(key)!r}; the checkpoint is corrupt or not "
                                "for napari-pvs")
    if arch.get("kernel_size") not in (3, 5, 7) or isinstance(arch.get("kernel_size"), bool):
        raise PVSInputError(f"{source}: arch.kernel_size must be 3, 5 or 7, "
                            f"got {arch.get('kernel_size')!r}")
    for key, hi in (("exp_r", 16), ("block_counts", 64)):
        v = arch.get(key)
        if not isinstance(v, list) or len(v) != 9 or not all(_whole(e, 1, hi) for e in v):
            raise PVSInputError(f"{source}: arch.{key} must be 9 whole numbers from 1 to {hi}, "
                                f"got {str(v)[:80]}")
    if _estimated_parameters(arch) > MAX_PARAMETERS:
        raise PVSInputError(f"{source}: the architecture would have about "
                            f"{_estimated_parameters(arch) / 1e9:.0f} billion parameters (limit "
                            f"{MAX_PARAMETERS / 1e9:.0f} billion); the metadata is corrupt")
    pre = meta.get("preprocessing", {})
    if not isinstance(pre, dict):
        raise PVSInputError(f"{source}: preprocessing must be a JSON object")
    if pre.get("target_spacing") is not None:
        check_spacing(pre["target_spacing"], f"{source}: target_spacing")
    patch = pre.get("patch_size")
    if patch is not None and (not isinstance(patch, list) or len(patch) != 3
                              or not all(_whole(p, 16, 1024) and p % 16 == 0 for p in patch)):
        raise PVSInputError(f"{source}: patch_size must be 3 multiples of 16 from 16 to 1024, "
                            f"got {str(patch)[:80]}")
    if not isinstance(meta.get("provenance", {}), dict):
        raise PVSInputError(f"{source}: provenance must be a JSON object")
    return meta


def arch_config(
    variant: str = "L", kernel_size: int = 5, in_channels: int = 1, out_channels: int = 2
) -> dict[str, Any]:
    """Architecture dict of a named variant (the paper's default PVS model is L, k5)."""
    key = str(variant).upper()
    if key not in VARIANTS:
        raise PVSInputError(f"unknown MedNeXt variant {variant!r}; choose one of {sorted(VARIANTS)}")
    if kernel_size not in (3, 5, 7):
        raise PVSInputError(f"kernel_size must be 3, 5 or 7, got {kernel_size}")
    if in_channels < 1 or out_channels < 2:
        raise PVSInputError(
            f"need >= 1 input and >= 2 output channels, got {in_channels} and {out_channels}"
        )
    return {"variant": key, "kernel_size": int(kernel_size), "in_channels": int(in_channels),
            "out_channels": int(out_channels), **deepcopy(VARIANTS[key])}


def _mednext_v1_class():
    from monai.networks.blocks.mednext_block import MedNeXtDownBlock
    from monai.networks.nets.mednext import MedNeXt

    class MedNeXtV1(MedNeXt):
        """Official MedNeXt v1 built from MONAI's blocks (see the module docstring)."""

        def __init__(self, *, in_channels, out_channels, n_channels, exp_r, block_counts,
                     kernel_size, deep_supervision=False):
            if len(exp_r) != 9 or len(block_counts) != 9:
                raise ValueError("exp_r and block_counts need 9 entries each")
            super().__init__(
                spatial_dims=3, init_filters=n_channels, in_channels=in_channels,
                out_channels=out_channels, encoder_expansion_ratio=list(exp_r[:4]),
                decoder_expansion_ratio=list(exp_r[5:]), bottleneck_expansion_ratio=exp_r[4],
                kernel_size=kernel_size, deep_supervision=deep_supervision,
                use_residual_connection=True, blocks_down=list(block_counts[:4]),
                blocks_bottleneck=block_counts[4], blocks_up=list(block_counts[5:]),
                norm_type="group", global_resp_norm=False,
            )
            for i in range(4):  # official: down_i expands by exp_r[i + 1]
                if exp_r[i + 1] != exp_r[i]:
                    self.down_blocks[i] = MedNeXtDownBlock(
                        in_channels=n_channels * 2**i, out_channels=n_channels * 2 ** (i + 1),
                        expansion_ratio=exp_r[i + 1], kernel_size=kernel_size,
                        use_residual_connection=True, norm_type="group", dim="3d",
                    )

    return MedNeXtV1


def build_network(arch: dict[str, Any], *, deep_supervision: bool = False):
    """Build the (untrained) network of an architecture dict."""
    cls = _mednext_v1_class()
    try:
        return cls(
            in_channels=int(arch["in_channels"]), out_channels=int(arch["out_channels"]),
            n_channels=int(arch["n_channels"]), exp_r=[int(e) for e in arch["exp_r"]],
            block_counts=[int(b) for b in arch["block_counts"]],
            kernel_size=int(arch["kernel_size"]), deep_supervision=deep_supervision,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise PVSInputError(f"invalid architecture {arch}: {exc}") from None


def count_parameters(net) -> int:
    """Number of parameters of a network."""
    return sum(p.numel() for p in net.parameters())


def map_official_state_dict(state: dict) -> tuple[dict, dict]:
    """Map official MedNeXt v1 key names onto :class:`MedNeXtV1`.

    Returns ``(main, deep_supervision)``: the weights used for inference and the
    deep-supervision heads (``out_1`` ... ``out_4``), which fine-tuning can reuse.
    ``dummy_tensor`` is dropped.
    """
    main, ds = {}, {}
    for key, value in state.items():
        head, _, rest = key.partition(".")
        if head == "dummy_tensor":
            continue
        m = re.fullmatch(r"(enc_block|down|up|dec_block|out)_(\d)", head)
        if head in ("stem", "bottleneck"):
            main[key] = value
        elif m is None:
            raise PVSInputError(f"unexpected key {key!r} in an official MedNeXt state dict")
        else:
            kind, i = m.group(1), int(m.group(2))
            if kind == "out":
                if i == 0:
                    main[key] = value
                else:  # MONAI keeps the heads deepest first
                    ds[f"out_blocks.{4 - i}.{rest}"] = value
                continue
            name = {"enc_block": f"enc_stages.{i}", "down": f"down_blocks.{i}",
                    "up": f"up_blocks.{3 - i}", "dec_block": f"dec_stages.{3 - i}"}[kind]
            main[f"{name}.{rest}"] = value
    return main, ds


def default_meta(arch: dict[str, Any], **preprocessing) -> dict[str, Any]:
    """Metadata of a new, untrained model with default preprocessing."""
    pre = {"target_spacing": [0.8, 0.8, 0.8], "modality": "T2w", "normalization": "zscore_roi",
           "patch_size": [128, 128, 128]}
    pre.update({k: v for k, v in preprocessing.items() if v is not None})
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "id": None, "created": None,
        "arch": {**arch, "deep_supervision_heads": False},
        "preprocessing": pre,
        "provenance": {"parent": None, "data_versions": [], "iterations": 0, "metrics": {},
                       "note": "untrained"},
    }


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
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        save_file(tensors, str(tmp), metadata={_META_KEY: json.dumps(meta)})
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # safetensors creates 0600 files; use normal permissions
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def read_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a checkpoint's metadata without loading its weights."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise PVSInputError(f"checkpoint {path} does not exist; check the path or `napari-pvs model ls`")
    try:
        with safe_open(str(path), framework="pt") as fh:
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
    import hashlib

    from .io import sha256_file

    path = Path(path)
    if path.suffix != ".json":
        return sha256_file(path)
    from .nnunet import load_ensemble

    return hashlib.sha256("".join(sha256_file(m) for m in load_ensemble(path)).encode()).hexdigest()


def _load_ensemble(path: Path, device: str):
    import torch

    from .nnunet import load_ensemble

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


def upkern(net_small, arch_large: dict[str, Any]):
    """UpKern: a network with larger kernels initialised from a smaller-kernel one.

    Every convolution kernel whose spatial size differs is resized by trilinear
    interpolation (``align_corners=True``, so the corner taps keep their values);
    everything else (norms, biases, 1x1x1 convolutions) is copied unchanged.
    """
    import torch
    import torch.nn.functional as F

    large = build_network(arch_large, deep_supervision=getattr(net_small, "do_ds", False))
    src = net_small.state_dict()
    out = {}
    for key, target in large.state_dict().items():
        if key not in src:
            raise PVSInputError(f"UpKern: the source network has no {key!r}; architectures differ")
        w = src[key]
        if w.shape == target.shape:
            out[key] = w.clone()
        elif w.ndim == 5 and w.shape[:2] == target.shape[:2]:
            with torch.no_grad():
                out[key] = F.interpolate(w.float(), size=tuple(target.shape[2:]), mode="trilinear",
                                         align_corners=True).to(w.dtype)
        else:
            raise PVSInputError(f"UpKern: {key} has shape {tuple(w.shape)} in the source and "
                                f"{tuple(target.shape)} in the target; only kernel sizes may differ")
    large.load_state_dict(out, strict=True)
    return large.eval()


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
        if not path.is_file():
            known = ", ".join(m["id"] for m in self.list()) or "none"
            raise PVSInputError(f"no model {model_id!r} in {self.folder} (known: {known})")
        return path

    def load(self, model_id: str, device: str = "cpu"):
        """``(network, metadata)`` of a registered model."""
        return load_checkpoint(self.path(model_id), device)

    def latest(self) -> dict[str, Any] | None:
        """Metadata of the newest model, or None for an empty registry."""
        models = self.list()
        return models[-1] if models else None
