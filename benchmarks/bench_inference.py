"""Inference speed: our engine vs plain MONAI sliding_window_inference, same network.

Volume: a 160^3 T2w phantom at 1 mm with its WM+BG ROI.  Network: the fixed small
MedNeXt (XS k3, benchmarks/data/xs_phantom.safetensors, 64^3 windows).  Baseline:
``monai.inferers.sliding_window_inference(overlap=0.5, mode="gaussian")`` in torch
eager on the same z-scored volume.  Each configuration runs in a fresh process so
its peak RSS is its own.  Configurations add one ingredient at a time, so each
one's share of the speed-up shows:

  A  our engine, torch, all windows, overlap 0.5   (engine overhead)
  B  + skip windows outside the ROI                (ROI skipping)
  C  + CPU runtime (auto: OpenVINO / ONNX Runtime) (runtime)
  D  + overlap 0.25                                (window overlap choice)

A configuration whose labels agree with the baseline's at Dice < 0.99 is reported
but rejected as a default (overlap 0.25 is: window borders then weigh too much).

Then the TTA cost for 1, 2, 4 and 8 flips (config C).  Target: >= 3x end to end with
label Dice >= 0.99 inside the ROI.

Run:  python benchmarks/bench_inference.py [--size-mm 160] [--no-tta]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import time
from pathlib import Path

import numpy as np

MODEL = Path(__file__).parent / "data" / "xs_phantom.safetensors"


def _phantom(size_mm):
    from napari_pvs.phantom import make_phantom

    p = make_phantom(0, size_mm=size_mm)
    return p.image, p.spacing, p.regions > 0


def _job(kind, size_mm, kwargs):
    """Runs in a child process: returns (seconds, labels, peak RSS in MiB)."""
    from napari_pvs.model import checkpoint_hash, load_checkpoint

    image, spacing, roi = _phantom(size_mm)
    net, meta = load_checkpoint(MODEL)
    t = time.perf_counter()
    if kind == "monai":
        import torch
        from monai.inferers import sliding_window_inference

        from napari_pvs.inference import _zscore

        x = torch.from_numpy(_zscore(image[None].astype(np.float32), roi)[None])
        with torch.inference_mode():
            logits = sliding_window_inference(x, roi_size=tuple(meta["preprocessing"]["patch_size"]),
                                              sw_batch_size=1, predictor=net, overlap=0.5,
                                              mode="gaussian")
        prob = torch.softmax(logits, 1)[0, 1].numpy()
        labels = ((prob >= 0.5) & roi).astype(np.uint8)
    else:
        from napari_pvs.inference import predict_volume, run

        pred = run(predict_volume(image, spacing, net, meta, roi=roi,
                                  cache_key=checkpoint_hash(MODEL), **kwargs))
        labels = pred.labels
    seconds = time.perf_counter() - t
    return seconds, labels, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _in_child(kind, size_mm, kwargs=None):
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(_job, (kind, size_mm, kwargs or {}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mm", type=float, default=160.0)
    ap.add_argument("--no-tta", action="store_true", help="skip the TTA scaling part")
    args = ap.parse_args()
    from napari_pvs.metrics import voxel_dice

    _, _, roi = _phantom(args.size_mm)
    # warm the export cache so that export time is not counted (it happens once per model)
    _in_child("ours", 64.0, {"backend": "auto"})
    t_base, lab_base, rss_base = _in_child("monai", args.size_mm)
    print(f"{'configuration':<44} {'seconds':>8} {'ratio':>6} {'Dice':>6} {'peak RSS':>9}")
    print(f"{'baseline: MONAI sliding_window_inference':<44} {t_base:8.1f} {1.0:6.2f} {1.0:6.3f} "
          f"{rss_base:7.0f}MiB")
    configs = [
        ("A ours: torch, all windows, overlap 0.5", {"backend": "torch", "skip_outside_roi": False}),
        ("B  + skip windows outside the ROI", {"backend": "torch"}),
        ("C  + CPU runtime (auto)", {"backend": "auto"}),
        ("D  + overlap 0.25", {"backend": "auto", "overlap": 0.25}),
    ]
    prev = t_base
    for name, kw in configs:
        t, lab, rss = _in_child("ours", args.size_mm, kw)
        dice = voxel_dice(lab, lab_base, roi)
        verdict = "" if dice >= 0.99 else "  REJECTED: Dice < 0.99, not a default"
        print(f"{name:<44} {t:8.1f} {t_base / t:6.2f} {dice:6.3f} {rss:7.0f}MiB   "
              f"(step x{prev / t:.2f}){verdict}")
        if dice >= 0.99:
            prev = t
    if args.no_tta:
        return
    print("TTA cost (config C):")
    base = None
    for n in (1, 2, 4, 8):
        t, _, _ = _in_child("ours", args.size_mm, {"backend": "auto", "tta": n})
        base = base or t
        print(f"  {n} flip(s): {t:7.1f} s  ({t / base:.2f}x of one flip)")


if __name__ == "__main__":
    main()
