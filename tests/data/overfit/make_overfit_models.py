"""Make the two over-fitted models that ``tests/test_one_path.py`` starts from.

Both are fitted, through :func:`napari_pvs.training.finetune.finetune` itself, to one
phantom subject: site C of ``write_phantom_cohort(n_sites=3, per_site=1, size_mm=40)``
(1.2 mm voxels, so every path resamples to the models' 0.8 mm):

* ``own.safetensors``: a new MedNeXt-XS k3 (our preprocessing: trilinear, z-score in
  the ROI);
* ``imported.safetensors``: fold 0 of the MedNet-PVS release-format fixture
  (``tests/data/mednext_v1``), imported with ``napari-pvs model import-nnunet``, so it
  keeps the release's nnU-Net v1 preprocessing (spline resampling, z-score inside the
  nonzero mask).

Fitting a MedNeXt to thin PVS takes hundreds of iterations, too long for the test
suite, so the models are made here once (about 10 minutes each on a 2-core CPU) and
committed; the test fine-tunes them a few iterations more and checks that
``napari-pvs predict`` reproduces what training's validation reported.

    python tests/data/overfit/make_overfit_models.py [--iterations 600]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TRAINER = (HERE.parent / "mednext_v1/nnUNet/3d_fullres/Task900_PVSTiny"
           / "nnUNetTrainerV2_MedNeXt_tiny_kernel5__nnUNetPlansv2.1_trgSp_0.8x0.8x0.8")


def main() -> int:
    from napari_pvs.cli import main as cli
    from napari_pvs.dataset import store_from_cohort, write_phantom_cohort
    from napari_pvs.training.finetune import FinetuneConfig, finetune

    ap = argparse.ArgumentParser()
    ap.add_argument("--iterations", type=int, default=600)
    ap.add_argument("--which", choices=["own", "imported", "both"], default="both")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="pvs-overfit-"))
    subject = write_phantom_cohort(tmp / "c", n_sites=3, per_site=1, size_mm=40)[2]
    assert cli(["model", "import-nnunet", str(TRAINER), str(tmp / "imported")]) == 0
    inits = {"own": None, "imported": str(tmp / "imported" / "fold_0.safetensors")}
    for name, init in inits.items():
        if args.which not in (name, "both"):
            continue
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
