"""Make the two over-fitted models that ``tests/test_one_path.py`` starts from.

Both are fitted, through :func:`napari_pvs.training.finetune.finetune` itself, to one
phantom subject: site C of ``write_phantom_cohort(n_sites=3, per_site=1, size_mm=40)``
(1.2 mm voxels, so every path resamples to the models' 0.8 mm):

* ``own.safetensors``: a new MedNeXt-XS k3 (our preprocessing: trilinear, z-score in
  the ROI);
* ``imported.safetensors``: a model imported with ``napari-pvs model import-nnunet``
  from a folder in MedNet-PVS's release format (nnU-Net v1: ``plans.pkl`` with a
  (2, 0, 1) transpose and "nonCT" normalisation inside the nonzero mask, and
  ``fold_0/model_final_checkpoint.model`` with the official MedNeXt v1 key names), so it
  keeps the release's preprocessing.  The tiny network of ``tests/data/mednext_v1`` did
  not fit the subject in 800 iterations, so the release is written from the weights of
  ``own.safetensors``; fine-tuning then adapts them to the release's preprocessing.

Fitting a MedNeXt to thin PVS takes hundreds of iterations, too long for the test
suite, so the models are made here once and committed: ``own`` with 800 iterations
(6 min on a 2-core CPU, validation voxel Dice 0.853), then ``imported`` from it with
400 (5 min, voxel Dice 0.862), i.e. ``--which own`` then ``--which imported
--iterations 400``; the test fine-tunes them a few iterations more and checks that
``napari-pvs predict`` reproduces what training's validation reported.

    python tests/data/overfit/make_overfit_models.py [--iterations 800] [--which own|imported]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _official_state(state: dict) -> dict:
    """MONAI-built MedNeXt v1 keys back to the official names (the inverse of
    :func:`napari_pvs.model.map_official_state_dict`)."""
    import torch

    out = {"dummy_tensor": torch.zeros(1)}
    for key, value in state.items():
        head, _, rest = key.partition(".")
        if head in ("stem", "bottleneck", "out_0"):
            out[key] = value
            continue
        index, _, rest = rest.partition(".")
        i = int(index)
        name = {"enc_stages": f"enc_block_{i}", "down_blocks": f"down_{i}",
                "up_blocks": f"up_{3 - i}", "dec_stages": f"dec_block_{3 - i}",
                "out_blocks": f"out_{4 - i}"}[head]
        out[f"{name}.{rest}"] = value
    return out


def write_release(checkpoint: Path, folder: Path) -> Path:
    """An nnU-Net v1 training folder (MedNet-PVS's release format) holding one fold."""
    import pickle
    from collections import OrderedDict

    import numpy as np
    import torch
    from safetensors.torch import load_file

    trainer = folder / ("nnUNetTrainerV2_MedNeXt_XS_kernel3__nnUNetPlansv2.1_trgSp_0.8x0.8x0.8")
    (trainer / "fold_0").mkdir(parents=True)
    plans = {"num_modalities": 1, "modalities": {0: "T2w"}, "num_classes": 1,
             "normalization_schemes": OrderedDict({0: "nonCT"}),
             "use_mask_for_norm": OrderedDict({0: True}),
             "transpose_forward": [2, 0, 1], "transpose_backward": [1, 2, 0],
             "plans_per_stage": {0: {"current_spacing": np.array([0.8, 0.8, 0.8]),
                                     "patch_size": np.array([32, 32, 32])}}}
    (trainer / "plans.pkl").write_bytes(pickle.dumps(plans))
    state = OrderedDict(_official_state(load_file(str(checkpoint))))
    torch.save({"epoch": 800, "state_dict": state}, trainer / "fold_0" / "model_final_checkpoint.model")
    return trainer


def main() -> int:
    from napari_pvs.cli import main as cli
    from napari_pvs.dataset import store_from_cohort, write_phantom_cohort
    from napari_pvs.training.finetune import FinetuneConfig, finetune

    ap = argparse.ArgumentParser()
    ap.add_argument("--iterations", type=int, default=800)
    ap.add_argument("--which", choices=["own", "imported", "both"], default="both")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="pvs-overfit-"))
    subject = write_phantom_cohort(tmp / "c", n_sites=3, per_site=1, size_mm=40)[2]
    for name in ("own", "imported"):
        if args.which not in (name, "both"):
            continue
        init = None
        if name == "imported":
            release = write_release(HERE / "own.safetensors", tmp / "release")
            assert cli(["model", "import-nnunet", str(release), str(tmp / "imported")]) == 0
            init = str(tmp / "imported" / "fold_0.safetensors")
        store = store_from_cohort(tmp / f"{name}.pvs.zarr", [subject])
        cfg = FinetuneConfig(iterations=args.iterations, iterations_per_epoch=100,
                             patch=(32, 32, 32), batch_size=2, lr=3e-3, val_fraction=0.0,
                             augment=False, seed=0, device="cpu", target_spacing=None)
        t0 = time.perf_counter()
        for e in finetune(store, init=init, config=cfg, work_dir=tmp / f"w-{name}",
                          train_subjects=[subject.subject], val_subjects=[subject.subject]):
            if e.kind == "validation":
                print(f"{name}: iteration {e.iteration}, voxel Dice {e.val_dice:.3f}, cluster "
                      f"Dice {e.val_cluster_dice:.3f}, {time.perf_counter() - t0:.0f} s",
                      flush=True)
            if e.kind == "done":
                shutil.copyfile(store.models.path(e.message), HERE / f"{name}.safetensors")
        store.close()
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
