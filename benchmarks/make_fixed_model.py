"""Train the fixed small MedNeXt that the inference benchmark uses.

MedNeXt-XS k3 (0.25M parameters), 150 iterations of 2 x 48^3 patches from two
synthetic T2w phantoms (seeds 1 and 2, 112 mm, site A), Dice+CE, AdamW lr 3e-3, through
the package's one trainer (:class:`napari_pvs.training.trainer.Trainer`) and its patch
sampler, without augmentation.  About 5 minutes on a 2-core CPU.  The result is
committed as benchmarks/data/xs_phantom.safetensors so that benchmark runs are
comparable; run this script again to regenerate it.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from napari_pvs.inference import run
from napari_pvs.model import arch_config, build_network, default_meta, save_checkpoint
from napari_pvs.phantom import make_phantom
from napari_pvs.preprocess import preprocess
from napari_pvs.training.data import PatchSampler, SubjectData
from napari_pvs.training.trainer import Trainer

OUT = Path(__file__).parent / "data" / "xs_phantom.safetensors"


def main() -> None:
    arch = arch_config("XS", 3)
    meta = default_meta(arch, target_spacing=[1.0] * 3, patch_size=[64, 64, 64])
    subjects = {}
    for seed in (1, 2):
        p = make_phantom(seed, size_mm=112)
        prep = preprocess(p.image, p.spacing, p.regions > 0, meta["preprocessing"])
        subjects[f"seed{seed}"] = SubjectData(f"seed{seed}", "A", 1, prep.image[0],
                                              prep.mask_to_model(p.labels).astype("uint8"),
                                              prep.mask, None)
    sampler = PatchSampler(subjects, list(subjects), (48, 48, 48), augment=False, seed=0)
    torch.manual_seed(0)
    t = time.perf_counter()
    trainer = Trainer(build_network(arch), lambda it: sampler.batch(2)[:2], iterations=150, lr=3e-3)
    net = run(trainer.run(), lambda e: e.kind == "iteration" and e.iteration % 25 == 0
              and print(f"iteration {e.iteration}: loss {e.loss:.3f}"))
    meta["provenance"].update(iterations=150, note="fixed benchmark model: phantoms seeds 1-2, "
                              f"trained {time.perf_counter() - t:.0f} s on CPU")
    print(save_checkpoint(OUT, net, meta))


if __name__ == "__main__":
    main()
