"""Sample data through a real napari viewer, and a screenshot of it."""

from __future__ import annotations

import numpy as np
import pytest

from napari_pvs._sample_data import phantom_t1w, phantom_t2w


def test_sample_layers_have_geometry():
    layers = phantom_t2w()
    assert [t for _, _, t in layers] == ["image", "labels", "labels"]
    img, kw, _ = layers[0]
    assert img.ndim == 3 and kw["scale"] == (1.0, 1.0, 1.0)
    np.testing.assert_allclose(kw["affine"] @ np.diag([*kw["scale"], 1]),
                               np.array(kw["metadata"]["nifti_affine"]))
    assert layers[2][0].any()


@pytest.mark.gui
@pytest.mark.parametrize("key, fn", [("phantom_t2w", phantom_t2w), ("phantom_t1w", phantom_t1w)])
def test_open_sample_in_viewer(make_napari_viewer, key, fn, tmp_path):
    viewer = make_napari_viewer(show=True)  # the canvas renders only when shown
    viewer.open_sample("napari-pvs", key)
    names = [layer.name for layer in viewer.layers]
    assert names[0].startswith("phantom") and "PVS truth" in names
    image = viewer.layers[0]
    assert tuple(image.scale) == (1.0, 1.0, 1.0)
    assert np.asarray(viewer.layers["PVS truth"].data).sum() > 0
    shot = viewer.screenshot(canvas_only=True, flash=False)
    assert shot.ndim == 3 and shot.shape[2] == 4
    assert shot[..., :3].std() > 5  # something was rendered, not a blank canvas
