"""Build an optimized artifact of a pipeline: precision + attention backend + compiler, checked against eager.

    rapid compile --model rapid_home/models/pipeline/demo/<run> --precision fp16 --attention sdpa-flash \\
        --compiler aot-inductor --channels-last --batch 1 --size 256 --steps 50
    rapid compile --model DIR --compiler inductor --cuda-graphs        # torch.compile, reduce-overhead
    rapid compile --model DIR --compiler none --attention sdpa-math    # eager with options only

What it does (the paper's section 4.4, with PyTorch 2 tools in place of BladeDISC where that is
not installed): casts the text encoder, U-Net and ESRGAN to ``--precision`` (the VAE decoder stays
fp32: fp16 VAE decodes overflow), optionally fuses the U-Net's QKV projections and moves conv nets to
channels-last, selects the attention kernel (`accel.attention`), and compiles each component with
``torch.compile`` (inductor; ``reduce-overhead`` = CUDA graphs), AOTInductor (``torch.export`` +
``aoti_compile_and_package``: a ``.pt2`` that serving loads without recompiling, CPU included) or
``torch_blade`` (BladeDISC, when importable). Components are compiled for static shapes
(``--batch``, ``--size``; classifier-free guidance doubles the U-Net batch); other shapes fall back to
eager at run time.

Invariants:
* Output ``models/compiled/<cache_key>/`` (see `accel.artifact`) is built in a staging folder and
  renamed into place with ``parity.json`` written last; the same key again is a cache hit (no compile).
* Parity is measured, never assumed: U-Net max abs error on a fixed input and final-image PSNR vs eager
  fp32 for a fixed prompt/seed, against the bounds in `artifact.parity_bounds`.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..core.atomic import atomic_write_json, publish_dir, staging_dir
from ..core.config import add_config_args, config_from_args, opt
from ..core.faults import fault_point
from ..core.fingerprint import fingerprint_path
from ..core.home import Home
from ..core.lineage import normalize_uri
from ..core.stage import DatasetRef, StageReport, StageResult, run_stage
from . import artifact as A
from .attention import BACKENDS, attention_context, check_backend, install_backend, probe_backend

STAGE = "compile"
COMPONENTS = ("text_encoder", "unet", "vae_decoder", "super_resolution")
COMPILERS = ("inductor", "aot-inductor", "torch_blade", "none")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class CompileConfig:
    precision: str = opt("fp32", "fp32, fp16 or bf16 for text encoder, U-Net and ESRGAN (the VAE decoder stays fp32)")
    attention: str = opt("auto", f"U-Net attention kernel: {', '.join(BACKENDS)}, or diffusers:<registry backend> "
                         "(e.g. diffusers:_native_cudnn)")
    compiler: str = opt("inductor", f"{', '.join(COMPILERS)} (aot-inductor saves .pt2 packages serving loads as is)")
    inductor_mode: str = opt("auto", "torch.compile mode; auto = max-autotune-no-cudagraphs on CUDA "
                             "(reduce-overhead with --cuda-graphs), default on CPU")
    channels_last: bool = opt(False, "channels-last memory format for the conv nets (U-Net, VAE, ESRGAN)")
    fuse_qkv: bool = opt(False, "fuse the U-Net / VAE attention Q,K,V projections into one matmul")
    cuda_graphs: bool = opt(False, "capture CUDA graphs (static shapes; needs CUDA and --compiler inductor)")
    batch: int = opt(1, "prompts per call the artifact is compiled for")
    size: int = opt(256, "diffusion resolution in pixels (final image is 4x with super-resolution)")
    steps: int = opt(50, "sampler steps of the final-image parity check")
    guidance_scale: float = opt(7.5, "classifier-free guidance of the parity check (> 1 doubles the U-Net batch)")
    prompt: str = opt("一张小炒黄牛肉的照片", "prompt of the final-image parity check")
    seed: int = opt(0, "seed of the parity inputs")
    components: tuple[str, ...] = opt(COMPONENTS, f"components to optimize: {', '.join(COMPONENTS)}")
    device: str = opt("auto", "auto (CUDA if available), cpu, cuda, cuda:N")


@dataclass
class Optimized:
    pipe: Any
    compile_seconds: dict[str, float]
    calls: dict[str, Callable]  # component -> callable on example inputs (for parity)
    inputs: dict[str, tuple]


# ------------------------------------------------------------------------------------- setup
def resolve_device(name: str) -> torch.device:
    """``auto`` = CUDA when available, else CPU (the training stages' rule, so both pick the same device)."""
    from ..train.common import pick_device

    return pick_device(name)


def validate(config: CompileConfig, dev: torch.device) -> None:
    if config.precision not in DTYPES:
        raise ValueError(f"--precision must be one of {', '.join(DTYPES)}, got {config.precision!r}")
    if config.compiler not in COMPILERS:
        raise ValueError(f"--compiler must be one of {', '.join(COMPILERS)}, got {config.compiler!r}")
    bad = [c for c in config.components if c not in COMPONENTS]
    if bad or not config.components:
        raise ValueError(f"--components: unknown {bad}; choose from {', '.join(COMPONENTS)}")
    if config.cuda_graphs and (dev.type != "cuda" or config.compiler != "inductor"):
        raise ValueError("--cuda-graphs needs a CUDA device and --compiler inductor (mode reduce-overhead)")
    if config.fuse_qkv and (config.attention == "flash-attn" or config.attention.startswith("diffusers:")):
        raise ValueError(f"--fuse-qkv uses diffusers' fused SDPA processor; it cannot be combined with --attention {config.attention}")
    if config.compiler == "torch_blade":
        _require_blade()
    reason = probe_backend(check_backend(config.attention), dev, DTYPES[config.precision])
    if reason:
        raise ValueError(f"--attention {config.attention} cannot run on {dev} / {config.precision}: {reason}")


def _require_blade():
    try:
        import torch_blade
    except Exception as exc:
        raise ValueError(f"--compiler torch_blade: BladeDISC's torch_blade is not importable ({type(exc).__name__}: {exc})")
    return torch_blade


def load_pipeline(model_dir: Path, dev: torch.device):
    from ..pipeline import RapidDiffusionPipeline

    return RapidDiffusionPipeline.from_pretrained(model_dir, device=dev)


def apply_model_options(pipe, config: CompileConfig) -> None:
    """Precision, fused QKV, attention processors, channels-last on the eager modules (in place)."""
    dtype = DTYPES[config.precision]
    if config.fuse_qkv:
        pipe.unet.fuse_qkv_projections()
        pipe.vae.fuse_qkv_projections()
    if config.attention == "flash-attn" or config.attention.startswith("diffusers:"):
        install_backend(pipe.unet, config.attention)  # processors; sdpa-* work through a context instead
    for name in ("text_encoder", "unet", "super_resolution"):
        module = getattr(pipe, name, None)
        if module is not None and dtype != torch.float32:
            _quiet_cast(module, dtype)
    if config.channels_last:
        for module in (pipe.unet, pipe.vae, pipe.super_resolution):
            if module is not None:
                module.to(memory_format=torch.channels_last)


def _quiet_cast(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """``module.to(dtype)`` without diffusers' per-call "kept in float32: []" warning (nothing is kept)."""
    from diffusers.utils import logging as dlog

    level = dlog.get_verbosity()
    dlog.set_verbosity_error()
    try:
        module.to(dtype=dtype)
    finally:
        dlog.set_verbosity(level)


# ------------------------------------------------------------------------------------- components
class UNetRunner(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, context):
        return self.unet(sample, timestep, encoder_hidden_states=context, return_dict=False)[0]


class VAEDecodeRunner(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, z):
        return self.vae.decode(z, return_dict=False)[0]


class TextRunner(torch.nn.Module):
    def __init__(self, text_encoder, keys: tuple[str, ...]):
        super().__init__()
        self.text_encoder, self.keys = text_encoder, keys

    def forward(self, *tensors):
        out = self.text_encoder(**dict(zip(self.keys, tensors)))
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out


def _module_dtype(module) -> torch.dtype:
    return next(module.parameters()).dtype


def _tokenize(pipe, texts: list[str]) -> dict[str, torch.Tensor]:
    return dict(pipe.tokenizer(texts, max_length=pipe.config.max_length))


def runner_for(pipe, name: str, config: CompileConfig) -> torch.nn.Module:
    if name == "unet":
        return UNetRunner(pipe.unet)
    if name == "vae_decoder":
        return VAEDecodeRunner(pipe.vae)
    if name == "text_encoder":
        return TextRunner(pipe.text_encoder, tuple(_tokenize(pipe, [config.prompt])))
    return pipe.super_resolution


def example_inputs(pipe, name: str, config: CompileConfig, dev: torch.device) -> tuple:
    """Fixed, seeded inputs of the compiled shapes (also the parity inputs)."""
    g = torch.Generator().manual_seed(config.seed)
    b, lat = config.batch, config.size // pipe.vae_scale_factor
    if name == "unet":
        b2 = 2 * b if config.guidance_scale > 1.0 else b
        dt = _module_dtype(pipe.unet)
        sample = torch.randn(b2, pipe.unet.config.in_channels, lat, lat, generator=g)
        ctx = torch.randn(b2, pipe.config.max_length, int(pipe.unet.config.cross_attention_dim), generator=g)
        return sample.to(dev, dt), torch.tensor(500, dtype=torch.long, device=dev), ctx.to(dev, dt)
    if name == "vae_decoder":
        return (torch.randn(b, pipe.vae.config.latent_channels, lat, lat, generator=g).to(dev),)
    if name == "text_encoder":
        batch = _tokenize(pipe, [config.prompt] * b)
        return tuple(_cast(v, dev, _module_dtype(pipe.text_encoder)) for v in batch.values())
    return (torch.rand(b, 3, config.size, config.size, generator=g).to(dev, _module_dtype(pipe.super_resolution)),)


def _cast(t: torch.Tensor, dev: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dev, dtype) if t.is_floating_point() else t.to(dev)


# ------------------------------------------------------------------------------------- compile
def _inductor_mode(config: CompileConfig, dev: torch.device) -> str | None:
    if config.cuda_graphs:  # only these two modes capture CUDA graphs
        return "max-autotune" if config.inductor_mode.startswith("max-autotune") else "reduce-overhead"
    if config.inductor_mode != "auto":
        return config.inductor_mode
    return "max-autotune-no-cudagraphs" if dev.type == "cuda" else None


def compile_component(runner, args: tuple, name: str, config: CompileConfig, dev: torch.device, folder: Path,
                      load_only: bool) -> Callable:
    """The optimized callable of one component (building its saved form unless `load_only`)."""
    if config.compiler == "none":
        return runner
    if config.compiler == "inductor":
        return torch.compile(runner, mode=_inductor_mode(config, dev), dynamic=False)
    if config.compiler == "aot-inductor":
        return _aot_inductor(runner, args, folder / f"{name}.pt2", attention_for(name, config), load_only)
    return _blade(runner, args, folder / f"{name}.blade.pt", attention_for(name, config), load_only)


def _aot_inductor(runner, args: tuple, path: Path, attention: str, load_only: bool) -> Callable:
    if not load_only:
        with torch.no_grad(), attention_context(attention):
            exported = torch.export.export(runner, args, strict=False)
            torch._inductor.aoti_compile_and_package(exported, package_path=str(path))
    if not path.exists():
        raise A.ArtifactError(f"{path} is missing from the artifact")
    return torch._inductor.aoti_load_package(str(path))


def _blade(runner, args: tuple, path: Path, attention: str, load_only: bool) -> Callable:
    torch_blade = _require_blade()
    if not load_only:
        with torch.no_grad(), attention_context(attention):
            optimized = torch_blade.optimize(runner, allow_tracing=True, model_inputs=args)
        torch.jit.save(optimized, str(path))
    return torch.jit.load(str(path))


def attention_for(name: str, config: CompileConfig) -> str:
    """The attention backend of one component: ``--attention`` is the U-Net's (where the paper applies
    FlashAttention). The text encoder passes a padding mask, which the flash kernel cannot take, and the
    VAE decoder stays fp32, which flash / cuDNN cannot take: they keep PyTorch's own choice."""
    return config.attention if name == "unet" else "auto"


def call_optimized(fn: Callable, args: tuple, config: CompileConfig, attention: str = "auto") -> torch.Tensor:
    """One call under the attention context; CUDA-graph outputs are copied (the graph reuses its buffers)."""
    with torch.no_grad(), attention_context(attention):
        if config.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        out = fn(*args)
    if isinstance(out, (list, tuple)):
        out = out[0]
    return out.clone() if config.cuda_graphs else out


# ------------------------------------------------------------------------------------- swap into the pipeline
def _same(args: tuple, expected: tuple) -> bool:
    return all(a.shape == e.shape and a.dtype == e.dtype and a.device == e.device for a, e in zip(args, expected))


def swap(pipe, name: str, fn: Callable, expected: tuple, config: CompileConfig) -> None:
    """Replace the pipeline step of `name` by `fn` for the compiled shapes (eager otherwise)."""
    {"unet": _swap_unet, "vae_decoder": _swap_vae, "text_encoder": _swap_text,
     "super_resolution": _swap_sr}[name](pipe, fn, expected, config)


def _swap_unet(pipe, fn, expected, config) -> None:
    eager = pipe.unet_eps

    def unet_eps(latents, t, context):
        args = (latents, t.reshape(()).to(torch.long), context)
        return call_optimized(fn, args, config, config.attention) if _same(args, expected) else eager(latents, t, context)

    pipe.unet_eps = unet_eps


def _swap_vae(pipe, fn, expected, config) -> None:
    eager, scale = pipe.decode_latents, pipe.vae.config.scaling_factor

    def decode_latents(latents):
        z = latents.float() / scale
        if not _same((z,), expected):
            return eager(latents)
        return ((call_optimized(fn, (z,), config).float() + 1) / 2).clamp(0, 1)

    pipe.decode_latents = decode_latents


def _swap_text(pipe, fn, expected, config) -> None:
    eager = pipe.encode_text

    def encode_text(texts):
        dev, dt = expected[0].device, _module_dtype(pipe.text_encoder)
        args = tuple(_cast(v, dev, dt) for v in _tokenize(pipe, list(texts)).values())
        if not _same(args, expected):
            return eager(texts)
        return call_optimized(fn, args, config).to(pipe.unet.dtype)

    pipe.encode_text = encode_text


def _swap_sr(pipe, fn, expected, config) -> None:
    eager = pipe.upscale

    def upscale(images):
        x = images.to(expected[0].device, expected[0].dtype)
        return call_optimized(fn, (x,), config).float().clamp(0, 1) if _same((x,), expected) else eager(images)

    pipe.upscale = upscale


# ------------------------------------------------------------------------------------- build
def build_optimized(model_dir: Path | None, config: CompileConfig, dev: torch.device, folder: Path,
                    load_only: bool, pipe: Any = None, warmup: bool = True) -> Optimized:
    """Load the pipeline (or take `pipe`, changed in place), apply the options, compile (or load)
    each component and swap it in."""
    pipe = load_pipeline(model_dir, dev) if pipe is None else pipe.to(dev)
    apply_model_options(pipe, config)
    out = Optimized(pipe, {}, {}, {})
    for name in config.components:
        if name == "super_resolution" and pipe.super_resolution is None:
            continue
        args = example_inputs(pipe, name, config, dev)
        t0 = time.perf_counter()
        fn = compile_component(runner_for(pipe, name, config), args, name, config, dev, folder, load_only)
        if warmup:  # JIT compilers compile on the first call: here, not in the first request
            call_optimized(fn, args, config, attention_for(name, config))
        out.compile_seconds[name] = round(time.perf_counter() - t0, 3)
        swap(pipe, name, fn, args, config)
        out.calls[name], out.inputs[name] = fn, args
    return out


# ------------------------------------------------------------------------------------- parity
def _parity_image(pipe, config: CompileConfig) -> torch.Tensor:
    gen = torch.Generator().manual_seed(config.seed)
    return pipe([config.prompt] * config.batch, num_inference_steps=config.steps, guidance_scale=config.guidance_scale,
                generator=gen, height=config.size, width=config.size, output_type="pt").images


@torch.no_grad()
def eager_reference(model_dir: Path, config: CompileConfig, dev: torch.device) -> dict[str, Any]:
    """Eager fp32 outputs of every component on the fixed inputs, and the final image."""
    pipe = load_pipeline(model_dir, dev)
    fp32 = dataclasses.replace(config, precision="fp32")
    ref = {"components": {}, "image": _parity_image(pipe, config).float()}
    for name in config.components:
        if name == "super_resolution" and pipe.super_resolution is None:
            continue
        args = example_inputs(pipe, name, fp32, dev)
        ref["components"][name] = call_optimized(runner_for(pipe, name, config), args, fp32).float().cpu()
    del pipe
    _free(dev)
    return ref


def _free(dev: torch.device) -> None:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


@torch.no_grad()
def measure_parity(opt: Optimized, ref: dict, config: CompileConfig) -> dict[str, Any]:
    errors = {}
    for name, fn in opt.calls.items():
        out = call_optimized(fn, opt.inputs[name], config, attention_for(name, config)).float().cpu()
        errors[name] = (out - ref["components"][name]).abs().max().item()
    image = _parity_image(opt.pipe, config).float()
    unet_opt = call_optimized(opt.calls["unet"], opt.inputs["unet"], config, config.attention) if "unet" in opt.calls else None
    unet_ref = ref["components"].get("unet")
    if unet_opt is None:  # U-Net not optimized: it is the eager module in another precision
        unet_ref = unet_opt = torch.zeros(1)
    return A.parity_record(unet_ref, unet_opt.cpu(), ref["image"], image, config.precision, errors)


# ------------------------------------------------------------------------------------- run
def build_artifact(model_dir: Path, config: CompileConfig, dev: torch.device, folder: Path, parts: dict) -> dict:
    ref = eager_reference(model_dir, config, dev)
    stage = staging_dir(folder)
    fault_point(STAGE, "start")
    opt = build_optimized(model_dir, config, dev, stage, load_only=False)
    parity = measure_parity(opt, ref, config)
    files = sorted(p.name for p in stage.iterdir())
    meta = {"options": dataclasses.asdict(config), "key_parts": parts, "cache_key": A.cache_key(parts),
            "model_dir": str(model_dir), "compile_seconds": opt.compile_seconds, "files": files}
    atomic_write_json(stage / A.ARTIFACT_JSON, meta)
    fault_point(STAGE, "mid_write")
    atomic_write_json(stage / A.PARITY_JSON, parity)  # last: marks the artifact complete
    publish_dir(stage, folder)
    fault_point(STAGE, "end")
    return {"parity": parity, "compile_seconds": opt.compile_seconds}


def run(config: CompileConfig, home: Home, model_dir: str | Path, force: bool = False) -> StageReport:
    from ..pipeline import resolve_pipeline_dir

    model = resolve_pipeline_dir(model_dir)
    dev = resolve_device(config.device)
    config = dataclasses.replace(config, device=str(dev))  # "auto" resolved: the key names the real device
    validate(config, dev)
    model_fp = fingerprint_path(model)
    parts = A.key_parts(model_fp, dataclasses.asdict(config), dev)
    key = A.cache_key(parts)
    folder = A.artifact_dir(home, key)

    def body(report: StageReport) -> StageResult:
        hit = A.is_complete(folder)
        extra = _hit_extra(folder) if hit else build_artifact(model, config, dev, folder, parts)
        extra |= {"cache_key": key, "artifact_dir": str(folder), "cache_hit": hit, "device_model": parts["device_model"]}
        return StageResult(outputs=[DatasetRef.of(folder)], extra=extra)

    inputs = [DatasetRef(normalize_uri(model), model_fp)]
    return run_stage(home, STAGE, config, inputs, body, domain="all", partition=key, force=force)


def _hit_extra(folder: Path) -> dict:
    meta, parity = A.read_artifact(folder)
    return {"parity": parity, "compile_seconds": meta["compile_seconds"]}


# ------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="pipeline folder (models/pipeline/<domain>/<run> or a production pointer)")
    parser.add_argument("--force", action="store_true", help="bypass the stage step cache (an existing artifact is still reused)")
    add_config_args(parser, CompileConfig)


def main(args: argparse.Namespace, home: Home) -> StageReport:
    config = config_from_args(CompileConfig(), args)
    report = run(config, home, args.model, force=args.force)
    parity = report.extra.get("parity", {})
    if not parity.get("ok", True):
        import sys

        print(f"rapid compile: WARNING parity outside bounds: {parity}", file=sys.stderr)
    return report
