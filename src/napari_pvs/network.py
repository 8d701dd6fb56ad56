"""MedNeXt as the MedNet-PVS paper defines it: architectures, metadata, UpKern.

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
S/B/M/L and ``XS``, a small configuration for tests and CPU demos.  :func:`check_meta`
checks a model's metadata document before anything is built from it.

Checkpoints, ensembles and the registry are in :mod:`napari_pvs.model`.
"""

from __future__ import annotations

import re
from copy import deepcopy
from typing import Any

from ._errors import PVSInputError

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "VARIANTS",
    "arch_config",
    "build_network",
    "check_meta",
    "check_spacing",
    "count_parameters",
    "default_meta",
    "map_official_state_dict",
    "upkern",
]

FORMAT = "napari-pvs-model"
FORMAT_VERSION = 1

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
    if pre.get("min_spacing") is not None:
        check_spacing(pre["min_spacing"], f"{source}: min_spacing")
    patch = pre.get("patch_size")
    if patch is not None and (not isinstance(patch, list) or len(patch) != 3
                              or not all(_whole(p, 16, 1024) and p % 16 == 0 for p in patch)):
        raise PVSInputError(f"{source}: patch_size must be 3 multiples of 16 from 16 to 1024, "
                            f"got {str(patch)[:80]}")
    post = meta.get("postprocessing", {})
    if not isinstance(post, dict):
        raise PVSInputError(f"{source}: postprocessing must be a JSON object")
    v = post.get("min_cluster_mm3", 0)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1000:
        raise PVSInputError(f"{source}: postprocessing.min_cluster_mm3 must be a volume from 0 "
                            f"to 1000 mm³, got {str(v)[:40]}")
    if not isinstance(meta.get("provenance", {}), dict):
        raise PVSInputError(f"{source}: provenance must be a JSON object")
    if meta.get("triage") is not None or meta.get("calibration") is not None:
        from .triage import check_triage, temperature_of

        if meta.get("triage") is not None:
            check_triage(meta["triage"], source)
        temperature_of(meta, source)
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
