"""``napari-pvs train`` and ``napari-pvs evaluate``: fine-tuning on a store's corrections."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ._backends import BACKENDS
from ._cli_common import ProgressReport, add_device, add_out, add_store, resolve_device
from ._errors import PVSInputError
from .inference import run
from .store import CorrectionsStore
from .training.evaluate import evaluate, parse_scheme, scheme_name
from .training.finetune import FinetuneConfig, finetune

__all__ = ["add_train_parsers", "remove_models"]


def _cmd_train(args: argparse.Namespace) -> int:
    # "auto" becomes a concrete device here: the config (and its checkpoint) names it
    cfg = FinetuneConfig(iterations=args.iterations, patch=(args.patch,) * 3, lr=args.lr,
                         variant=args.variant, device=resolve_device(args.device), seed=args.seed,
                         iterations_per_epoch=min(args.epoch, max(args.iterations, 1))).validate()
    report = ProgressReport("train")
    again = []  # the run had finished before (--resume): its model, not a new one

    def show(event) -> None:
        if event.kind == "iteration":
            report(event)
        elif event.kind == "validation":
            report.note(f"iteration {event.iteration}: validation voxel Dice "
                        f"{event.val_dice:.3f}, cluster Dice {event.val_cluster_dice:.3f}")
        elif event.kind == "start":
            report.note(f"start: {event.message} (device {cfg.device})")
        elif event.kind == "triage":
            report.note(event.message)
        elif event.kind == "done" and event.extra.get("already_registered"):
            again.append(event.message)

    # read-only: corrections can be saved meanwhile; the lock is taken only to register
    with CorrectionsStore.open(args.store) as store:
        model_id = run(finetune(store, init=args.init, config=cfg, resume=args.resume,
                                wait=args.wait), show)
        # the id names the model for --init, predict --model ID --store S and the widgets
        print(f"done: {model_id} ({store.models.path(model_id)})"
              + (" (registered by the finished run; nothing new)"
                 if again else ""), flush=True)
    return 0


def remove_models(store_path, model_ids: list[str], wait: float) -> None:
    """Remove ``model_ids`` from the store's registry under its write lock."""
    with CorrectionsStore.open(store_path, writable=True, wait=wait) as store:
        for model_id in model_ids:
            store.remove_model(model_id)


def _scheme_arg(value: str) -> str:
    try:
        parse_scheme(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value.strip().lower()


def _evaluate_printer(registered: list[str]):
    """Prints evaluation events (progress through a :class:`ProgressReport`) and collects
    the ids of the fold models as they are registered."""
    report = ProgressReport("evaluate")

    def show(ev) -> None:
        if ev.kind == "train":
            if ev.train.kind == "done":
                registered.append(ev.train.message)
            report(ev)
        else:
            report(ev)
            report.note(("  " if ev.kind == "subject" else "") + ev.message)

    return show


def _cmd_evaluate(args: argparse.Namespace) -> int:
    cfg = FinetuneConfig(iterations=args.iterations, patch=(args.patch,) * 3, lr=args.lr,
                         batch_size=args.batch_size,
                         iterations_per_epoch=max(1, min(50, args.iterations)),
                         device=resolve_device(args.device))
    registered: list[str] = []
    print(f"evaluate {args.scheme} on {cfg.device}", flush=True)
    try:
        with CorrectionsStore.open(args.store) as store:  # read-only: annotators keep saving
            out = Path(args.out) if args.out else (
                store.path / "evaluation" / scheme_name(args.scheme, args.seed))
            report = run(evaluate(store, args.scheme, config=cfg, out_dir=out, seed=args.seed,
                                  init=args.init, backend=args.backend, wait=args.wait),
                         _evaluate_printer(registered))
    except BaseException:
        if not args.keep_models and registered:  # an interrupted run leaves no fold models
            try:
                remove_models(args.store, registered, args.wait)
            except (PVSInputError, OSError) as exc:
                print(f"napari-pvs: warning: fold models {registered} were not removed: {exc}",
                      file=sys.stderr)
        raise
    print(f"\n{report.markdown}")
    print(f"results: {report.results_csv}\nsummary: {report.summary_md}\n"
          f"plot:    {report.boxplot_png}")
    if args.keep_models:
        print(f"fold models kept in {args.store}: {', '.join(registered)}")
    elif registered:
        remove_models(args.store, registered, args.wait)
        print(f"removed the {len(registered)} fold models from {args.store} (results.csv names "
              "them; --keep-models keeps them)")
    return 0


def _add_fit_args(p: argparse.ArgumentParser, what: str) -> None:
    """The settings ``train`` and ``evaluate`` share."""
    add_store(p, "holding the corrections to train on")
    p.add_argument("--init", help=f"model id in the store's registry, or a .safetensors file, "
                                  f"{what} starts from (default: a new MedNeXt)")
    p.add_argument("--patch", type=int, default=48,
                   help="patch edge (voxels: a multiple of 16, at least 32)")
    p.add_argument("--lr", type=float, default=3e-4,
                   help="peak learning rate of AdamW (polynomial decay; default: 3e-4)")
    add_device(p, f"that {what} trains on")
    p.add_argument("--wait", type=float, default=30.0,
                   help=f"seconds to wait for the store's write lock when {what} registers "
                        "a model (training itself never holds it)")


def add_train_parsers(sub) -> None:
    """Register ``train`` and ``evaluate``."""
    p = sub.add_parser("train", help="fine-tune on the store's corrections; registers the model "
                                     "and prints its id and file")
    _add_fit_args(p, "training")
    p.add_argument("--iterations", type=int, default=200,
                   help="training iterations, one batch of patches each (default: 200)")
    p.add_argument("--epoch", type=int, default=50, help="iterations per epoch (validation + "
                                                         "checkpoint)")
    p.add_argument("--variant", default="XS", help="architecture when starting from scratch")
    p.add_argument("--seed", type=int, default=0, help="seed of sampling and initial weights")
    p.add_argument("--resume", action="store_true", help="continue the last interrupted run")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("evaluate", help="k-fold or leave-one-site-out cross-validation of "
                                        "fine-tuning on the store's corrections")
    _add_fit_args(p, "each fold")
    p.add_argument("--scheme", required=True, type=_scheme_arg,
                   help="kfold:K (e.g. kfold:5) or losocv")
    p.add_argument("--iterations", type=int, default=200, help="training iterations per fold")
    p.add_argument("--batch-size", type=int, default=2, help="patches per training iteration")
    add_out(p, "output folder (default: STORE/evaluation/SCHEME)", required=False)
    p.add_argument("--seed", type=int, default=12345, help="seed of the k-fold split")
    p.add_argument("--backend", default="auto", choices=("auto", *BACKENDS),
                   help="window runner of the held-out predictions (default: the fastest "
                        "installed)")
    p.add_argument("--keep-models", action="store_true",
                   help="keep the fold models in the store's registry (default: remove them "
                        "once the results are written)")
    p.set_defaults(func=_cmd_evaluate)
