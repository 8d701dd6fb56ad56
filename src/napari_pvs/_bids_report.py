"""The BIDS App's QC figures and group report.

* :func:`montage_png`: axial slices of an image with its PVS in red (a PNG, written
  atomically), the per-image figure of the participant level.
* :func:`robust_z`: ``(x - median) / (1.4826 MAD)``, the outlier score of the report.
* :func:`write_report`: one self-contained HTML file, one row per image: its montage
  (embedded as base64 PNG), its counts and volumes, and its flags (robust z above 3 on
  the PVS count or volume; failed images with their reason).  Clicking a column header
  sorts by it (a few lines of inline JavaScript: no server, no network).
"""

from __future__ import annotations

import base64
import html
import os
from pathlib import Path

import numpy as np

from ._fs import atomic_path, atomic_write_text

__all__ = ["montage_png", "robust_z", "write_report"]


def _axial_slices(labels: np.ndarray, n: int) -> list[int]:
    """``n`` axial slices (last axis) spread over the extent of the PVS, else the volume."""
    z = np.flatnonzero(labels.any(axis=(0, 1)))
    lo, hi = (int(z[0]), int(z[-1])) if z.size else (0, labels.shape[2] - 1)
    return sorted({int(round(v)) for v in np.linspace(lo, hi, n + 2)[1:-1]})


def montage_png(path: str | os.PathLike[str], image: np.ndarray, labels: np.ndarray,
                spacing, n: int = 6) -> Path:
    """Write ``n`` axial slices of ``image`` with ``labels`` overlaid in red."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    image = np.asarray(image, dtype=np.float32)
    labels = np.asarray(labels) > 0
    vmin, vmax = np.percentile(image[image > 0] if (image > 0).any() else image, (1, 99.5))
    fig = Figure(figsize=(1.6 * n, 1.9), dpi=90)
    fig.subplots_adjust(0, 0, 1, 1, 0.01, 0)
    aspect = spacing[1] / spacing[0]
    for k, z in enumerate(_axial_slices(labels, n)):
        ax = fig.add_subplot(1, n, k + 1)
        ax.imshow(image[:, :, z].T, cmap="gray", vmin=vmin, vmax=vmax, origin="lower",
                  aspect=aspect, interpolation="nearest")
        overlay = np.zeros((*labels.shape[:2][::-1], 4), np.float32)
        overlay[labels[:, :, z].T] = (1.0, 0.1, 0.1, 0.9)
        ax.imshow(overlay, origin="lower", aspect=aspect, interpolation="nearest")
        ax.set_axis_off()
    path = Path(path)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    return path


def robust_z(values) -> np.ndarray:
    """``(x - median) / (1.4826 MAD)``; 0 where the MAD is 0 and x is the median."""
    x = np.asarray(values, dtype=float)
    ok = np.isfinite(x)
    if not ok.any():
        return np.full(x.shape, np.nan)
    med = np.median(x[ok])
    mad = 1.4826 * np.median(np.abs(x[ok] - med))
    if mad == 0:  # more than half the values are equal: any other value stands out
        return np.where(x == med, 0.0, np.copysign(np.inf, x - med))
    return (x - med) / mad


_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.2em;color:#222}
table{border-collapse:collapse;font-size:13px}
th,td{border:1px solid #ccc;padding:3px 6px;text-align:right;vertical-align:middle}
th{background:#eee;cursor:pointer;position:sticky;top:0}
th:hover{background:#ddd} td.l{text-align:left;white-space:nowrap}
td.f{text-align:left;white-space:normal;word-break:break-word}
tr.flag td{background:#fff3cd} tr.fail td{background:#f8d7da}
img{display:block;height:110px}
.badge{display:inline-block;padding:1px 5px;border-radius:3px;background:#c0392b;color:#fff;
margin:1px;font-size:11px;white-space:nowrap}
"""

_SORT = """
document.querySelectorAll('th').forEach(function(th, col){
  th.addEventListener('click', function(){
    var body = th.closest('table').tBodies[0];
    var rows = Array.from(body.rows);
    var asc = th.dataset.asc !== '1'; th.dataset.asc = asc ? '1' : '0';
    rows.sort(function(a, b){
      var x = a.cells[col].dataset.v, y = b.cells[col].dataset.v;
      var nx = parseFloat(x), ny = parseFloat(y);
      var c = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : String(x).localeCompare(String(y));
      return asc ? c : -c;
    });
    rows.forEach(function(r){ body.appendChild(r); });
  });
});
"""


def _cell(value, text: str | None = None, cls: str = "") -> str:
    v = "" if value is None else value
    shown = html.escape(str(v if text is None else text))
    c = f' class="{cls}"' if cls else ""
    return f'<td{c} data-v="{html.escape(str(v))}">{shown}</td>'


def _png_data(path: Path | None) -> str | None:
    if path is None or not Path(path).is_file():
        return None
    return base64.b64encode(Path(path).read_bytes()).decode("ascii")


def write_report(path: str | os.PathLike[str], rows: list[dict], failed: list[dict],
                 title: str, model: str) -> Path:
    """The self-contained HTML QC report (see the module docstring).

    ``rows``: one dict per processed image with ``image``, ``subject``, ``session``,
    ``count_*``/``volume_mm3_*`` columns, ``flags`` (list of str) and ``montage`` (a PNG
    path); ``failed``: ``{"image", "reason"}`` per failed image.
    """
    cols = [("image", "image"), ("subject", "subject"), ("session", "session"),
            ("count_all", "PVS"), ("count_WM", "WM PVS"), ("count_BG", "BG PVS"),
            ("volume_mm3_all", "volume mm³"), ("median_cluster_mm3_all", "median mm³"),
            ("z_count", "z count"), ("z_volume", "z volume")]
    head = "".join(f"<th>{html.escape(t)}</th>" for _, t in cols) + "<th>flags</th><th>montage</th>"
    body = []
    for r in rows:
        cells = []
        for key, _ in cols:
            v = r.get(key)
            if isinstance(v, float):
                text = f"{v:.1f}" if key.startswith(("volume", "median")) else f"{v:.2f}"
            else:
                text = None
            cells.append(_cell(v, text, "l" if key in ("image", "subject", "session") else ""))
        flags = r.get("flags") or []
        badges = "".join(f'<span class="badge">{html.escape(f)}</span>' for f in flags)
        cells.append(f'<td class="f" data-v="{len(flags)}">{badges}</td>')
        data = _png_data(r.get("montage"))
        img = f'<img alt="montage" src="data:image/png;base64,{data}">' if data else "no figure"
        cells.append(f'<td data-v="">{img}</td>')
        body.append(f'<tr class="{"flag" if flags else ""}">' + "".join(cells) + "</tr>")
    for f in failed:
        cells = [_cell(f["image"], cls="l"), _cell(f.get("subject"), cls="l"),
                 _cell(f.get("session"), cls="l")] + [_cell("", "") for _ in cols[3:]]
        reason = html.escape(str(f["reason"]))
        cells.append('<td class="f" data-v="99"><span class="badge">failed</span></td>')
        cells.append(f'<td class="f" data-v="">{reason}</td>')
        body.append('<tr class="fail">' + "".join(cells) + "</tr>")
    n_flag = sum(bool(r.get("flags")) for r in rows)
    doc = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
           f"</title><style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
           f"<p>{len(rows)} images processed, {len(failed)} failed, {n_flag} flagged "
           f"(robust z &gt; 3 on PVS count or volume). Model: <code>{html.escape(model)}"
           "</code>. Click a column header to sort.</p>"
           f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
           f"<script>{_SORT}</script></body></html>")
    atomic_write_text(path, doc)
    return Path(path)

