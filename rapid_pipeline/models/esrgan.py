"""ESRGAN x4 super-resolution: RRDBNet generator (spandrel), U-Net discriminator with spectral norm,
VGG19 perceptual features.

    from rapid_pipeline.models.esrgan import build_generator, load_generator, UNetDiscriminatorSN
    g = build_generator(num_blocks=23, num_features=64, growth=32)   # paper, Table 6 (~16.7M params)
    g = load_generator("models/esrgan/demo/<run>/")                  # our folder, or any ESRGAN .pth

Invariants:
* The generator IS spandrel's ``RRDBNet`` (old-arch keys ``model.N...``), so every published
  ``generator.safetensors`` with growth 32 also loads with ``spandrel.ModelLoader``. spandrel hard-codes
  growth 32; for other growths (the tiny preset) the RRDB blocks are rebuilt from spandrel's own
  ``RRDB`` block with the requested growth, and `load_generator` infers it from tensor shapes.
* Checkpoints are read only through ``core.checkpoint.load_state_dict`` (weights_only, unwraps
  realesrgan's ``params_ema`` / ``params``). Real-ESRGAN new-arch keys (``conv_first``,
  ``body.N.rdb1.conv1``, ...) are renamed to spandrel's old-arch keys by `to_old_arch`.
* VGG19 weights come only from a local file; there is no silent random-init perceptual network.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import spectral_norm

from ..core.checkpoint import CheckpointError, load_state_dict

# Real-ESRGAN ("new arch") name -> spandrel ("old arch") name, for x4 models.
_NEW_TO_OLD_FIXED = {"conv_first": "model.0", "conv_up1": "model.3", "conv_up2": "model.6",
                     "conv_hr": "model.8", "conv_last": "model.10"}
_BODY_NEW = re.compile(r"^(?:body|RRDB_trunk)\.(\d+)\.(?:rdb|RDB)(\d)\.conv(\d)\.(weight|bias)$")
# The original ESRGAN repository (RRDB_ESRGAN_x4.pth) names the same layers differently.
_ESRGAN_ALIASES = {"trunk_conv": "conv_body", "upconv1": "conv_up1", "upconv2": "conv_up2", "HRconv": "conv_hr"}
_BODY_OLD = re.compile(r"^model\.1\.sub\.(\d+)\.RDB(\d)\.conv(\d)\.0\.(weight|bias)$")

# ImageNet statistics: torchvision's VGG19 was trained on inputs normalised with them.
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
VGG19_CONV5_4 = 34  # index of conv5_4 in torchvision's vgg19().features


def build_generator(num_blocks: int = 23, num_features: int = 64, growth: int = 32, scale: int = 4) -> nn.Module:
    """spandrel RRDBNet (x`scale`); growth != 32 swaps in RRDB blocks of that growth."""
    from spandrel.architectures.ESRGAN import ESRGAN
    from spandrel.architectures.__arch_helpers import block as B

    model = ESRGAN(in_nc=3, out_nc=3, num_filters=num_features, num_blocks=num_blocks, scale=scale)
    if growth != 32:  # spandrel fixes gc=32 in RRDBNet; its RRDB block takes any gc
        trunk = model.model[1].sub
        for i in range(num_blocks):
            trunk[i] = B.RRDB(nf=num_features, kernel_size=3, gc=growth, stride=1, bias=True, pad_type="zero",
                              norm_type=None, act_type="leakyrelu", mode="CNA")
    model.arch_config = {"num_blocks": num_blocks, "num_features": num_features, "growth": growth, "scale": scale}
    return model


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def to_old_arch(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename Real-ESRGAN / ESRGAN new-arch keys to spandrel old-arch keys (old-arch input passes through)."""
    if "conv_first.weight" not in state:
        return dict(state)
    nb = 1 + max(int(m.group(1)) for k in state if (m := _BODY_NEW.match(k)))
    out = {}
    for key, value in state.items():
        if m := _BODY_NEW.match(key):
            out[f"model.1.sub.{m[1]}.RDB{m[2]}.conv{m[3]}.0.{m[4]}"] = value
            continue
        name, _, kind = key.rpartition(".")
        name = _ESRGAN_ALIASES.get(name, name)
        if name == "conv_body":
            out[f"model.1.sub.{nb}.{kind}"] = value
        elif name in _NEW_TO_OLD_FIXED:
            out[f"{_NEW_TO_OLD_FIXED[name]}.{kind}"] = value
        else:
            raise CheckpointError(f"unexpected key {key!r} in a Real-ESRGAN x4 checkpoint")
    return out


def to_new_arch(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """spandrel old-arch keys -> Real-ESRGAN new-arch keys (the format realesrgan/basicsr writes)."""
    old_to_new = {v: k for k, v in _NEW_TO_OLD_FIXED.items()}
    nb = infer_arch(state)["num_blocks"]
    old_to_new[f"model.1.sub.{nb}"] = "conv_body"
    out = {}
    for key, value in state.items():
        if m := _BODY_OLD.match(key):
            out[f"body.{m[1]}.rdb{m[2]}.conv{m[3]}.{m[4]}"] = value
        else:
            name, _, kind = key.rpartition(".")
            out[f"{old_to_new[name]}.{kind}"] = value
    return out


def infer_arch(state: dict[str, torch.Tensor]) -> dict[str, int]:
    """(num_blocks, num_features, growth, scale) from old-arch tensor shapes."""
    blocks = {int(m.group(1)) for k in state if (m := _BODY_OLD.match(k))}
    if "model.0.weight" not in state or not blocks:
        raise CheckpointError("not an ESRGAN RRDBNet state dict (no model.0 / RRDB trunk keys)")
    convs = [int(k.split(".")[1]) for k in state if k.startswith("model.") and k.endswith(".weight")]
    n_up = (max(convs) - 4) // 3  # layout: 0, 1, [up, conv, act] * n_up, hr conv, act, last conv
    return {"num_blocks": max(blocks) + 1, "num_features": int(state["model.0.weight"].shape[0]),
            "growth": int(state["model.1.sub.0.RDB1.conv1.0.weight"].shape[0]), "scale": 2 ** n_up}


def generator_from_state(state: dict[str, torch.Tensor]) -> nn.Module:
    """Build the matching generator and load `state` strictly (spandrel's loader when growth is 32)."""
    state = to_old_arch(state)
    arch = infer_arch(state)
    if arch["growth"] == 32:
        from spandrel import ModelLoader

        model = ModelLoader().load_from_state_dict(state).model
        model.arch_config = arch
        return model
    model = build_generator(**arch)
    model.load_state_dict(state, strict=True)
    return model


def load_generator(path: str | Path) -> nn.Module:
    """A generator from a folder (``generator.safetensors``) or a checkpoint file (.pth/.safetensors)."""
    path = Path(path)
    if path.is_dir():
        path = path / "generator.safetensors"
    return generator_from_state(load_state_dict(path))


def init_generator_from(model: nn.Module, path: str | Path) -> nn.Module:
    """Copy weights from a local ESRGAN / Real-ESRGAN checkpoint into `model` (shapes must match)."""
    state = to_old_arch(load_state_dict(path))
    want = getattr(model, "arch_config", None)
    have = infer_arch(state)
    if want is not None and want != have:
        raise CheckpointError(f"{path}: checkpoint architecture {have} does not match the configured {want}")
    model.load_state_dict(state, strict=True)
    return model


def write_generator_config(model: nn.Module, folder: Path) -> None:
    from ..core.atomic import atomic_write_json

    atomic_write_json(Path(folder) / "config.json", {"type": "RRDBNet", "in_channels": 3, "out_channels": 3,
                                                   **model.arch_config})


def read_generator_config(folder: Path) -> dict:
    return json.loads((Path(folder) / "config.json").read_text())


class UNetDiscriminatorSN(nn.Module):
    """U-Net discriminator with spectral norm (the Real-ESRGAN design, Table 6: 64 features, skips).

    Three stride-2 downsampling convs (nf -> 2nf -> 4nf -> 8nf), three bilinear-upsampling convs back
    to nf with additive skip connections, two more convs, and a 1-channel per-pixel realness map.
    Every conv but the first and the last is spectrally normalised (stable GAN training).
    """

    def __init__(self, in_channels: int = 3, num_features: int = 64, skip_connection: bool = True):
        super().__init__()
        nf = num_features
        self.skip_connection = skip_connection
        self.conv_in = nn.Conv2d(in_channels, nf, 3, 1, 1)
        widths = [nf, nf * 2, nf * 4, nf * 8]
        self.down = nn.ModuleList(spectral_norm(nn.Conv2d(widths[i], widths[i + 1], 4, 2, 1, bias=False))
                                  for i in range(3))
        self.up = nn.ModuleList(spectral_norm(nn.Conv2d(widths[i + 1], widths[i], 3, 1, 1, bias=False))
                                for i in reversed(range(3)))
        self.refine = nn.ModuleList(spectral_norm(nn.Conv2d(nf, nf, 3, 1, 1, bias=False)) for _ in range(2))
        self.conv_out = nn.Conv2d(nf, 1, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = lambda t: F.leaky_relu(t, 0.2)  # noqa: E731
        feats = [act(self.conv_in(x))]
        for conv in self.down:
            feats.append(act(conv(feats[-1])))
        h = feats.pop()
        for conv in self.up:
            h = act(conv(F.interpolate(h, scale_factor=2, mode="bilinear", align_corners=False)))
            skip = feats.pop()
            h = h + skip if self.skip_connection else h
        for conv in self.refine:
            h = act(conv(h))
        return self.conv_out(h)


class VGGFeatures(nn.Module):
    """VGG19 features up to conv5_4 *before* its ReLU (ESRGAN's perceptual loss), frozen.

    Inputs are images in [0, 1]; they are normalised with ImageNet statistics here.
    """

    def __init__(self, weights_path: str | Path):
        super().__init__()
        from torchvision.models import vgg19

        vgg = vgg19(weights=None)
        state = load_state_dict(weights_path)
        needed = {k for k in vgg.state_dict() if k.startswith("features.") and int(k.split(".")[1]) <= VGG19_CONV5_4}
        missing = sorted(needed - set(state))
        if missing:
            raise CheckpointError(f"{weights_path} is not a torchvision VGG19 state dict (missing {missing[:3]})")
        vgg.load_state_dict(state, strict=False)
        self.features = vgg.features[: VGG19_CONV5_4 + 1].eval().requires_grad_(False)
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features((x - self.mean) / self.std)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR (dB) of images in [0, 1]; identical images give +inf."""
    mse = F.mse_loss(a.clamp(0, 1), b.clamp(0, 1)).item()
    return float("inf") if mse == 0 else 10.0 * torch.log10(torch.tensor(1.0 / mse)).item()
