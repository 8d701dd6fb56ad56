"""Realistic synthetic training subjects: real anatomy, random contrast, distractors, PVS.

The cartoon phantoms of :mod:`napari_pvs.phantom` teach a network the phantoms, not PVS:
on a real-anatomy image it takes sulcal CSF, cortex partial volume and vessels for PVS.
This generator starts from real anatomy instead:

* **Anatomy.**  The MNI ICBM152 2009 (09a, symmetric) template and its GM / WM
  probability maps, which nilearn's wheel ships (no download).  Each subject is the
  template under a random affine (rotation, anisotropic scale) and a random smooth
  displacement field, sampled on the grid of a randomly drawn scanner.  The WM region,
  deep grey matter (basal ganglia, BG), thalamus and ventricles are found once on the
  template and travel with the deformation.
* **Contrast, as SynthSeg draws it.**  Every subject gets its own tissue means (CSF, GM,
  WM, BG, thalamus, WMH) within T2w-like (or T1w-like) orders, its own within-tissue
  texture, gamma, bias field, blur, voxel size and Rician noise.  Partial volume comes
  from the probability maps, so the cortex and sulci look as they do in a real image.
* **Distractors.**  Sulcal CSF and cortex partial volume (from the anatomy itself), dark
  flow voids of cortical and basal vessels, WMH blobs and periventricular caps, lacunes
  with a gliotic rim, and optionally a skull and scalp.
* **PVS** grow with the phantom's tube model (radial in the WM, lenticulostriate in the
  BG) inside the deformed WM and BG.
* **Hard negatives.**  :attr:`RealisticSubject.hard` marks the distractors and the
  borders of the WM / BG region with CSF and cortex; the patch sampler draws part of its
  patches there (``hard_fraction``).

The validation case of ``benchmarks/bench_starter.py`` is made by a different
generator (the template's own T1 intensities, other deformations and another PVS
model), so the benchmark does not grade this generator on its own output.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from napari_pvs._errors import PVSInputError
from napari_pvs._phantom_anatomy import smooth_field
from napari_pvs._phantom_tubes import confounders, pvs_tubes, render_tubes, sample_inside, tube_path
from napari_pvs._regions import REGION_CODES
from napari_pvs.phantom import MODALITIES, SITES, Phantom, SiteProfile

__all__ = ["MNITemplate", "RealisticSubject", "make_realistic", "mni_template", "random_site"]

# Template labels (order-0 interpolated with the deformation).
OUTSIDE, WM, BG, THALAMUS, VENTRICLE, CORTEX, OTHER = range(7)


def _nilearn_data() -> Path:
    """nilearn's bundled data folder, found without importing nilearn (slow import)."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise PVSInputError("the realistic training data needs nilearn's MNI152 template; "
                            "install it with: pip install 'napari-pvs[train]'")
    return Path(spec.submodule_search_locations[0]) / "datasets" / "data"


@dataclass(frozen=True)
class MNITemplate:
    """The MNI152 2009 template on its 1 mm grid: tissue probabilities and labels."""

    t1: np.ndarray  # float32 0..1, skull-stripped
    gm: np.ndarray  # float32 0..1
    wm: np.ndarray
    csf: np.ndarray
    labels: np.ndarray  # uint8, OUTSIDE .. OTHER
    affine: np.ndarray


@functools.lru_cache(maxsize=1)
def mni_template() -> MNITemplate:
    """Load the template and find its regions (cached; about 2 s)."""
    import nibabel as nib

    data = _nilearn_data()

    def load(name):
        img = nib.load(data / f"mni_icbm152_{name}_tal_nlin_sym_09a_converted.nii.gz")
        return np.asarray(img.dataobj, np.float32) / 255.0, img.affine

    t1, affine = load("t1")
    gm, _ = load("gm")
    wm, _ = load("wm")
    brain = t1 > 0.02
    csf = np.clip(1.0 - gm - wm, 0, 1) * brain
    idx = np.indices(t1.shape, dtype=np.float32)
    x, y, z = (idx[a] * affine[a, a] + affine[a, 3] for a in range(3))
    ax = np.abs(x)
    depth = ndi.distance_transform_edt(brain)  # mm (1 mm grid) below the brain surface
    hindbrain = ((y < -34) & (z < 2)) | ((ax < 14) & (z < -8) & (y < -6)) | (z < -30)
    thal_box = (ax < 22) & (y > -38) & (y < -8) & (z > -6) & (z < 20)
    deep_gm = (gm > 0.45) & (depth > 18) & ~hindbrain & (z > -14) & (z < 26)
    labels = np.full(t1.shape, OTHER, np.uint8)
    labels[~brain] = OUTSIDE
    labels[brain & (gm >= wm) & (gm >= csf)] = CORTEX
    labels[(csf > 0.5) & (depth > 14) & ~hindbrain] = VENTRICLE
    labels[brain & (wm > 0.5) & ~hindbrain] = WM
    labels[deep_gm & thal_box] = THALAMUS
    labels[deep_gm & ~thal_box & (ax > 6) & (y > -14)] = BG
    labels[brain & hindbrain & (labels == WM)] = OTHER
    return MNITemplate(t1, gm, wm, csf, labels, affine)


@dataclass
class RealisticSubject(Phantom):
    """A :class:`~napari_pvs.phantom.Phantom` with its hard-negative mask."""

    hard: np.ndarray | None = None


class _Anatomy:
    """The deformed template on a subject's grid, in the shape that the phantom's
    tube and confounder generators read (boolean masks, world coordinates, centres)."""

    def __init__(self, labels, gm, wm, csf, affine, h):
        self.labels = labels
        self.gm, self.wmp, self.csfp = gm, wm, csf
        shape = labels.shape
        self.coords = tuple(
            (np.arange(shape[a], dtype=np.float32) * h + affine[a, 3]).reshape(
                [-1 if b == a else 1 for b in range(3)]) for a in range(3))
        self.wm = labels == WM
        self.bg = labels == BG
        self.thalamus = labels == THALAMUS
        self.vent = labels == VENTRICLE
        self.brain = labels != OUTSIDE
        self.csf = self.brain & (csf > 0.5)
        x = self.coords[0]
        self.vent_centres, self.bg_centres = [], []
        for side in (-1, 1):
            half = np.broadcast_to((x * side) > 0, shape)
            self.vent_centres.append(tuple(self._centroid(self.vent & half, affine)[0]))
            c, sd = self._centroid(self.bg & half, affine)
            self.bg_centres.append((tuple(c), tuple(np.maximum(1.8 * sd, 4.0))))

    @staticmethod
    def _centroid(mask, affine):
        vox = np.argwhere(mask)
        if len(vox) < 10:
            raise PVSInputError("the deformed template lost a ventricle or a basal ganglion; "
                                "use a smaller deformation")
        world = vox @ affine[:3, :3].T + affine[:3, 3]
        return world.mean(0), world.std(0)


def random_site(rng: np.random.Generator, sites=SITES[:3]) -> SiteProfile:
    """A scanner drawn around one of ``sites``: jittered voxel size, SNR, bias, blur."""
    base = sites[int(rng.integers(len(sites)))]
    return SiteProfile(
        name=base.name, spacing=float(np.clip(base.spacing * rng.uniform(0.9, 1.1), 0.6, 1.3)),
        snr=float(base.snr * rng.uniform(0.6, 1.5)), bias=float(base.bias * rng.uniform(0.5, 1.6)),
        contrast=float(base.contrast * rng.uniform(0.85, 1.15)),
        pvs_conspicuity=float(base.pvs_conspicuity * rng.uniform(0.8, 1.2)),
        blur_fwhm=float(base.blur_fwhm + rng.uniform(0.0, 0.6)))


def _deformed(rng, tpl: MNITemplate, h: float, warp_mm: float):
    """Sample the template under a random affine and smooth warp on a grid of ``h`` mm."""
    brain = tpl.labels != OUTSIDE
    vox = np.argwhere(brain)
    lo = vox.min(0) * np.diag(tpl.affine)[:3] + tpl.affine[:3, 3] - 8.0
    hi = vox.max(0) * np.diag(tpl.affine)[:3] + tpl.affine[:3, 3] + 8.0
    scale = rng.uniform(0.88, 1.12, 3)
    ang = rng.uniform(-0.17, 0.17, 3)
    cx, cy, cz = np.cos(ang)
    sx, sy, sz = np.sin(ang)
    rot = (np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
           @ np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
           @ np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]]))
    fwd = rot @ np.diag(scale)  # template -> subject
    centre = (lo + hi) / 2
    corners = np.array(np.meshgrid(*zip(lo, hi, strict=True), indexing="ij")).reshape(3, -1).T
    corners -= centre
    ext = np.abs(corners @ fwd.T).max(0) + 2.0
    shape = tuple(int(np.ceil(2 * e / h)) for e in ext)
    affine = np.diag([h, h, h, 1.0])
    affine[:3, 3] = centre - (np.array(shape) - 1) / 2 * h
    inv = np.linalg.inv(fwd)
    # subject world -> template world, plus a smooth displacement (mm)
    pts = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) * h + affine[a, 3]
                                 for a, n in enumerate(shape)], indexing="ij"), 0).reshape(3, -1)
    src = (inv.astype(np.float32) @ (pts - centre[:, None].astype(np.float32))) + centre[:, None]
    del pts
    for a in range(3):
        src[a] += warp_mm * smooth_field(rng, shape, h, float(rng.uniform(25, 45))).ravel()
    t_inv = np.linalg.inv(tpl.affine)
    src = (t_inv[:3, :3].astype(np.float32) @ src) + t_inv[:3, 3:4].astype(np.float32)
    lab = ndi.map_coordinates(tpl.labels, src, order=0, mode="constant").reshape(shape)
    maps = [ndi.map_coordinates(m, src, order=1, mode="constant").reshape(shape)
            for m in (tpl.gm, tpl.wm, tpl.csf)]
    return _Anatomy(lab, *maps, affine, h), affine, shape


def _vessels(rng, anat: _Anatomy, affine, n: int):
    """Centre lines of cortical / sulcal vessels: tubes near the brain surface."""
    surface = anat.brain & ~anat.wm & ~anat.bg & ~anat.thalamus & ~anat.vent & (anat.csfp > 0.3)
    inside = _lookup_dilated(anat.brain, affine)
    out = []
    for p0 in sample_inside(rng, surface, affine, n):
        d0 = rng.standard_normal(3)
        d0 /= np.linalg.norm(d0)
        pts = tube_path(rng, p0, d0, float(rng.uniform(10, 40)), 0.8, inside)
        if len(pts) >= 4:
            out.append((pts, float(rng.uniform(0.5, 1.5)), 1.0))
    return out


def _lookup_dilated(mask, affine):
    from napari_pvs._phantom_tubes import lookup

    return lookup(ndi.binary_dilation(mask, iterations=2), affine)


# T2w-like (CSF bright) tissue means: (low, high) of each draw, as fractions of CSF.
def _tissue_means(rng, modality: str) -> dict[str, float]:
    wm = rng.uniform(0.15, 0.45)
    gm = wm + rng.uniform(0.08, 0.32)
    csf = max(rng.uniform(0.8, 1.0), gm + 0.2)
    deep = wm + rng.uniform(0.25, 0.95) * (gm - wm)
    mu = {"wm": wm, "gm": gm, "csf": csf, "bg": deep,
          "thalamus": wm + rng.uniform(0.15, 0.8) * (gm - wm),
          "wmh": gm + rng.uniform(0.2, 0.8) * (csf - gm),
          "rim": gm + rng.uniform(0, 0.5) * (csf - gm),
          "void": rng.uniform(0.0, 0.6) * wm, "skull": rng.uniform(0.02, 0.25),
          "scalp": rng.uniform(0.4, 1.1)}
    if modality == "T1w":  # CSF dark, WM bright
        top = rng.uniform(0.85, 1.0)
        mu = {k: (v if k in ("void", "skull", "scalp") else top - v + 0.1) for k, v in mu.items()}
    return mu


def make_realistic(seed: int, *, modality: str = "T2w", site: SiteProfile | None = None,
                   burden: float | None = None, warp_mm: float | None = None,
                   head: bool | None = None, spacing: float | None = None,
                   subject: str | None = None) -> RealisticSubject:
    """One realistic synthetic subject, deterministically from ``seed`` (see module doc).

    Parameters
    ----------
    seed : int
    modality : {"T2w", "T1w"}
    site : SiteProfile, optional
        The scanner; default: :func:`random_site` around sites A-C.
    burden : float, optional
        PVS burden multiplier (default: drawn from [0.4, 1.6]).
    warp_mm : float, optional
        Standard deviation of the smooth displacement in mm (default: drawn in [1, 4]).
    head : bool, optional
        Add a skull and scalp around the brain (default: 70 % of subjects).
    spacing : float, optional
        Override the scanner's voxel size (mm); everything else stays as drawn.
    """
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
    rng = np.random.default_rng([seed, 15])
    prof = site or random_site(rng)
    if spacing is not None:
        prof = replace(prof, spacing=float(spacing))
    h = prof.spacing
    warp = float(rng.uniform(1.0, 4.0) if warp_mm is None else warp_mm)
    anat, affine, shape = _deformed(rng, mni_template(), h, warp)
    burden = float(rng.uniform(0.4, 1.6) if burden is None else burden)
    tubes, kinds = pvs_tubes(rng, anat, affine, h, 160.0, burden)
    occupancy = np.zeros(shape, np.float32)
    strength = np.zeros(shape, np.float32)
    labels = np.zeros(shape, bool)
    render_tubes(tubes, shape, affine, h, occupancy, labels, strength)
    roi = anat.wm | anat.bg
    labels &= roi

    wmh, lac, rim, voids = confounders(rng, anat, affine, h, 160.0, shape)
    voids += _vessels(rng, anat, affine, int(rng.integers(20, 60)))
    void_occ = np.zeros(shape, np.float32)
    render_tubes(voids, shape, affine, h, void_occ, np.zeros(shape, bool),
                 np.zeros(shape, np.float32))

    mu = _tissue_means(rng, modality)
    gm_mean = np.where(anat.bg, mu["bg"], np.where(anat.thalamus, mu["thalamus"], mu["gm"]))
    tex = {k: 1.0 + rng.uniform(0.01, 0.06) * smooth_field(rng, shape, h, float(rng.uniform(2, 6)))
           for k in ("gm", "wm")}
    img = (anat.gm * gm_mean * tex["gm"] + anat.wmp * mu["wm"] * tex["wm"] + anat.csfp * mu["csf"])
    img = img.astype(np.float32)
    img += anat.wm * wmh * (mu["wmh"] - img)
    img += roi * rim * (mu["rim"] - img)
    img += roi * lac * (mu["csf"] - img)
    pvs_mix = np.clip(strength * prof.pvs_conspicuity * rng.uniform(0.8, 1.1), 0, 1) * roi
    img += pvs_mix * (mu["csf"] - img)
    img += void_occ * anat.brain * (mu["void"] - img)
    if head if head is not None else rng.random() < 0.7:
        dist = ndi.distance_transform_edt(~anat.brain, sampling=h)
        t_csf, t_skull, t_scalp = rng.uniform(1, 4), rng.uniform(3, 7), rng.uniform(3, 8)
        img[(dist > 0) & (dist <= t_csf)] = mu["csf"]
        img[(dist > t_csf) & (dist <= t_csf + t_skull)] = mu["skull"]
        img[(dist > t_csf + t_skull) & (dist <= t_csf + t_skull + t_scalp)] = mu["scalp"]
    img = np.clip(img, 0, None) ** rng.uniform(0.8, 1.25)
    if prof.blur_fwhm > 0:
        img = ndi.gaussian_filter(img, prof.blur_fwhm / 2.3548 / h)
    img *= np.exp(prof.bias * smooth_field(rng, shape, h, float(rng.uniform(40, 90))))
    sigma = mu["wm"] / prof.snr
    img = np.sqrt((img + rng.standard_normal(shape, dtype=np.float32) * sigma) ** 2
                  + (rng.standard_normal(shape, dtype=np.float32) * sigma) ** 2)

    regions = np.zeros(shape, np.uint8)
    regions[anat.wm] = REGION_CODES["WM"]
    regions[anat.bg] = REGION_CODES["BG"]
    distractors = (wmh > 0.3) | (lac > 0.3) | (rim > 0.3) | (void_occ > 0.3)
    border = roi & ndi.binary_dilation(anat.brain & ~roi & (anat.csfp + anat.gm > 0.5),
                                       iterations=2)
    hard = ((distractors & anat.brain) | border) & ~labels
    meta = {"subject": subject, "generator": "realistic (MNI152 2009 + deformation)",
            "site": prof.name, "modality": modality, "seed": int(seed), "spacing_mm": h,
            "snr": prof.snr, "burden": burden, "warp_mm": warp, "n_pvs_wm": kinds.count("WM"),
            "n_pvs_bg": kinds.count("BG"), "n_vessels": len(voids),
            "tissue_means": {k: float(v) for k, v in mu.items()}}
    return RealisticSubject((img * 1000).astype(np.float32), labels.astype(np.uint8), regions,
                            affine, (h, h, h), meta, aseg=None, hard=hard)
