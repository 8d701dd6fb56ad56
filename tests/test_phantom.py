"""Synthetic phantoms: determinism, anatomy, PVS statistics, sites, cohort layout."""

from __future__ import annotations

import numpy as np
import pytest

from napari_pvs.phantom import REGION_CODES, SITES, make_cohort, make_phantom, site_profile


@pytest.fixture(scope="module")
def small():
    return make_phantom(3, size_mm=80.0)


def test_same_seed_gives_identical_phantom(small):
    again = make_phantom(3, size_mm=80.0)
    np.testing.assert_array_equal(small.image, again.image)
    np.testing.assert_array_equal(small.labels, again.labels)
    np.testing.assert_array_equal(small.regions, again.regions)
    assert small.meta == again.meta


def test_other_seed_gives_other_phantom(small):
    other = make_phantom(4, size_mm=80.0)
    assert not np.array_equal(small.labels, other.labels)
    assert other.image.shape == small.image.shape


def test_arrays_and_geometry(small):
    assert small.image.dtype == np.float32 and small.image.ndim == 3
    assert small.labels.dtype == np.uint8 and set(np.unique(small.labels)) <= {0, 1}
    assert small.regions.dtype == np.uint8
    assert set(np.unique(small.regions)) == set(REGION_CODES.values())
    np.testing.assert_allclose(np.diag(small.affine)[:3], small.spacing)
    # the grid is centred on the world origin
    centre = small.affine @ np.r_[(np.array(small.image.shape) - 1) / 2, 1]
    np.testing.assert_allclose(centre[:3], 0, atol=1e-9)


def test_pvs_lie_in_wm_or_bg_and_are_csf_like(small):
    pvs = small.labels > 0
    assert np.all(small.regions[pvs] > 0)
    wm_only = (small.regions == REGION_CODES["WM"]) & ~pvs
    # T2w: PVS are brighter than the white matter around them
    assert np.median(small.image[pvs]) > 1.3 * np.median(small.image[wm_only])


def test_t1w_pvs_are_dark():
    ph = make_phantom(3, size_mm=80.0, modality="T1w")
    wm_only = (ph.regions == REGION_CODES["WM"]) & (ph.labels == 0)
    assert np.median(ph.image[ph.labels > 0]) < 0.85 * np.median(ph.image[wm_only])


@pytest.mark.slow
def test_full_size_statistics_in_range():
    ph = make_phantom(11)  # 160 mm at 1 mm
    m = ph.meta
    assert ph.image.shape == (160, 160, 160)
    assert 50 <= m["n_pvs_wm"] <= 1000 and 10 <= m["n_pvs_bg"] <= 200
    assert 0.5 <= m["pvs_diameter_mm"]["min"] and m["pvs_diameter_mm"]["max"] <= 3.0
    assert 0.9 <= m["pvs_diameter_mm"]["median"] <= 2.0
    assert 2.0 <= m["pvs_length_mm"]["min"] and m["pvs_length_mm"]["max"] <= 25.0
    # real brains: roughly 0.5-3 % of the WM
    assert 0.003 <= m["pvs_volume_fraction_wm"] <= 0.03
    for code in REGION_CODES.values():
        assert np.count_nonzero(ph.regions == code) > 1000


def test_sites_differ_and_are_deterministic():
    spacings = {s.spacing for s in SITES}
    assert min(spacings) == pytest.approx(0.7) and max(spacings) == pytest.approx(1.2)
    assert len({s.snr for s in SITES}) == len(SITES)
    assert site_profile(9) == site_profile(9)
    assert 0.7 <= site_profile(9).spacing <= 1.2
    with pytest.raises(ValueError):
        site_profile(-1)


def test_cohort_is_reproducible_and_multi_site():
    a = [(sid, p.spacing, p.meta["site"]) for sid, p in make_cohort(2, 2, size_mm=48.0, seed=5)]
    b = [(sid, p.spacing, p.meta["site"]) for sid, p in make_cohort(2, 2, size_mm=48.0, seed=5)]
    assert a == b
    assert [x[0] for x in a] == ["siteA01", "siteA02", "siteB01", "siteB02"]
    assert a[0][1] != a[2][1]  # the sites have different voxel sizes


@pytest.mark.parametrize(
    "kwargs", [{"modality": "FLAIR"}, {"size_mm": 10.0}, {"spacing": 0.0}, {"spacing": 9.0}]
)
def test_bad_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        make_phantom(0, **kwargs)
