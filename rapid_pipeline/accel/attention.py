"""Attention-backend selection for the U-Net, VAE and text encoder (the paper's FlashAttention step).

    from rapid_pipeline.accel.attention import attention_context, install_backend, probe_backends
    install_backend(pipe.unet, "sdpa-flash")          # processors (only flash-attn changes them)
    with attention_context("sdpa-flash"):             # PyTorch SDPA kernel choice, active per call
        pipe.unet(...)

Backends:
* ``auto``: PyTorch's own SDPA dispatch (flash / cuDNN / mem-efficient / math by its heuristics).
* ``sdpa-flash`` / ``sdpa-cudnn`` / ``sdpa-efficient`` / ``sdpa-math``: ONE SDPA kernel, forced with
  ``torch.nn.attention.sdpa_kernel``. diffusers' ``AttnProcessor2_0`` (U-Net, VAE mid-block) and the
  transformers text encoder (``attn_implementation="sdpa"``) all call ``F.scaled_dot_product_attention``,
  so the context reaches any of them, eager or compiled (dynamo traces under it; export bakes the chosen
  kernel into the graph). `rapid compile` forces it on the U-Net only (`compile.attention_for`): the
  text encoder's padding mask and the fp32 VAE are outside what the flash kernel accepts.
* ``flash-attn``: the Dao et al. ``flash_attn`` package (only when importable) through a diffusers
  attention processor on every U-Net ``Attention`` module.
* ``diffusers:<name>``: a backend of diffusers' registry (``attention_dispatch.AttentionBackendName``,
  e.g. ``diffusers:_native_flash``, ``diffusers:_native_cudnn``, ``diffusers:flash``, ``diffusers:sage``,
  ``diffusers:xformers``) called through ``dispatch_attention_fn``. diffusers' ``attention_backend``
  context / ``set_attention_backend`` only reach ``AttentionModuleMixin`` processors, and the SD-style
  ``UNet2DConditionModel`` of diffusers 0.42 uses ``AttnProcessor2_0`` (plain ``F.scaled_dot_product_attention``),
  so the backend is installed here as a processor. ``*_hub`` backends are refused: they download kernels.

Invariant: a backend that cannot run on the device/dtype is reported by `probe_backends` with the
reason (PyTorch's "No available kernel", or the missing package), never silently replaced.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "sdpa-math", "flash-attn")


def _sdpa_backend(name: str):
    from torch.nn.attention import SDPBackend

    return {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
            "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION, "sdpa-math": SDPBackend.MATH}[name]


def diffusers_backends() -> list[str]:
    """Registry names of the installed diffusers usable here (no Hub downloads)."""
    from diffusers.models.attention_dispatch import AttentionBackendName

    return [b.value for b in AttentionBackendName if "hub" not in b.value]


def check_backend(name: str) -> str:
    if name.startswith("diffusers:"):
        if name.split(":", 1)[1] not in diffusers_backends():
            raise ValueError(f"unknown diffusers attention backend {name!r}; choose diffusers:<one of "
                             f"{', '.join(diffusers_backends())}> (Hub-downloaded kernels are not allowed)")
        return name
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)} or diffusers:<name>")
    return name


@contextlib.contextmanager
def attention_context(name: str) -> Iterator[None]:
    """Force the SDPA kernel for calls inside the block (no-op for ``auto`` and ``flash-attn``)."""
    check_backend(name)
    if not name.startswith("sdpa-"):
        yield
        return
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel([_sdpa_backend(name)]):
        yield


def flash_attn_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except Exception:
        return False
    return True


def probe_backend(name: str, device: torch.device, dtype: torch.dtype, head_dim: int = 64) -> str | None:
    """None if `name` runs a small SDPA call on (device, dtype); otherwise the reason it cannot."""
    check_backend(name)
    if name == "flash-attn":
        if not flash_attn_available():
            return "the flash_attn package is not installed"
        if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
            return "flash_attn needs CUDA and fp16/bf16"
        return None
    if name.startswith("diffusers:"):
        return _probe_diffusers(name, device, dtype, head_dim)
    q = torch.randn(1, 2, 16, head_dim, device=device, dtype=dtype)
    try:
        with attention_context(name):
            F.scaled_dot_product_attention(q, q, q)
    except RuntimeError as exc:
        return str(exc).strip().splitlines()[0][:300] or type(exc).__name__
    return None


def probe_backends(device: torch.device, dtype: torch.dtype) -> dict[str, str | None]:
    """{backend: None if usable else reason} for every backend (warnings of failed probes silenced)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {name: probe_backend(name, device, dtype) for name in BACKENDS}


def _probe_diffusers(name: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    q = torch.randn(1, 16, 2, head_dim, device=device, dtype=dtype)  # [B, S, H, D]
    try:
        _dispatch_fn(name)(q, q, q, None)
    except Exception as exc:  # missing package, wrong device/dtype: diffusers' own checks say which
        return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}"
    return None


def _dispatch_fn(name: str):
    """fn(q, k, v, scale) on [B, S, H, D] tensors for `name` (flash-attn or diffusers:<backend>)."""
    if name == "flash-attn":
        def flash(q, k, v, scale):
            from flash_attn import flash_attn_func

            return flash_attn_func(q, k, v, softmax_scale=scale)
        return flash
    from diffusers.models.attention_dispatch import (AttentionBackendName, _check_attention_backend_requirements,
                                                     dispatch_attention_fn)

    backend = AttentionBackendName(name.split(":", 1)[1])
    _check_attention_backend_requirements(backend)  # raises when the backend's package is missing
    return lambda q, k, v, scale: dispatch_attention_fn(q, k, v, scale=scale, backend=backend)


class DispatchAttnProcessor:
    """diffusers attention processor that runs the attention product with `fn` (flash_attn or a diffusers
    registry backend) on [B, S, H, D] tensors. No mask: the U-Net's attentions pass none."""

    def __init__(self, name: str):
        self.name, self.fn = name, _dispatch_fn(name)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **_):
        if attention_mask is not None:
            raise ValueError(f"attention backend {self.name} is installed without mask support")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        four_d = hidden_states.ndim == 4
        if four_d:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if attn.norm_cross and encoder_hidden_states is not None:
            context = attn.norm_encoder_hidden_states(context)
        q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        heads = attn.heads
        split = lambda t: t.view(t.shape[0], t.shape[1], heads, t.shape[-1] // heads)  # noqa: E731  [B,S,H,D]
        out = self.fn(split(q), split(k), split(v), attn.scale)
        out = attn.to_out[1](attn.to_out[0](out.reshape(out.shape[0], out.shape[1], -1)))
        if four_d:
            out = out.transpose(1, 2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def install_backend(module: torch.nn.Module, name: str) -> int:
    """Put the processors `name` needs on every diffusers ``Attention`` in `module`; returns how many."""
    check_backend(name)
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    if name == "flash-attn" and not flash_attn_available():
        raise RuntimeError("--attention flash-attn: the flash_attn package is not installed")
    custom = name == "flash-attn" or name.startswith("diffusers:")
    processor = DispatchAttnProcessor(name) if custom else AttnProcessor2_0()
    count = 0
    for m in module.modules():
        if isinstance(m, Attention):
            m.set_processor(processor)
            count += 1
    return count
