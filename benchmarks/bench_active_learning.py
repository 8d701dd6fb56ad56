"""Does the queue save corrections?  A simulated annotator adapts the model to a new site.

The scenario: a lab's model knows sites A-C (the shipped starter, MedNeXt-XS, trained
around sites A-C only).  Scans of a new scanner, site D, arrive.  Each round a strategy
picks what the annotator looks at, the oracle (the phantom truth) annotates it, the
model is fine-tuned incrementally through the package's own path
(:func:`napari_pvs.training.finetune.finetune` on a corrections store) with a fixed
number of iterations, and held-out site-D phantoms are scored.

* **Pool:** ``--per-site`` unlabelled phantoms of each of sites A-D.  **Test:**
  ``--test`` held-out site-D phantoms.  The lab's own labelled A-C phantoms (one per
  site, full labels) stay in the store: fine-tuning replays them, and two more (sites
  A and B) are its validation subjects, on which it refits the false-positive triage.
* **Strategies:**
  - ``random``: whole subjects of the pool in random order (seeded);
  - ``uncertainty``: whole subjects by the queue's uncertainty order
    (:func:`napari_pvs.active.rank_subjects`, the mean cluster uncertainty);
  - ``clusters``: the top ``--k`` clusters of the queue's cluster ranking across the
    pool (:func:`napari_pvs.active.rank_clusters`, P(false positive) of the model's
    triage), decided one by one and saved as review-only label versions (cluster
    decisions, trained with the masked loss);
  - ``site``: whole subjects, site-aware (``rank_subjects(site_aware=True)``: the sites
    with the fewest corrected subjects first, then by uncertainty);
  - ``site-clusters``: ``clusters``, site-aware (``rank_clusters(site_aware=True)``);
  - ``mistakes``: site-aware, the top ``--k`` of one queue of the likeliest mistakes:
    predicted clusters by P(false positive), and near misses (components of
    probability >= ``--candidates`` that hold no predicted voxel) by their highest
    probability.  A near miss that is a PVS is painted (the annotator paints the true
    PVS there: one painted PVS); one that is not is marked background (one decision).
* **Effort,** counted in annotator actions: deciding a cluster (accept or reject) is
  one action; painting a PVS the model missed is one action per missed PVS.  A whole
  subject costs its predicted clusters plus its missed PVS (the prediction of the
  model at the time it is picked); the annotator then holds the subject's full truth.
  Minutes: ``--decision-s`` seconds per decision (default 4) and ``--paint-s`` per
  painted PVS (default 30).
* **Oracle of a cluster decision:** accept when at least half of the cluster's voxels
  lie within one voxel of a true PVS, else reject.  An accepted cluster keeps the
  predicted voxels (the annotator does not redraw it).
* **Scores:** voxel and cluster Dice inside WM + BG of the test phantoms, the mean over
  them, after every round.

Target: the best active strategy reaches random order's final site-D cluster Dice with
at least 40 % less effort (the effort at which its curve, linearly interpolated between
rounds, first reaches that Dice; mean over seeds).

Outputs (``--out``): ``active_learning.csv`` (one row per seed, strategy and round, with
cluster precision / recall and the predicted PVS volume over the true one),
``active_learning.png`` (cluster Dice, voxel Dice and volume against effort) and
``active_learning.json`` (the summary).  ``--from-csv`` summarises and plots earlier
CSVs (a later file's strategy and seed replace an earlier one's).

Run:  python benchmarks/bench_active_learning.py [--seeds 0 1] [--rounds 4] [--k 40]
          [--iterations 60] [--size-mm 80] [--per-site 2] [--test 4] [--threads 2]
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

STRATEGIES = ("random", "uncertainty", "clusters", "site", "site-clusters", "mistakes")
SITE_D = 3


@dataclass
class Case:
    name: str
    site: int
    phantom: object


@dataclass
class Run:
    strategy: str
    seed: int
    rows: list = field(default_factory=list)


def _phantoms(seed: int, args) -> tuple[list[Case], list[Case], list[Case], list[Case]]:
    """(pool, test, lab-labelled training, lab validation) for one seed."""
    from napari_pvs.phantom import make_phantom

    base = 50_000 + 1000 * seed

    def case(name, site, k):
        return Case(name, site, make_phantom(base + k, site=site, size_mm=args.size_mm))

    pool = [case(f"pool-{'ABCD'[s]}{i}", s, 10 * s + i)
            for s in range(4) for i in range(args.per_site)]
    test = [case(f"test-D{i}", SITE_D, 100 + i) for i in range(args.test)]
    lab = [case(f"lab-{'ABC'[s]}", s, 200 + s) for s in range(3)]
    val = [case(f"val-{'AB'[s]}", s, 300 + s) for s in range(2)]
    return pool, test, lab, val


def _store(path: Path, pool, lab, val):
    from napari_pvs.io import Volume
    from napari_pvs.model import load_checkpoint, starter_path
    from napari_pvs.store import CorrectionsStore

    store = CorrectionsStore.create(path)
    for c in [*pool, *lab, *val]:
        ph = c.phantom
        store.add_subject(c.name, Volume(ph.image, ph.affine, ph.spacing), site="ABCD"[c.site],
                          regions=ph.regions)
    for c in [*lab, *val]:
        store.commit_labels(c.name, c.phantom.labels.astype(np.uint8), author="lab")
    net, meta = load_checkpoint(starter_path("starter"))
    meta.pop("card", None)
    model_id = store.models.register(net, meta)
    return store, model_id


def _predict(store, model_id: str, case: Case):
    from napari_pvs.inference import run
    from napari_pvs.pipeline import predict_array

    ph = case.phantom
    return run(predict_array(ph.image, ph.spacing, model_id, affine=ph.affine, roi=ph.regions,
                             registry=store.models, tta=1))


def _score(store, model_id: str, test: list[Case]) -> dict[str, float]:
    from napari_pvs.metrics import score

    s = [score(_predict(store, model_id, c).labels, c.phantom.labels, c.phantom.regions)
         for c in test]
    out = {}
    for region in ("all", "WM", "BG"):
        for key in ("voxel_dice", "cluster_dice"):
            out[f"{region}_{key}"] = float(np.mean([x[region][key] for x in s]))
    for key in ("cluster_precision", "cluster_recall"):
        out[key] = float(np.mean([x["all"][key] for x in s]))
    out["volume_ratio"] = float(sum(x["all"]["pred_voxels"] for x in s)
                                / max(sum(x["all"]["ref_voxels"] for x in s), 1))
    return out


def _subject_effort(pred_labels: np.ndarray, case: Case) -> tuple[int, int]:
    """(clusters to decide, missed PVS to paint) of a whole-subject annotation."""
    from napari_pvs.metrics import cluster_scores

    roi = case.phantom.regions > 0
    cs = cluster_scores(pred_labels.astype(bool) & roi, case.phantom.labels.astype(bool) & roi)
    return cs.n_pred, cs.n_ref - cs.detected_ref


def _annotate_subject(store, case: Case) -> None:
    store.commit_labels(case.name, case.phantom.labels.astype(np.uint8), author="oracle")


def _paint_truth(session, pvs: np.ndarray, vox: np.ndarray) -> None:
    """Paint into the session the true PVS (``pvs``: flat component ids) that the voxels
    ``vox`` touch."""
    hit = np.unique(pvs[vox])
    vox = np.flatnonzero(np.isin(pvs, hit[hit > 0]))
    session.labels.reshape(-1)[vox] = 1
    session.record_paint(vox, 1)


def _decide(store, model_id: str, picks: list[dict], cases: dict[str, Case],
            redraw: bool = False) -> tuple[int, int, int]:
    """The oracle decides the picked rows, one review-only version per subject; returns
    ``(decisions, painted PVS, positive answers)``.

    A predicted cluster (a row of ``rank_clusters``) is accepted when at least half of
    its voxels lie within one voxel of a true PVS, else rejected: one decision.  A near
    miss (a row of :func:`_candidates`) that is a PVS by the same rule is painted in
    with its true voxels (one painted PVS); one that is not is marked background (one
    decision).  ``redraw`` (a diagnostic, ``--redraw-accepted``): an accepted cluster's
    true PVS voxels are painted in as well, as if the annotator redrew its outline for
    free (not counted)."""
    from scipy import ndimage as ndi

    from napari_pvs.clusters import label_clusters
    from napari_pvs.review import ReviewSession

    by_subject: dict[str, list[dict]] = {}
    for r in picks:
        by_subject.setdefault(r["subject"], []).append(r)
    decisions = painted = positive = 0
    for sid, rows in by_subject.items():
        truth = cases[sid].phantom.labels > 0
        near = ndi.binary_dilation(truth, iterations=1).reshape(-1)
        pvs = label_clusters(truth)[0].reshape(-1)
        labels = store.read_prediction(sid, model_id, "labels")
        session = ReviewSession(labels.astype(np.uint8))
        assert np.array_equal(label_clusters(labels)[0], session.clusters), \
            "cluster ids of the queue and the review differ"
        for r in rows:
            vox = r["candidate"] if "candidate" in r else session.cluster_voxels(int(r["cluster"]))
            is_pvs = near[vox].mean() >= 0.5
            positive += int(is_pvs)
            if "candidate" in r:
                if is_pvs:  # a missed PVS: the annotator paints it
                    _paint_truth(session, pvs, vox)
                    painted += 1
                else:  # not a PVS: marked background with one decision
                    session.record_paint(vox, 0)
                    decisions += 1
                continue
            decisions += 1
            if is_pvs:
                session.accept(int(r["cluster"]))
                if redraw:
                    _paint_truth(session, pvs, vox)
            else:
                session.reject(int(r["cluster"]))
        session.save(store, sid, author="oracle", review_only=True)
    return decisions, painted, positive


def _candidates(store, model_id: str, subjects, threshold: float) -> list[dict]:
    """Near-miss clusters: components of probability >= ``threshold`` in the ROI that hold
    no predicted voxel and were not decided in a saved review; their priority is their
    highest probability (how likely the model missed a PVS there)."""
    from napari_pvs.active import _decided
    from napari_pvs.clusters import label_clusters

    rows = []
    for sid in subjects:
        prob = store.read_prediction(sid, model_id, "probability")
        labels = store.read_prediction(sid, model_id, "labels") > 0
        roi = store.read_regions(sid) > 0
        comp, n = label_clusters((prob >= threshold) & roi)
        if not n:
            continue
        flat = comp.ravel()
        size = np.bincount(flat, minlength=n + 1)
        hit = np.bincount(flat, weights=labels.ravel(), minlength=n + 1)
        peak = np.zeros(n + 1)
        np.maximum.at(peak, flat, prob.ravel())
        decided = _decided(store, sid, labels.shape)
        done = (np.bincount(flat, weights=decided.ravel(), minlength=n + 1) > 0.5 * size
                if decided is not None else np.zeros(n + 1, bool))
        site = store.info(sid).get("site", "unknown")
        order = np.argsort(flat, kind="stable")  # component c: order[ends[c - 1]:ends[c]]
        ends = np.cumsum(size)
        for c in range(1, n + 1):
            if hit[c] == 0 and size[c] >= 2 and not done[c]:
                rows.append({"subject": sid, "site": site, "priority": float(peak[c]),
                             "candidate": order[ends[c - 1]:ends[c]]})
    return rows


def _finetune(store, parent: str, val: list[str], args, seed: int) -> str:
    from napari_pvs.inference import run
    from napari_pvs.training.data import training_versions
    from napari_pvs.training.finetune import FinetuneConfig, finetune

    train = sorted(s for s in training_versions(store) if s not in val)
    cfg = FinetuneConfig(iterations=args.iterations, iterations_per_epoch=args.iterations,
                         patch=(48, 48, 48), batch_size=2, lr=args.lr, val_fraction=0.0,
                         seed=seed, device="cpu", cache_budget_mb=1024,
                         **({} if args.review_gap is None else {"review_gap": args.review_gap}))
    return run(finetune(store, init=parent, config=cfg, train_subjects=train, val_subjects=val,
                        work_dir=store.path / "training" / f"run-{seed}"))


def _save_predictions(store, model_id: str, cases: list[Case], memo: dict, key: str) -> dict:
    """Predict each case (or take it from ``memo[(key, case)]``) and save the prediction
    in the store under ``model_id``; returns ``{case: prediction}``."""
    from napari_pvs.active import save_prediction

    out = {}
    for c in cases:
        if (key, c.name) not in memo:
            memo[(key, c.name)] = _predict(store, model_id, c)
        out[c.name] = memo[(key, c.name)]
        save_prediction(store, c.name, model_id, out[c.name], c.phantom.regions)
    return out


def run_strategy(strategy: str, seed: int, cases, tmp: Path, args, memo: dict, log) -> Run:
    from napari_pvs.active import _corrected_per_site, rank_clusters, rank_subjects

    pool, test, lab, val = cases
    by_name = {c.name: c for c in pool}
    store, model_id = _store(tmp / f"{strategy}-{seed}.pvs.zarr", pool, lab, val)
    # the registered starter has a new id per store; memoise its predictions by "starter"
    alias = {model_id: "starter"}
    res = Run(strategy, seed)
    decisions = painted = positive = 0  # positive: cluster decisions that said "PVS"
    order = list(np.random.default_rng(seed).permutation([c.name for c in pool]))
    t0 = time.perf_counter()

    def record(rnd, model, picked=()):
        key = ("score", alias.get(model, model))
        if key not in memo:
            memo[key] = _score(store, model, test)
        minutes = (decisions * args.decision_s + painted * args.paint_s) / 60
        res.rows.append({"seed": seed, "strategy": strategy, "round": rnd,
                         "actions": decisions + painted, "decisions": decisions,
                         "painted": painted, "minutes": round(minutes, 2), "model": model,
                         "picked": " ".join(picked), "positive_decisions": positive,
                         **{k: round(v, 4) for k, v in memo[key].items()},
                         "seconds": round(time.perf_counter() - t0, 1)})
        r = res.rows[-1]
        log(f"  seed {seed} {strategy:11s} round {rnd}: {r['actions']:4d} actions "
            f"({r['minutes']:.1f} min), site-D cluster Dice {r['all_cluster_dice']:.3f}, "
            f"voxel Dice {r['all_voxel_dice']:.3f} (P {r['cluster_precision']:.2f} R "
            f"{r['cluster_recall']:.2f}, volume x{r['volume_ratio']:.2f}; "
            f"{r['positive_decisions']} "
            f"positive decisions) ({r['seconds']:.0f} s) {r['picked']}")

    def predictions(model, cases_):
        # the starter's predictions are the same in every store of this seed
        return _save_predictions(store, model, cases_, memo, alias.get(model, model))

    record(0, model_id)
    for rnd in range(1, args.rounds + 1):
        if strategy == "random":
            done = {s for s in by_name if store.info(s)["status"] == "corrected"}
            pick = next(s for s in order if s not in done)
            pred = predictions(model_id, [by_name[pick]])[pick]
            d, p = _subject_effort(pred.labels, by_name[pick])
            decisions, painted = decisions + d, painted + p
            _annotate_subject(store, by_name[pick])
            picked = [pick]
        elif strategy in ("uncertainty", "site"):
            predictions(model_id, [c for c in pool
                                   if store.info(c.name)["status"] != "corrected"])
            rows = [r for r in rank_subjects(store, model_id, site_aware=strategy == "site")
                    if r["subject"] in by_name and r["status"] != "corrected"]
            pick = rows[0]["subject"]
            d, p = _subject_effort(store.read_prediction(pick, model_id, "labels"),
                                   by_name[pick])
            decisions, painted = decisions + d, painted + p
            _annotate_subject(store, by_name[pick])
            picked = [pick]
        elif strategy == "mistakes":
            predictions(model_id, pool)
            rows = [r for r in rank_clusters(store, model_id, site_aware=True)
                    if r["subject"] in by_name]
            per_site = _corrected_per_site(store)
            cands = _candidates(store, model_id, list(by_name), args.candidates)
            for r in cands:
                r["site_corrected"] = per_site.get(r["site"], 0)
            picks = sorted(rows + cands, key=lambda r: (r["site_corrected"], -r["priority"]))
            picks = picks[:args.k]
            d, p, y = _decide(store, model_id, picks, by_name)
            decisions, painted, positive = decisions + d, painted + p, positive + y
            picked = sorted({r["subject"] for r in picks})
        else:
            predictions(model_id, pool)
            picks = [r for r in rank_clusters(store, model_id,
                                              site_aware=strategy == "site-clusters")
                     if r["subject"] in by_name][:args.k]
            d, _, y = _decide(store, model_id, picks, by_name, args.redraw_accepted)
            decisions, positive = decisions + d, positive + y
            picked = sorted({r["subject"] for r in picks})
        model_id = _finetune(store, model_id, [c.name for c in val], args, 1000 * seed + rnd)
        record(rnd, model_id, picked)
    return res


def effort_to_reach(rows: list[dict], target: float) -> float:
    """Effort at which the curve first reaches ``target`` cluster Dice (linear between
    rounds); inf when it never does."""
    prev = None
    for r in rows:
        if r["all_cluster_dice"] >= target:
            if prev is None:
                return float(r["actions"])
            x0, y0 = prev["actions"], prev["all_cluster_dice"]
            x1, y1 = r["actions"], r["all_cluster_dice"]
            return float(x0 + (target - y0) / (y1 - y0) * (x1 - x0)) if y1 > y0 else float(x1)
        prev = r
    return float("inf")


def mean_curve(runs: list[Run], strategy: str) -> list[dict]:
    """The strategy's curve averaged over seeds, round by round (actions and Dice)."""
    mine = [r.rows for r in runs if r.strategy == strategy]
    if not mine:
        return []
    n = min(len(rows) for rows in mine)
    keys = ("actions", "minutes", "all_cluster_dice", "all_voxel_dice", "volume_ratio")
    return [{"round": k, **{key: float(np.mean([rows[k].get(key, np.nan) for rows in mine]))
                            for key in keys}} for k in range(n)]


def summarise(runs: list[Run]) -> dict:
    """Per strategy: the effort at which it reaches random order's final cluster Dice,
    on the curves averaged over seeds (the target) and seed by seed."""
    seeds = sorted({r.seed for r in runs})
    get = {(r.strategy, r.seed): r.rows for r in runs}
    rand = mean_curve(runs, "random")
    out = {}
    for strategy in sorted({r.strategy for r in runs}, key=STRATEGIES.index):
        curve = mean_curve(runs, strategy)
        entry = {"final_actions": curve[-1]["actions"], "final_minutes": curve[-1]["minutes"],
                 "final_cluster_dice": curve[-1]["all_cluster_dice"],
                 "final_voxel_dice": curve[-1]["all_voxel_dice"],
                 "final_volume_ratio": curve[-1]["volume_ratio"]}
        if rand:
            e = effort_to_reach(curve, rand[-1]["all_cluster_dice"])
            entry.update(effort_to_random_final=e, saving=1 - e / rand[-1]["actions"])
            per_seed = []
            for seed in seeds:
                r, m = get.get(("random", seed)), get.get((strategy, seed))
                if r and m:
                    per_seed.append(1 - effort_to_reach(m, r[-1]["all_cluster_dice"])
                                    / r[-1]["actions"])
            entry["saving_per_seed"] = per_seed
        out[strategy] = entry
    return out


def _read_runs(paths) -> list[Run]:
    """The runs of earlier CSVs; a later file's (strategy, seed) replaces an earlier one's."""
    runs: dict[tuple[str, int], Run] = {}
    for path in paths:
        mine: dict[tuple[str, int], Run] = {}
        try:
            with open(path, newline="") as fh:
                rows = list(csv.DictReader(fh))
        except OSError as exc:
            raise SystemExit(f"bench_active_learning: cannot read {path} "
                             f"({exc.strerror})") from None
        for row in rows:
            try:
                r = {k: (v if k in ("strategy", "model", "picked") else float(v))
                     for k, v in row.items()}
                r["seed"], r["round"] = int(r["seed"]), int(r["round"])
            except (KeyError, TypeError, ValueError):
                raise SystemExit(f"bench_active_learning: {path} is not a CSV this benchmark "
                                 "wrote") from None
            key = (r["strategy"], r["seed"])
            mine.setdefault(key, Run(*key)).rows.append(r)
        runs.update(mine)
    if not runs:
        raise SystemExit("bench_active_learning: no rows in " + ", ".join(map(str, paths)))
    return list(runs.values())


def _effort(x: float) -> str:
    return "never" if not np.isfinite(x) else f"{x:.0f}"


def _pct(x: float) -> str:
    return "never" if not np.isfinite(x) else f"{x:.0%}"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ("all_cluster_dice", "all_voxel_dice", "volume_ratio")
    titles = ("site-D cluster Dice", "site-D voxel Dice", "PVS volume, prediction / truth")
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    colours = ("tab:grey", "tab:blue", "tab:red", "tab:green", "tab:purple", "tab:orange")
    for strategy, colour in zip(STRATEGIES, colours, strict=True):
        mine = [r for r in rows if r["strategy"] == strategy]
        if not mine:
            continue
        rounds = sorted({r["round"] for r in mine})
        for ax, key in zip(axes, keys, strict=True):
            for seed in sorted({r["seed"] for r in mine}):
                s = [r for r in mine if r["seed"] == seed]
                ax.plot([r["actions"] for r in s], [r.get(key, np.nan) for r in s],
                        color=colour, alpha=0.3, lw=1)
            x = [np.mean([r["actions"] for r in mine if r["round"] == k]) for k in rounds]
            y = [np.mean([r.get(key, np.nan) for r in mine if r["round"] == k]) for k in rounds]
            ax.plot(x, y, "-o", color=colour, label=strategy, lw=2, ms=4)
    for ax, title in zip(axes, titles, strict=True):
        ax.set_xlabel("annotator actions (cluster decisions + painted PVS)")
        ax.set_ylabel(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("New-site adaptation: held-out site-D phantoms against annotation effort "
                 "(thin: seeds, thick: mean)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--strategies", nargs="+", choices=STRATEGIES,
                    default=["random", "uncertainty", "clusters", "site-clusters", "mistakes"],
                    help="default: all but site (site-aware whole subjects: on this pool it "
                    "picks what uncertainty picks)")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--k", type=int, default=40, help="clusters reviewed per round")
    ap.add_argument("--iterations", type=int, default=60, help="fine-tuning iterations per round")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--size-mm", type=float, default=80.0)
    ap.add_argument("--per-site", type=int, default=2)
    ap.add_argument("--test", type=int, default=4)
    ap.add_argument("--decision-s", type=float, default=4.0)
    ap.add_argument("--paint-s", type=float, default=30.0)
    ap.add_argument("--candidates", type=float, default=0.15,
                    help="probability of the near-miss clusters the mistakes strategy offers")
    ap.add_argument("--review-gap", type=int, default=None,
                    help="FinetuneConfig.review_gap (default: the package's)")
    ap.add_argument("--redraw-accepted", action="store_true",
                    help="diagnostic: accepted clusters get their true outline painted in, "
                    "uncounted (does the thinning come from the model's own voxels?)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--from-csv", type=Path, nargs="+", metavar="CSV",
                    help="summarise and plot the rows of earlier runs instead of running")
    args = ap.parse_args(argv)
    if args.rounds > args.per_site * 4:
        ap.error(f"--rounds {args.rounds} needs more than the pool's {args.per_site * 4} subjects")
    import torch

    torch.set_flush_denormal(True)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    runs = []
    if args.from_csv:
        runs = _read_runs(args.from_csv)
        args.seeds = sorted({r.seed for r in runs})
    with tempfile.TemporaryDirectory() as tmp:
        for seed in [] if args.from_csv else args.seeds:
            cases = _phantoms(seed, args)
            memo: dict = {}
            print(f"seed {seed}: pool {len(cases[0])} phantoms of sites A-D, test "
                  f"{len(cases[1])} site-D phantoms ({args.size_mm:g} mm)", flush=True)
            for strategy in args.strategies:
                runs.append(run_strategy(strategy, seed, cases, Path(tmp), args, memo,
                                         lambda m: print(m, flush=True)))
    rows = [r for run in runs for r in run.rows]
    csv_path, png_path = args.out / "active_learning.csv", args.out / "active_learning.png"
    with csv_path.open("w", newline="") as fh:
        fields = list(dict.fromkeys(k for r in rows for k in r))  # older CSVs: fewer columns
        w = csv.DictWriter(fh, fieldnames=fields, restval="")
        w.writeheader()
        w.writerows(rows)
    plot(rows, png_path)
    summary = summarise(runs)
    minutes = (time.perf_counter() - t0) / 60
    print(f"\nper-action times: {args.decision_s:g} s per cluster decision, {args.paint_s:g} s "
          f"per painted PVS; {args.iterations} fine-tuning iterations per round; "
          f"{len(args.seeds)} seeds (curves: mean over seeds)")
    start = mean_curve(runs, next(iter(summary)))[0]
    print(f"start (the starter): cluster Dice {start['all_cluster_dice']:.3f}, voxel Dice "
          f"{start['all_voxel_dice']:.3f}, volume {start['volume_ratio']:.2f} x the truth")
    print(f"{'strategy':14s} {'actions':>7s} {'minutes':>7s} {'cluster Dice':>12s} "
          f"{'voxel Dice':>10s} {'volume':>6s} {'effort to random final':>22s} {'saving':>7s}"
          "  per seed")
    for strategy, e in summary.items():
        print(f"{strategy:14s} {e['final_actions']:7.0f} {e['final_minutes']:7.1f} "
              f"{e['final_cluster_dice']:12.3f} {e['final_voxel_dice']:10.3f} "
              f"{e['final_volume_ratio']:6.2f} "
              f"{_effort(e.get('effort_to_random_final', float('nan'))):>22s} "
              f"{_pct(e.get('saving', float('nan'))):>7s}  "
              + " ".join(_pct(x) for x in e.get("saving_per_seed", [])))
    active = [s for s in summary if s != "random"]
    if active and "random" in summary:
        best = max(active, key=lambda s: summary[s]["saving"])
        saving = summary[best]["saving"]
        print(f"target: the best active strategy ({best}) reaches random order's final site-D "
              f"cluster Dice ({summary['random']['final_cluster_dice']:.3f}) with >= 40 % less "
              f"effort: {_pct(saving)} less: {'MET' if saving >= 0.4 else 'MISSED'}")
    (args.out / "active_learning.json").write_text(json.dumps(
        {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
         "summary": summary, "minutes": None if args.from_csv else minutes}, indent=1,
        default=str))
    print(f"curves: {png_path}, {csv_path}; {minutes:.1f} min in all")
    return 0


if __name__ == "__main__":
    try:
        status = main()
        sys.stdout.flush()  # a closed pipe shows up here rather than at interpreter exit
    except BrokenPipeError:  # piped into head: stop quietly, as napari-pvs does
        from napari_pvs.cli import _stdout_closed

        status = _stdout_closed()
    raise SystemExit(status)
