"""Time ``napari-pvs train`` (20 iterations) on a 3-site x 2-subject phantom store.

Our code and a baseline revision of the project (default ``d2ff435``, the release before
training shared inference's preprocessing and prediction stages) run the same command
on the same store, one after the other, in the same run; the script prints both wall
times and their ratio.  The baseline runs from a ``git worktree`` of that revision,
imported through ``PYTHONPATH`` ahead of the installed package.

    python benchmarks/bench_train_cli.py [--iterations 20] [--baseline d2ff435]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _shim(checkout: Path, into: Path) -> Path:
    """A folder holding ``napari_pvs`` of ``checkout`` with its ``training`` subpackage."""
    pkg = into / "napari_pvs"
    pkg.mkdir(parents=True)
    for item in (checkout / "src" / "napari_pvs").iterdir():
        (pkg / item.name).symlink_to(item)
    (pkg / "training").symlink_to(checkout / "training")
    return into


def _train(store: Path, iterations: int, env: dict) -> float:
    cmd = [sys.executable, "-m", "napari_pvs.cli", "train", "--store", str(store),
           "--iterations", str(iterations), "--device", "cpu"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return dt


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--baseline", default="d2ff435", help="git revision of the baseline")
    ap.add_argument("--size-mm", type=float, default=96.0)
    args = ap.parse_args()
    from napari_pvs.dataset import store_from_cohort, write_phantom_cohort

    tmp = Path(tempfile.mkdtemp(prefix="pvs-bench-train-"))
    try:
        cohort = write_phantom_cohort(tmp / "cohort", n_sites=3, per_site=2, size_mm=args.size_mm)
        store_from_cohort(tmp / "s.pvs.zarr", cohort).close()
        base = tmp / "baseline"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(base),
                        args.baseline], check=True)
        env_base = dict(os.environ, PYTHONPATH=str(_shim(base, tmp / "shim")),
                        NAPARI_PVS_CACHE=str(tmp / "cache-base"))
        env_ours = dict(os.environ, NAPARI_PVS_CACHE=str(tmp / "cache-ours"))
        env_ours.pop("PYTHONPATH", None)
        times = {}
        for name, env in (("baseline", env_base), ("ours", env_ours)):
            times[name] = _train(tmp / "s.pvs.zarr", args.iterations, env)
            print(f"{name:9s} napari-pvs train --iterations {args.iterations}: "
                  f"{times[name]:.1f} s", flush=True)
        print(f"ratio ours / baseline: {times['ours'] / times['baseline']:.2f}")
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force",
                        str(tmp / "baseline")], capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
