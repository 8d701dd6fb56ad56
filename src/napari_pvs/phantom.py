"""Synthetic multi-site PVS phantoms: the embedded default data.

No public PVS data set can be downloaded on the machines this project runs on, so
the demo, the tests and the benchmarks use phantoms.  A phantom is a brain-shaped
volume with CSF, ventricles, a folded cortical ribbon, white matter (WM), basal
ganglia (BG) and a thalamus, in world millimetres (RAS, centred on the origin):

* PVS are thin tortuous tubes, 0.5-3 mm wide and 2-25 mm long.  In the WM they run
  radially, away from the ventricles towards the cortex; in the BG they rise from the
  base of the putamen/pallidum and fan out upwards like lenticulostriate arteries.
  Each tube has its own contrast, so some are faint.  Partial volume is modelled by
  the fraction of each voxel that the tube covers.
* Confounders that fool naive vessel filters: WM hyperintensity (WMH) blobs, some
  elongated; lacunes (3-15 mm, CSF-filled, with a gliotic rim); flow voids of larger
  vessels (dark on both contrasts); sulcal CSF close to the WM; bias field; Rician
  noise; blur.
* ``modality="T2w"`` makes PVS/CSF bright, ``"T1w"`` makes them dark.
* Sites (:class:`SiteProfile`) differ in voxel size (0.7-1.2 mm), SNR, bias field,
  tissue contrast, PVS conspicuity and blur, so that a cohort supports
  leave-one-site-out cross-validation.

Ground-truth labels mark voxels whose centre lies within ``max(r, 0.55 * h)`` of a
tube's centre line (``r`` the tube radius, ``h`` the voxel size), so a 0.5 mm tube is
still labelled as a one-voxel line even though it barely changes the intensity.

The region mask uses the codes of :data:`REGION_CODES`: 0 other, 1 WM, 2 BG.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from ._phantom_anatomy import Anatomy, grid, smooth_field
from ._phantom_tubes import confounders, length_stats, pvs_tubes, render_tubes
from ._regions import REGION_CODES

__all__ = [
    "CONFORMED_AFFINE",
    "CONFORMED_SHAPE",
    "MODALITIES",
    "REGION_CODES",
    "SITES",
    "Phantom",
    "SiteProfile",
    "conformed_aseg",
    "make_cohort",
    "make_phantom",
    "site_profile",
]

MODALITIES = ("T2w", "T1w")

# Tissue intensities before site effects, (T2w, T1w).  PVS and lacunes take the CSF
# value, modulated by partial volume and by each tube's conspicuity.
_TISSUE = {
    "csf": (1.00, 0.12),
    "gm": (0.56, 0.50),
    "wm": (0.36, 0.82),
    "bg": (0.44, 0.64),
    "thalamus": (0.42, 0.70),
    "wmh": (0.84, 0.56),
    "rim": (0.66, 0.62),
    "flow_void": (0.06, 0.20),
}


@dataclass(frozen=True)
class SiteProfile:
    """Acquisition characteristics of one (synthetic) scanner site.

    Parameters
    ----------
    name : str
        Site label, e.g. ``"siteA"``.
    spacing : float
        Isotropic voxel size in mm.
    snr : float
        White-matter signal over the Rician noise sigma.
    bias : float
        Standard deviation of the log bias field.
    contrast : float
        Grey/white and PVS contrast scale (1 = nominal).
    pvs_conspicuity : float
        Scale of each PVS's contrast against its surroundings.
    blur_fwhm : float
        Extra Gaussian blur in mm (point-spread function).
    """

    name: str
    spacing: float
    snr: float
    bias: float
    contrast: float
    pvs_conspicuity: float
    blur_fwhm: float


# The first sites are fixed so that every cohort covers the same range of scanners;
# more sites are drawn at random (seeded by their index) in the same ranges.
SITES: tuple[SiteProfile, ...] = (
    SiteProfile("siteA", 1.0, 18.0, 0.10, 1.00, 1.00, 0.0),
    SiteProfile("siteB", 0.8, 12.0, 0.20, 0.90, 0.85, 0.6),
    SiteProfile("siteC", 1.2, 24.0, 0.15, 1.10, 0.90, 0.9),
    SiteProfile("siteD", 0.7, 10.0, 0.30, 0.85, 0.80, 0.4),
)


def site_profile(index: int) -> SiteProfile:
    """Return the profile of site ``index`` (0-based); deterministic."""
    if index < 0:
        raise ValueError(f"site index must be >= 0, got {index}")
    if index < len(SITES):
        return SITES[index]
    rng = np.random.default_rng([7919, index])
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    name = "site" + (letters[index] if index < 26 else f"{index:03d}")
    return SiteProfile(
        name=name,
        spacing=float(rng.choice([0.7, 0.8, 0.9, 1.0, 1.1, 1.2])),
        snr=float(rng.uniform(10, 32)),
        bias=float(rng.uniform(0.05, 0.3)),
        contrast=float(rng.uniform(0.8, 1.15)),
        pvs_conspicuity=float(rng.uniform(0.75, 1.05)),
        blur_fwhm=float(rng.uniform(0.0, 1.0)),
    )


@dataclass
class Phantom:
    """One synthetic subject.

    Attributes
    ----------
    image : ndarray of float32, shape (X, Y, Z)
        The MR image, arbitrary units (white matter near 1000 on T1w).
    labels : ndarray of uint8
        Ground-truth PVS mask (1 = PVS).
    regions : ndarray of uint8
        Region mask, :data:`REGION_CODES` (0 other, 1 WM, 2 BG).
    affine : ndarray, shape (4, 4)
        Voxel index to world RAS mm.
    spacing : tuple of float
        Voxel size in mm.
    meta : dict
        Subject id, site, modality, seed, PVS counts and diameters, WM PVS volume
        fraction, confounder counts: JSON-serialisable.
    aseg : ndarray of int32 or None
        The anatomy as a FreeSurfer-style aseg on the same grid (cerebral WM 2/41,
        cortex 3/42, putamen 12/51, pallidum 13/52 ...); :func:`conformed_aseg` puts it
        on FreeSurfer's conformed grid.
    """

    image: np.ndarray
    labels: np.ndarray
    regions: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, float, float]
    meta: dict[str, Any] = field(default_factory=dict)
    aseg: np.ndarray | None = None


#: FreeSurfer's conformed grid: 256³ voxels of 1 mm, LIA, centred on world (0, 0, 0)
#: (``c_ras`` 0, as the phantoms are centred on the origin).
CONFORMED_AFFINE = np.array([[-1.0, 0, 0, 128], [0, 0, 1, -128], [0, -1, 0, 128], [0, 0, 0, 1]])
CONFORMED_SHAPE = (256, 256, 256)


def conformed_aseg(ph: Phantom):
    """The phantom's aseg resampled (nearest neighbour) to FreeSurfer's conformed space.

    Returns an ``nibabel.MGHImage`` (int32, 256³, 1 mm, LIA), as ``mri/aseg.mgz`` is.
    """
    import nibabel as nib
    from nibabel.processing import resample_from_to

    if ph.aseg is None:
        raise ValueError("this phantom has no aseg (it was not made by make_phantom)")
    src = nib.Nifti1Image(np.asarray(ph.aseg, np.int32), ph.affine)
    out = resample_from_to(src, (CONFORMED_SHAPE, CONFORMED_AFFINE), order=0, mode="constant",
                           cval=0)
    return nib.MGHImage(np.asarray(out.dataobj).astype(np.int32), CONFORMED_AFFINE)


def make_phantom(
    seed: int = 0,
    *,
    modality: str = "T2w",
    site: SiteProfile | int = 0,
    size_mm: float = 160.0,
    spacing: float | None = None,
    burden: float | None = None,
    subject: str | None = None,
) -> Phantom:
    """Generate one synthetic subject, deterministically from ``seed``.

    Parameters
    ----------
    seed : int
        Seed of everything random in this subject.
    modality : {"T2w", "T1w"}
        Contrast: PVS bright (T2w) or dark (T1w).
    site : SiteProfile or int
        Scanner site, or the index of one (see :func:`site_profile`).
    size_mm : float
        Field of view (cube edge) in mm.  The anatomy scales with it; PVS keep their
        millimetre sizes, so small phantoms are fast but still realistic locally.
    spacing : float, optional
        Override the site's voxel size (mm).
    burden : float, optional
        PVS burden multiplier; drawn from [0.6, 1.4] when omitted.
    subject : str, optional
        Subject id stored in ``meta``.

    Returns
    -------
    Phantom
    """
    prof = _profile(modality, site, size_mm, spacing)
    h = prof.spacing
    rng = np.random.default_rng(seed)
    shape, affine = grid(size_mm, h)
    anat = Anatomy(rng, shape, affine, h, size_mm)
    burden = float(rng.uniform(0.6, 1.4)) if burden is None else float(burden)
    tubes, kinds = pvs_tubes(rng, anat, affine, h, size_mm, burden)
    occupancy = np.zeros(shape, np.float32)
    strength = np.zeros(shape, np.float32)
    labels = np.zeros(shape, bool)
    render_tubes(tubes, shape, affine, h, occupancy, labels, strength)
    labels &= anat.wm | anat.bg

    wmh, lac, rim, voids = confounders(rng, anat, affine, h, size_mm, shape)
    void_occ = np.zeros(shape, np.float32)
    render_tubes(voids, shape, affine, h, void_occ, np.zeros(shape, bool), np.zeros(shape, np.float32))
    img = _image(rng, anat, prof, modality, strength, (wmh, lac, rim, void_occ))

    regions = np.zeros(shape, np.uint8)
    regions[anat.wm] = REGION_CODES["WM"]
    regions[anat.bg] = REGION_CODES["BG"]
    meta = {"subject": subject, "site": prof.name, "modality": modality, "seed": int(seed),
            "spacing_mm": h, "snr": prof.snr, "burden": burden,
            **_pvs_stats(anat, labels, tubes, kinds, h), "n_flow_voids": len(voids),
            "site_profile": {k: getattr(prof, k) for k in SiteProfile.__dataclass_fields__}}
    return Phantom(img, labels.astype(np.uint8), regions, affine, (h, h, h), meta,
                   aseg=anat.aseg())


def _profile(modality: str, site: SiteProfile | int, size_mm: float,
             spacing: float | None) -> SiteProfile:
    """Check the arguments of :func:`make_phantom`; the site profile to use."""
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
    if size_mm < 32:
        raise ValueError(f"size_mm must be >= 32 mm, got {size_mm}")
    prof = site if isinstance(site, SiteProfile) else site_profile(int(site))
    if spacing is not None:
        if not 0.3 <= spacing <= 3.0:
            raise ValueError(f"spacing must be in [0.3, 3] mm, got {spacing}")
        prof = replace(prof, spacing=float(spacing))
    return prof


def _image(rng, anat: Anatomy, prof: SiteProfile, modality: str, strength: np.ndarray,
           maps: tuple[np.ndarray, ...]) -> np.ndarray:
    """The MR image: tissue contrast, confounders and PVS, then blur, bias and Rician noise."""
    wmh, lac, rim, void_occ = maps
    h, shape = prof.spacing, strength.shape
    m = MODALITIES.index(modality)
    jitter = {k: v[m] * rng.uniform(0.97, 1.03) for k, v in _TISSUE.items()}
    wm_v = jitter["wm"]
    img = np.zeros(shape, np.float32)
    for name, mask in (("csf", anat.csf), ("gm", anat.gm), ("wm", anat.wm), ("bg", anat.bg),
                       ("thalamus", anat.thalamus)):
        img[mask] = wm_v + prof.contrast * (jitter[name] - wm_v)
    in_wm = anat.wm.astype(np.float32)
    img += in_wm * wmh * (jitter["wmh"] - img)
    parenchyma = (anat.wm | anat.bg).astype(np.float32)
    img += parenchyma * rim * (jitter["rim"] - img)
    img += parenchyma * lac * (jitter["csf"] - img)
    pvs_mix = np.clip(strength * prof.pvs_conspicuity, 0, 1) * parenchyma
    img += pvs_mix * (jitter["csf"] - img)
    img += void_occ * anat.brain * (jitter["flow_void"] - img)

    if prof.blur_fwhm > 0:
        img = ndi.gaussian_filter(img, prof.blur_fwhm / 2.3548 / h)
    bias = np.exp(prof.bias * smooth_field(rng, shape, h, 60.0)).astype(np.float32)
    img *= bias
    sigma = wm_v / prof.snr
    noise_r = rng.standard_normal(shape, dtype=np.float32) * sigma
    noise_i = rng.standard_normal(shape, dtype=np.float32) * sigma
    head = ndi.binary_dilation(anat.brain | anat.csf, iterations=2)
    img = np.sqrt((img + noise_r) ** 2 + noise_i**2) * np.where(head, 1.0, 0.15)
    return (img * 1000.0).astype(np.float32)


def _pvs_stats(anat: Anatomy, labels: np.ndarray, tubes, kinds, h: float) -> dict[str, Any]:
    """PVS counts, sizes and volumes, and the WM / BG volumes, for ``Phantom.meta``."""
    voxel_mm3 = h**3
    wm_vox = int(anat.wm.sum())
    wm_pvs = int((labels & anat.wm).sum())
    diam = [2 * r for _, r, _ in tubes]
    return {
        "n_pvs_wm": kinds.count("WM"),
        "n_pvs_bg": kinds.count("BG"),
        "pvs_diameter_mm": {"min": float(np.min(diam)), "median": float(np.median(diam)),
                            "max": float(np.max(diam))},
        "pvs_length_mm": length_stats([p for p, _, _ in tubes]),
        "pvs_volume_fraction_wm": wm_pvs / max(wm_vox, 1),
        "pvs_volume_mm3": float(labels.sum() * voxel_mm3),
        "wm_volume_mm3": float(wm_vox * voxel_mm3),
        "bg_volume_mm3": float(anat.bg.sum() * voxel_mm3),
    }


def make_cohort(
    n_sites: int = 3,
    per_site: int = 2,
    *,
    modality: str = "T2w",
    seed: int = 0,
    size_mm: float = 160.0,
):
    """Yield ``(subject_id, Phantom)`` for ``n_sites`` x ``per_site`` subjects.

    Subject ``j`` of site ``i`` is seeded with ``(seed, i, j)``, so a cohort is
    reproducible and adding sites does not change the existing subjects.
    """
    if n_sites < 1 or per_site < 1:
        raise ValueError(f"need at least one site and one subject per site, got {n_sites}x{per_site}")
    for i in range(n_sites):
        prof = site_profile(i)
        for j in range(per_site):
            sid = f"{prof.name}{j + 1:02d}"
            sub_seed = int(np.random.SeedSequence([seed, i, j]).generate_state(1)[0])
            yield sid, make_phantom(sub_seed, modality=modality, site=prof, size_mm=size_mm, subject=sid)
