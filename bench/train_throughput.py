"""Training throughput of the latent diffusion step (images/s, achieved TFLOP/s), against an eager fp32 baseline.

    .venv/bin/python bench/train_throughput.py --preset tiny --batch-size 4 --steps 3 --device cpu   # seconds
    python bench/train_throughput.py --preset paper --batch-size 80 --steps 50 --device cuda --precision bf16 \\
        --compile --channels-last --attention flash

Two variants of one optimizer step (AdamW; CKCLIP text tower trained jointly unless --freeze-text):
* ``latents``: precomputed VAE latents (what ``--precompute-latents`` trains on): text encoder + U-Net.
* ``online``: VAE encode of 256 px images (frozen, no grad) + text encoder + U-Net.
Each is measured for the requested configuration and, unless ``--no-baseline``, for the eager fp32 baseline
(SDPA attention, no compile, no channels-last) in the same process, so the ratio is like for like.

Invariants: random weights and synthetic inputs (nothing downloaded, no data needed); warm-up steps (which
include compilation) are excluded; CUDA is synchronised around the timed region; FLOPs per step are counted
once with `torch.utils.flop_counter` on the eager model (forward + backward); an out-of-memory variant is
reported as ``null`` instead of aborting; the last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rapid_pipeline.models import ldm  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TEXT_PRESET = {"tiny": "tiny", "small": "small", "paper": "paper"}


@dataclass
class Setup:
    unet: torch.nn.Module
    vae: torch.nn.Module
    text: torch.nn.Module
    opt: torch.optim.Optimizer
    batch: dict
    device: torch.device
    dtype: torch.dtype
    attention: str


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=sorted(ldm.LDM_PRESETS), help="LDM / CKCLIP architecture preset")
    p.add_argument("--batch-size", type=int, default=4, help="images per step (appendix C: 80)")
    p.add_argument("--baseline-batch-size", type=int, default=None, help="batch of the fp32 baseline (default: same)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation happens here)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--precision", default="bf16", choices=sorted(DTYPES), help="autocast dtype of the measured run")
    p.add_argument("--compile", action="store_true", help="torch.compile the U-Net (and text encoder)")
    p.add_argument("--compile-mode", default="default", help="torch.compile mode (default, max-autotune, ...)")
    p.add_argument("--channels-last", action="store_true", help="U-Net / VAE weights and inputs in channels-last")
    p.add_argument("--attention", default="sdpa", choices=["sdpa", "flash", "efficient", "cudnn", "math", "eager"],
                   help="attention kernel: SDPA auto-select, a forced SDPA backend, or diffusers' eager matmul path")
    p.add_argument("--variants", default="latents,online", help="comma list of: latents, online")
    p.add_argument("--freeze-text", action="store_true", help="do not train the text encoder")
    p.add_argument("--no-baseline", action="store_true", help="skip the eager fp32 baseline")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    return p.parse_args(argv)


def build(args: argparse.Namespace, dtype: torch.dtype, attention: str, channels_last: bool, batch: int) -> Setup:
    from rapid_pipeline.models.ckclip import build_ckclip

    device = torch.device(args.device)
    torch.manual_seed(0)
    text = build_ckclip(TEXT_PRESET[args.preset], vocab_size=21128 if args.preset == "paper" else 4096,
                        entity_dim=100).text_encoder.to(device)
    unet = ldm.build_unet(args.preset, context_dim=text.hidden_size).to(device)
    vae = ldm.build_vae(args.preset).to(device).requires_grad_(False).eval()
    _set_attention(unet, attention)
    if channels_last:
        unet.to(memory_format=torch.channels_last)
        vae.to(memory_format=torch.channels_last)
    text.requires_grad_(not args.freeze_text)
    params = list(unet.parameters()) + ([] if args.freeze_text else list(text.parameters()))
    opt = torch.optim.AdamW(params, lr=5e-5, fused=device.type == "cuda")
    return Setup(unet, vae, text, opt, synthetic_batch(args.preset, batch, device, channels_last), device, dtype, attention)


def _set_attention(unet: torch.nn.Module, attention: str) -> None:
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    unet.set_attn_processor(AttnProcessor() if attention == "eager" else AttnProcessor2_0())


def synthetic_batch(preset: str, n: int, device: torch.device, channels_last: bool) -> dict:
    cfg = ldm.ldm_config(preset)
    g = torch.Generator().manual_seed(0)
    f = 2 ** (len(cfg.vae_channel_mult) - 1)
    images = torch.rand(n, 3, cfg.image_size, cfg.image_size, generator=g) * 2 - 1
    latents = torch.randn(n, cfg.latent_channels, cfg.image_size // f, cfg.image_size // f, generator=g)
    ids = torch.randint(5, 4000, (n, 32), generator=g)
    mask = torch.ones(n, 32, dtype=torch.long)
    ent = torch.randn(n, 32, 100, generator=g)
    emask = torch.zeros(n, 32, dtype=torch.bool)
    emask[:, 3:7] = True
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return {"images": images.to(device).contiguous(memory_format=fmt), "latents": latents.to(device),
            "input_ids": ids.to(device), "attention_mask": mask.to(device), "entity_vectors": ent.to(device),
            "entity_mask": emask.to(device), "t": torch.randint(0, 1000, (n,), generator=g).to(device)}


def _kernel_ctx(attention: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    forced = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
              "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}.get(attention)
    return sdpa_kernel(forced) if forced is not None else contextlib.nullcontext()


def _autocast(s: Setup):
    if s.dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=s.device.type, dtype=s.dtype)


def train_step(s: Setup, unet, text, online: bool) -> None:
    b = s.batch
    with _autocast(s), _kernel_ctx(s.attention):
        if online:
            with torch.no_grad():
                latents = s.vae.encode(b["images"]).latent_dist.sample() * s.vae.config.scaling_factor
        else:
            latents = b["latents"]
        noise = torch.randn_like(latents)
        noisy = latents + noise  # the scheduler's scaling is elementwise and negligible in cost
        context = text(b["input_ids"], b["attention_mask"], b["entity_vectors"], b["entity_mask"])
        pred = unet(noisy, b["t"], encoder_hidden_states=context, return_dict=False)[0]
    loss = F.mse_loss(pred.float(), noise.float())
    loss.backward()
    s.opt.step()
    s.opt.zero_grad(set_to_none=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def count_flops(s: Setup, online: bool) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        train_step(s, s.unet, s.text, online)
    return float(counter.get_total_flops())


def measure(s: Setup, args: argparse.Namespace, online: bool, compile_: bool) -> dict:
    unet, text = s.unet, s.text
    if compile_:
        unet = torch.compile(s.unet, mode=args.compile_mode)
        text = torch.compile(s.text, mode=args.compile_mode)
    for _ in range(args.warmup):
        train_step(s, unet, text, online)
    _sync(s.device)
    if s.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(s.device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        train_step(s, unet, text, online)
    _sync(s.device)
    seconds = time.perf_counter() - t0
    flops = count_flops(s, online)
    n = s.batch["latents"].shape[0]
    out = {"images_per_s": n * args.steps / seconds, "step_ms": 1000 * seconds / args.steps,
           "tflops_per_s": flops * args.steps / seconds / 1e12, "gflop_per_step": flops / 1e9, "batch": n}
    if s.device.type == "cuda":
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated(s.device) / 2**30
    return out


def run_config(args: argparse.Namespace, label: str, dtype: torch.dtype, attention: str, channels_last: bool,
               compile_: bool, batch: int) -> dict:
    results: dict = {}
    try:
        s = build(args, dtype, attention, channels_last, batch)
    except torch.cuda.OutOfMemoryError as exc:
        return {v: {"error": f"OOM: {str(exc)[:200]}"} for v in _variants(args)}
    for variant in _variants(args):
        try:
            results[variant] = measure(s, args, variant == "online", compile_)
        except torch.cuda.OutOfMemoryError as exc:
            results[variant] = {"error": f"OOM: {str(exc)[:200]}"}
        print(f"[{label}] {variant}: {_fmt(results[variant])}", flush=True)
    del s
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return results


def _variants(args: argparse.Namespace) -> list[str]:
    out = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in out if v not in ("latents", "online")]
    if bad:
        raise SystemExit(f"unknown variant(s) {bad}; choose latents, online")
    return out


def _fmt(r: dict) -> str:
    if "error" in r:
        return r["error"]
    return f"{r['images_per_s']:.2f} img/s, {r['step_ms']:.1f} ms/step, {r['tflops_per_s']:.2f} TFLOP/s"


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    meta = {"preset": args.preset, "device": args.device, "torch": torch.__version__, "steps": args.steps,
            "warmup": args.warmup, "gpu": torch.cuda.get_device_name(args.device) if "cuda" in args.device else None}
    measured = run_config(args, "measured", DTYPES[args.precision], args.attention, args.channels_last, args.compile,
                          args.batch_size)
    result = {**meta, "config": {"precision": args.precision, "compile": args.compile, "channels_last": args.channels_last,
                                 "attention": args.attention, "batch_size": args.batch_size}, "measured": measured}
    if not args.no_baseline:
        base = run_config(args, "baseline eager fp32", torch.float32, "sdpa", False, False,
                          args.baseline_batch_size or args.batch_size)
        result["baseline"] = base
        result["speedup"] = {v: _ratio(measured.get(v), base.get(v)) for v in measured}
    print(json.dumps(result), flush=True)
    return result


def _ratio(a: dict | None, b: dict | None) -> float | None:
    if not a or not b or "error" in a or "error" in b:
        return None
    return a["images_per_s"] / b["images_per_s"]


if __name__ == "__main__":
    main()
