"""``python -m napari_pvs.training.worker``: fine-tuning in a child process, events on stdout.

The retrain widget starts this process (see :mod:`napari_pvs.training.job`) so that
training neither competes with napari's event loop for the GIL nor takes napari down
when it crashes.  Every :class:`~napari_pvs.training.finetune.FinetuneEvent` is written
to stdout as one JSON line, ``{"kind": ..., "iteration": ..., ...}``; the run ends with
``{"kind": "result", "model_id": ...}``, ``{"kind": "cancelled", ...}`` (after SIGTERM
or SIGINT, exit status 3) or ``{"kind": "error", "message": ...}`` (exit status 2).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import sys
import threading

from napari_pvs.store import CorrectionsStore

from .finetune import FinetuneConfig, TrainingCancelled, finetune

EXIT_ERROR, EXIT_CANCELLED = 2, 3


def _emit(payload: dict) -> None:
    sys.stdout.write(json.dumps(payload, default=str) + "\n")
    sys.stdout.flush()


def config_args(cfg) -> list[str]:
    """Command-line arguments that rebuild a FinetuneConfig in the worker."""
    out = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if value is None:
            continue
        if isinstance(value, (tuple, list)):
            value = ",".join(str(v) for v in value)
        out += [f"--{f.name.replace('_', '-')}", str(value)]
    return out


def _parse_config(ns: argparse.Namespace):
    kwargs = {}
    for f in dataclasses.fields(FinetuneConfig):
        raw = getattr(ns, f.name)
        if raw is None:
            continue
        default = f.default
        if f.name in ("patch", "target_spacing"):
            cast = int if f.name == "patch" else float
            kwargs[f.name] = tuple(cast(v) for v in raw.split(","))
        elif isinstance(default, bool):
            kwargs[f.name] = raw in ("True", "true", "1")
        elif isinstance(default, int):
            kwargs[f.name] = int(raw)
        elif isinstance(default, float):
            kwargs[f.name] = float(raw)
        else:
            kwargs[f.name] = raw
    return FinetuneConfig(**kwargs)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m napari_pvs.training.worker")
    ap.add_argument("--store", required=True)
    ap.add_argument("--init", help="model id or .safetensors to start from")
    ap.add_argument("--wait", type=float, default=30.0,
                    help="seconds to wait for the store lock when registering the model")
    ap.add_argument("--resume", action="store_true")
    for f in dataclasses.fields(FinetuneConfig):
        ap.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name)
    args = ap.parse_args(argv)

    cancel = threading.Event()

    def _on_signal(signum, frame):
        cancel.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    try:
        cfg = _parse_config(args).validate()
        # read-only: the store's write lock is taken only to register the model
        with CorrectionsStore.open(args.store) as store:
            gen = finetune(store, init=args.init, config=cfg, resume=args.resume, cancel=cancel,
                           wait=args.wait)
            try:
                while True:
                    _emit(dataclasses.asdict(next(gen)))
            except StopIteration as stop:
                _emit({"kind": "result", "model_id": stop.value})
    except TrainingCancelled as exc:
        _emit({"kind": "cancelled", "message": str(exc)})
        return EXIT_CANCELLED
    except Exception as exc:  # reported to the parent as an event, never lost
        _emit({"kind": "error", "type": type(exc).__name__, "message": str(exc)})
        return EXIT_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
