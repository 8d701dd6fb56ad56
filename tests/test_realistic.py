"""The realistic training subjects, the hard-negative sampler and the real-anatomy case."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from napari_pvs._regions import REGION_CODES
from napari_pvs.phantom import SITES
from napari_pvs.training.data import PatchSampler, SubjectData
from napari_pvs.training.holdout import anatomy_case
from napari_pvs.training.realistic import BG, VENTRICLE, WM, make_realistic, mni_template

pytestmark = pytest.mark.slow

COARSE = replace(SITES[0], spacing=1.4)  # a coarse scanner keeps the tests fast


@pytest.fixture(scope="module")
def subject():
    return make_realistic(3, site=COARSE)


def test_template_regions_are_anatomical():
    tpl = mni_template()
    idx = np.argwhere(tpl.labels == BG)
    world = idx @ tpl.affine[:3, :3].T + tpl.affine[:3, 3]
    # the basal ganglia sit on both sides of the midline, lateral to the ventricles
    assert (world[:, 0] < -8).sum() > 3000 and (world[:, 0] > 8).sum() > 3000
    assert np.abs(world[:, 0]).min() > 5
    vent = np.argwhere(tpl.labels == VENTRICLE) @ tpl.affine[:3, :3].T + tpl.affine[:3, 3]
    assert 5_000 < len(vent) < 60_000 and abs(vent[:, 0].mean()) < 3  # symmetric, about 20 ml
    assert (tpl.labels == WM).sum() > 300_000  # cerebral WM, ~ 400-500 ml


def test_subject_is_t2w_with_pvs_in_the_regions(subject):
    s = subject
    assert s.image.dtype == np.float32 and s.image.shape == s.labels.shape == s.regions.shape
    assert np.isfinite(s.image).all() and s.image.min() >= 0
    assert s.labels.any() and not (s.labels.astype(bool) & (s.regions == 0)).any()
    for code in REGION_CODES.values():
        if code:
            assert (s.labels.astype(bool) & (s.regions == code)).sum() > 50
    # T2w: PVS are brighter than the WM around them, whatever the drawn contrast
    wm = (s.regions == REGION_CODES["WM"]) & ~s.labels.astype(bool)
    assert np.median(s.image[s.labels > 0]) > np.median(s.image[wm]) * 1.1
    assert np.allclose(np.diag(s.affine)[:3], s.spacing)
    assert s.meta["modality"] == "T2w" and s.meta["n_pvs_wm"] > 50


def test_hard_negatives_are_look_alikes_not_pvs(subject):
    s = subject
    assert s.hard.any() and not (s.hard & (s.labels > 0)).any()
    # they lie where the network must learn to say no: the ROI's borders and distractors
    near_roi = s.hard & (s.regions > 0)
    assert near_roi.sum() > 0.3 * s.hard.sum()


def test_t1w_inverts_the_contrast():
    s = make_realistic(4, modality="T1w", site=COARSE, head=False, burden=1.0)
    wm = (s.regions == REGION_CODES["WM"]) & (s.labels == 0)
    assert np.median(s.image[s.labels > 0]) < np.median(s.image[wm]) * 0.9


def test_sampler_draws_hard_negatives():
    shape = (64, 64, 64)
    hard = np.zeros(shape, bool)
    hard[50:53, 50:53, 50:53] = True
    labels = np.zeros(shape, np.uint8)
    labels[10, 10, 10] = 1
    image = np.zeros(shape, np.float32)
    image[hard] = 7.0
    d = SubjectData("s", "A", 1, image, labels, np.ones(shape, bool), None, hard=hard)
    sampler = PatchSampler({"s": d}, ["s"], (32, 32, 32), pos_fraction=0.0, hard_fraction=1.0,
                           augment=False, seed=1)
    imgs, labs, _ = sampler.batch(4)
    assert all((img == 7.0).any() for img in imgs[:, 0])  # every patch holds the hard cube
    sampler = PatchSampler({"s": d}, ["s"], (32, 32, 32), pos_fraction=0.0, hard_fraction=0.5,
                           augment=False, seed=1)
    hits = [int((sampler.batch(1)[0] == 7.0).any()) for _ in range(40)]
    assert 8 < sum(hits) < 36  # a fraction of one patch is rounded at random, not away
    # without a hard mask the hard share falls back to anywhere in the ROI
    d.hard = None
    imgs, _, _ = PatchSampler({"s": d}, ["s"], (32, 32, 32), pos_fraction=0.0, hard_fraction=1.0,
                              augment=False, seed=1).batch(2)
    assert imgs.shape == (2, 1, 32, 32, 32)


def test_sampler_can_centre_on_pvs_not_on_pvs_voxels():
    """pos_balance="component": a one-voxel PVS is centred as often as a 40-voxel one
    (with "voxel", 1 draw in 41); the patch then holds it."""
    shape = (64, 64, 64)
    labels = np.zeros(shape, np.uint8)
    labels[10:50, 12, 12] = 1  # a long PVS
    labels[50, 50, 50] = 1  # a short one
    image = np.zeros(shape, np.float32)
    image[50, 50, 50] = 5.0
    d = SubjectData("s", "A", 1, image, labels, np.ones(shape, bool), None)
    share = {}
    for balance in ("voxel", "component"):
        sampler = PatchSampler({"s": d}, ["s"], (16, 16, 16), pos_fraction=1.0, augment=False,
                               seed=3, pos_balance=balance)
        share[balance] = np.mean([(sampler.batch(1)[0] == 5.0).any() for _ in range(300)])
    assert 0.38 < share["component"] < 0.62 and share["voxel"] < 0.08
    with pytest.raises(ValueError, match="pos_balance"):
        PatchSampler({"s": d}, ["s"], (16, 16, 16), pos_balance="cluster")


def test_anatomy_case_deforms_the_template():
    a = anatomy_case(1, spacing=1.6)
    assert a.labels.any() and not (a.labels.astype(bool) & (a.regions == 0)).any()
    assert a.spacing == (1.6, 1.6, 1.6) and a.meta["n_pvs"] > 150
    b = anatomy_case(2, warp_mm=3.0, spacing=1.6)
    assert a.image.shape == b.image.shape and not np.array_equal(a.labels, b.labels)
    # the deformation moves the anatomy: the region maps differ beyond their borders
    assert (a.regions != b.regions).mean() > 0.01


def test_generator_is_deterministic(subject):
    again = make_realistic(3, site=COARSE)
    assert np.array_equal(again.image, subject.image)
    assert np.array_equal(again.labels, subject.labels) and np.array_equal(again.hard, subject.hard)


def test_starter_recipe_reproduces_its_weights(tmp_path):
    """The shipped weights come from a seeded recipe: resuming from the checkpoint of
    stages 1-2 (--stage2) or 1-3 (--stage3), each trained in a run of its own, gives the
    full run's network bit for bit (here 32³ patches, 1 coarse realistic subject, 1 small
    phantom (2 in stage 4), 3 + 2 + 2 + 2 iterations of the four stages): the same recipe,
    computed twice over, gives the same weights."""
    import torch

    from napari_pvs.model import save_checkpoint
    from napari_pvs.training.starter import train_starter

    recipe = {"realistic": 1, "phantoms": 1, "phantom_size_mm": 48, "iterations": 3,
              "patch": 32,
              "realistic_spacing": 2.0, "refine_spacing": 1.5, "refine_iterations": 2,
              "polish_iterations": 2, "balance_iterations": 2, "balance_phantoms": 2}
    torch.set_flush_denormal(True)
    a, meta = train_starter(recipe, log=lambda m: None, cache=tmp_path)

    def same(x, y):
        return all(torch.equal(x.state_dict()[k], y.state_dict()[k]) for k in x.state_dict())

    card = meta["card"]
    assert card["recipe"]["iterations"] == 3 and "1000-1000" in card["data"]
    assert meta["provenance"]["iterations"] == 9 and meta["preprocessing"]["overlap"] == 0.25
    # the runtime settings picked on validation subjects (bench_runtime_settings.py)
    assert meta["preprocessing"]["min_spacing"] == [0.7] * 3
    assert meta["postprocessing"] == {"min_cluster_mm3": 1.0}
    for stage, drop in ((2, {"polish_iterations": 0, "balance_iterations": 0}),
                        (3, {"balance_iterations": 0})):
        part, part_meta = train_starter({**recipe, **drop}, log=lambda m: None, cache=tmp_path)
        assert part_meta["provenance"]["iterations"] == 3 + 2 * (stage - 1)
        assert not same(part, a)
        ckpt = save_checkpoint(tmp_path / f"stage{stage}.safetensors", part, part_meta)
        resumed, _ = train_starter(recipe, log=lambda m: None, cache=tmp_path, init=ckpt,
                                   init_stage=stage)
        assert same(resumed, a), f"resuming after stage {stage} changed the weights"
    # --stage4: the finished network trains no further; its grid and figures carry over
    full = save_checkpoint(tmp_path / "stage4.safetensors", a, meta)
    done, done_meta = train_starter(recipe, log=lambda m: None, cache=tmp_path, init=full,
                                    init_stage=4)
    assert same(done, a) and done_meta["preprocessing"]["target_spacing"] == [1.5] * 3
    assert done_meta["card"]["final_loss"] == card["final_loss"]
    assert meta["preprocessing"]["target_spacing"] == [1.5, 1.5, 1.5]  # stage 2's grid
    # each stage's subjects are cached on their own grid; stage 4 adds a phantom
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.npz")) == sorted(
        ["T2w-1mm-realistic2mm/phantom00-48mm.npz", "T2w-1mm-realistic2mm/real00.npz"]
        + [f"T2w-1.5mm-realistic2mm/{n}"
           for n in ("phantom00-48mm.npz", "phantom01-48mm.npz", "real00.npz")])
