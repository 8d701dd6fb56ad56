"""``napari-pvs model ...``: create, upkern, import and list MedNeXt checkpoints (the
shipped starter models first)."""

from __future__ import annotations

import argparse
import json
import textwrap
from pathlib import Path

from . import model as M
from ._cli_common import add_out
from ._errors import PVSInputError
from .nnunet import import_nnunet
from .store import CorrectionsStore

__all__ = ["add_model_parser", "card_lines", "registry_of"]


def registry_of(folder: str) -> M.ModelRegistry:
    """The registry of a store folder (``STORE``), or a registry folder itself
    (``STORE/models``, the output folder of ``import-nnunet``)."""
    path = Path(folder)
    if (path / "zarr.json").is_file():
        with CorrectionsStore.open(path) as store:  # read-only: never waits for a writer
            return store.models
    if not path.is_dir():
        raise PVSInputError(f"{folder} is not a folder; pass a store (NAME.pvs.zarr), its "
                            "models folder or the output folder of import-nnunet")
    return M.ModelRegistry(path)


def _create(args: argparse.Namespace) -> None:
    arch = M.arch_config(args.variant, args.kernel, args.in_channels, args.out_channels)
    net = M.build_network(arch)
    meta = M.default_meta(arch, target_spacing=[args.spacing] * 3, modality=args.modality,
                          patch_size=[args.patch] * 3)
    out = M.save_checkpoint(args.out, net, meta)
    print(f"{out}: untrained MedNeXt-{arch['variant']} k{arch['kernel_size']}, "
          f"{M.count_parameters(net) / 1e6:.3f}M parameters, id {M.read_meta(out)['id']}")


def _upkern(args: argparse.Namespace) -> None:
    out = M.upkern_checkpoint(args.checkpoint, args.out, args.kernel)
    meta = M.read_meta(out)
    print(f"{out}: k{meta['arch']['kernel_size']} model from {meta['provenance']['parent']}, "
          f"id {meta['id']}")


def _import_nnunet(args: argparse.Namespace) -> None:
    ens = import_nnunet(args.folder, args.out)
    members = M.load_ensemble(ens)
    for member in members:
        meta = M.read_meta(member)
        a, pre = meta["arch"], meta["preprocessing"]
        print(f"{member}: {meta['provenance']['fold']}, MedNeXt {a['variant']} "
              f"k{a['kernel_size']}, {a['in_channels']}->{a['out_channels']} channels, spacing "
              f"{pre['target_spacing']}, patch {pre['patch_size']}")
    print(f"{ens}: ensemble of {len(members)} folds; use it with "
          f"`napari-pvs predict IMAGE -o OUT --model {ens}`")


def _card_value(value) -> str:
    """A card entry on one line: numbers to 3 decimals, mappings as ``key value, ...``
    (nested ones in parentheses)."""
    if isinstance(value, float):
        return f"{round(value, 3):g}"
    if isinstance(value, dict):
        return ", ".join(f"{k} ({_card_value(v)})" if isinstance(v, dict)
                         else f"{k} {_card_value(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_card_value(v) for v in value) + "]"
    return str(value)


def card_lines(card: dict, width: int = 100) -> list[str]:
    """A model card (``meta["card"]``) as indented ``key: value`` lines, wrapped; a
    mapping of mappings (the held-out scores, by test set) gets a line per entry."""
    lines = []

    def add(text: str, indent: str) -> None:
        lines.extend(textwrap.wrap(text, width, initial_indent=indent,
                                   subsequent_indent=indent + "  "))

    for key, value in card.items():
        if key in ("name", "modality"):  # on the model's own line already
            continue
        if key == "held_out" and isinstance(value, dict) and all(
                isinstance(v, dict) and "mean" in v for v in value.values()):
            # training.holdout.evaluate's scores: the means, model next to Frangi
            lines.append("    held-out (WM + BG; voxel Dice, cluster Dice, cluster P, R):")
            for case, res in value.items():
                for method, m in (res.get("mean") or {}).items():
                    a = m.get("all", {})
                    add(f"{case} {method}: " + ", ".join(
                        f"{a.get(k, float('nan')):.3f}" for k in
                        ("voxel_dice", "cluster_dice", "cluster_precision", "cluster_recall")),
                        "      ")
            continue
        if isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
            lines.append(f"    {key}:")
            for sub, entry in value.items():
                add(f"{sub}: {_card_value(entry)}", "      ")
        else:
            add(f"{key}: {_card_value(value)}", "    ")
    return lines


def _mm(spacing) -> str:
    """``0.8`` for an isotropic spacing, ``0.5x0.5x3`` otherwise."""
    return "x".join(f"{s:g}" for s in dict.fromkeys(spacing))


def _ls_starter() -> None:
    print("shipped with napari-pvs (predict --model NAME):")
    for m in M.starter_models():
        if "error" in m:
            print(f"{m['name']:<14} {m['error']}")
            continue
        a, pre = m["arch"], m["preprocessing"]
        grid = f"{_mm(pre['target_spacing'])} mm"
        if pre.get("min_spacing"):
            floor = _mm(pre["min_spacing"])
            grid += f" (finer images run at their own voxels, down to {floor} mm)"
        smallest = (m.get("postprocessing") or {}).get("min_cluster_mm3")
        if smallest:
            grid += f", clusters of {smallest:g} mm³ or more"
        print(f"{m['name']:<14} MedNeXt-{a['variant']} k{a['kernel_size']}, "
              f"{pre.get('modality', '?')}, {grid}, id {m['id']} "
              f"({Path(m['path']).name})")
        card = m.get("card")
        for line in card_lines(card) if isinstance(card, dict) else ["    (no model card)"]:
            print(line)


def _ls(args: argparse.Namespace) -> None:
    models = None if args.folder is None else registry_of(args.folder).list()
    _ls_starter()
    if models is None:
        return
    print()
    if not models:
        print(f"no models in {args.folder}")
        return
    print(f"{'id':<44} {'arch':<8} {'created':<26} {'parent':<30} metrics")
    for m in models:
        a = m["arch"]
        prov = m.get("provenance", {})
        print(f"{m['id']:<44} {a.get('variant', '?')}-k{a.get('kernel_size', '?'):<4} "
              f"{m.get('created') or '':<26} {prov.get('parent') or '-':<30} "
              f"{json.dumps(prov.get('metrics') or {})}")


_COMMANDS = {"create": _create, "upkern": _upkern, "import-nnunet": _import_nnunet, "ls": _ls}


def _cmd_model(args: argparse.Namespace) -> int:
    _COMMANDS[args.model_command](args)
    return 0


def add_model_parser(sub) -> None:
    """Register ``model`` and its subcommands."""
    p = sub.add_parser("model", help="create, upkern, import and list MedNeXt checkpoints")
    msub = p.add_subparsers(dest="model_command", required=True)
    c = msub.add_parser("create", help="write an untrained checkpoint")
    add_out(c, "output .safetensors file", positional="OUT")
    c.add_argument("--variant", default="L", help="S, B, M, L (paper) or XS (small, for CPU demos)")
    c.add_argument("--kernel", type=int, default=5, choices=(3, 5, 7),
                   help="convolution kernel edge (default: 5)")
    c.add_argument("--in-channels", type=int, default=1, help="input channels (default: 1)")
    c.add_argument("--out-channels", type=int, default=2,
                   help="output classes, background included (default: 2)")
    c.add_argument("--spacing", type=float, default=0.8, help="target spacing in mm")
    c.add_argument("--patch", type=int, default=128, help="window edge in voxels")
    c.add_argument("--modality", choices=("T2w", "T1w"), default="T2w",
                   help="contrast the model is for (default: T2w)")
    u = msub.add_parser("upkern", help="build a larger-kernel model from a checkpoint (UpKern)")
    u.add_argument("checkpoint", help="the smaller-kernel checkpoint (.safetensors)")
    add_out(u, "output .safetensors file", positional="OUT")
    u.add_argument("--kernel", type=int, default=5, choices=(5, 7),
                   help="kernel edge of the new model (default: 5)")
    im = msub.add_parser("import-nnunet",
                         help="convert an nnU-Net v1 MedNeXt training folder (MedNet-PVS release)")
    im.add_argument("folder", help="trainer folder holding plans.pkl and fold_N/")
    add_out(im, "output folder: fold_N.safetensors + ensemble.json", positional="OUT")
    ls = msub.add_parser("ls", help="list the shipped models (with their cards) and the "
                                    "models of a store's registry")
    ls.add_argument("folder", metavar="STORE", nargs="?",
                    help="a store (NAME.pvs.zarr), its models folder, or the output folder of "
                         "import-nnunet (without it: the shipped models only)")
    p.set_defaults(func=_cmd_model)
