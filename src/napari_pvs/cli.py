"""The ``napari-pvs`` command.

Subcommands::

    napari-pvs demo     [--out DIR] [--sites N] [--per-site M] [--modality T2w|T1w] [--no-viewer]
    napari-pvs phantom  OUTDIR [--sites N] [--per-site M] [--modality T2w|T1w] [--seed S]
    napari-pvs predict  IMAGE [IMAGE ...] -o OUTDIR [--model baseline] [--roi MASK] [--modality]

Bad input exits with status 2 and one line ``napari-pvs: error: ...`` on stderr; a
failing file operation (disk full, no permission) with status 1 and one line naming the
file; Ctrl-C with 130.  When the reader of stdout goes away (``napari-pvs store ls S |
head -3``) the command stops quietly with status 141 (128 + SIGPIPE, as the shell
reports for ``yes | head``).
"""

from __future__ import annotations

import argparse
import errno
import json
import math
import os
import sys
import time
from pathlib import Path

from . import __version__
from ._errors import PVSInputError
from ._nifti_checks import one_line
from .pipeline import check_output_folder, predict_file

__all__ = ["main"]


def _cmd_phantom(args: argparse.Namespace) -> int:
    from .dataset import write_phantom_cohort

    def progress(msg, done, total):
        print(f"[{done}/{total}] {msg}", flush=True)

    check_output_folder(args.outdir, "OUTDIR")
    files = write_phantom_cohort(
        args.outdir, n_sites=args.sites, per_site=args.per_site, modality=args.modality,
        seed=args.seed, size_mm=args.size_mm, progress=progress,
    )
    print(f"wrote {len(files)} subjects to {args.outdir} (participants.tsv lists their sites)")
    return 0


class _ProgressBar:
    """A one-line progress bar on a terminal; silent when the stream is not a TTY.

    It takes inference :class:`~napari_pvs.inference.Progress` events (``done`` of
    ``total``) and training events (``iteration`` of ``total``).  Without a positive
    ``total`` it shows the count alone.
    """

    def __init__(self, label: str, stream=None):
        self.label = label
        self.stream = sys.stderr if stream is None else stream
        self.tty = self.stream.isatty()
        self.t0 = time.perf_counter()

    def __call__(self, event) -> None:
        done = getattr(event, "done", None)
        if done is None:
            done = getattr(event, "iteration", None)
        if not self.tty or not isinstance(done, (int, float)) or not math.isfinite(done):
            return
        total = getattr(event, "total", None)
        ok_total = isinstance(total, (int, float)) and math.isfinite(total) and total > 0
        elapsed = f"{time.perf_counter() - self.t0:5.1f}s"
        if ok_total:
            bar = "#" * int(30 * min(max(done / total, 0.0), 1.0))
            self.stream.write(f"\r{self.label} [{bar:<30}] {done:g}/{total:g} {elapsed}")
            if done >= total:
                self.stream.write("\n")
        else:
            self.stream.write(f"\r{self.label} {done:g} {elapsed}")
        self.stream.flush()


def _cmd_predict(args: argparse.Namespace) -> int:
    from .io import strip_nifti_suffix

    if args.roi is not None and len(args.images) > 1:
        raise PVSInputError("--roi applies to one image; run predict once per image with its mask")
    check_output_folder(args.output, "-o")
    by_stem: dict[str, str] = {}
    for image in args.images:  # refuse before any work: the second would overwrite the first
        stem = strip_nifti_suffix(Path(image).name)
        if stem in by_stem:
            raise PVSInputError(
                f"{by_stem[stem]} and {image} would both be written to "
                f"{Path(args.output) / stem}_pvs.nii.gz; predict them into different -o folders"
            )
        by_stem[stem] = image
    for image in args.images:
        t = time.perf_counter()
        outs = predict_file(
            image, args.output, model=args.model, roi=args.roi, modality=args.modality,
            volume=args.volume, tta=args.tta, device=args.device, backend=args.backend,
            overlap=args.overlap, progress=_ProgressBar(Path(image).name),
        )
        names = ", ".join(str(p) for p in outs.values())
        print(f"{image} -> {names} ({time.perf_counter() - t:.1f} s)", flush=True)
    return 0


def _cmd_score(args: argparse.Namespace) -> int:
    from .io import load_volume
    from .metrics import score

    pred = load_volume(args.pred, as_labels=True)
    ref = load_volume(args.gt, as_labels=True)
    regions = load_volume(args.regions, as_labels=True) if args.regions else None
    # score() checks that the three lie on one grid (shape and affine), as the store does
    result = score(pred, ref, regions, connectivity=args.connectivity)
    print(json.dumps({"pred": str(args.pred), "gt": str(args.gt), "regions": args.regions,
                      "connectivity": args.connectivity, "scores": result}, indent=1))
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from .inference import Progress
    from .store import CorrectionsStore
    from .training.finetune import FinetuneConfig, finetune

    cfg = FinetuneConfig(iterations=args.iterations, patch=(args.patch,) * 3, lr=args.lr,
                         variant=args.variant, device=args.device or "cpu", seed=args.seed,
                         iterations_per_epoch=min(args.epoch, max(args.iterations, 1))).validate()
    bar = _ProgressBar("train")
    # read-only: corrections can be saved meanwhile; the lock is taken only to register
    with CorrectionsStore.open(args.store) as store:
        for event in finetune(store, init=args.init, config=cfg, resume=args.resume, wait=args.wait):
            if event.kind == "iteration":
                bar(Progress(event.iteration, event.total))
            elif event.kind == "validation":
                print(f"iteration {event.iteration}: validation voxel Dice {event.val_dice:.3f}, "
                      f"cluster Dice {event.val_cluster_dice:.3f}", flush=True)
            elif event.kind in ("start", "done"):
                print(f"{event.kind}: {event.message}"
                      + (" (registered by the finished run; nothing new)"
                         if event.extra.get("already_registered") else ""), flush=True)
    return 0


def _cmd_model(args: argparse.Namespace) -> int:
    from . import model as M

    if args.model_command == "create":
        arch = M.arch_config(args.variant, args.kernel, args.in_channels, args.out_channels)
        net = M.build_network(arch)
        meta = M.default_meta(arch, target_spacing=[args.spacing] * 3, modality=args.modality,
                              patch_size=[args.patch] * 3)
        out = M.save_checkpoint(args.out, net, meta)
        print(f"{out}: untrained MedNeXt-{arch['variant']} k{arch['kernel_size']}, "
              f"{M.count_parameters(net) / 1e6:.3f}M parameters, id {M.read_meta(out)['id']}")
    elif args.model_command == "upkern":
        out = M.upkern_checkpoint(args.checkpoint, args.out, args.kernel)
        meta = M.read_meta(out)
        print(f"{out}: k{meta['arch']['kernel_size']} model from {meta['provenance']['parent']}, "
              f"id {meta['id']}")
    elif args.model_command == "import-nnunet":
        from .model import load_ensemble
        from .nnunet import import_nnunet

        ens = import_nnunet(args.folder, args.out)
        for member in load_ensemble(ens):
            meta = M.read_meta(member)
            a = meta["arch"]
            print(f"{member}: {meta['provenance']['fold']}, MedNeXt {a['variant']} k{a['kernel_size']}, "
                  f"{a['in_channels']}->{a['out_channels']} channels, spacing "
                  f"{meta['preprocessing']['target_spacing']}, patch {meta['preprocessing']['patch_size']}")
        print(f"{ens}: ensemble of {len(load_ensemble(ens))} folds; use it with "
              f"`napari-pvs predict IMAGE -o OUT --model {ens}`")
    elif args.model_command == "ls":
        if not Path(args.folder).is_dir():
            raise PVSInputError(f"{args.folder} is not a folder; pass a model registry folder "
                                "(e.g. STORE.pvs.zarr/models) or the output folder of import-nnunet")
        models = M.ModelRegistry(args.folder).list()
        if not models:
            print(f"no models in {args.folder}")
        print(f"{'id':<44} {'arch':<8} {'created':<26} {'parent':<30} metrics")
        for m in models:
            a = m["arch"]
            prov = m.get("provenance", {})
            print(f"{m['id']:<44} {a.get('variant', '?')}-k{a.get('kernel_size', '?'):<4} "
                  f"{m.get('created') or '':<26} {prov.get('parent') or '-':<30} "
                  f"{json.dumps(prov.get('metrics') or {})}")
    return 0


def _score_subject(files, pred_path: Path) -> dict:
    from .io import load_volume
    from .metrics import cluster_scores, voxel_dice

    ref = load_volume(files.labels, as_labels=True).data
    pred = load_volume(pred_path, as_labels=True).data
    roi = load_volume(files.regions, as_labels=True).data > 0
    cs = cluster_scores(pred, ref, mask=roi)
    return {
        "subject": files.subject, "site": files.site, "voxel_dice": voxel_dice(pred, ref, roi),
        "cluster_dice": cs.dice, "cluster_precision": cs.precision, "cluster_recall": cs.recall,
        "n_pred": cs.n_pred, "n_ref": cs.n_ref,
    }


def _display_available() -> bool:
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")) and (
        os.environ.get("QT_QPA_PLATFORM", "") != "offscreen"
    )


def _cmd_demo(args: argparse.Namespace) -> int:
    import numpy as np

    from .dataset import write_phantom_cohort

    out = check_output_folder(args.out, "--out")
    print(f"napari-pvs {__version__} demo: {args.sites} sites x {args.per_site} {args.modality} "
          f"phantoms -> {out}", flush=True)
    t0 = time.perf_counter()
    subjects = write_phantom_cohort(
        out / "cohort", n_sites=args.sites, per_site=args.per_site, modality=args.modality,
        seed=args.seed, size_mm=args.size_mm,
        progress=lambda m, d, n: print(f"  phantom [{d}/{n}] {m}", flush=True),
    )
    print(f"  cohort written in {time.perf_counter() - t0:.1f} s; segmenting with the Frangi baseline "
          "inside each subject's WM+BG mask", flush=True)
    rows = []
    header = f"{'subject':<10} {'site':<6} {'voxel':>6} {'vox Dice':>8} {'clu Dice':>8} " \
             f"{'clu P':>6} {'clu R':>6} {'n pred':>6} {'n ref':>6} {'time':>6}"
    print(header)
    for files in subjects:
        t = time.perf_counter()
        pred = predict_file(files.image, out / "predictions", roi=files.regions,
                            modality=files.modality)["labels"]
        row = _score_subject(files, pred)
        row["seconds"] = time.perf_counter() - t
        rows.append(row)
        spacing = json.loads(files.regions.with_name(f"sub-{files.subject}_desc-phantom.json")
                             .read_text())["spacing_mm"]
        print(f"{row['subject']:<10} {row['site']:<6} {spacing:>4.1f}mm {row['voxel_dice']:>8.3f} "
              f"{row['cluster_dice']:>8.3f} {row['cluster_precision']:>6.2f} "
              f"{row['cluster_recall']:>6.2f} {row['n_pred']:>6d} {row['n_ref']:>6d} "
              f"{row['seconds']:>5.1f}s", flush=True)
    vd = np.array([r["voxel_dice"] for r in rows])
    cd = np.array([r["cluster_dice"] for r in rows])
    print(f"mean +/- sd   voxel Dice {vd.mean():.3f} +/- {vd.std():.3f}   "
          f"cluster Dice {cd.mean():.3f} +/- {cd.std():.3f}")
    (out / "scores.json").write_text(json.dumps(rows, indent=1))
    print(f"scores: {out / 'scores.json'}; predictions: {out / 'predictions'}")
    if args.viewer and _display_available():
        from ._widgets._demo import show_demo

        show_demo(subjects, out, out / "predictions", args.screenshot)
    elif args.viewer:
        print("no display found: skipping the napari viewer (open the files with "
              "`napari <file.nii.gz>` on a desktop)")
    return 0


def _number(kind, lo: float, hi: float, *, hi_open: bool = False, what: str = "a number"):
    """An argparse ``type``: ``kind`` (int or float) within [lo, hi] (or [lo, hi)), finite."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        inside = lo <= value < hi if hi_open else lo <= value <= hi
        if not (math.isfinite(value) and inside):
            raise argparse.ArgumentTypeError(
                f"{text} is out of range: use {what} from {lo:g} to {hi:g}"
                f"{' (exclusive)' if hi_open else ''}")
        return value

    return parse


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="napari-pvs", description="PVS segmentation in brain MRI")
    ap.add_argument("--version", action="version", version=f"napari-pvs {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)

    def cohort_args(p, sites, per_site, size_mm):
        p.add_argument("--sites", type=int, default=sites, help="number of scanner sites")
        p.add_argument("--per-site", type=int, default=per_site, help="subjects per site")
        p.add_argument("--modality", choices=("T2w", "T1w"), default="T2w")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--size-mm", type=_number(float, 32, 320, what="a field of view in mm"),
                       default=size_mm,
                       help="field of view in mm (the anatomy scales with it)")

    p = sub.add_parser("demo", help="main job: phantom cohort -> baseline -> Dice per subject")
    p.add_argument("--out", default="pvs-demo", help="output folder (default: ./pvs-demo)")
    p.add_argument("--no-viewer", dest="viewer", action="store_false",
                   help="do not open napari even when a display exists")
    p.add_argument("--screenshot", metavar="PNG",
                   help="save a screenshot of the viewer to PNG and exit instead of waiting")
    cohort_args(p, 3, 2, 144.0)
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("phantom", help="write a synthetic multi-site cohort (BIDS-like)")
    p.add_argument("outdir")
    cohort_args(p, 3, 2, 160.0)
    p.set_defaults(func=_cmd_phantom)

    p = sub.add_parser("predict", help="segment NIfTI images")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--model", default="baseline",
                   help="'baseline' (Frangi vesselness) or a MedNeXt checkpoint (.safetensors)")
    p.add_argument("--roi", help="mask on the image grid (nonzero inside), e.g. WM+BG")
    p.add_argument("--modality", choices=("T2w", "T1w"),
                   help="contrast (default: from the BIDS suffix of the file name, else T2w)")
    p.add_argument("--volume", type=int, help="volume index for 4D files")
    p.add_argument("--tta", type=_number(int, 1, 8, what="a count of mirror variants"), default=None,
                   help="mirror TTA variants, 1-8 (MedNeXt only; default: the model's, else 1)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: best available)")
    p.add_argument("--backend", default="auto", choices=("auto", "torch", "onnxruntime", "openvino"),
                   help="window runner on CPU (default: the fastest installed)")
    p.add_argument("--overlap", type=_number(float, 0, 1, hi_open=True, what="a fraction"),
                   default=None,
                   help="sliding-window overlap in [0, 1) (default: the model's, else 0.5)")
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("score", help="voxel and cluster Dice of a prediction (JSON)")
    p.add_argument("pred", help="predicted PVS labels (NIfTI)")
    p.add_argument("gt", help="reference labels (NIfTI, same grid)")
    p.add_argument("--regions", help="region map: 1 WM, 2 BG (scores per region)")
    p.add_argument("--connectivity", type=int, default=26, choices=(6, 18, 26))
    p.set_defaults(func=_cmd_score)

    p = sub.add_parser("train", help="fine-tune on the store's corrections; registers the model")
    p.add_argument("--store", required=True)
    p.add_argument("--init", help="model id in the store's registry, or a .safetensors file "
                                  "(default: a new MedNeXt)")
    p.add_argument("--iterations", type=int, default=200)
    p.add_argument("--epoch", type=int, default=50, help="iterations per epoch (validation + checkpoint)")
    p.add_argument("--patch", type=int, default=48,
                   help="patch edge (voxels: a multiple of 16, at least 32)")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--variant", default="XS", help="architecture when starting from scratch")
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue the last interrupted run")
    p.add_argument("--wait", type=float, default=30.0,
                   help="seconds to wait for the store's write lock when registering the model "
                        "(training itself never holds it)")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("model", help="create, upkern and list MedNeXt checkpoints")
    msub = p.add_subparsers(dest="model_command", required=True)
    c = msub.add_parser("create", help="write an untrained checkpoint")
    c.add_argument("out", help="output .safetensors file")
    c.add_argument("--variant", default="L", help="S, B, M, L (paper) or XS (small, for CPU demos)")
    c.add_argument("--kernel", type=int, default=5, choices=(3, 5, 7))
    c.add_argument("--in-channels", type=int, default=1)
    c.add_argument("--out-channels", type=int, default=2)
    c.add_argument("--spacing", type=float, default=0.8, help="target spacing in mm")
    c.add_argument("--patch", type=int, default=128, help="window edge in voxels")
    c.add_argument("--modality", choices=("T2w", "T1w"), default="T2w")
    u = msub.add_parser("upkern", help="build a larger-kernel model from a checkpoint (UpKern)")
    u.add_argument("checkpoint")
    u.add_argument("out")
    u.add_argument("--kernel", type=int, default=5, choices=(5, 7))
    im = msub.add_parser("import-nnunet",
                         help="convert an nnU-Net v1 MedNeXt training folder (MedNet-PVS release)")
    im.add_argument("folder", help="trainer folder holding plans.pkl and fold_N/")
    im.add_argument("out", help="output folder: fold_N.safetensors + ensemble.json")
    ls = msub.add_parser("ls", help="list the models of a registry folder")
    ls.add_argument("folder")
    p.set_defaults(func=_cmd_model)

    from ._cli_store import add_store_parser
    from .training.evaluate import add_evaluate_parser

    add_store_parser(sub)
    add_evaluate_parser(sub)
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
    try:
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
