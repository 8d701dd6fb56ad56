"""Inference speed: our engine vs plain MONAI sliding_window_inference, same network.

Volume: a 160^3 T2w phantom at 1 mm with its WM+BG ROI.  Networks, 64^3 windows:

* ``s``: MedNeXt-S k3 (the paper's small variant, 5.6M parameters), seeded weights with
  the output layer scaled x8 so that labels are decisive; label agreement then measures
  numerical equivalence of the two engines.  This is the default.
* ``xs``: the fixed, trained MedNeXt-XS k3 (benchmarks/data/xs_phantom.safetensors,
  0.25M parameters).  It is so cheap per window that fixed costs dominate.

Baseline:
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


def _network(name):
    """(net, meta, cache key) of the benchmark network ``name``."""
    from napari_pvs.model import (
        arch_config,
        build_network,
        checkpoint_hash,
        default_meta,
        load_checkpoint,
    )

    if name == "xs":
        net, meta = load_checkpoint(MODEL)
        return net, meta, checkpoint_hash(MODEL)
    import torch

    torch.manual_seed(0)
    arch = arch_config("S", 3)
    net = build_network(arch).eval()
    with torch.no_grad():
        net.out_0.conv_out.weight.mul_(8.0)
    meta = default_meta(arch, target_spacing=[1.0] * 3, patch_size=[64, 64, 64])
    return net, meta, "bench-mednext-s-k3-seed0-x8"


def _job(kind, size_mm, kwargs, model):
    """Runs in a child process: returns (seconds, labels, peak RSS in MiB)."""
    image, spacing, roi = _phantom(size_mm)
    net, meta, key = _network(model)
    t = time.perf_counter()
    if kind == "monai":
        import torch
        from monai.inferers import sliding_window_inference

        from napari_pvs.preprocess import zscore

        x = torch.from_numpy(zscore(image[None].astype(np.float32), roi)[None])
        with torch.inference_mode():
            logits = sliding_window_inference(x, roi_size=tuple(meta["preprocessing"]["patch_size"]),
                                              sw_batch_size=1, predictor=net, overlap=0.5,
                                              mode="gaussian")
        prob = torch.softmax(logits, 1)[0, 1].numpy()
        labels = ((prob >= 0.5) & roi).astype(np.uint8)
    else:
        from napari_pvs.inference import predict_volume, run

        pred = run(predict_volume(image, spacing, net, meta, roi=roi, cache_key=key, **kwargs))
        labels = pred.labels
    seconds = time.perf_counter() - t
    return seconds, labels, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _in_child(kind, size_mm, kwargs=None, model="s"):
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(_job, (kind, size_mm, kwargs or {}, model))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mm", type=float, default=160.0)
    ap.add_argument("--no-tta", action="store_true", help="skip the TTA scaling part")
    ap.add_argument("--model", choices=("s", "xs"), default="s")
    args = ap.parse_args()
    m = args.model
    from napari_pvs.metrics import voxel_dice

    _, _, roi = _phantom(args.size_mm)
    # warm the export cache so that export time is not counted (it happens once per model)
    _in_child("ours", 64.0, {"backend": "auto"}, m)
    t_base, lab_base, rss_base = _in_child("monai", args.size_mm, None, m)
    print(f"network: {m}, volume {args.size_mm:.0f} mm at 1 mm")
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
        t, lab, rss = _in_child("ours", args.size_mm, kw, m)
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
        t, _, _ = _in_child("ours", args.size_mm, {"backend": "auto", "tta": n}, m)
        base = base or t
        print(f"  {n} flip(s): {t:7.1f} s  ({t / base:.2f}x of one flip)")


if __name__ == "__main__":
    main()
