"""The report of a cross-validation: ``results.csv``, ``summary.md`` and ``boxplot.png``."""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from napari_pvs._fs import atomic_path

__all__ = ["COLUMNS", "METRICS", "EvaluationReport", "fold_stats", "write_report"]

#: Table / plot metrics: (results.csv column, label), in the paper's column order.
METRICS: tuple[tuple[str, str], ...] = (
    ("wm_voxel_dice", "WM voxel Dice"),
    ("wm_cluster_dice", "WM cluster Dice"),
    ("bg_voxel_dice", "BG voxel Dice"),
    ("bg_cluster_dice", "BG cluster Dice"),
)

#: Columns of ``results.csv``.
COLUMNS: tuple[str, ...] = ("fold", "subject", "site", *(m for m, _ in METRICS),
                            "all_voxel_dice", "all_cluster_dice", "model_id")



@dataclass
class EvaluationReport:
    """What :func:`evaluate` returns: output paths, per-subject rows, summary numbers.

    ``folds`` holds one dict per fold (``fold``, ``label``, ``n``, ``model_id`` and, per
    metric, ``(mean, sd)`` over the fold's held-out subjects); ``overall`` maps each
    metric to ``(mean, sd)`` over the fold means; ``sites`` maps each site to ``n`` and
    per-metric ``(mean, sd)`` over its subjects.  An sd of a single value is NaN.
    """

    scheme: str
    splits_path: Path
    out_dir: Path
    results_csv: Path
    summary_md: Path
    boxplot_png: Path
    rows: list[dict]
    folds: list[dict]
    overall: dict[str, tuple[float, float]]
    sites: dict[str, dict]
    markdown: str = ""
    left_out: list[str] = field(default_factory=list)


def write_report(scheme: str, kind: str, k: int | None, splits_path: Path, out: Path,
                 rows: list[dict], folds: list[dict], left_out) -> EvaluationReport:
    """Summarise the held-out rows and write the three report files into ``out``."""
    overall = {m: _mean_sd([fd[m][0] for fd in folds]) for m, _ in METRICS}
    by_site = {}
    for site in sorted({r["site"] for r in rows}):
        site_rows = [r for r in rows if r["site"] == site]
        by_site[site] = {"n": len(site_rows), **fold_stats(site_rows)}
    report = EvaluationReport(scheme, splits_path, out, out / "results.csv", out / "summary.md",
                              out / "boxplot.png", rows, folds, overall, by_site,
                              left_out=list(left_out))
    _write_csv(report.results_csv, rows)
    report.markdown = _markdown(report, kind)
    report.summary_md.write_text(report.markdown)
    _boxplot(report.boxplot_png, rows, f"{_title(kind, k)}: held-out subjects by site")
    return report


def _mean_sd(values) -> tuple[float, float]:
    v = np.asarray(values, dtype=float)
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else float("nan")


def fold_stats(rows: list[dict]) -> dict[str, tuple[float, float]]:
    return {m: _mean_sd([r[m] for r in rows]) for m, _ in METRICS}


def _cell(ms: tuple[float, float]) -> str:
    mean, sd = ms
    return f"{mean:.3f}" if np.isnan(sd) else f"{mean:.3f} ± {sd:.3f}"


def _title(kind: str, k: int | None) -> str:
    return "Leave-one-site-out CV" if kind == "losocv" else f"{k}-fold CV"


def _write_csv(path: Path, rows: list[dict]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS, lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({c: f"{r[c]:.6f}" if isinstance(r[c], float) else r[c] for c in COLUMNS})


def _table(first: str, rows: list[tuple[str, str, dict]]) -> list[str]:
    head = [first, "n", *(lab for _, lab in METRICS)]
    lines = ["| " + " | ".join(head) + " |", "|---" + "|--:" * (len(head) - 1) + "|"]
    for name, n, stats in rows:
        lines.append("| " + " | ".join([name, n, *(_cell(stats[m]) for m, _ in METRICS)]) + " |")
    return lines


def _markdown(rep: EvaluationReport, kind: str) -> str:
    first = "Left-out site" if kind == "losocv" else "Fold"
    fold_rows = [(fd["label"], str(fd["n"]), fd) for fd in rep.folds]
    fold_rows.append(("mean ± sd", str(sum(fd["n"] for fd in rep.folds)), rep.overall))
    site_rows = [(site, str(s["n"]), s) for site, s in rep.sites.items()]
    site_rows.append(("all subjects", str(len(rep.rows)), fold_stats(rep.rows)))
    k = len(rep.folds) if kind == "kfold" else None
    lines = [f"# {_title(kind, k)} of fine-tuning on corrections", "",
             f"Scheme `{rep.scheme}`, splits `{rep.splits_path}`, {len(rep.rows)} held-out "
             "subjects.",
             "Fold rows: mean ± sd over the fold's held-out subjects; `mean ± sd` row: over the "
             "fold means.  Site rows: over the site's subjects.", ""]
    if rep.left_out:
        lines += ["Left out (corrected after the splits were saved): "
                  + ", ".join(rep.left_out), ""]
    lines += [f"## Per {'left-out site' if kind == 'losocv' else 'fold'}", "",
              *_table(first, fold_rows), "", "## Per site", "", *_table("Site", site_rows), ""]
    return "\n".join(lines)


def _boxplot(path: Path, rows: list[dict], title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    sites = sorted({r["site"] for r in rows})
    fig = Figure(figsize=(10, 8), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2, sharey=True)
    rng = np.random.default_rng(0)
    for ax, (metric, label) in zip(axes.ravel(), METRICS, strict=True):
        data = [[r[metric] for r in rows if r["site"] == s] for s in sites]
        pos = np.arange(1, len(sites) + 1)
        ax.boxplot(data, positions=pos, widths=0.5, showmeans=True, medianprops={"color": "C1"})
        for x, vals in zip(pos, data, strict=True):
            ax.scatter(x + rng.uniform(-0.12, 0.12, len(vals)), vals, s=14, color="C0", alpha=0.7,
                       zorder=3)
        ax.set_xticks(pos)
        ax.set_xticklabels([f"{s}\n(n={len(v)})" for s, v in zip(sites, data, strict=True)],
                           rotation=30 if len(sites) > 6 else 0)
        ax.set_title(label, fontsize=12)
        ax.set_ylim(-0.03, 1.03)
        ax.grid(axis="y", alpha=0.3)
        ax.tick_params(labelsize=10)
    for ax in axes[:, 0]:
        ax.set_ylabel("Dice", fontsize=11)
    for ax in axes[1]:
        ax.set_xlabel("Site", fontsize=11)
    fig.suptitle(f"{title} (n={len(rows)})", fontsize=13)
    fig.legend(handles=[Line2D([], [], color="C1", label="median"),
                        Line2D([], [], color="C2", marker="^", ls="", label="mean"),
                        Line2D([], [], color="C0", marker="o", ls="", label="subject")],
               loc="outside lower center", ncols=3, fontsize=10, frameon=False)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
