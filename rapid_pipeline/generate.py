"""Text -> image with a pipeline folder.

    rapid generate "一张小炒黄牛肉的照片" --model rapid_home/models/pipeline/food/production -o beef.png
    rapid generate "鱼香肉丝米饭" --domain food --steps 25 --scheduler dpmsolver++ --seed 7 --no-sr -o a.png

``--model`` is a pipeline run folder or a ``production`` pointer file; without it the domain's
``production`` pointer is used, else its newest pipeline. ``--size`` is the diffusion resolution; with
super-resolution (default when the pipeline has one) the PNG is 4x that.
Invariant: the PNG is written atomically (temporary file + rename).
"""

from __future__ import annotations

import argparse
import io
import time
from pathlib import Path

import torch

from .core.atomic import atomic_write_bytes
from .core.home import Home, check_name


def model_dir(home: Home, model: str | None, domain: str) -> Path:
    from .assemble import newest_run
    from .pipeline import resolve_pipeline_dir

    if model:
        return resolve_pipeline_dir(model)
    root = home.models / "pipeline" / check_name(domain, "domain")
    if (root / "production").is_file():
        return resolve_pipeline_dir(root / "production")
    return newest_run(root, "model_index.json", "pipeline", "pass --model DIR or train one (rapid train diffusion)")


def load(folder: Path, device: str, precision: str):
    from .pipeline import RapidDiffusionPipeline
    from .train.common import pick_device

    dev = pick_device(device)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
    if precision == "auto":
        dtype = torch.float16 if dev.type == "cuda" else torch.float32
    if dtype is None:
        raise ValueError(f"unknown precision {precision!r}; choose auto, fp32, fp16 or bf16")
    return RapidDiffusionPipeline.from_pretrained(folder, torch_dtype=dtype, device=dev)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help="the text (Chinese); the pipeline's prompt template is applied")
    parser.add_argument("--model", default=None, help="pipeline folder or production pointer file")
    parser.add_argument("--domain", default="demo", help="domain whose production / newest pipeline is used without --model")
    parser.add_argument("-o", "--output", default="out.png", help="PNG to write")
    parser.add_argument("--steps", type=int, default=50, help="sampling steps (paper: 50 PNDM steps)")
    parser.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (1 = off)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial noise (same seed, same image)")
    parser.add_argument("--size", type=int, default=None, help="diffusion resolution in pixels (default: the model's)")
    parser.add_argument("--scheduler", default="pndm", choices=["pndm", "ddim", "dpmsolver++"], help="sampler")
    parser.add_argument("--negative", default=None, help="negative prompt (default: the empty prompt)")
    parser.add_argument("--no-sr", action="store_true", help="skip ESRGAN x4 super-resolution")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    parser.add_argument("--precision", default="auto", help="auto (fp16 on CUDA, fp32 on CPU), fp32, fp16, bf16")


def main(args: argparse.Namespace, home: Home) -> dict:
    folder = model_dir(home, args.model, args.domain)
    pipe = load(folder, args.device, args.precision)
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    image = pipe(args.prompt, num_inference_steps=args.steps, guidance_scale=args.guidance, negative_prompt=args.negative,
                 height=args.size, width=args.size, generator=gen, scheduler=args.scheduler,
                 super_resolution=not args.no_sr).images[0]
    seconds = time.perf_counter() - t0
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    atomic_write_bytes(Path(args.output), buf.getvalue())
    return {"output": str(Path(args.output).resolve()), "model": str(folder), "size": list(image.size),
            "seconds": round(seconds, 3), "seed": args.seed, "steps": args.steps,
            "text": f"wrote {args.output} ({image.size[0]}x{image.size[1]}) in {seconds:.1f}s from {folder}"}
