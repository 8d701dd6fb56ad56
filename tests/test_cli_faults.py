"""Every bad input to the napari-pvs command ends in one line, never in a traceback.

Each case is ``(id, build, expected)``: ``build(tmp_path)`` writes whatever files the
case needs and returns the command's arguments; ``expected`` must appear in the last
``napari-pvs: error:`` line on stderr.  The command runs in a child process, as a user
runs it, and must exit non-zero with no ``Traceback`` anywhere in its output.  Append
new cases to ``CASES``.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from _helpers import (
    assert_clean_failure,
    flip_middle_bytes,
    oversized_nifti,
    run_cli,
    truncate_half,
    write_raw_nifti,
)


def _nifti(path: Path, data=None, affine=None) -> Path:
    """A small valid NIfTI file (16^3 float32, 1 mm) unless *data* says otherwise."""
    data = np.random.default_rng(0).random((16, 16, 16)).astype(np.float32) if data is None \
        else data
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), path)
    return path


def _bad_affine(path: Path, sform: np.ndarray) -> Path:
    header = nib.Nifti1Header()
    header.set_data_shape((8, 8, 8))
    header.set_data_dtype(np.float32)
    header.set_sform(sform, code=2)
    return write_raw_nifti(path, header, np.ones(512, np.float32).tobytes(order="F"))


def _corrupt_gz(path: Path) -> Path:
    data = np.add.outer(np.arange(40), np.arange(40))[:, :, None] * np.ones(30)
    return flip_middle_bytes(_nifti(path, data.astype(np.int16)))


def _truncated_gz(path: Path) -> Path:
    return truncate_half(_nifti(path))


def _labels(path: Path, value=1, shift_mm=0.0, shape=(8, 8, 8)) -> Path:
    data = np.zeros(shape, np.int16)
    data[2:5, 3, 3] = value
    affine = np.eye(4)
    affine[0, 3] = shift_mm
    return _nifti(path, data, affine)


def _file(path: Path, text: str = "keep me") -> Path:
    path.write_text(text)
    return path


def _img(t: Path) -> Path:
    return _nifti(t / "sub-01_T2w.nii.gz")


CASES = [
    # --- predict: input files
    ("predict-missing", lambda t: ["predict", t / "nope.nii.gz", "-o", t / "o"], "nope.nii.gz"),
    ("predict-folder", lambda t: ["predict", t, "-o", t / "o"], "is a directory"),
    ("predict-not-nifti", lambda t: ["predict", _file(t / "scan.png", "x"), "-o", t / "o"],
     "scan.png is not a NIfTI file"),
    ("predict-text-as-gz", lambda t: ["predict", _file(t / "x.nii.gz", "a,b\n1,2"), "-o", t / "o"],
     "x.nii.gz ends in .gz but is not gzip-compressed"),
    ("predict-empty", lambda t: ["predict", _file(t / "e.nii", ""), "-o", t / "o"],
     "e.nii is empty"),
    ("predict-corrupt-gz", lambda t: ["predict", _corrupt_gz(t / "c.nii.gz"), "-o", t / "o"],
     "c.nii.gz is a corrupt gzip file"),
    ("predict-truncated-gz", lambda t: ["predict", _truncated_gz(t / "cut.nii.gz"), "-o", t / "o"],
     "cut.nii.gz is truncated"),
    ("predict-5d", lambda t: ["predict", _nifti(t / "v.nii.gz", np.zeros((4, 4, 4, 2, 3),
                                                                        np.float32)),
                              "-o", t / "o"], "v.nii.gz is 5D"),
    ("predict-2d", lambda t: ["predict", _nifti(t / "s.nii.gz", np.zeros((8, 8), np.float32)),
                              "-o", t / "o"], "s.nii.gz is 2D"),
    ("predict-4d-no-volume", lambda t: ["predict", _nifti(t / "f.nii.gz", np.zeros((4, 4, 4, 3),
                                                                                  np.float32)),
                                        "-o", t / "o"], "--volume N"),
    ("predict-4d-volume-range", lambda t: ["predict", _nifti(t / "f.nii.gz",
                                                             np.zeros((4, 4, 4, 3), np.float32)),
                                           "--volume", "7", "-o", t / "o"],
     "volume=7 is out of range"),
    ("predict-oversized-nii", lambda t: ["predict", oversized_nifti(t / "huge.nii"), "-o", t / "o"],
     "huge.nii is truncated or corrupt: its header claims 3,000,000,352 bytes"),
    ("predict-oversized-gz", lambda t: ["predict", oversized_nifti(t / "huge.nii.gz"), "-o", t / "o"],
     "huge.nii.gz is truncated or corrupt: its header claims 3,000,000,352 bytes"),
    ("predict-zero-affine", lambda t: ["predict", _bad_affine(t / "z.nii", np.zeros((4, 4))),
                                       "-o", t / "o"], "z.nii has no usable voxel-to-world"),
    ("predict-nan-affine", lambda t: ["predict", _bad_affine(t / "n.nii", np.full((4, 4), np.nan)),
                                      "-o", t / "o"], "sform (code 2) has NaN"),
    # --- predict: options and outputs
    ("predict-same-name", lambda t: ["predict", _nifti(t / "a" / "sub-01_T2w.nii.gz"),
                                     _nifti(t / "b" / "sub-01_T2w.nii.gz"), "-o", t / "o"],
     "would both be written to"),
    ("predict-out-is-file", lambda t: ["predict", _img(t), "-o", _file(t / "taken")],
     "taken is an existing file, not a folder"),
    ("predict-out-under-file", lambda t: ["predict", _img(t), "-o", _file(t / "taken") / "sub"],
     "taken is an existing file, not a folder"),
    ("predict-bad-model", lambda t: ["predict", _img(t), "--model", "mednext", "-o", t / "o"],
     "'mednext' is neither 'baseline' nor an existing checkpoint"),
    ("predict-roi-grid", lambda t: ["predict", _img(t), "--roi", _labels(t / "roi.nii.gz"),
                                    "-o", t / "o"], "ROI shape (8, 8, 8)"),
    ("predict-roi-shifted", lambda t: ["predict", _img(t), "--roi",
                                       _labels(t / "roi.nii.gz", shift_mm=5.0, shape=(16,) * 3),
                                       "-o", t / "o"], "roi.nii.gz: ROI affine differs"),
    ("predict-roi-two-images", lambda t: ["predict", _img(t), _nifti(t / "sub-02_T2w.nii.gz"),
                                          "--roi", _labels(t / "roi.nii.gz"), "-o", t / "o"],
     "--roi applies to one image"),
    # --- score
    ("score-shifted", lambda t: ["score", _labels(t / "p.nii.gz"),
                                 _labels(t / "r.nii.gz", shift_mm=5.0)],
     "r.nii.gz: map affine differs"),
    ("score-shape", lambda t: ["score", _labels(t / "p.nii.gz"),
                               _labels(t / "r.nii.gz", shape=(8, 8, 9))], "map shape (8, 8, 9)"),
    ("score-empty-regions", lambda t: ["score", _labels(t / "p.nii.gz"), _labels(t / "r.nii.gz"),
                                       "--regions", _labels(t / "g.nii.gz", value=0)],
     "g.nii.gz has no voxel inside a region"),
    ("score-negative", lambda t: ["score", _labels(t / "p.nii.gz"),
                                  _labels(t / "r.nii.gz", value=-1)],
     "r.nii.gz holds negative labels"),
    ("score-probabilities", lambda t: ["score", _img(t), _labels(t / "r.nii.gz")],
     "holds non-integer values"),
    # --- folders that are files; OS failures
    ("phantom-out-is-file", lambda t: ["phantom", _file(t / "taken")],
     "taken is an existing file, not a folder"),
    ("demo-out-is-file", lambda t: ["demo", "--out", _file(t / "taken"), "--no-viewer"],
     "--out"),
    ("phantom-os-error", lambda t: ["phantom", "/proc/napari-pvs-faults/x", "--sites", "1",
                                    "--per-site", "1", "--size-mm", "32"],
     "/proc/napari-pvs-faults"),
    # option values out of range are refused by the parser, before any work
    ("predict-tta-0", lambda t: ["predict", _img(t), "--tta", "0", "-o", t / "o"], "--tta"),
    ("predict-tta-99", lambda t: ["predict", _img(t), "--tta", "99", "-o", t / "o"], "99"),
    ("predict-overlap-1.5", lambda t: ["predict", _img(t), "--overlap", "1.5", "-o", t / "o"],
     "1.5"),
    ("predict-overlap-nan", lambda t: ["predict", _img(t), "--overlap", "nan", "-o", t / "o"],
     "nan"),
    ("phantom-size-nan", lambda t: ["phantom", t / "o", "--size-mm", "nan"], "--size-mm"),
    ("phantom-size-huge", lambda t: ["phantom", t / "o", "--size-mm", "1e6"], "1e6"),
    ("model-ls-missing", lambda t: ["model", "ls", t / "nope"], "nope"),
    ("store-is-a-file", lambda t: ["store", "ls", _file(t / "lab.pvs.zarr")], "is a file"),
]


@pytest.mark.parametrize(("build", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_ends_in_one_line(tmp_path, build, expected):
    rc, out, err = run_cli(*build(tmp_path), timeout=120)
    assert_clean_failure(rc, out, err, expected)
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())  # no output
