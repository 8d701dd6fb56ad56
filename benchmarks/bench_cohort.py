"""Cohort throughput: the sequential ``predict`` loop against ``napari-pvs bids`` on Dask.

One run, one phantom BIDS dataset of ``--images`` T2w phantoms (default 12, 160 mm,
sites A-C, with their segmentations in ``derivatives/``), the shipped starter model:

* ``sequential``: ``napari-pvs predict IMG... --model starter --seg ...`` in one
  process, one image after another (the command before the BIDS App: the baseline);
* ``dask 1x2``: ``napari-pvs bids ... participant --workers 1`` (1 worker, 2 threads);
* ``dask 2x1``: ``--workers 2`` (2 workers, 1 thread each).

Each is a fresh child process with fresh outputs, timed from start to exit (start-up,
model load and the cluster's start included), and prints images per minute and the
ratio to the sequential loop.  The ONNX export cache is warmed first, so no
configuration pays for the one-time export.  It also times how the dataset is read
(pybids against the built-in walk) on an empty BIDS tree of ``--index-subjects``
subjects, and projects the wall time of 10,000 scans on N nodes like this one from the
best configuration's measured cost per image.

Run:  python benchmarks/bench_cohort.py [--images 12] [--size-mm 160] [--index-subjects 2000]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "cohort.json"


def _timed(cmd: list[str]) -> float:
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    seconds = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:6])}... failed ({r.returncode}):\n{r.stderr[-2000:]}")
    return seconds


def _index_tree(root: Path, n: int) -> None:
    root.mkdir(parents=True)
    (root / "dataset_description.json").write_text('{"Name": "x", "BIDSVersion": "1.9.0"}')
    for i in range(n):
        for ses in ("1", "2"):
            anat = root / f"sub-{i:05d}" / f"ses-{ses}" / "anat"
            anat.mkdir(parents=True)
            for name in (f"sub-{i:05d}_ses-{ses}_T2w.nii.gz", f"sub-{i:05d}_ses-{ses}_T1w.nii.gz"):
                (anat / name).write_bytes(b"")
            (anat / f"sub-{i:05d}_ses-{ses}_T2w.json").write_text('{"EchoTime": 0.1}')


def readers(n: int, tmp: Path) -> dict:
    from napari_pvs._bids_io import find_images

    root = tmp / "index"
    _index_tree(root, n)
    out = {}
    for reader in ("glob", "pybids"):
        t = time.perf_counter()
        found = find_images(root, "T2w", reader=reader)
        out[reader] = time.perf_counter() - t
        assert len(found) == 2 * n, (reader, len(found))
    print(f"reading a {n}-subject, {2 * n}-image BIDS tree: built-in walk {out['glob']:.2f} s, "
          f"pybids {out['pybids']:.2f} s ({out['pybids'] / out['glob']:.0f}x)")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=12)
    ap.add_argument("--size-mm", type=float, default=160.0)
    ap.add_argument("--index-subjects", type=int, default=2000)
    ap.add_argument("--configs", nargs="+", default=["sequential", "1x2", "2x1"],
                    choices=["sequential", "1x2", "2x1"])
    args = ap.parse_args(argv)
    from napari_pvs.dataset import write_bids_phantoms

    cli = [sys.executable, "-m", "napari_pvs.cli"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ds = tmp / "ds"
        t = time.perf_counter()
        paths = write_bids_phantoms(ds, [{"subject": f"{i + 1:02d}"} for i in range(args.images)],
                                    size_mm=args.size_mm)
        print(f"{args.images} phantoms of {args.size_mm:g} mm written in "
              f"{time.perf_counter() - t:.0f} s; cores: {os.cpu_count()}", flush=True)
        segs = [ds / "derivatives" / "phantom" / p.parent.parent.name / "anat"
                / p.name.replace("_T2w.nii.gz", "_desc-aseg_dseg.nii.gz") for p in paths]
        # warm the export cache: no configuration pays for the one-time ONNX export
        _timed([*cli, "predict", str(paths[0]), "-o", str(tmp / "warm"), "--model", "starter",
                "--seg", str(segs[0])])
        res = {"images": args.images, "size_mm": args.size_mm, "cores": os.cpu_count()}
        for cfg in args.configs:
            out = tmp / f"out-{cfg}"
            if cfg == "sequential":
                # predict takes one --seg for all images: loop over the images in one
                # process through the package's own function, as predict does
                code = ("import sys; from napari_pvs.pipeline import predict_file\n"
                        "a = sys.argv[1:]; out = a.pop(0); n = len(a) // 2\n"
                        "for img, seg in zip(a[:n], a[n:]):\n"
                        "    predict_file(img, out, model='starter', seg=seg)\n")
                seconds = _timed([sys.executable, "-c", code, str(out), *map(str, paths),
                                  *map(str, segs)])
            else:
                workers = cfg.split("x")[0]
                seconds = _timed([*cli, "bids", str(ds), str(out), "participant",
                                  "--workers", workers])
            res[cfg] = {"seconds": seconds, "images_per_min": 60 * args.images / seconds}
            ratio = res["sequential"]["seconds"] / seconds if "sequential" in res else float("nan")
            print(f"{cfg:>10}: {seconds:6.1f} s, {res[cfg]['images_per_min']:5.2f} images/min, "
                  f"{ratio:.2f}x the sequential loop", flush=True)
            shutil.rmtree(out, ignore_errors=True)
        best = min((c for c in args.configs if c != "sequential"),
                   key=lambda c: res[c]["seconds"], default=None)
        if best:
            per_image = res[best]["seconds"] / args.images
            res["best"], res["seconds_per_image_per_node"] = best, per_image
            print(f"default: {best} (the fastest); {per_image:.1f} s per image per "
                  f"{os.cpu_count()}-core node")
            for nodes in (1, 10, 50, 200):
                hours = 10_000 * per_image / nodes / 3600
                print(f"  10,000 scans on {nodes:>3} such nodes: {hours:7.1f} h")
        res["readers"] = readers(args.index_subjects, tmp)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(res, indent=1))
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
