"""Latent diffusion parts (U-Net + KL autoencoder) built from presets, never downloaded.

    from rapid_pipeline.models.ldm import LDM_PRESETS, build_unet, build_vae, count_params
    unet = build_unet("paper", context_dim=768)      # Table 6 U-Net (SD-1.x shape, ~860M params)
    vae = build_vae("paper")                          # Table 6 KL-f8 autoencoder (~84M params)

Invariants:
* ``paper`` is exactly Table 6 of the seed paper: U-Net on 32x32x4 latents, model channels 320,
  channel multiplier 1,2,4,4, attention at resolutions 4,2,1 (the first three down blocks, i.e.
  downsampling factors 1,2,4, carry cross-attention), context dim 768, 8 heads, transformer depth 1;
  autoencoder z=4, resolution 256, ch 128, mult 1,2,4,4 (f8: 256 px -> 32x32 latents).
* ``tiny`` runs a training step on CPU in well under a second (32 px images, channels 32/64).
* Weights come only from random init or a local diffusers folder (`load_local`); nothing is fetched.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.config import opt


@dataclass(frozen=True)
class LDMConfig:
    image_size: int = opt(256, "training / sampling image size in pixels")
    latent_size: int = opt(32, "U-Net sample size (latent height = width)")
    latent_channels: int = opt(4, "autoencoder z-channels = U-Net in/out channels")
    model_channels: int = opt(320, "U-Net base channel count")
    channel_mult: tuple[int, ...] = opt((1, 2, 4, 4), "U-Net channel multiplier per level")
    attention_resolutions: tuple[int, ...] = opt((4, 2, 1), "downsampling factors whose blocks carry cross-attention")
    num_heads: int = opt(8, "attention heads per transformer block")
    transformer_depth: int = opt(1, "transformer layers per attention block")
    layers_per_block: int = opt(2, "ResNet layers per U-Net level")
    norm_groups: int = opt(32, "GroupNorm groups (U-Net and VAE)")
    vae_channels: int = opt(128, "autoencoder base channels")
    vae_channel_mult: tuple[int, ...] = opt((1, 2, 4, 4), "autoencoder channel multiplier")
    vae_layers_per_block: int = opt(2, "autoencoder ResNet layers per level")
    scaling_factor: float = opt(0.18215, "latent scaling factor (SD-1.x value)")


LDM_PRESETS: dict[str, LDMConfig] = {
    "tiny": LDMConfig(image_size=32, latent_size=16, model_channels=32, channel_mult=(1, 2), attention_resolutions=(1,),
                      num_heads=4, layers_per_block=1, norm_groups=8, vae_channels=16, vae_channel_mult=(1, 2),
                      vae_layers_per_block=1),
    "small": LDMConfig(image_size=64, latent_size=8, model_channels=64, channel_mult=(1, 2, 4), attention_resolutions=(2, 1),
                       num_heads=8, layers_per_block=1, vae_channels=64, vae_channel_mult=(1, 2, 4, 4), vae_layers_per_block=1),
    "paper": LDMConfig(),
}


def ldm_config(preset: str | LDMConfig) -> LDMConfig:
    if isinstance(preset, LDMConfig):
        return preset
    if preset not in LDM_PRESETS:
        raise ValueError(f"unknown LDM preset {preset!r}; choose one of {', '.join(LDM_PRESETS)}")
    return LDM_PRESETS[preset]


def _unet_block_types(cfg: LDMConfig) -> tuple[tuple[str, ...], tuple[str, ...]]:
    # Level i works at downsampling factor 2**i; LDM's "attention resolutions" name those factors.
    attn = [2 ** i in cfg.attention_resolutions for i in range(len(cfg.channel_mult))]
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn))
    return down, up


def unet_kwargs(cfg: LDMConfig, context_dim: int) -> dict:
    down, up = _unet_block_types(cfg)
    return dict(sample_size=cfg.latent_size, in_channels=cfg.latent_channels, out_channels=cfg.latent_channels,
                block_out_channels=tuple(cfg.model_channels * m for m in cfg.channel_mult),
                down_block_types=down, up_block_types=up, layers_per_block=cfg.layers_per_block,
                cross_attention_dim=context_dim, transformer_layers_per_block=cfg.transformer_depth,
                # diffusers' historical naming: for SD-1.x `attention_head_dim` is the number of heads.
                attention_head_dim=cfg.num_heads, norm_num_groups=cfg.norm_groups)


def vae_kwargs(cfg: LDMConfig) -> dict:
    n = len(cfg.vae_channel_mult)
    return dict(in_channels=3, out_channels=3, latent_channels=cfg.latent_channels,
                block_out_channels=tuple(cfg.vae_channels * m for m in cfg.vae_channel_mult),
                down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                layers_per_block=cfg.vae_layers_per_block, norm_num_groups=cfg.norm_groups,
                sample_size=cfg.image_size, scaling_factor=cfg.scaling_factor)


def build_unet(preset: str | LDMConfig, context_dim: int):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**unet_kwargs(ldm_config(preset), context_dim))


def build_vae(preset: str | LDMConfig):
    from diffusers import AutoencoderKL

    return AutoencoderKL(**vae_kwargs(ldm_config(preset)))


def latent_size_for(vae, image_size: int) -> int:
    """Latent side length for an image side: the VAE downsamples by 2 per level but the last."""
    return image_size // (2 ** (len(vae.config.block_out_channels) - 1))


def load_local(folder: str | Path, context_dim: int | None = None):
    """(unet, vae) from a local SD-1.x diffusers folder (``unet/``, ``vae/``); never downloads."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    folder = Path(folder)
    for sub in ("unet", "vae"):
        if not (folder / sub / "config.json").exists():
            raise FileNotFoundError(f"{folder} is not a diffusers SD-1.x folder: {sub}/config.json is missing")
    unet = UNet2DConditionModel.from_pretrained(folder / "unet", local_files_only=True)
    vae = AutoencoderKL.from_pretrained(folder / "vae", local_files_only=True)
    if context_dim is not None and unet.config.cross_attention_dim != context_dim:
        raise ValueError(f"{folder}/unet expects context dim {unet.config.cross_attention_dim}, the text encoder gives {context_dim}")
    return unet, vae


def load_vae(folder: str | Path):
    """An ``AutoencoderKL`` saved by ``rapid train vae`` (``save_pretrained``); never downloads."""
    from diffusers import AutoencoderKL

    folder = Path(folder)
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"{folder} is not a VAE folder (config.json is missing)")
    return AutoencoderKL.from_pretrained(folder, local_files_only=True)


def count_params(module: torch.nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def build_on_meta(fn, *args, **kw):
    """Build a module without allocating weights (parameter counts of the paper preset on a laptop)."""
    with torch.device("meta"):
        return fn(*args, **kw)
