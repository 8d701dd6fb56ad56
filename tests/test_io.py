"""Tests for napari_pvs.io: loading, geometry, bad input and label writing."""

from __future__ import annotations

import gzip
import hashlib
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from _helpers import (
    assert_same_geometry,
    flip_middle_bytes,
    oversized_nifti,
    truncate_half,
    write_raw_nifti,
)

from napari_pvs import PVSInputError
from napari_pvs import io as pvs_io
from napari_pvs.io import (
    NonFiniteVoxelsWarning,
    Volume,
    as_label_array,
    geometry_from_affine,
    is_nifti_path,
    load_volume,
    save_labels,
)

ATOL = 1e-5


def _axis_aligned(tmp_path: Path) -> Path:
    affine = np.diag([0.8, 0.8, 1.5, 1.0])
    affine[:3, 3] = [-40.0, -50.0, -20.0]
    data = np.arange(6 * 7 * 5, dtype=np.float32).reshape(6, 7, 5)
    img = nib.Nifti1Image(data, affine)
    img.header.set_sform(affine, code=2)
    img.header.set_qform(affine, code=1)
    path = tmp_path / "aligned.nii"
    nib.save(img, path)
    return path


def _assert_single_line(exc: pytest.ExceptionInfo, name: str) -> str:
    message = str(exc.value)
    assert "\n" not in message
    assert name in message
    return message


@pytest.mark.parametrize("kind", ["aligned", "oblique"])
@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_labels_round_trip_keeps_geometry(tmp_path, oblique_nifti, kind, suffix):
    source = _axis_aligned(tmp_path) if kind == "aligned" else oblique_nifti
    vol = load_volume(source)
    assert vol.data.dtype == np.float32
    labels = (vol.data > np.median(vol.data)).astype(np.int64)
    labels[0, 0, 0] = 7
    out = save_labels(tmp_path / f"labels{suffix}", labels, like=vol)

    back = nib.load(out)
    assert_same_geometry(out, source)
    assert back.get_data_dtype() == np.uint8
    assert back.dataobj.slope == 1.0 and back.dataobj.inter == 0.0
    np.testing.assert_array_equal(np.asanyarray(back.dataobj), labels)
    assert back.header.get_intent()[0] == "label"


def test_oblique_fixture_is_really_oblique(oblique_nifti):
    img = nib.load(oblique_nifti)
    sform, scode = img.header.get_sform(coded=True)
    qform, qcode = img.header.get_qform(coded=True)
    assert (int(scode), int(qcode)) == (2, 1)
    assert not np.allclose(sform, qform)  # different translations
    rot = sform[:3, :3] / np.linalg.norm(sform[:3, :3], axis=0)
    assert np.abs(rot).max(axis=0).min() < np.cos(np.radians(10))


@pytest.mark.parametrize(
    ("name", "volume"),
    [("anatomical.nii", None), ("example_nifti2.nii.gz", 0), ("reoriented_anat_moved.nii", None)],
)
def test_real_nibabel_files_geometry(nibabel_data, name, volume):
    path = nibabel_data / name
    img = nib.load(path)
    vol = load_volume(path, volume=volume)
    np.testing.assert_allclose(vol.affine, img.affine, atol=1e-12)
    np.testing.assert_allclose(vol.spacing, img.header.get_zooms()[:3])
    assert vol.qform_code == int(img.header["qform_code"])
    assert vol.sform_code == int(img.header["sform_code"])
    expected = np.asanyarray(img.dataobj)
    if volume is not None:
        expected = expected[..., volume]
    assert vol.shape == expected.shape
    np.testing.assert_allclose(vol.data, expected.astype(np.float32))
    assert vol.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_nifti2_stays_nifti2(nibabel_data, tmp_path):
    vol = load_volume(nibabel_data / "example_nifti2.nii.gz", volume=1)
    out = save_labels(tmp_path / "lab.nii.gz", (vol.data > 300).astype(bool), vol)
    back = nib.load(out)
    assert isinstance(back, nib.Nifti2Image)
    assert back.shape == vol.shape  # the 4th dimension is gone
    np.testing.assert_allclose(back.affine, vol.affine, atol=ATOL)
    np.testing.assert_allclose(back.header.get_qform(), vol.header.get_qform(), atol=ATOL)
    assert back.get_data_dtype() == np.uint8


def test_4d_needs_a_volume_index(nibabel_data):
    with pytest.raises(PVSInputError) as exc:
        load_volume(nibabel_data / "example4d.nii.gz")
    message = _assert_single_line(exc, "example4d.nii.gz")
    assert "4D" in message and "volume" in message and "--volume" in message
    assert "fslroi" in message and "(128, 96, 24, 2)" in message


def test_4d_volume_is_picked(nibabel_data):
    path = nibabel_data / "example4d.nii.gz"
    vol = load_volume(path, volume=1)
    expected = np.asanyarray(nib.load(path).dataobj)[..., 1]
    assert vol.shape == (128, 96, 24)
    np.testing.assert_array_equal(vol.data, expected.astype(np.float32))
    assert not np.array_equal(vol.data, load_volume(path, volume=0).data)
    with pytest.raises(PVSInputError, match="out of range"):
        load_volume(path, volume=2)


def test_trailing_singleton_volume_is_squeezed(tmp_path):
    data = np.random.default_rng(1).random((5, 6, 7, 1)).astype(np.float32)
    path = tmp_path / "single.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    vol = load_volume(path)
    assert vol.shape == (5, 6, 7)
    np.testing.assert_array_equal(vol.data, data[..., 0])


def _valid_gz(tmp_path: Path, name: str = "scan.nii.gz") -> Path:
    # Smooth integer data compress well, so the middle of the file is Huffman-coded.
    data = np.add.outer(np.arange(40), np.arange(40))[:, :, None] * np.ones(30)
    path = tmp_path / name
    nib.save(nib.Nifti1Image(data.astype(np.int16), np.eye(4)), path)
    return path


def _truncated(tmp_path: Path) -> Path:
    return truncate_half(_valid_gz(tmp_path, "cut.nii.gz"))


def _corrupt(tmp_path: Path) -> Path:
    return flip_middle_bytes(_valid_gz(tmp_path, "flipped.nii.gz"))


def _truncated_plain(tmp_path: Path) -> Path:
    path = tmp_path / "cut.nii"
    nib.save(nib.Nifti1Image(np.ones((10, 10, 10), np.float32), np.eye(4)), path)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) - 1000])
    return path


def _text(tmp_path: Path) -> Path:
    path = tmp_path / "x.nii.gz"
    path.write_text("subject,age\nsub-01,42\n")
    return path


def _gzipped_text(tmp_path: Path) -> Path:
    path = tmp_path / "notes.nii.gz"
    path.write_bytes(gzip.compress(b"this is not a NIfTI header\n" * 50))
    return path


def _png(tmp_path: Path) -> Path:
    path = tmp_path / "x.nii"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    return path


def _image_2d(tmp_path: Path) -> Path:
    path = tmp_path / "slice.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((16, 16), np.float32), np.eye(4)), path)
    return path


def _image_5d(tmp_path: Path) -> Path:
    path = tmp_path / "vectors.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4, 1, 3), np.float32), np.eye(4)), path)
    return path


def _missing(tmp_path: Path) -> Path:
    return tmp_path / "nowhere.nii.gz"


def _wrong_suffix(tmp_path: Path) -> Path:
    path = tmp_path / "scan.dcm"
    path.write_bytes(b"\x00" * 400)
    return path


def _corrupt_mgz(tmp_path: Path) -> Path:
    path = tmp_path / "aseg.mgz"
    path.write_bytes(b"\x00" * 400)
    return path


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (_truncated, "truncated"),
        (_corrupt, "corrupt"),
        (_truncated_plain, "truncated or corrupt"),
        (_text, "not gzip-compressed"),
        (_gzipped_text, "not a readable NIfTI"),
        (_png, "not a readable NIfTI"),
        (_image_2d, "is 2D (shape (16, 16)); napari-pvs needs a 3D volume"),
        (_image_5d, "is 5D"),
        (_missing, "does not exist"),
        (_wrong_suffix, "not a NIfTI file"),
        (_corrupt_mgz, "not a readable FreeSurfer MGH/MGZ file"),
    ],
)
def test_bad_input_gives_one_clear_line(tmp_path, make, expected):
    path = make(tmp_path)
    with pytest.raises(PVSInputError) as exc:
        load_volume(path)
    message = _assert_single_line(exc, path.name)
    assert expected in message
    assert isinstance(exc.value, ValueError)


def test_intact_gzip_passes_the_crc_check(tmp_path):
    path = _valid_gz(tmp_path)
    assert load_volume(path).shape == (40, 40, 30)


def test_non_finite_voxels_warn_and_become_zero(tmp_path):
    data = np.full((4, 5, 6), 3.5, dtype=np.float32)
    data[0, 0, 0] = np.nan
    data[1, 2, 3] = np.inf
    data[3, 4, 5] = -np.inf
    path = tmp_path / "holes.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    with pytest.warns(NonFiniteVoxelsWarning, match=r"holes\.nii\.gz: 3 of 120 voxels"):
        vol = load_volume(path)
    assert np.isfinite(vol.data).all()
    assert vol.data[0, 0, 0] == 0 and vol.data[1, 2, 3] == 0 and vol.data[3, 4, 5] == 0
    assert np.count_nonzero(vol.data == 3.5) == 117


def test_finite_volume_does_not_warn(tmp_path):
    path = _valid_gz(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NonFiniteVoxelsWarning)
        load_volume(path)


def test_sha256_matches_hashlib(oblique_nifti):
    expected = hashlib.sha256(oblique_nifti.read_bytes()).hexdigest()
    assert load_volume(oblique_nifti).sha256 == expected
    assert pvs_io.sha256_file(oblique_nifti) == expected


def test_save_labels_refuses_a_shape_mismatch(tmp_path, oblique_nifti):
    vol = load_volume(oblique_nifti)
    target = tmp_path / "wrong_shape.nii.gz"
    with pytest.raises(PVSInputError) as exc:
        save_labels(target, np.zeros((12, 10, 9), np.uint8), vol)
    message = _assert_single_line(exc, "wrong_shape.nii.gz")
    assert "(12, 10, 9)" in message and "(12, 10, 8)" in message
    assert not target.exists()


def test_save_labels_refuses_float_labels(tmp_path, oblique_nifti):
    vol = load_volume(oblique_nifti)
    with pytest.raises(PVSInputError, match="integers"):
        save_labels(tmp_path / "f.nii.gz", vol.data, vol)


@pytest.mark.parametrize(
    ("high", "dtype"), [(1, np.uint8), (255, np.uint8), (256, np.int16), (70000, np.int32)]
)
def test_label_dtype_fits_the_values(tmp_path, oblique_nifti, high, dtype):
    vol = load_volume(oblique_nifti)
    labels = np.zeros(vol.shape, dtype=np.int64)
    labels[1, 1, 1] = high
    back = nib.load(save_labels(tmp_path / "l.nii.gz", labels, vol))
    assert back.get_data_dtype() == dtype
    assert np.asanyarray(back.dataobj).max() == high


def test_save_is_atomic(tmp_path, oblique_nifti, monkeypatch):
    vol = load_volume(oblique_nifti)
    target = tmp_path / "labels.nii.gz"
    target.write_bytes(b"previous result")

    def crash(image, filename):
        Path(filename).write_bytes(b"half a file")
        raise RuntimeError("simulated crash while writing")

    monkeypatch.setattr(pvs_io.nib, "save", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        save_labels(target, np.zeros(vol.shape, np.uint8), vol)
    assert target.read_bytes() == b"previous result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.nii.gz", "oblique_T2w.nii.gz"]


def test_napari_transform_composes_to_the_nifti_affine(oblique_nifti, nibabel_data):
    for path in (oblique_nifti, nibabel_data / "anatomical.nii"):
        vol = load_volume(path)
        scale, affine = vol.napari_transform()
        assert scale == vol.spacing
        # napari applies the scale first, then the affine.
        np.testing.assert_allclose(affine @ np.diag([*scale, 1.0]), vol.affine, atol=1e-12)
        ijk = np.array([3.0, 2.0, 5.0, 1.0])
        np.testing.assert_allclose(affine @ (np.diag([*scale, 1.0]) @ ijk), vol.affine @ ijk)


def test_as_labels_keeps_integers(tmp_path):
    data = np.zeros((5, 5, 5), np.int16)
    data[1:3, 1:3, 1:3] = 300
    path = tmp_path / "seg.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    vol = load_volume(path, as_labels=True)
    assert vol.data.dtype == np.int16
    np.testing.assert_array_equal(vol.data, data)


def test_as_label_array():
    assert as_label_array(np.array([[[True]]])).dtype == np.uint8
    assert as_label_array(np.array([0.0, 2.0, 300.0])).dtype == np.int16
    with pytest.raises(PVSInputError, match="non-integer"):
        as_label_array(np.array([0.5]), "probabilities.nii.gz")


def test_scaled_integers_load_as_scaled_floats(tmp_path):
    img = nib.Nifti1Image(np.arange(27, dtype=np.int16).reshape(3, 3, 3), np.eye(4))
    img.header.set_slope_inter(0.5, 10.0)
    path = tmp_path / "scaled.nii"
    nib.save(img, path)
    vol = load_volume(path)
    np.testing.assert_allclose(vol.data.ravel(), np.arange(27) * 0.5 + 10.0)


def test_geometry_only_volume(tmp_path):
    affine = np.diag([2.0, 3.0, 4.0, 1.0])
    affine[:3, 3] = [1.0, 2.0, 3.0]
    like = geometry_from_affine(affine, (4, 5, 6), sform_code=1, qform_code=1)
    assert isinstance(like, Volume) and like.data is None
    assert like.shape == (4, 5, 6) and like.spacing == (2.0, 3.0, 4.0)
    assert (like.sform_code, like.qform_code) == (1, 1)
    back = nib.load(save_labels(tmp_path / "g.nii.gz", np.ones((4, 5, 6), bool), like))
    np.testing.assert_allclose(back.affine, affine)
    assert int(back.header["sform_code"]) == 1 and int(back.header["qform_code"]) == 1


def test_is_nifti_path():
    assert is_nifti_path("a.nii") and is_nifti_path(Path("b.NII.GZ"))
    assert not is_nifti_path("c.nii.zip") and not is_nifti_path("d.png")


# ----------------------------------------------------------------------------- oversized headers


def _peak_rss_of_load(path: Path) -> tuple[str, int]:
    """Load *path* in a fresh interpreter; its error message and its peak RSS in bytes.

    The child reads its own high-water mark (VmHWM) after the load: ru_maxrss of a
    child also counts the parent's pages it shared before exec, and pytest may be
    large by then.
    """
    import subprocess
    import sys

    code = (
        "import resource, sys\n"
        "from napari_pvs.io import load_volume\n"
        "try:\n    load_volume(sys.argv[1])\nexcept ValueError as e:\n"
        "    sys.stderr.write(str(e))\n"
        "try:\n"
        "    status = open('/proc/self/status').read().split('VmHWM:')[1]\n"
        "    print(int(status.split()[0]) * 1024)\n"
        "except OSError:  # not Linux: ru_maxrss is in bytes on macOS\n"
        "    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    )
    r = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stderr, int(r.stdout)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_oversized_header_is_refused_before_allocating(tmp_path, suffix):
    path = oversized_nifti(tmp_path / f"huge{suffix}")
    assert path.stat().st_size < 1500
    with pytest.raises(PVSInputError) as exc:
        load_volume(path)
    message = _assert_single_line(exc, path.name)
    assert "3,000,000,352 bytes" in message and "1,376 bytes" in message
    err, peak = _peak_rss_of_load(path)
    assert path.name in err
    assert peak < 400e6, f"loading a 1 KB file took {peak / 1e6:.0f} MB"


# ----------------------------------------------------------------------------- unusable affines


def _raw_nifti(path: Path, edit) -> Path:
    """Write a 6x6x6 float32 ``.nii`` byte by byte after ``edit(header)``.

    nibabel's own save would repair the geometry fields we want broken.
    """
    header = nib.Nifti1Header()
    header.set_data_shape((6, 6, 6))
    header.set_data_dtype(np.float32)
    header.set_zooms((0.8, 0.8, 0.8))
    edit(header)
    data = np.arange(216, dtype=np.float32).reshape(6, 6, 6)
    return write_raw_nifti(path, header, data.tobytes(order="F"))


def _sform(matrix, code=2):
    def edit(header):
        rows = np.asarray(matrix, dtype=np.float64)[:3]
        for row, name in zip(rows, ("srow_x", "srow_y", "srow_z"), strict=True):
            header[name] = row
        header["sform_code"] = code
        header["qform_code"] = 0
    return edit


def _nan_qform(header):
    header.set_qform(np.diag([0.8, 0.8, 0.8, 1.0]), code=1)
    header["quatern_b"] = np.nan
    header["sform_code"] = 0


def _zero_pixdim(code):
    def edit(header):
        header["qform_code"] = code
        header["sform_code"] = 0
        header["pixdim"][1:4] = 0
    return edit


_SINGULAR = np.diag([0.8, 0.8, 0.8, 1.0])
_SINGULAR[:3, 2] = _SINGULAR[:3, 0]  # third axis = first axis: rank 2


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (_sform(np.zeros((4, 4))), "sform (code 2) is all zero"),
        (_sform(np.full((4, 4), np.nan)), "sform (code 2) has NaN or infinite entries"),
        (_sform(np.diag([np.inf, 1, 1, 1])), "has NaN or infinite entries"),
        (_sform(_SINGULAR), "is singular"),
        (_nan_qform, "qform (code 1) has NaN"),
        (_zero_pixdim(1), "qform (code 1) its voxel size (pixdim) is [0.0, 0.0, 0.0]"),
        (_zero_pixdim(0), "voxel size (no sform or qform code) its voxel size"),
    ],
    ids=["zero-sform", "nan-sform", "inf-sform", "singular-sform", "nan-qform", "zero-pixdim-qform",
         "zero-pixdim-no-codes"],
)
def test_unusable_affine_is_refused_on_load(tmp_path, edit, expected):
    path = _raw_nifti(tmp_path / "broken.nii", edit)
    with pytest.raises(PVSInputError) as exc:
        load_volume(path)
    message = _assert_single_line(exc, "broken.nii")
    assert "no usable voxel-to-world geometry" in message and expected in message


def test_a_broken_sform_falls_back_to_a_valid_qform(tmp_path):
    qform = np.diag([0.8, 0.9, 1.2, 1.0])
    qform[:3, 3] = [-10.0, 5.0, 3.0]

    def edit(header):
        header.set_qform(qform, code=1)
        header["sform_code"] = 2  # srow_* stay all zero

    path = _raw_nifti(tmp_path / "zero_sform.nii", edit)
    with pytest.warns(UserWarning, match=r"zero_sform\.nii: its sform \(code 2\) is all zero; "
                                         r"using the qform \(code 1\)"):
        vol = load_volume(path)
    np.testing.assert_allclose(vol.affine, qform, atol=1e-6)
    np.testing.assert_allclose(vol.spacing, (0.8, 0.9, 1.2), rtol=1e-6)
    back = nib.load(save_labels(tmp_path / "lab.nii.gz", vol.data > 100, vol))
    np.testing.assert_allclose(back.affine, qform, atol=1e-5)


@pytest.mark.parametrize("which", ["sform-only", "qform-only"])
def test_sform_only_and_qform_only_files_load(tmp_path, which):
    sform, qform = (np.diag([0.7, 0.8, 1.5, 1.0]),) * 2

    def edit(header):
        header.set_zooms((0.7, 0.8, 1.5))
        if which == "sform-only":
            _sform(sform, code=2)(header)
        else:
            header.set_qform(qform, code=1)
            header["sform_code"] = 0

    vol = load_volume(_raw_nifti(tmp_path / f"{which}.nii", edit))
    np.testing.assert_allclose(vol.affine, sform, atol=1e-6)
    np.testing.assert_allclose(vol.spacing, (0.7, 0.8, 1.5), rtol=1e-6)


def test_spacing_comes_from_the_affine_not_a_zero_pixdim(tmp_path):
    """nibabel turns a zero pixdim into 1 mm; the sform says 0.7 x 0.8 x 1.5 mm."""
    affine = np.diag([0.7, 0.8, 1.5, 1.0])

    def edit(header):
        _sform(affine, code=2)(header)
        header["pixdim"][1:4] = 0

    vol = load_volume(_raw_nifti(tmp_path / "sform_zero_pixdim.nii", edit))
    np.testing.assert_allclose(vol.spacing, (0.7, 0.8, 1.5), rtol=1e-6)
    scale, affine_part = vol.napari_transform()
    np.testing.assert_allclose(affine_part @ np.diag([*scale, 1.0]), vol.affine, atol=1e-12)


def test_geometry_from_affine_refuses_a_singular_affine():
    with pytest.raises(ValueError, match="all zero"):
        geometry_from_affine(np.diag([0.0, 0.0, 0.0, 1.0]), (4, 4, 4))
