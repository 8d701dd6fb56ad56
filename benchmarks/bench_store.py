"""Corrections-store speed and size, each next to its baseline (raw size / plain np.save).

1. Save one 256^3 uint8 label version (sparse PVS-like labels, ~1 % foreground):
   ``CorrectionsStore.commit_labels`` vs ``np.save`` of the same array.  Target <= 0.2 s.
2. Random 96^3 patch reads, image + labels, as training does them:
   cold (straight from the zarr arrays) and cached (the subject decoded once into
   memory, then sliced), vs ``np.load(mmap_mode="r")`` slices.  Target >= 200/s.
3. Store size of the sparse label version as a fraction of the raw 16 MiB.
   Target <= 5 %.
4. The price of integrity: a checked read of the subject (``read_image`` +
   ``read_labels``: decode, then compare the SHA-256 recorded at write time) vs a plain
   decode of the same zarr arrays.  Target: the check adds <= 50 %.

Run:  python benchmarks/bench_store.py
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from napari_pvs.io import Volume
from napari_pvs.store import CorrectionsStore

N = 256
PATCH = 96


def _folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _labels(seed: int) -> np.ndarray:
    """Sparse tubular labels (~1 %): short random line segments, PVS-like."""
    rng = np.random.default_rng(seed)
    lab = np.zeros((N, N, N), np.uint8)
    for _ in range(6000):
        p = rng.integers(10, N - 10, 3)
        d = rng.normal(size=3)
        d /= np.linalg.norm(d)
        for t in range(int(rng.integers(3, 14))):
            q = np.clip(np.round(p + t * d).astype(int), 0, N - 2)
            lab[q[0] : q[0] + 2, q[1] : q[1] + 2, q[2]] = 1
    return lab


def main() -> None:
    rng = np.random.default_rng(0)
    image = rng.normal(100, 10, (N, N, N)).astype(np.float32)
    labels = _labels(1)
    print(f"labels: {N}^3 uint8, {100 * labels.mean():.2f}% foreground")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        store = CorrectionsStore.create(tmp / "b.pvs.zarr")
        store.add_subject("s1", Volume(image, np.eye(4), (1.0, 1.0, 1.0), None, None, None))
        times = []
        for k in range(5):
            lab = labels if k == 0 else _labels(k + 1)
            t = time.perf_counter()
            store.commit_labels("s1", lab, author="bench")
            times.append(time.perf_counter() - t)
        t_np = []
        for k in range(5):
            t = time.perf_counter()
            np.save(tmp / f"l{k}.npy", labels)
            t_np.append(time.perf_counter() - t)
        ours, base = float(np.median(times)), float(np.median(t_np))
        print(f"save one label version: store {ours:.3f} s (median of 5; target <= 0.2 s: "
              f"{'met' if ours <= 0.2 else 'MISSED'}), np.save {base:.3f} s, ratio {ours / base:.1f}x")

        size = _folder_size(tmp / "b.pvs.zarr" / "subjects" / "s1" / "labels" / "v0001")
        print(f"label version size: {size / 2**10:.0f} KiB = {100 * size / labels.nbytes:.2f}% of raw "
              f"{labels.nbytes / 2**20:.0f} MiB (target <= 5%: {'met' if size <= 0.05 * labels.nbytes else 'MISSED'}); "
              f"np.save {(tmp / 'l0.npy').stat().st_size / 2**20:.0f} MiB")

        np.save(tmp / "img.npy", image)
        starts = rng.integers(0, N - PATCH, (200, 3))
        sl = [tuple(slice(a, a + PATCH) for a in s) for s in starts]
        img_z, lab_z = store.image("s1"), store.labels("s1")
        t = time.perf_counter()
        for s in sl[:40]:
            img_z[s], lab_z[s]
        cold = 40 / (time.perf_counter() - t)
        t = time.perf_counter()
        img_mem, lab_mem = np.asarray(img_z[...]), np.asarray(lab_z[...])
        decode = time.perf_counter() - t
        t = time.perf_counter()
        for s in sl:
            np.ascontiguousarray(img_mem[s]), np.ascontiguousarray(lab_mem[s])
        cached = len(sl) / (time.perf_counter() - t)
        img_mm = np.load(tmp / "img.npy", mmap_mode="r")
        lab_mm = np.load(tmp / "l0.npy", mmap_mode="r")
        t = time.perf_counter()
        for s in sl:
            np.ascontiguousarray(img_mm[s]), np.ascontiguousarray(lab_mm[s])
        mm = len(sl) / (time.perf_counter() - t)
        print(f"random {PATCH}^3 patch reads (image + labels): store cold {cold:.0f}/s; store cached "
              f"{cached:.0f}/s after decoding the subject once in {decode:.2f} s (target >= 200/s: "
              f"{'met' if cached >= 200 else 'MISSED'}); np.load mmap {mm:.0f}/s; "
              f"ratio cached/mmap {cached / mm:.2f}x")

        t_plain, t_checked = [], []
        for _ in range(3):
            t = time.perf_counter()
            np.asarray(img_z[...]), np.asarray(lab_z[...])
            t_plain.append(time.perf_counter() - t)
            t = time.perf_counter()
            store.read_image("s1"), store.read_labels("s1")
            t_checked.append(time.perf_counter() - t)
        plain, checked = float(np.median(t_plain)), float(np.median(t_checked))
        print(f"read a subject ({N}^3 float32 image + uint8 labels): checked {checked:.3f} s, plain "
              f"zarr decode {plain:.3f} s, ratio {checked / plain:.2f}x (target <= 1.5x: "
              f"{'met' if checked <= 1.5 * plain else 'MISSED'})")
        store.close()


if __name__ == "__main__":
    main()
