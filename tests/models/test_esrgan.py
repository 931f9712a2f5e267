"""ESRGAN model pieces: x4 output, Real-ESRGAN checkpoint format, spectral norm in D, VGG weights policy."""

from __future__ import annotations

import pytest
import torch

from rapid_pipeline.core.checkpoint import CheckpointError
from rapid_pipeline.models import esrgan as E


def _tiny(growth: int = 8):
    torch.manual_seed(0)
    return E.build_generator(num_blocks=2, num_features=16, growth=growth)


def test_generator_output_is_4x_input():
    g = _tiny()
    out = g(torch.rand(2, 3, 12, 20))
    assert out.shape == (2, 3, 48, 80)


def test_paper_generator_has_table6_size():
    # 23 RRDB blocks, 64 features, growth 32: the well-known 16.7M-parameter RRDBNet x4.
    n = E.count_params(E.build_generator(23, 64, 32))
    assert 16_600_000 < n < 16_800_000


@pytest.mark.parametrize("growth,container", [(8, "params_ema"), (32, "params")])
def test_realesrgan_format_checkpoint_loads(tmp_path, growth, container):
    g = _tiny(growth)
    new_arch = E.to_new_arch(g.state_dict())
    assert "conv_first.weight" in new_arch and "body.1.rdb3.conv5.weight" in new_arch and "conv_body.weight" in new_arch
    path = tmp_path / "RealESRGAN_tiny.pth"
    torch.save({container: new_arch}, path)  # exactly how realesrgan/basicsr write .pth files

    loaded = E.load_generator(path)
    assert loaded.arch_config == {"num_blocks": 2, "num_features": 16, "growth": growth, "scale": 4}
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), g(x))

    fresh = _tiny(growth)
    torch.nn.init.zeros_(fresh.model[0].weight)
    E.init_generator_from(fresh, path)
    with torch.no_grad():
        assert torch.equal(fresh(x), g(x))


def test_original_esrgan_key_names_load(tmp_path):
    # xinntao/ESRGAN's RRDB_ESRGAN_x4.pth: RRDB_trunk.N.RDBk.convj, trunk_conv, upconv1/2, HRconv
    g = _tiny(32)
    rename = {"conv_body": "trunk_conv", "conv_up1": "upconv1", "conv_up2": "upconv2", "conv_hr": "HRconv"}
    state = {}
    for key, value in E.to_new_arch(g.state_dict()).items():
        name, _, kind = key.rpartition(".")
        if name.startswith("body."):
            _, i, rdb, conv = name.split(".")
            name = f"RRDB_trunk.{i}.RDB{rdb[-1]}.{conv}"
        state[f"{rename.get(name, name)}.{kind}"] = value
    path = tmp_path / "RRDB_ESRGAN_x4.pth"
    torch.save(state, path)
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(E.load_generator(path)(x), g(x))


def test_init_from_mismatched_architecture_fails(tmp_path):
    path = tmp_path / "g.pth"
    torch.save({"params_ema": E.to_new_arch(_tiny(8).state_dict())}, path)
    with pytest.raises(CheckpointError, match="does not match"):
        E.init_generator_from(E.build_generator(3, 16, 8), path)


def test_discriminator_has_spectral_norm_and_skips():
    d = E.UNetDiscriminatorSN(3, 8)
    sn = [m for m in d.modules() if isinstance(m, torch.nn.Conv2d) and hasattr(m, "weight_orig")]
    assert len(sn) == 8  # 3 down + 3 up + 2 refine; first and last conv plain (as Real-ESRGAN)
    out = d(torch.rand(2, 3, 32, 32))
    assert out.shape == (2, 1, 32, 32)  # per-pixel realness map
    # the skip connections matter: turning them off changes the output
    d2 = E.UNetDiscriminatorSN(3, 8, skip_connection=False)
    d2.load_state_dict(d.state_dict())
    d.eval(), d2.eval()
    x = torch.rand(1, 3, 32, 32)
    assert not torch.allclose(d(x), d2(x))


def test_paper_discriminator_size():
    # Real-ESRGAN's UNetDiscriminatorSN(3, 64) has ~4.38M parameters.
    assert 4_300_000 < E.count_params(E.UNetDiscriminatorSN(3, 64)) < 4_450_000


def test_vgg_loads_local_weights_only(tmp_path):
    from torchvision.models import vgg19

    torch.manual_seed(1)
    ref = vgg19(weights=None)
    path = tmp_path / "vgg19.pth"
    torch.save(ref.state_dict(), path)
    feats = E.VGGFeatures(path)
    assert isinstance(feats.features[-1], torch.nn.Conv2d)  # conv5_4, before its ReLU
    x = torch.rand(1, 3, 32, 32)
    mean = torch.tensor(E._IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(E._IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(feats(x), ref.features[:35]((x - mean) / std))
    bad = tmp_path / "bad.pth"
    torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3)}, bad)
    with pytest.raises(CheckpointError, match="not a torchvision VGG19"):
        E.VGGFeatures(bad)


def test_psnr():
    a = torch.zeros(3, 4, 4)
    assert E.psnr(a, a) == float("inf")
    assert E.psnr(a, torch.full_like(a, 0.1)) == pytest.approx(20.0, abs=1e-4)
