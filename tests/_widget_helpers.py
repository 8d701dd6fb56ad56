"""Helpers of the widget tests: a phantom in a viewer, a store with a small model."""

from __future__ import annotations

from napari_pvs.io import Volume
from napari_pvs.model import arch_config, build_network, default_meta
from napari_pvs.phantom import make_phantom
from napari_pvs.store import CorrectionsStore


def phantom_viewer(viewer, size_mm=64.0, seed=0):
    """A phantom's image and its region map (metadata role "regions") in ``viewer``."""
    ph = make_phantom(seed=seed, size_mm=size_mm, subject="w")
    scale, aff = Volume(None, ph.affine, ph.spacing).napari_transform()
    meta = {"nifti_affine": ph.affine.tolist(), "modality": "T2w"}
    image = viewer.add_image(ph.image, name="phantom T2w", scale=scale, affine=aff, metadata=meta)
    regions = viewer.add_labels(ph.regions, name="regions (1 WM, 2 BG)", scale=scale, affine=aff,
                                metadata={**meta, "role": "regions"}, visible=False)
    return ph, image, regions


def store_with_model(path, ph, spacing=1.0):
    """A store with the phantom as subject w01 and a small untrained model; its id."""
    store = CorrectionsStore.create(path)
    store.add_subject("w01", Volume(ph.image, ph.affine, ph.spacing), site="A", regions=ph.regions)
    arch = arch_config("XS", 3)
    model_id = store.models.register(build_network(arch), default_meta(
        arch, target_spacing=[spacing] * 3, patch_size=[32] * 3))
    store.close()
    return model_id


def camera(viewer):
    return viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera
