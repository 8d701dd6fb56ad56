"""The ``napari-pvs`` command.

Subcommands (``napari-pvs COMMAND --help`` describes each)::

    napari-pvs demo     [-o DIR] [--sites N] [--per-site M] [--modality T2w|T1w] [--tta N]
                        [--no-viewer]
    napari-pvs phantom  -o OUTDIR [--sites N] [--per-site M] [--modality T2w|T1w] [--aseg]
    napari-pvs predict  IMAGE [IMAGE ...] -o OUTDIR [--model baseline|starter|FILE|ID --store S]
                        [--roi REGIONS | --seg SEG [--lut TSV]]
    napari-pvs regions  SEG --like IMAGE -o REGIONS.nii.gz [--lut TSV] [--brain MASK]
    napari-pvs score    PRED GT [--regions REGIONS]
    napari-pvs train    --store S [--init MODEL] [--iterations N] [--device auto]
    napari-pvs evaluate --store S --scheme kfold:K|losocv [-o DIR] [--keep-models]
    napari-pvs model    create|upkern|import-nnunet|ls [STORE] ...
    napari-pvs store    init|import|commit|export|ls|verify ...
    napari-pvs cache    clean [--dry-run]
    napari-pvs bids     BIDS_DIR OUTPUT_DIR participant|group [--participant-label L ...]
                        [--model M] [--seg auto|none|PATTERN] [--workers N | --scheduler A]

Every command that writes takes ``-o/--out`` (older spellings still work: ``phantom
OUTDIR``, ``predict --output``, ``model create OUT``, ``store export STORE OUTDIR``).
A model is named by ``baseline``, a shipped model's name (``starter``), a checkpoint file
or a registry id with ``--store``.
Long commands draw a progress bar on a terminal and otherwise log a line every 5 %
with the time elapsed and left.

Bad input exits with status 2 and one line ``napari-pvs: error: ...`` on stderr; a
failing file operation (disk full, no permission) with status 1 and one line naming the
file; Ctrl-C with 130.  When the reader of stdout goes away (``napari-pvs store ls S |
head -3``) the command stops quietly with status 141 (128 + SIGPIPE, as the shell
reports for ``yes | head``).
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import warnings

from . import __version__
from ._cli_bids import add_bids_parser
from ._cli_cache import add_cache_parser
from ._cli_common import settle_out
from ._cli_demo import add_demo_parsers
from ._cli_model import add_model_parser
from ._cli_predict import add_predict_parsers
from ._cli_store import add_store_parser
from ._cli_train import add_train_parsers
from ._errors import PVSInputError
from ._nifti_checks import one_line

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="napari-pvs", description="PVS segmentation in brain MRI")
    ap.add_argument("--version", action="version", version=f"napari-pvs {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)
    add_demo_parsers(sub)
    add_predict_parsers(sub)
    add_train_parsers(sub)
    add_model_parser(sub)
    add_store_parser(sub)
    add_cache_parser(sub)
    add_bids_parser(sub)
    return ap


def _stdout_closed() -> int:
    """The reader of stdout went away (``napari-pvs store ls S | head``): stop quietly."""
    try:  # later writes, and the flush at exit, go nowhere instead of raising again
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    return 141  # 128 + SIGPIPE: what the shell reports for `yes | head`


_OS_HINTS = {
    errno.ENOSPC: "free some disk space and run it again",
    errno.EDQUOT: "free some space within your disk quota and run it again",
    errno.EACCES: "check the permissions of the file and its folder",
    errno.EPERM: "check the permissions of the file and its folder",
    errno.EROFS: "the file system is read-only; write somewhere else",
    errno.ENOENT: "check the path",
    errno.EEXIST: "a file of that name is in the way; pick another name or remove it",
    errno.ENOTDIR: "a file stands where a folder is needed; check the path",
    errno.EISDIR: "a folder stands where a file is needed; check the path",
}


def _os_error_line(exc: OSError) -> str:
    """One line for an OSError: the file(s), the system's reason and what to do."""
    reason = exc.strerror or one_line(exc)
    files = " -> ".join(str(f) for f in (exc.filename, exc.filename2) if f is not None)
    hint = _OS_HINTS.get(exc.errno) or (
        "check the file and the disk, then run it again" if files else "run it again")
    return f"{files}: {reason}; {hint}" if files else f"{reason}; {hint}"


def _one_line_warnings() -> None:
    """Show our warnings (``UserWarning``, ``RuntimeWarning`` and their subclasses) as one
    ``napari-pvs: warning: ...`` line on stderr, each message once per command."""
    shown = warnings.showwarning

    def show(message, category, *args, **kwargs):
        if issubclass(category, (UserWarning, RuntimeWarning)):
            print(f"napari-pvs: warning: {message}", file=sys.stderr, flush=True)
        else:
            shown(message, category, *args, **kwargs)

    warnings.showwarning = show


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``napari-pvs`` command; returns the exit status.

    Bad input (:class:`PVSInputError`, ``ValueError``) prints one line
    ``napari-pvs: error: ...`` and returns 2; a failing file operation (disk full,
    permission denied, missing file) prints one line naming the file and returns 1;
    Ctrl-C prints ``napari-pvs: interrupted`` and returns 130; a closed stdout pipe
    ends quietly with 141 (128 + SIGPIPE).  Any other exception is a bug and keeps
    its traceback.
    """
    args = _parser().parse_args(argv)
    settle_out(args)
    try:
        with warnings.catch_warnings():
            _one_line_warnings()
            status = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows up here rather than at interpreter exit
        return status
    except BrokenPipeError:
        return _stdout_closed()
    except KeyboardInterrupt:
        print("napari-pvs: interrupted", file=sys.stderr)
        return 130
    except PVSInputError as exc:
        print(f"napari-pvs: error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # argument values that the core rejected
        print(f"napari-pvs: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"napari-pvs: error: {_os_error_line(exc)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
