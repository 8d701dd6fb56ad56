"""``python -m napari_pvs.training``: the fine-tuning entry point, also under torchrun.

    torchrun --nproc_per_node=N -m napari_pvs.training --store S.pvs.zarr --iterations 200

Every process opens the store read-only; process 0 validates, checkpoints and takes
the store's write lock only to register the model.  Each process prints the sha256 of
its final weights, so one can
check that data-parallel training kept them in sync.
"""

from __future__ import annotations

import argparse
import os

from napari_pvs.store import CorrectionsStore

from .finetune import FinetuneConfig, finetune


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m napari_pvs.training")
    ap.add_argument("--store", required=True)
    ap.add_argument("--init", help="model id or .safetensors to start from")
    ap.add_argument("--iterations", type=int, default=200)
    ap.add_argument("--epoch", type=int, default=50, help="iterations per epoch")
    ap.add_argument("--patch", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--device", default="auto", help="torch device: auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps")
    ap.add_argument("--work-dir")
    args = ap.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    cfg = FinetuneConfig(iterations=args.iterations, iterations_per_epoch=args.epoch,
                         patch=(args.patch,) * 3, batch_size=args.batch_size, lr=args.lr,
                         device=args.device, val_fraction=0.0)
    cfg.validate()
    # every process reads; process 0 takes the write lock only to register the model
    with CorrectionsStore.open(args.store) as store:
        for event in finetune(store, init=args.init, config=cfg, work_dir=args.work_dir, wait=60):
            if event.kind == "trained":
                print(f"[rank {rank}] weights {event.extra['weights_sha256']}", flush=True)
            elif event.kind in ("start", "done"):
                print(f"[rank {rank}] {event.kind}: {event.message}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
