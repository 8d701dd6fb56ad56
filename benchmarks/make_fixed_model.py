"""Train the fixed small MedNeXt that the inference benchmark uses.

MedNeXt-XS k3 (0.25M parameters), 150 iterations of 2 x 48^3 patches from two
synthetic T2w phantoms (seeds 1 and 2, 112 mm, site A), Dice+CE, AdamW lr 3e-3.
About 5 minutes on a 2-core CPU.  The result is committed as
benchmarks/data/xs_phantom.safetensors so that benchmark runs are comparable; run
this script again to regenerate it.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from napari_pvs.inference import run
from napari_pvs.preprocess import zscore
from napari_pvs.model import arch_config, build_network, default_meta, save_checkpoint
from napari_pvs.phantom import make_phantom
from napari_pvs.training.loop import TrainingVolume, fit

OUT = Path(__file__).parent / "data" / "xs_phantom.safetensors"


def main() -> None:
    vols = []
    for seed in (1, 2):
        p = make_phantom(seed, size_mm=112)
        roi = p.regions > 0
        vols.append(TrainingVolume(zscore(p.image[None], roi)[0], p.labels, roi))
    torch.manual_seed(0)
    arch = arch_config("XS", 3)
    t = time.perf_counter()
    net = run(fit(build_network(arch), vols, iterations=150, patch=(48, 48, 48), batch_size=2,
                  lr=3e-3), lambda e: e.done % 25 == 0 and print(f"iteration {e.done}: loss {e.loss:.3f}"))
    meta = default_meta(arch, target_spacing=[1.0] * 3, patch_size=[64, 64, 64])
    meta["provenance"].update(iterations=150, note="fixed benchmark model: phantoms seeds 1-2, "
                              f"trained {time.perf_counter() - t:.0f} s on CPU")
    print(save_checkpoint(OUT, net, meta))


if __name__ == "__main__":
    main()
