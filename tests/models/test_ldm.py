"""models/ldm.py presets and local loading; bench/train_throughput.py runs on CPU with the tiny preset."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from rapid_pipeline.models import ldm


def test_tiny_forward_shapes():
    torch.manual_seed(0)
    unet, vae = ldm.build_unet("tiny", context_dim=24), ldm.build_vae("tiny")
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    z = vae.encode(x).latent_dist.mean
    assert z.shape == (2, 4, 16, 16) and ldm.latent_size_for(vae, 32) == 16
    eps = unet(z, torch.tensor([10, 500]), encoder_hidden_states=torch.randn(2, 7, 24)).sample
    assert eps.shape == z.shape
    assert vae.decode(z).sample.shape == x.shape


def test_attention_resolutions_pick_cross_attention_blocks():
    cfg = ldm.LDMConfig(channel_mult=(1, 2, 4, 4), attention_resolutions=(4, 2, 1))
    kw = ldm.unet_kwargs(cfg, 768)
    assert kw["down_block_types"] == ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    assert kw["up_block_types"] == ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    kw = ldm.unet_kwargs(ldm.LDMConfig(channel_mult=(1, 2, 4), attention_resolutions=(2,)), 64)
    assert kw["down_block_types"] == ("DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")


def test_paper_counts_on_meta():
    unet = ldm.build_on_meta(ldm.build_unet, "paper", context_dim=768)
    vae = ldm.build_on_meta(ldm.build_vae, "paper")
    assert next(unet.parameters()).device.type == "meta"
    assert ldm.count_params(unet) == 859_520_964  # the SD-1.x U-Net: Table 6 is exactly that architecture
    assert ldm.count_params(vae) == 83_653_863


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown LDM preset"):
        ldm.build_unet("huge", 768)


def test_load_local_sd_folder(tmp_path):
    torch.manual_seed(0)
    unet, vae = ldm.build_unet("tiny", context_dim=24), ldm.build_vae("tiny")
    unet.save_pretrained(tmp_path / "sd" / "unet")
    vae.save_pretrained(tmp_path / "sd" / "vae")
    u2, v2 = ldm.load_local(tmp_path / "sd", context_dim=24)
    assert torch.equal(u2.conv_in.weight, unet.conv_in.weight) and torch.equal(v2.encoder.conv_in.weight, vae.encoder.conv_in.weight)
    with pytest.raises(ValueError, match="context dim"):
        ldm.load_local(tmp_path / "sd", context_dim=768)
    with pytest.raises(FileNotFoundError, match="unet/config.json"):
        ldm.load_local(tmp_path / "nothing")


def test_train_throughput_bench_runs_on_cpu(capsys, monkeypatch):
    import sys

    path = Path(__file__).resolve().parents[2] / "bench" / "train_throughput.py"
    spec = importlib.util.spec_from_file_location("train_throughput", path)
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "train_throughput", mod)  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    res = mod.main(["--preset", "tiny", "--batch-size", "2", "--steps", "1", "--warmup", "1", "--device", "cpu",
                    "--precision", "bf16", "--variants", "latents,online"])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["measured"]["latents"]["images_per_s"] > 0 and last["baseline"]["online"]["tflops_per_s"] > 0
    assert last["measured"]["online"]["gflop_per_step"] > last["measured"]["latents"]["gflop_per_step"]  # + VAE
    assert res["speedup"]["latents"] == pytest.approx(
        last["measured"]["latents"]["images_per_s"] / last["baseline"]["latents"]["images_per_s"])
