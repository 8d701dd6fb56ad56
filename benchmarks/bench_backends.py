"""Window backends: seconds per window of each installed CPU runtime against torch eager.

Cases (random weights, seeded; random input):
  XS k3 at 64^3, batch 1           the test/demo configuration
  S  k3 at 64^3, batch 1 and 2
  L  k5 at 128^3, batch 1          the paper's PVS model at its patch size, torch and the
                                   fastest runtime of the S runs, one window each (--large)

For every backend it prints the setup time of ``make_runner`` (a fresh export into an
empty cache, then a second call that reuses it), seconds per window (fastest of
--repeat calls after one warm-up round, the backends taking turns; one call for L),
the speed ratio over torch and the largest absolute difference from torch's logits.

Run:  python benchmarks/bench_backends.py [--repeat N] [--no-large]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
import warnings

import numpy as np


def run_case(label, arch, window, batch, backends, repeat, cache_dir) -> dict[str, float]:
    """Time ``backends`` (torch first) on one case; returns seconds per window by name.

    The backends are called in turns (one warm-up round, then ``repeat`` timed rounds)
    and the fastest call counts, so that load from other processes spreads evenly and
    is mostly filtered out.
    """
    import torch

    from napari_pvs._backends import make_runner
    from napari_pvs.model import build_network

    torch.manual_seed(0)
    net = build_network(arch).eval()
    x = np.random.default_rng(0).standard_normal((batch, 1, *window)).astype(np.float32)
    key = f"bench-{arch['variant']}{arch['kernel_size']}"
    runners, setup = {}, {}
    for name in backends:
        times = []
        for _ in range(1 if name == "torch" else 2):  # fresh export, then from the cache
            runners.pop(name, None)
            t0 = time.perf_counter()
            runners[name] = make_runner(net, window=window, batch_size=batch, backend=name,
                                        cache_key=key, cache_dir=cache_dir)
            times.append(time.perf_counter() - t0)
        assert name == "torch" or not runners[name].exported, "second make_runner re-exported"
        setup[name] = times
    best = {name: np.inf for name in backends}
    outputs = {}
    for round_ in range(repeat + (1 if repeat > 1 else 0)):
        for name, runner in runners.items():
            t0 = time.perf_counter()
            outputs[name] = runner(x)
            if round_ > 0 or repeat == 1:
                best[name] = min(best[name], time.perf_counter() - t0)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\n{label}: window {window}, batch {batch}  (1-min load average after: {load:.2f})")
    print(f"  {'backend':<12} {'setup s':>8} {'cached s':>8} {'s/window':>9} {'vs torch':>9} "
          f"{'max|diff|':>10}")
    per_window = {name: best[name] / batch for name in backends}
    for name in backends:
        fresh, cached = (setup[name] + [float("nan")])[:2]
        diff = float(np.abs(outputs[name] - outputs["torch"]).max())
        ratio = per_window["torch"] / per_window[name]
        print(f"  {name:<12} {fresh:8.2f} {cached:8.2f} {per_window[name]:9.3f} "
              f"{ratio:8.2f}x {diff:10.2e}", flush=True)
    return per_window


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3, help="timed calls per backend and case")
    ap.add_argument("--large", action=argparse.BooleanOptionalAction, default=True,
                    help="also time MedNeXt-L k5 on one 128^3 window (about 1 minute)")
    args = ap.parse_args()
    warnings.simplefilter("ignore", DeprecationWarning)
    import torch

    from napari_pvs._backends import available_backends
    from napari_pvs.model import arch_config

    backends = available_backends()
    versions = {"torch": torch.__version__}
    for name in backends[1:]:
        versions[name] = __import__(name).__version__
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch threads {torch.get_num_threads()}, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    with tempfile.TemporaryDirectory(prefix="bench-backends-") as cache_dir:
        run_case("MedNeXt-XS k3", arch_config("XS", 3), (64, 64, 64), 1, backends,
                 args.repeat, cache_dir)
        s1 = run_case("MedNeXt-S k3", arch_config("S", 3), (64, 64, 64), 1, backends,
                      args.repeat, cache_dir)
        s2 = run_case("MedNeXt-S k3", arch_config("S", 3), (64, 64, 64), 2, backends,
                      args.repeat, cache_dir)
        runtimes = [b for b in backends if b != "torch"]
        best = min(runtimes, key=lambda b: s1[b] + s2[b]) if runtimes else None
        print(f"\nfastest runtime on S k3: {best or 'none installed'}")
        if args.large:
            chosen = ["torch"] + ([best] if best else [])
            run_case("MedNeXt-L k5", arch_config("L", 5), (128, 128, 128), 1, chosen, 1,
                     cache_dir)


if __name__ == "__main__":
    main()
