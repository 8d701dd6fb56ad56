"""``napari-pvs cache clean``: remove the ONNX exports the CPU runtimes keep."""

from __future__ import annotations

import argparse
from pathlib import Path

from ._backends import default_cache_dir
from ._onnx_cache import clean_exports

__all__ = ["add_cache_parser", "size_text"]


def size_text(n: int) -> str:
    """``512 B``, ``3.4 MB``, ``1.2 GB`` (powers of 1000, as ``df -H``)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _cmd_cache(args: argparse.Namespace) -> int:
    root = Path(args.cache_dir).expanduser() if args.cache_dir else default_cache_dir()
    entries = clean_exports(root, dry_run=args.dry_run)
    verb = "would free" if args.dry_run else "freed"
    for path, size in entries:
        print(f"{size_text(size):>10}  {path}")
    total = sum(size for _, size in entries)
    print(f"{root}: {verb} {size_text(total)} in {len(entries)} cached export"
          f"{'s' * (len(entries) != 1)}"
          + (" (run without --dry-run to remove them)" if args.dry_run and entries else ""))
    return 0


def add_cache_parser(sub) -> None:
    """Register ``cache clean``."""
    p = sub.add_parser("cache", help="the ONNX export cache of the CPU runtimes")
    csub = p.add_subparsers(dest="cache_command", required=True)
    c = csub.add_parser("clean", help="remove the cached ONNX exports and print what that "
                                      "freed (the next prediction with a model exports it again)")
    c.add_argument("--dry-run", action="store_true",
                   help="only list the exports and their sizes; remove nothing")
    c.add_argument("--cache-dir", metavar="DIR",
                   help="cache folder (default: $NAPARI_PVS_CACHE, else "
                        "$XDG_CACHE_HOME/napari-pvs, else ~/.cache/napari-pvs)")
    p.set_defaults(func=_cmd_cache)
