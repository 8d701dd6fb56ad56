"""False-positive triage on a site the model never saw: does P(false positive) find them?

The model (default: the shipped starter, whose triage and temperature were fitted on its
validation subjects of sites A-C) predicts held-out phantoms of site D.  A predicted
cluster is a false positive when it touches no reference PVS voxel.  Each figure is
printed for the learned P(false positive), for today's heuristic priority
(``0.6 * unc_mean + 0.4 * (1 - linearity)`` at temperature 1) and for random order:

* AUROC of the score for false versus true positive clusters (random: 0.5);
* the share of all false positives in the first 20 % of the review order, for one queue
  across all subjects (random: 20 %) and per subject;
* the expected calibration error (10 bins) of the cluster probability ``prob_mean`` as
  P(true positive), before and after temperature scaling, and of 1 - P(false positive);
* "expected false positives left" before any review (the sum of P(false positive))
  against the true count, per subject and in all.

Targets: AUROC >= 0.85; >= 60 % of the false positives in the first 20 %; the estimate
within +-30 % of the true count.

Run:  python benchmarks/bench_triage.py [--model starter|PATH] [--subjects 4]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from napari_pvs._errors import PVSInputError
from napari_pvs.model import read_meta, starter_path
from napari_pvs.phantom import make_phantom
from napari_pvs.training.triage import auroc, cluster_samples, expected_calibration_error
from napari_pvs.triage import p_false_positive, temperature_of


def first_share(score: np.ndarray, is_fp: np.ndarray, fraction: float = 0.2) -> float:
    """Share of all false positives among the ``fraction`` highest-scored clusters."""
    k = int(np.ceil(fraction * len(score)))
    order = np.argsort(-np.asarray(score), kind="stable")
    return float(is_fp[order[:k]].sum() / max(is_fp.sum(), 1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="starter", help="starter, starter-fast or a checkpoint")
    ap.add_argument("--subjects", type=int, default=4, help="site-D phantoms (seeds 901...)")
    args = ap.parse_args()
    path = starter_path(args.model) if args.model in ("starter", "starter-fast") else args.model
    try:
        meta = read_meta(path)
    except PVSInputError as exc:
        ap.error(str(exc))
    triage = meta.get("triage")
    if triage is None:
        raise SystemExit(f"{path} has no triage classifier; fit one with "
                         f"python -m napari_pvs.training.triage {path}")
    t_fit = temperature_of(meta)
    print(f"model {meta['id']}: temperature {t_fit:.3f}; classifier fitted on "
          f"{len(triage.get('subjects', []))} validation subjects ({triage.get('clusters')} "
          f"clusters): {triage.get('feature_set')} {triage['features']}, leave-one-subject-"
          f"out AUROC {triage.get('cv_auroc')} (heuristic {triage.get('cv_auroc_heuristic')})")
    t0 = time.perf_counter()

    def subjects():
        for seed in range(901, 901 + args.subjects):
            p = make_phantom(seed, modality="T2w", site=3, size_mm=144)
            yield f"siteD-{seed}", p.image, p.spacing, p.labels, p.regions, p.affine

    rows = []
    for s in cluster_samples(path, subjects(), log=lambda m: None):
        raw, is_fp = s.table(1.0)
        cal, _ = s.table(t_fit)
        rows.append({"name": s.name, "is_fp": is_fp, "heuristic": raw.columns["priority"],
                     "p_fp": p_false_positive(cal.columns, triage),
                     "pm_raw": raw.columns["prob_mean"], "pm_cal": cal.columns["prob_mean"]})
    cat = {k: np.concatenate([r[k] for r in rows]) for k in rows[0] if k != "name"}
    y = cat["is_fp"]
    rng = np.random.default_rng(0)
    rand = rng.random(len(y))
    print(f"\nsite D, {len(rows)} phantoms: {len(y)} predicted clusters, {int(y.sum())} false "
          f"positives ({y.mean():.0%}); {time.perf_counter() - t0:.0f} s")
    print(f"\n  {'':<26}{'P(false positive)':>18}{'heuristic':>12}{'random':>10}")
    a = {k: auroc(cat[k], y) for k in ("p_fp", "heuristic")}
    print(f"  {'AUROC':<26}{a['p_fp']:>18.3f}{a['heuristic']:>12.3f}{auroc(rand, y):>10.3f}")
    share = {k: first_share(cat[k], y) for k in ("p_fp", "heuristic")}
    print(f"  {'FPs in first 20% (queue)':<26}{share['p_fp']:>18.0%}{share['heuristic']:>12.0%}"
          f"{first_share(rand, y):>10.0%}")
    per = {k: np.mean([first_share(r[k], r["is_fp"]) for r in rows]) for k in ("p_fp", "heuristic")}
    print(f"  {'  per subject (mean)':<26}{per['p_fp']:>18.0%}{per['heuristic']:>12.0%}{0.2:>10.0%}")
    print("\n  calibration (ECE, 10 bins, of P(true positive) per cluster):")
    print(f"    prob_mean at T = 1:            {expected_calibration_error(cat['pm_raw'], ~y):.3f}")
    print(f"    prob_mean at T = {t_fit:<6.3f}:       "
          f"{expected_calibration_error(cat['pm_cal'], ~y):.3f}")
    print(f"    1 - P(false positive):         {expected_calibration_error(1 - cat['p_fp'], ~y):.3f}")
    print("\n  expected false positives left, before any review (sum of P(FP)) vs true:")
    errs = []
    for r in rows:
        e, n = float(np.sum(r["p_fp"])), int(r["is_fp"].sum())
        errs.append((e - n) / max(n, 1))
        print(f"    {r['name']}: {e:6.1f} vs {n:4d}  ({errs[-1]:+.0%})")
    total_e, total_n = float(np.sum(cat["p_fp"])), int(y.sum())
    total_err = (total_e - total_n) / max(total_n, 1)
    print(f"    all:         {total_e:6.1f} vs {total_n:4d}  ({total_err:+.0%})")
    print("\n  targets:")
    print(f"    AUROC >= 0.85: {'met' if a['p_fp'] >= 0.85 else 'MISSED'} ({a['p_fp']:.3f})")
    print(f"    >= 60% of false positives in the first 20%: "
          f"{'met' if share['p_fp'] >= 0.6 else 'MISSED'} ({share['p_fp']:.0%})")
    ok = all(abs(e) <= 0.3 for e in errs)
    print(f"    estimate within +-30% of the true count, every subject: "
          f"{'met' if ok else 'MISSED'} (worst {max(errs, key=abs):+.0%})")


if __name__ == "__main__":
    main()
