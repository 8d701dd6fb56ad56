"""Tests for the npe2 reader and writer, headless and in a real napari viewer."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from _helpers import assert_same_geometry

from napari_pvs import PVSInputError
from napari_pvs._reader import get_reader, read_nifti
from napari_pvs._writer import write_labels

ATOL = 1e-5
# napari shows oblique volumes in 2D without the out-of-slice rotation and says so.
OBLIQUE_2D = pytest.mark.filterwarnings("ignore:Non-orthogonal slicing:UserWarning")


@pytest.fixture
def shown_warnings(monkeypatch) -> list[str]:
    """Collect what the reader reports through napari's show_warning."""
    import napari.utils.notifications as notifications

    messages: list[str] = []
    monkeypatch.setattr(notifications, "show_warning", messages.append)
    return messages


def _world(kwargs: dict) -> np.ndarray:
    """napari's data-to-world matrix for reader kwargs: affine after scale."""
    return np.asarray(kwargs["affine"]) @ np.diag([*kwargs["scale"], 1.0])


@pytest.mark.parametrize("path", [123, None, "scan.png", "scan.nii.zip", ["a.nii", "b.tif"], []])
def test_get_reader_declines_other_paths(path):
    assert get_reader(path) is None


@pytest.mark.parametrize("path", ["a.nii", "a.nii.gz", Path("A.NII.GZ"), ["a.nii", "b.nii.gz"]])
def test_get_reader_accepts_nifti(path):
    assert get_reader(path) is read_nifti


def test_reader_gives_an_image_layer_in_world_space(oblique_nifti):
    layers = get_reader(str(oblique_nifti))(str(oblique_nifti))
    assert layers is not None and len(layers) == 1
    data, kwargs, layer_type = layers[0]
    img = nib.load(oblique_nifti)
    assert layer_type == "image" and data.dtype == np.float32
    assert kwargs["name"] == "oblique_T2w"
    assert kwargs["colormap"] == "gray"
    np.testing.assert_allclose(kwargs["scale"], img.header.get_zooms()[:3])
    np.testing.assert_allclose(_world(kwargs), img.affine, atol=1e-9)
    low, high = kwargs["contrast_limits"]
    assert low == pytest.approx(np.percentile(data, 0.5))
    assert high == pytest.approx(np.percentile(data, 99.5))
    meta = kwargs["metadata"]
    np.testing.assert_allclose(meta["nifti_affine"], img.affine)
    assert (meta["sform_code"], meta["qform_code"]) == (2, 1)
    assert meta["source_path"] == str(oblique_nifti)
    assert len(meta["sha256"]) == 64 and meta["shape"] == [12, 10, 8]


def test_reader_opens_real_files(nibabel_data):
    paths = [str(nibabel_data / n) for n in ("anatomical.nii", "reoriented_anat_moved.nii")]
    layers = read_nifti(paths)
    assert [kw["name"] for _, kw, _ in layers] == ["anatomical", "reoriented_anat_moved"]
    for (_, kwargs, layer_type), path in zip(layers, paths, strict=True):
        assert layer_type == "image"  # int16 anatomical has thousands of values
        np.testing.assert_allclose(_world(kwargs), nib.load(path).affine, atol=1e-9)


def test_integer_map_with_few_values_opens_as_labels(tmp_path):
    data = np.zeros((6, 6, 6), np.int16)
    data[2:4, 2:4, 2:4] = 3
    data[0, 0, 0] = 1
    path = tmp_path / "sub-01_T2w_pvs.nii.gz"
    affine = np.diag([0.5, 0.5, 0.7, 1.0])
    nib.save(nib.Nifti1Image(data, affine), path)
    ((labels, kwargs, layer_type),) = read_nifti(str(path))
    assert layer_type == "labels"
    assert np.issubdtype(labels.dtype, np.integer)
    np.testing.assert_array_equal(labels, data)
    assert "colormap" not in kwargs and "contrast_limits" not in kwargs
    np.testing.assert_allclose(_world(kwargs), affine)


def test_float_mask_named_like_labels_opens_as_labels(tmp_path):
    data = (np.random.default_rng(2).random((5, 5, 5)) > 0.5).astype(np.float32)
    path = tmp_path / "sub-01_desc-brain_mask.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    ((labels, _, layer_type),) = read_nifti(str(path))
    assert layer_type == "labels" and labels.dtype == np.uint8


@pytest.mark.parametrize("content", [b"not an image\n" * 20, b"\x1f\x8b\x08 broken gzip"])
def test_reader_never_raises_on_foreign_files(tmp_path, shown_warnings, content):
    path = tmp_path / "x.nii.gz"
    path.write_bytes(content)
    reader = get_reader(str(path))
    assert reader is not None  # the suffix matches, so napari asks us
    assert reader(str(path)) is None
    assert len(shown_warnings) == 1 and "x.nii.gz" in shown_warnings[0]


def test_reader_reports_corrupt_and_4d_files(tmp_path, shown_warnings, nibabel_data):
    corrupt = tmp_path / "corrupt.nii.gz"
    raw = bytearray((nibabel_data / "example4d.nii.gz").read_bytes())
    raw[len(raw) // 2 : len(raw) // 2 + 32] = bytes(32)
    corrupt.write_bytes(bytes(raw))
    assert get_reader(str(corrupt))(str(corrupt)) is None
    four_d = str(nibabel_data / "example4d.nii.gz")
    assert read_nifti(four_d) is None
    assert "corrupt.nii.gz" in shown_warnings[0]
    assert "4D" in shown_warnings[1] and "volume" in shown_warnings[1]


def test_reader_keeps_the_good_files_of_a_list(tmp_path, shown_warnings, oblique_nifti):
    bad = tmp_path / "bad.nii"
    bad.write_text("hello")
    layers = read_nifti([str(bad), str(oblique_nifti)])
    assert [kw["name"] for _, kw, _ in layers] == ["oblique_T2w"]
    assert len(shown_warnings) == 1 and "bad.nii" in shown_warnings[0]


def _labels_from_reader(path: Path):
    from napari.layers import Labels

    ((data, kwargs, _),) = read_nifti(str(path))
    geometry = {k: kwargs[k] for k in ("scale", "affine", "metadata")}
    return Labels((data > np.median(data)).astype(np.uint8), name="pvs", **geometry)


@OBLIQUE_2D
def test_writer_round_trips_reader_geometry(tmp_path, oblique_nifti):
    layer = _labels_from_reader(oblique_nifti)
    data, meta, _ = layer.as_layer_data_tuple()
    written = write_labels(str(tmp_path / "pvs_labels"), data, meta)
    assert written == [str(tmp_path / "pvs_labels.nii.gz")]
    assert_same_geometry(Path(written[0]), oblique_nifti)
    back = nib.load(written[0])
    assert back.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asanyarray(back.dataobj), layer.data)


def test_writer_keeps_nifti2(tmp_path, nibabel_data):
    from napari.layers import Labels

    source = tmp_path / "two.nii.gz"
    nib.save(nib.load(nibabel_data / "example_nifti2.nii.gz").slicer[..., 0], source)
    ((data, kwargs, _),) = read_nifti(str(source))
    layer = Labels(np.zeros(data.shape, np.uint8), metadata=kwargs["metadata"])
    out = write_labels(str(tmp_path / "lab.nii"), layer.data, layer.as_layer_data_tuple()[1])
    assert isinstance(nib.load(out[0]), nib.Nifti2Image)
    assert_same_geometry(Path(out[0]), source)


def test_writer_uses_the_layer_transform_without_metadata(tmp_path):
    from napari.layers import Labels

    labels = np.zeros((4, 5, 6), np.int32)
    labels[1, 2, 3] = 2
    layer = Labels(labels, scale=(2.0, 2.0, 2.0), translate=(10.0, -20.0, 5.5))
    data, meta, _ = layer.as_layer_data_tuple()
    (out,) = write_labels(str(tmp_path / "plain.nii"), data, meta)
    back = nib.load(out)
    expected = np.diag([2.0, 2.0, 2.0, 1.0])
    expected[:3, 3] = [10.0, -20.0, 5.5]
    np.testing.assert_allclose(back.affine, expected)
    assert int(back.header["sform_code"]) == 1 and int(back.header["qform_code"]) == 1
    np.testing.assert_array_equal(np.asanyarray(back.dataobj), labels)
    np.testing.assert_allclose(layer._data_to_world.affine_matrix, expected)


def test_writer_ignores_metadata_of_another_grid(tmp_path, oblique_nifti):
    from napari.layers import Labels

    ((_, kwargs, _),) = read_nifti(str(oblique_nifti))
    layer = Labels(
        np.zeros((3, 3, 3), np.uint8), scale=(1.5, 1.5, 1.5), metadata=kwargs["metadata"]
    )
    (out,) = write_labels(
        str(tmp_path / "small.nii.gz"), layer.data, layer.as_layer_data_tuple()[1]
    )
    np.testing.assert_allclose(nib.load(out).affine, np.diag([1.5, 1.5, 1.5, 1.0]))


def test_writer_refuses_2d_layers(tmp_path):
    with pytest.raises(PVSInputError, match="3D"):
        write_labels(str(tmp_path / "flat.nii.gz"), np.zeros((4, 4), np.uint8), {"name": "flat"})


@OBLIQUE_2D
def test_viewer_model_opens_through_the_plugin(npe2pm, oblique_nifti):
    """Headless: napari's own open() finds our reader through the npe2 manifest."""
    from napari.components import ViewerModel
    from npe2 import PluginManifest

    npe2pm.register(PluginManifest.from_distribution("napari-pvs"))
    viewer = ViewerModel()
    (layer,) = viewer.open(str(oblique_nifti), plugin="napari-pvs")
    np.testing.assert_allclose(layer._data_to_world.affine_matrix, nib.load(oblique_nifti).affine)


@pytest.mark.gui
@OBLIQUE_2D
def test_viewer_opens_and_saves_oblique_volume(make_napari_viewer, tmp_path, oblique_nifti):
    import napari

    viewer = make_napari_viewer()
    (layer,) = viewer.open(str(oblique_nifti), plugin="napari-pvs")
    nifti = nib.load(oblique_nifti)
    np.testing.assert_allclose(layer.scale, nifti.header.get_zooms()[:3])
    np.testing.assert_allclose(layer._data_to_world.affine_matrix, nifti.affine, atol=1e-9)
    np.testing.assert_allclose(
        layer.affine.affine_matrix @ np.diag([*layer.scale, 1.0]), nifti.affine, atol=1e-9
    )
    labels = viewer.add_labels(
        (layer.data > np.median(layer.data)).astype(np.uint8),
        scale=layer.scale,
        affine=layer.affine,
        metadata=layer.metadata,
    )
    target = tmp_path / "saved_labels.nii.gz"
    written = napari.save_layers(str(target), [labels], plugin="napari-pvs")
    assert written == [str(target)]
    assert_same_geometry(target, oblique_nifti)


@pytest.mark.gui
def test_viewer_declines_foreign_file_without_crashing(make_napari_viewer, tmp_path):
    make_napari_viewer()
    path = tmp_path / "x.nii.gz"
    path.write_text("definitely not NIfTI")
    reader = get_reader(str(path))
    assert reader is not None and reader(str(path)) is None
