"""``napari-pvs bids BIDS_DIR OUTPUT_DIR participant|group``: the BIDS-App interface.

The work is :mod:`napari_pvs.bids_app`; this module parses the arguments (the BIDS-App
conventions: positional ``bids_dir output_dir analysis_level``, ``--participant-label``,
``--session-label``) and turns the result into the exit status: 0 when every image was
processed, else the number of failed images (at most 100).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ._cli_common import number

__all__ = ["add_bids_parser"]


def _cmd_bids(args: argparse.Namespace) -> int:
    from .bids_app import model_identity, run_group, run_participant

    if args.scheduler and args.scheduler_file:
        raise ValueError("give --scheduler or --scheduler-file, not both")
    if args.scheduler_file and not Path(args.scheduler_file).is_file():
        raise ValueError(f"--scheduler-file {args.scheduler_file}: no such file; start the "
                         "scheduler first (dask scheduler --scheduler-file FILE)")
    if args.level == "participant":
        from ._cli_common import ProgressReport

        # a bar on a terminal, else a line every 5 % (as the other long commands)
        report = ProgressReport("bids")
        res = run_participant(args.bids_dir, args.output_dir, model=args.model,
                              participants=args.participant_label,
                              sessions=args.session_label, seg=args.seg, tta=args.tta,
                              workers=args.workers, scheduler=args.scheduler,
                              scheduler_file=args.scheduler_file, reader=args.reader,
                              suffix=args.modality, log=report.note, progress=report)
        print(f"participant level: {res.found} images, {len(res.computed)} computed, "
              f"{len(res.skipped)} skipped (already done), {len(res.failed)} failed, in "
              f"{res.seconds:.1f} s", flush=True)
        for path, reason in res.failed.items():
            print(f"napari-pvs: failed: {path}: {reason}", file=sys.stderr)
        return min(len(res.failed), 100)
    suffix = args.modality or model_identity(args.model)["modality"] or "T2w"
    _, n_failed = run_group(args.bids_dir, args.output_dir,
                            participants=args.participant_label,
                            sessions=args.session_label, suffix=suffix, reader=args.reader,
                            log=lambda m: print(m, flush=True))
    return min(n_failed, 100)


def add_bids_parser(sub) -> None:
    p = sub.add_parser(
        "bids", help="run over a BIDS dataset on Dask (BIDS App: participant / group)",
        description="Segment the PVS of every anatomical image of a BIDS dataset and write "
        "BIDS derivatives (participant level), then the cohort's statistics and an HTML QC "
        "report (group level). Images run as Dask tasks on a local cluster (--workers) or "
        "an existing scheduler; a rerun skips the images already done with the same input "
        "and model. Exit status: 0, or the number of images that failed (at most 100).")
    p.add_argument("bids_dir", type=Path, help="the BIDS dataset's root")
    p.add_argument("output_dir", type=Path, help="the derivatives folder to write "
                   "(e.g. BIDS_DIR/derivatives/napari-pvs)")
    p.add_argument("level", choices=("participant", "group"), metavar="participant|group",
                   help="participant: segment each image and write its derivatives; group: "
                   "the cohort's statistics, failures and QC report from them")
    p.add_argument("--participant-label", nargs="+", metavar="LABEL",
                   help="only these participants (with or without sub-)")
    p.add_argument("--session-label", nargs="+", metavar="LABEL",
                   help="only these sessions (with or without ses-)")
    p.add_argument("--model", default="starter", help="starter (default), baseline (Frangi), "
                   "a checkpoint or an ensemble .json")
    p.add_argument("--modality", choices=("T2w", "T1w"),
                   help="the images' suffix (default: the model's modality, else T2w)")
    p.add_argument("--seg", default="auto", metavar="auto|none|PATTERN",
                   help="regions: auto (FreeSurfer / SynthSeg / fMRIPrep in derivatives/, "
                   "else estimated from the image), none (estimated), or a path pattern "
                   "relative to BIDS_DIR with {subject} and {session}")
    p.add_argument("--tta", type=number(int, 1, 8, what="a number of flips"),
                   help="mirror flips (default: the model's)")
    p.add_argument("--workers", type=number(int, 1, 512, what="a number of workers"),
                   help="local Dask worker processes (default 1: measured fastest on 2 "
                   "cores, benchmarks/bench_cohort.py); each gets cores / workers threads")
    p.add_argument("--scheduler", metavar="ADDRESS",
                   help="join an existing Dask scheduler (tcp://host:8786) instead")
    p.add_argument("--scheduler-file", metavar="FILE",
                   help="join the scheduler described by FILE (dask-jobqueue, dask-mpi)")
    p.add_argument("--reader", choices=("pybids", "glob"), default="pybids",
                   help="how the dataset is read: pybids (default) or the built-in walk of "
                   "sub-*/[ses-*/]anat (faster on large datasets)")
    p.set_defaults(func=_cmd_bids)
