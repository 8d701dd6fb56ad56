"""Train the starter model that ships in the package (``--model starter``).

    python -m napari_pvs.training.starter [--out FILE] [--iterations N] [--modality T2w]

The recipe, all seeded, so a rerun reproduces the weights' scores:

* data: ``--realistic`` subjects of :mod:`napari_pvs.training.realistic` (the MNI152
  anatomy, deformed, with random contrast, distractors and PVS; seeds 1000...), drawn
  around sites A-C, plus ``--phantoms`` cartoon phantoms of sites A-C.  Site D is never
  seen: the leave-one-site-out benchmark tests on it.
* patches: 2 x 48³ per iteration at the model's 1 mm grid; 50 % centred on PVS, 25 %
  on hard negatives (look-alikes and region borders), the rest anywhere in the WM / BG;
  MONAI augmentation (flips, rotations, scaling, intensity, gamma, noise, bias).
* network: MedNeXt-XS k3 with deep supervision, AdamW, poly decay, Dice + CE, through
  the package's one trainer (:class:`napari_pvs.training.trainer.Trainer`).
* card: the data, seeds, sites and iterations, and the held-out scores of
  :func:`napari_pvs.training.holdout.evaluate` (site-D phantoms and the real-anatomy
  case, each next to the Frangi baseline), go into ``meta["card"]``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from napari_pvs.model import arch_config, default_meta, save_checkpoint
from napari_pvs.phantom import SITES, make_phantom
from napari_pvs.preprocess import preprocess

from .data import PatchSampler, SubjectData
from .realistic import make_realistic
from .trainer import Trainer

__all__ = ["RECIPE", "main", "train_starter"]

PACKAGE_MODELS = Path(__file__).resolve().parents[1] / "src" / "napari_pvs" / "models"

RECIPE = {
    "variant": "XS", "kernel_size": 3, "target_spacing": 1.0, "patch": 48, "batch": 2,
    "iterations": 3000, "lr": 2e-3, "pos_fraction": 0.5, "hard_fraction": 0.25,
    "realistic": 24, "phantoms": 6, "phantom_size_mm": 128, "seed": 0, "tta": 1,
    "overlap": 0.25,  # the shipped runtime: window overlap of its predictions
    "realistic_spacing": None,  # None: each subject's scanner draws its voxel size
    # stage 2: the same network refined on the same subjects at a finer grid
    "refine_spacing": 0.8, "refine_iterations": 1500, "refine_lr": 1e-3,
    # stage 3: more of stage 2 at a lower rate, on new patch draws (measured: real-anatomy
    # cluster precision 0.879 -> 0.908, site-D BG cluster Dice 0.914 -> 0.940)
    "polish_iterations": 1500, "polish_lr": 5e-4,
    # stage 4 (not in the shipped weights: 0 iterations): positive patches centred on a
    # PVS drawn uniformly, not a PVS voxel, so that short, faint PVS are seen as often as
    # long ones, with more cartoon phantoms.  Measured (README "Stage 4, measured and not
    # shipped"): site-D WM cluster Dice 0.816 -> 0.826-0.829, still below Frangi's 0.831,
    # and real-anatomy cluster precision 0.908 -> 0.850-0.874
    "balance_iterations": 0, "balance_lr": 3e-4, "balance_phantoms": 12,
    # the runtime (no training uses them), picked on the validation subjects (realistic
    # seeds 1100-1103 and phantoms 2100-2105, each also at 0.7 mm): an image finer than
    # the 0.8 mm grid keeps its own voxels down to 0.7 mm (WM voxel / cluster Dice of the
    # 0.7 mm copies 0.651 / 0.833 -> 0.711 / 0.893, BG 0.712 / 0.799 -> 0.737 / 0.821),
    # and label clusters under 1 mm³ are dropped (the best of 0, 0.5, 1 and 1.5 mm³ by
    # the mean of the four Dice over all 20 validation images; Frangi drops under 2 mm³)
    "min_spacing": 0.7, "min_cluster_mm3": 1.0,
}


def _subject(name: str, site: str, image, labels, regions, spacing, pre, hard=None) -> SubjectData:
    prep = preprocess(image, spacing, regions > 0, pre)
    return SubjectData(name, site, 1, prep.image[0], prep.mask_to_model(labels).astype(np.uint8),
                       prep.mask, None,
                       hard=None if hard is None else prep.mask_to_model(hard))


def _cached(cache: Path | None, name: str, make) -> SubjectData:
    """``make()``, or its arrays from ``cache/name.npz`` (they depend only on the seed)."""
    f = None if cache is None else cache / f"{name}.npz"
    if f is not None and f.is_file():
        z = np.load(f)
        return SubjectData(name, str(z["site"]), 1, z["image"], z["labels"], z["roi"], None,
                           hard=z["hard"] if "hard" in z else None)
    d = make()
    if f is not None:
        f.parent.mkdir(parents=True, exist_ok=True)
        arrays = {"image": d.image, "labels": d.labels, "roi": d.roi, "site": d.site}
        if d.hard is not None:
            arrays["hard"] = d.hard
        np.savez(f.with_suffix(".tmp.npz"), **arrays)
        f.with_suffix(".tmp.npz").replace(f)
    return d


def training_subjects(recipe: dict, modality: str, pre: dict, log=print,
                      cache: Path | None = None) -> dict[str, SubjectData]:
    """The realistic subjects and the site A-C phantoms on the model grid.

    ``cache``: a folder that keeps them between runs (keyed by modality, seed and the
    model grid, which is all they depend on).
    """
    out = {}
    t = time.perf_counter()
    if cache is not None:
        grid = recipe.get("realistic_spacing")
        cache = cache / (f"{modality}-{pre['target_spacing'][0]:g}mm"
                         + (f"-realistic{grid:g}mm" if grid else ""))

    def realistic(i):
        s = make_realistic(1000 + i, modality=modality, spacing=recipe.get("realistic_spacing"))
        return _subject(f"real{i:02d}", s.meta["site"], s.image, s.labels, s.regions, s.spacing,
                        pre, s.hard)

    def phantom(j):
        p = make_phantom(2000 + j, modality=modality, site=j % 3,  # sites A, B, C
                         size_mm=recipe["phantom_size_mm"])
        return _subject(f"phantom{j:02d}", SITES[j % 3].name, p.image, p.labels, p.regions,
                        p.spacing, pre)

    for i in range(recipe["realistic"]):
        out[f"real{i:02d}"] = _cached(cache, f"real{i:02d}", lambda i=i: realistic(i))
        log(f"  realistic subject {i + 1}/{recipe['realistic']} ({out[f'real{i:02d}'].site}) "
            f"{time.perf_counter() - t:.0f} s")
    for j in range(recipe["phantoms"]):
        name = f"phantom{j:02d}-{recipe['phantom_size_mm']}mm"
        out[name] = _cached(cache, name, lambda j=j: phantom(j))
    log(f"  {len(out)} training subjects ready in {time.perf_counter() - t:.0f} s")
    return out


def _heads(path) -> dict:
    """The deep-supervision heads saved beside a checkpoint's weights."""
    from safetensors.torch import load_file

    return {k: v for k, v in load_file(str(path)).items() if k.startswith("out_blocks.")}


def train_starter(recipe: dict | None = None, modality: str = "T2w", log=print,
                  cache: Path | None = None, init: Path | None = None, init_stage: int = 1):
    """Train the starter network; returns ``(net, meta)`` (meta without held-out scores).

    ``init``: the checkpoint that stages 1..``init_stage`` of the same recipe wrote; the
    later stages run.
    """
    import torch

    from napari_pvs.inference import run
    from napari_pvs.network import build_network

    r = {**RECIPE, **(recipe or {})}
    arch = arch_config(r["variant"], r["kernel_size"])
    meta = default_meta(arch, target_spacing=[r["target_spacing"]] * 3, modality=modality,
                        patch_size=[64, 64, 64])
    meta["arch"]["deep_supervision_heads"] = True
    t = time.perf_counter()
    losses = []

    def stage(net, spacing, iterations, lr, seed, pos_balance="voxel", phantoms=None):
        meta["preprocessing"]["target_spacing"] = [spacing] * 3
        data = r if phantoms is None else {**r, "phantoms": phantoms}
        subjects = training_subjects(data, modality, meta["preprocessing"], log, cache)
        sampler = PatchSampler(subjects, sorted(subjects), (r["patch"],) * 3,
                               pos_fraction=r["pos_fraction"], hard_fraction=r["hard_fraction"],
                               augment=True, seed=seed, pos_balance=pos_balance)
        torch.manual_seed(seed)
        if net is None:  # a new network, initialised from this seed
            net = build_network(arch, deep_supervision=True)
        trainer = Trainer(net, lambda it: sampler.batch(r["batch"])[:2], iterations=iterations,
                          lr=lr)

        def show(e):
            if e.kind == "iteration":
                losses.append(e.loss)
                if e.iteration % 50 == 0:
                    log(f"  {spacing:g} mm, iteration {e.iteration}/{e.total}: loss "
                        f"{np.mean(losses[-50:]):.3f} ({time.perf_counter() - t:.0f} s)")

        return run(trainer.run(), show)

    earlier: dict = {}  # the card of the checkpoint resumed from
    if init is None:  # stage 1: from scratch on the coarse grid
        net = stage(None, r["target_spacing"], r["iterations"], r["lr"], r["seed"])
    else:  # stages 1..init_stage done before: their checkpoint
        from napari_pvs.model import load_checkpoint

        net = build_network(arch, deep_supervision=True)
        done, init_meta = load_checkpoint(init)
        net.load_state_dict(done.state_dict(), strict=False)
        net.load_state_dict(_heads(init), strict=False)
        # its grid (when no stage runs here), and what its training took
        meta["preprocessing"]["target_spacing"] = init_meta["preprocessing"]["target_spacing"]
        earlier = init_meta.get("card") or {}
    if r["refine_iterations"] and (init is None or init_stage < 2):
        # stage 2: the same network on the finer grid
        net = stage(net.train(), r["refine_spacing"], r["refine_iterations"], r["refine_lr"],
                    r["seed"] + 1)
    if r["refine_iterations"] and r["polish_iterations"] and (init is None or init_stage < 3):
        # stage 3: on the same grid, a lower rate and new patches
        net = stage(net.train(), r["refine_spacing"], r["polish_iterations"], r["polish_lr"],
                    r["seed"] + 2)
    if r["refine_iterations"] and r["balance_iterations"] and (init is None or init_stage < 4):
        # stage 4: PVS-balanced positive patches, more phantoms, a lower rate
        net = stage(net.train(), r["refine_spacing"], r["balance_iterations"], r["balance_lr"],
                    r["seed"] + 3, pos_balance="component", phantoms=r["balance_phantoms"])
    seconds = time.perf_counter() - t
    meta["provenance"].update(
        iterations=r["iterations"] + r["refine_iterations"]
        + (r["polish_iterations"] + r["balance_iterations"] if r["refine_iterations"] else 0),
        note="starter model (see card)")
    # one pass keeps a 160³ image under 10 s on a 2-core CPU; its uncertainty is then the
    # entropy of the probability (--tta 2 adds the mirror variance)
    meta["preprocessing"]["tta"] = r["tta"]
    # and windows overlapping by a quarter (not 0.5): measured on the held-out cases it
    # keeps the scores (benchmarks/bench_starter.py --overlap) at less than half the time
    meta["preprocessing"]["overlap"] = r["overlap"]
    if r["min_spacing"] and r["refine_iterations"]:  # measured for the 0.8 mm grid only
        meta["preprocessing"]["min_spacing"] = [r["min_spacing"]] * 3
    if r["min_cluster_mm3"]:
        meta["postprocessing"] = {"min_cluster_mm3": r["min_cluster_mm3"]}
    meta["id"] = f"starter-{modality.lower()}-{time.strftime('%Y%m%d')}"
    meta["card"] = {
        "name": "starter" if modality == "T2w" else f"starter-{modality.lower()}",
        "modality": modality,
        "script": "python -m napari_pvs.training.starter",
        "recipe": r,
        "data": (f"{r['realistic']} realistic subjects (MNI152 2009 template from nilearn, random "
                 f"affine + smooth deformation, SynthSeg-style random contrast, distractors, PVS; "
                 f"seeds 1000-{1000 + r['realistic'] - 1}) and {r['phantoms']} cartoon phantoms "
                 f"(seeds 2000-{2000 + r['phantoms'] - 1}, {r['phantom_size_mm']} mm)"
                 + (f"; stage 4: {r['balance_phantoms']} phantoms (seeds 2000-"
                    f"{2000 + r['balance_phantoms'] - 1}), positive patches on a PVS drawn "
                    f"uniformly" if r["refine_iterations"] and r["balance_iterations"] else "")),
        "sites": "around sites A-C (voxel size, SNR, bias, blur); site D never seen",
        # a resume that trains nothing (--stage4) keeps its checkpoint's figures
        "training_seconds": round(seconds) if losses else earlier.get("training_seconds"),
        "final_loss": float(np.mean(losses[-50:])) if losses else earlier.get("final_loss"),
    }
    return net, meta


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m napari_pvs.training.starter", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modality", choices=("T2w", "T1w"), default="T2w")
    p.add_argument("--out", type=Path, help="checkpoint to write (default: the package's "
                   "models/starter_<modality>.safetensors)")
    p.add_argument("--iterations", type=int, default=RECIPE["iterations"])
    p.add_argument("--realistic", type=int, default=RECIPE["realistic"])
    p.add_argument("--phantoms", type=int, default=RECIPE["phantoms"])
    p.add_argument("--cache", type=Path, help="folder that keeps the generated subjects "
                   "between runs")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--stage1", type=Path, help="the checkpoint of stage 1 of this recipe "
                   "(the 1 mm network, --refine-iterations 0): run stages 2 and 3 only")
    p.add_argument("--stage2", type=Path, help="the checkpoint of stages 1 and 2 of this "
                   "recipe (--polish-iterations 0): run stage 3 only")
    p.add_argument("--stage3", type=Path, help="the checkpoint of stages 1-3 of this recipe "
                   "(--balance-iterations 0): run stage 4 only")
    p.add_argument("--stage4", type=Path, help="the checkpoint of all four stages of this "
                   "recipe: train nothing; fit the triage, evaluate and write the card")
    p.add_argument("--refine-iterations", type=int, default=RECIPE["refine_iterations"])
    p.add_argument("--polish-iterations", type=int, default=RECIPE["polish_iterations"])
    p.add_argument("--balance-iterations", type=int, default=RECIPE["balance_iterations"])
    p.add_argument("--balance-phantoms", type=int, default=RECIPE["balance_phantoms"])
    p.add_argument("--no-triage", dest="triage", action="store_false",
                   help="skip fitting the false-positive triage and temperature on the "
                   "validation subjects (napari_pvs.training.triage)")
    p.add_argument("--no-eval", dest="evaluate", action="store_false",
                   help="skip the held-out evaluation (the card then has no scores)")
    args = p.parse_args(argv)
    out = args.out or PACKAGE_MODELS / f"starter_{args.modality.lower()}.safetensors"
    recipe = {"iterations": args.iterations, "realistic": args.realistic,
              "phantoms": args.phantoms, "refine_iterations": args.refine_iterations,
              "polish_iterations": args.polish_iterations,
              "balance_iterations": args.balance_iterations,
              "balance_phantoms": args.balance_phantoms}
    resume = [(n, c) for n, c in enumerate((args.stage1, args.stage2, args.stage3, args.stage4),
                                           start=1) if c]
    if len(resume) > 1:
        p.error("give one of --stage1, --stage2, --stage3 and --stage4")
    from napari_pvs._errors import PVSInputError
    from napari_pvs.model import read_meta

    for ckpt in (args.stage1, args.stage2, args.stage3, args.stage4):
        try:  # a bad checkpoint is said now, not after generating the subjects
            if ckpt is not None:
                read_meta(ckpt)
        except PVSInputError as exc:
            p.error(str(exc))
    print(f"training the {args.modality} starter model -> {out}", flush=True)
    import torch

    torch.set_flush_denormal(True)  # denormal weights slow CPU training down many times
    if args.threads:
        torch.set_num_threads(args.threads)
    net, meta = train_starter(recipe, args.modality, log=lambda m: print(m, flush=True),
                              cache=args.cache, init=resume[0][1] if resume else None,
                              init_stage=resume[0][0] if resume else 1)
    tmp = out.with_name(out.name + ".tmp.safetensors")
    save_checkpoint(tmp, net, meta)
    if args.triage:  # on the validation subjects: seeds the training never used
        from .triage import cluster_samples, fit, starter_validation

        samples = cluster_samples(tmp, starter_validation(args.modality),
                                  log=lambda m: print(m, flush=True))
        meta["calibration"], meta["triage"] = fit(samples, log=lambda m: print(m, flush=True))
        save_checkpoint(tmp, net, meta)
    if args.evaluate:
        from .holdout import evaluate

        meta["card"]["held_out"] = evaluate(tmp, modality=args.modality,
                                            log=lambda m: print(m, flush=True))
    save_checkpoint(out, net, meta)
    tmp.unlink(missing_ok=True)
    print(json.dumps(meta["card"], indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
