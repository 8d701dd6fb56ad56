"""MedNeXt as the paper defines it; checkpoints, UpKern, registry."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from _helpers import PickleBomb

from napari_pvs import PVSInputError
from napari_pvs.cli import main
from napari_pvs.model import (
    ModelRegistry,
    arch_config,
    build_network,
    count_parameters,
    default_meta,
    load_checkpoint,
    map_official_state_dict,
    read_meta,
    save_checkpoint,
    upkern,
    upkern_checkpoint,
)

FIXTURE = Path(__file__).parent / "data" / "mednext_v1"
TRAINER = (FIXTURE / "nnUNet/3d_fullres/Task900_PVSTiny"
           / "nnUNetTrainerV2_MedNeXt_tiny_kernel5__nnUNetPlansv2.1_trgSp_0.8x0.8x0.8")


@pytest.mark.parametrize("variant, kernel, expected", [("S", 3, 5.551), ("L", 3, 61.779),
                                                       ("L", 5, 62.993)])
def test_parameter_counts_match_the_official_mednext(variant, kernel, expected):
    net = build_network(arch_config(variant, kernel))
    assert round(count_parameters(net) / 1e6, 3) == expected


def test_monai_factory_differs_for_l_but_we_do_not():
    from monai.networks.nets.mednext import create_mednext

    assert round(count_parameters(create_mednext("L", kernel_size=5)) / 1e6, 3) == 62.940
    # S has equal expansion ratios everywhere, so MONAI and the paper agree
    assert count_parameters(create_mednext("S", kernel_size=3)) == count_parameters(
        build_network(arch_config("S", 3)))


@pytest.mark.parametrize("fold", [0, 1])
def test_reproduces_the_official_network_outputs(fold):
    a = json.loads((FIXTURE / "Task900_PVSTiny_architecture.json").read_text())
    arch = {"variant": "custom", "in_channels": a["in_channels"], "out_channels": a["n_classes"],
            "n_channels": a["n_channels"], "exp_r": a["exp_r"], "block_counts": a["block_counts"],
            "kernel_size": a["kernel_size"]}
    ckpt = torch.load(TRAINER / f"fold_{fold}" / "model_final_checkpoint.model", weights_only=True)
    main_sd, ds = map_official_state_dict(ckpt["state_dict"])
    assert len(ds) == 8  # out_1..out_4, weight and bias
    net = build_network(arch)
    net.load_state_dict(main_sd, strict=True)
    net.eval()
    x = torch.from_numpy(np.load(FIXTURE / "Task900_PVSTiny_input.npy"))
    with torch.no_grad():
        y = net(x).numpy()
    expected = np.load(FIXTURE / f"Task900_PVSTiny_fold{fold}_expected.npy")
    np.testing.assert_allclose(y, expected, atol=1e-5, rtol=0)
    # the deep-supervision heads load too, for fine-tuning
    net_ds = build_network(arch, deep_supervision=True)
    net_ds.load_state_dict({**main_sd, **ds}, strict=True)


def _xs(kernel=3):
    torch.manual_seed(0)
    arch = arch_config("XS", kernel)
    return build_network(arch).eval(), default_meta(arch, patch_size=[32, 32, 32])


def test_checkpoint_round_trip_restores_identical_outputs(tmp_path):
    net, meta = _xs()
    path = save_checkpoint(tmp_path / "m.safetensors", net, meta)
    net2, meta2 = load_checkpoint(path)
    assert not net2.training
    assert meta2["arch"]["variant"] == "XS" and meta2["format_version"] == 1
    assert meta2["id"].startswith("mednext-xsk3-") and meta2["created"]
    assert meta2["preprocessing"]["patch_size"] == [32, 32, 32]
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        assert torch.equal(net(x), net2(x))


def test_truncated_and_foreign_checkpoints_are_refused(tmp_path):
    net, meta = _xs()
    good = save_checkpoint(tmp_path / "m.safetensors", net, meta)
    data = good.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(PVSInputError, match="truncated or corrupt"):
        load_checkpoint(cut)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 100)
    with pytest.raises(PVSInputError, match="cut|corrupt|readable"):
        load_checkpoint(junk)
    with pytest.raises(PVSInputError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.safetensors")


def test_metadata_that_does_not_match_the_weights_is_refused(tmp_path):
    net, meta = _xs(3)
    wrong = json.loads(json.dumps(meta))
    wrong["arch"]["kernel_size"] = 5
    path = save_checkpoint(tmp_path / "m.safetensors", net, wrong)
    with pytest.raises(PVSInputError, match=r"do not match the architecture.*other shapes"):
        load_checkpoint(path)


def test_loading_never_executes_pickled_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    evil = tmp_path / "evil.safetensors"
    evil.write_bytes(pickle.dumps({"state_dict": PickleBomb("PWNED_BY_PICKLE")}))
    with pytest.raises(PVSInputError):
        load_checkpoint(evil)
    evil_pt = tmp_path / "evil.pt"
    torch.save({"x": PickleBomb("PWNED_BY_PICKLE")}, evil_pt)
    with pytest.raises(PVSInputError):
        load_checkpoint(evil_pt)
    assert not (tmp_path / "PWNED_BY_PICKLE").exists()


def test_upkern_interpolates_kernels_and_copies_the_rest(tmp_path):
    net3, meta = _xs(3)
    net5 = upkern(net3, arch_config("XS", 5))
    s3, s5 = net3.state_dict(), net5.state_dict()
    k = "enc_stages.0.0.conv1.weight"
    assert s3[k].shape[2:] == (3, 3, 3) and s5[k].shape[2:] == (5, 5, 5)
    # corners are kept (align_corners) and the centre tap too
    torch.testing.assert_close(s5[k][..., 0, 0, 0], s3[k][..., 0, 0, 0])
    torch.testing.assert_close(s5[k][..., 2, 2, 2], s3[k][..., 1, 1, 1])
    for name in ("enc_stages.0.0.norm.weight", "enc_stages.0.0.norm.bias", "stem.weight",
                 "enc_stages.0.0.conv2.weight", "out_0.conv_out.bias"):
        assert torch.equal(s3[name], s5[name]), name
    path3 = save_checkpoint(tmp_path / "k3.safetensors", net3, meta)
    path5 = upkern_checkpoint(path3, tmp_path / "k5.safetensors")
    net, meta5 = load_checkpoint(path5)
    assert meta5["arch"]["kernel_size"] == 5 and meta5["provenance"]["parent"] == read_meta(path3)["id"]
    with torch.no_grad():
        assert net(torch.randn(1, 1, 32, 32, 32)).shape == (1, 2, 32, 32, 32)


def test_registry_lists_loads_and_finds_latest(tmp_path):
    reg = ModelRegistry(tmp_path / "models")
    assert reg.list() == [] and reg.latest() is None
    net, meta = _xs()
    first = reg.register(net, {**meta, "created": "2026-01-01T00:00:00+00:00"})
    second = reg.register(net, {**meta, "created": "2026-02-01T00:00:00+00:00"})
    (tmp_path / "models" / "broken.safetensors").write_bytes(b"junk")
    assert [m["id"] for m in reg.list()] == [first, second]
    assert reg.latest()["id"] == second
    loaded, m = reg.load(first)
    assert m["id"] == first
    with pytest.raises(PVSInputError, match="no model"):
        reg.load("nope")
    with pytest.raises(PVSInputError, match="invalid model id"):
        reg.load("../etc/passwd")


def test_model_cli_create_upkern_ls(tmp_path, capsys):
    reg = tmp_path / "reg"
    assert main(["model", "create", "--variant", "XS", "--kernel", "3", "--patch", "32",
                 str(reg / "a.safetensors")]) == 0
    assert main(["model", "upkern", str(reg / "a.safetensors"), str(reg / "b.safetensors")]) == 0
    assert main(["model", "ls", str(reg)]) == 0
    out = capsys.readouterr().out
    assert "XS-k3" in out and "XS-k5" in out
    meta = read_meta(reg / "b.safetensors")
    assert meta["provenance"]["parent"] == read_meta(reg / "a.safetensors")["id"]
    assert main(["model", "create", "--variant", "Q", str(reg / "c.safetensors")]) == 2
