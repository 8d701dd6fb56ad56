"""The README tutorial "MedNet-PVS workflow, end to end", run as a user types it.

Import a MedNet-PVS release (the release-format fixture) into a store's registry, predict
a subject with its FreeSurfer ``aseg.mgz``, import the cohort and commit a correction,
fine-tune the imported fold on the corrections, predict with the new model, and evaluate
leave-one-site-out.  Every command runs as ``napari-pvs ...`` in a child process and must
exit 0 without a traceback.  Iterations and patches are tiny so that it fits in CI time;
``--tta 1`` only saves time (the README commands leave the model's 8 mirrorings on).
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from _helpers import MEDNEXT_RELEASE, run_cli

from napari_pvs._errors import PVSInputError
from napari_pvs.model import ModelRegistry, read_meta

SUBJECTS = ["siteA01", "siteA02", "siteB01", "siteB02"]


def _ok(*args) -> str:
    """Run ``napari-pvs ARGS``; assert it exits 0 with no traceback; return stdout."""
    rc, out, err = run_cli(*args, timeout=300)
    assert rc == 0, f"napari-pvs {' '.join(map(str, args))} exited {rc}:\n{out}\n{err}"
    assert "Traceback" not in err and "Traceback" not in out, err
    return out


def _predicted(out: Path, stem: str) -> None:
    for suffix in ("pvs.nii.gz", "prob.nii.gz", "uncertainty.nii.gz", "clusters.csv",
                   "regions.nii.gz", "regions.json"):
        assert (out / f"{stem}_{suffix}").is_file(), suffix
    with open(out / f"{stem}_clusters.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert rows and {r["region"] for r in rows} <= {"WM", "BG", "other"}


def test_an_imported_fold_is_named_by_its_file_or_by_the_id_model_ls_shows(imported_release):
    registry = ModelRegistry(imported_release)
    for fold in ("fold_0", "fold_1"):
        path = imported_release / f"{fold}.safetensors"
        assert registry.path(fold) == path
        assert registry.path(read_meta(path)["id"]) == path
    with pytest.raises(PVSInputError, match=r"no model 'fold_7' .*known: mednext-"):
        registry.path("fold_7")


@pytest.mark.slow
def test_mednet_pvs_workflow_end_to_end(tmp_path):
    cohort, store = tmp_path / "cohort", tmp_path / "lab.pvs.zarr"
    _ok("phantom", "-o", cohort, "--sites", 2, "--per-site", 2, "--size-mm", 64, "--aseg")
    # no phantom region maps: the regions come from FreeSurfer's aseg.mgz, as for real data
    for f in cohort.glob("derivatives/napari-pvs-phantom/sub-*/anat/*desc-regions_dseg*"):
        f.unlink()
    aseg = cohort / "derivatives/freesurfer/sub-siteA01/mri/aseg.mgz"
    image = cohort / "sub-siteA01/anat/sub-siteA01_T2w.nii.gz"
    assert nib.aff2axcodes(nib.load(aseg).affine) == ("L", "I", "A")

    # 1. the release into the store's registry
    _ok("store", "init", store)
    _ok("model", "import-nnunet", MEDNEXT_RELEASE, "-o", store / "models")
    fold = read_meta(store / "models" / "fold_0.safetensors")
    assert fold["provenance"]["source_folder"] == str(MEDNEXT_RELEASE.resolve())
    assert fold["id"] in _ok("model", "ls", store)  # the id `model ls` shows names it

    # 2. predict with the subject's aseg.mgz (any grid: resampled to the image)
    _ok("predict", image, "--seg", aseg, "--model", fold["id"], "--store", store,
        "-o", tmp_path / "pred", "--tta", 1)
    _predicted(tmp_path / "pred", "sub-siteA01_T2w")

    # 3. the cohort into the store (regions from aseg.mgz), and a correction committed
    out = _ok("store", "import", store, cohort)
    assert out.count("regions from aseg.mgz") == len(SUBJECTS)
    truth = (cohort / "derivatives/napari-pvs-phantom/sub-siteA01/anat"
             / "sub-siteA01_desc-pvs_mask.nii.gz")
    img = nib.load(truth)
    labels = np.asarray(img.dataobj).copy()
    labels[: labels.shape[0] // 4] = 0  # the annotator erased the clusters of one slab
    fixed = tmp_path / "siteA01_fixed.nii.gz"
    nib.save(nib.Nifti1Image(labels, img.affine, img.header), fixed)
    assert "committed label version 2" in _ok("store", "commit", store, "siteA01", fixed,
                                               "--author", "ann")

    # 4. fine-tune the imported fold on the corrections
    out = _ok("train", "--store", store, "--init", fold["id"], "--iterations", 2,
              "--patch", 32, "--epoch", 2)
    model_id = re.search(r"^done: (\S+) ", out, re.M).group(1)
    meta = read_meta(store / "models" / f"{model_id}.safetensors")
    prov = meta["provenance"]
    assert prov["parent"] == fold["id"]
    assert prov["data_versions"] == {"siteA01": 2, "siteA02": 1, "siteB01": 1, "siteB02": 1}
    assert prov["origin"] == {k: fold["provenance"][k]
                              for k in ("source_folder", "trainer", "plans", "fold")}
    assert meta["preprocessing"] == fold["preprocessing"]  # the release's own preprocessing
    listed = [line for line in _ok("model", "ls", store).splitlines() if line.startswith(model_id)]
    assert len(listed) == 1 and fold["id"] in listed[0]

    # 5. predict with the new model
    _ok("predict", image, "--seg", aseg, "--model", model_id, "--store", store,
        "-o", tmp_path / "pred2", "--tta", 1)
    _predicted(tmp_path / "pred2", "sub-siteA01_T2w")

    # 6. leave-one-site-out evaluation of fine-tuning from the imported fold
    out = _ok("evaluate", "--store", store, "--scheme", "losocv", "--init", fold["id"],
              "--iterations", 1, "--patch", 32, "--batch-size", 1, "-o", tmp_path / "eval")
    with open(tmp_path / "eval" / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert sorted((r["site"], r["subject"]) for r in rows) == [
        (s[:5], s) for s in SUBJECTS]
    by_fold = {r["fold"]: {x["site"] for x in rows if x["fold"] == r["fold"]} for r in rows}
    assert sorted(map(sorted, by_fold.values())) == [["siteA"], ["siteB"]]  # one site a fold
    assert "Per left-out site" in out and "| siteA | 2 |" in out and "| siteB | 2 |" in out
    assert sorted(read_meta(p)["id"] for p in (store / "models").glob("*.safetensors")) == \
        sorted([fold["id"], read_meta(store / "models" / "fold_1.safetensors")["id"], model_id])
