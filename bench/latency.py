"""Table 3 of the paper, per component: eager fp32 against each optimisation, all in one process.

    python bench/latency.py --preset tiny --device cpu                      # seconds, structure only
    python bench/latency.py --preset paper --device cuda --size 1024        # final 1024 px = 256 base + x4 ESRGAN
    python bench/latency.py --model rapid_home/models/pipeline/demo/<run> --device cuda --variants eager,fp16-flash-inductor

Per variant (a `rapid_pipeline.accel.compile.CompileConfig` applied to a fresh copy of the same
weights): text encoder (cond + uncond), U-Net over N sampler steps (50 PNDM by default; the loop as
the pipeline runs it, scheduler included), VAE decoder, ESRGAN x4, and the whole text -> image call.
Each is warmed up, then timed ``--iters`` times (CUDA events + synchronize on GPU, perf_counter on
CPU); the median is reported, with the ratio eager / variant. Then: batched throughput (images/s)
at ``--throughput-batches`` and a fewer-step mode (DPM-Solver++, ``--fast-steps`` steps).

Random weights are fine for latency (``--preset``), or give a pipeline folder (``--model``).
The issue's goals (paper preset, H100, batch 1, 50 PNDM steps, text -> 1024 px) are printed next to
the measurements; nothing here asserts a speed. The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from rapid_pipeline.accel.compile import CompileConfig, build_optimized, resolve_device, validate  # noqa: E402
from rapid_pipeline.pipeline import make_scheduler  # noqa: E402

COMPONENTS = ("text_encoder", "unet", "vae_decoder", "super_resolution", "total")
# Goals from the issue (paper preset, H100, batch 1, 50 PNDM steps, 256 -> 1024 px).
GOALS = {"total_ms": 120.0, "unet_ms_per_step": 2.0, "super_resolution_ms": 10.0, "vae_decoder_ms": 4.0,
         "throughput_images_per_s": 20.0, "fast_total_ms": 50.0}

# name -> CompileConfig changes on top of eager fp32. "{lp}" is fp16 on CUDA, bf16 on CPU.
VARIANTS: dict[str, dict[str, Any]] = {
    "eager": {"compiler": "none"},
    "lowp": {"compiler": "none", "precision": "{lp}"},
    "lowp-flash": {"compiler": "none", "precision": "{lp}", "attention": "sdpa-flash"},
    "lowp-flash-cl": {"compiler": "none", "precision": "{lp}", "attention": "sdpa-flash", "channels_last": True},
    "lowp-flash-inductor": {"compiler": "inductor", "precision": "{lp}", "attention": "sdpa-flash"},
    "lowp-flash-inductor-cudagraphs": {"compiler": "inductor", "precision": "{lp}", "attention": "sdpa-flash",
                                       "cuda_graphs": True},
    "lowp-flash-aot": {"compiler": "aot-inductor", "precision": "{lp}", "attention": "sdpa-flash"},
    "sdpa-math": {"compiler": "none", "attention": "sdpa-math"},
    "fuse-qkv": {"compiler": "none", "fuse_qkv": True},
    "inductor": {"compiler": "inductor"},
}
# AOTInductor ("lowp-flash-aot") is left out of the default: exporting + compiling the paper U-Net takes minutes.
DEFAULT_CUDA = ("eager", "lowp", "lowp-flash", "lowp-flash-cl", "lowp-flash-inductor", "lowp-flash-inductor-cudagraphs")
DEFAULT_CPU = ("eager", "lowp", "lowp-flash", "sdpa-math")  # compiling on a small CPU takes minutes per variant


# ----------------------------------------------------------------------------------------- timing
class Timer:
    """Median wall time of `fn` after warm-up; CUDA events + synchronize on GPU."""

    def __init__(self, dev: torch.device, warmup: int, iters: int):
        self.dev, self.warmup, self.iters = dev, warmup, iters

    def _once(self, fn: Callable[[], Any]) -> float:
        if self.dev.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(self.dev)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(self.dev)
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1000.0

    def __call__(self, fn: Callable[[], Any]) -> float:
        for _ in range(self.warmup):
            fn()
        return statistics.median(self._once(fn) for _ in range(self.iters))


# ----------------------------------------------------------------------------------------- pipeline
def base_pipeline(args: argparse.Namespace):
    """The weights every variant starts from, on CPU (each variant deep-copies them)."""
    from rapid_pipeline.pipeline import RapidDiffusionPipeline, build_random_pipeline

    if args.model:
        return RapidDiffusionPipeline.from_pretrained(args.model)
    return build_random_pipeline(args.preset, seed=0)


def variant_config(name: str, args: argparse.Namespace, dev: torch.device, batch: int) -> CompileConfig:
    if name not in VARIANTS:
        raise SystemExit(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")
    lp = "fp16" if dev.type == "cuda" else "bf16"
    changes = {k: (v.format(lp=lp) if isinstance(v, str) else v) for k, v in VARIANTS[name].items()}
    return dataclasses.replace(CompileConfig(), batch=batch, size=args.size, steps=args.steps, prompt=args.prompt,
                               device=str(dev), guidance_scale=args.guidance_scale, inductor_mode=args.inductor_mode,
                               **changes)


def build_variant(base, name: str, args: argparse.Namespace, dev: torch.device, batch: int, workdir: Path):
    config = variant_config(name, args, dev, batch)
    validate(config, dev)
    folder = workdir / f"{name}-b{batch}"
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    opt = build_optimized(None, config, dev, folder, load_only=False, pipe=copy.deepcopy(base))
    return opt.pipe, config, time.perf_counter() - t0


# ----------------------------------------------------------------------------------------- measure
@torch.no_grad()
def measure_components(pipe, config: CompileConfig, timer: Timer, scheduler: str = "pndm") -> dict[str, float]:
    prompts = [config.prompt] * config.batch
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    cond, uncond = pipe.encode_prompt(prompts, None, config.guidance_scale > 1.0)
    latents = pipe.prepare_latents(config.batch, config.size, config.size, gen())
    sched = make_scheduler(scheduler, pipe.scheduler.config)
    denoised = pipe.denoise(latents, cond, uncond, config.steps, config.guidance_scale, sched)
    images = pipe.decode_latents(denoised)
    out = {
        "text_encoder": timer(lambda: pipe.encode_prompt(prompts, None, config.guidance_scale > 1.0)),
        "unet": timer(lambda: pipe.denoise(latents, cond, uncond, config.steps, config.guidance_scale, sched)),
        "vae_decoder": timer(lambda: pipe.decode_latents(denoised)),
        "super_resolution": timer(lambda: pipe.upscale(images)) if pipe.super_resolution is not None else 0.0,
        "total": timer(lambda: pipe(prompts, num_inference_steps=config.steps, guidance_scale=config.guidance_scale,
                                    generator=gen(), height=config.size, width=config.size, output_type="pt",
                                    scheduler=scheduler)),
    }
    out["unet_per_step"] = out["unet"] / config.steps
    return out


def ratios(eager: dict[str, float], other: dict[str, float]) -> dict[str, float | None]:
    """eager time / variant time per component (None where a time is zero: component absent)."""
    return {k: (eager[k] / other[k] if other.get(k) and eager.get(k) else None) for k in eager}


def run_variants(base, args, dev, timer, workdir, keep: dict) -> dict[str, dict]:
    """The per-component table; built pipelines stay in `keep` (the fewer-step mode reuses them:
    the sampler step count is not part of the compiled shapes)."""
    results = {}
    for i, name in enumerate(args.variants):
        try:
            pipe, config, build_s = build_variant(base, name, args, dev, args.batch, workdir)
            results[name] = {"ms": measure_components(pipe, config, timer), "build_seconds": round(build_s, 2),
                             "options": dataclasses.asdict(config)}
        except Exception as exc:  # one broken optimisation must not lose the others' measurements
            if i == 0:
                raise
            results[name] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
            print(f"[bench] {name}: FAILED {results[name]['error']}", file=sys.stderr)
            _free(dev)
            continue
        print(f"[bench] {name}: total {results[name]['ms']['total']:.2f} ms (built in {build_s:.1f}s)", file=sys.stderr)
        keep[name] = (pipe, config)
    eager = results[args.variants[0]]["ms"]
    for r in results.values():
        if "ms" in r:
            r["ratio_vs_eager"] = ratios(eager, r["ms"])
    return results


def _free(dev: torch.device) -> None:
    import gc

    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def run_throughput(base, args, dev, timer, workdir, names: list[str]) -> dict[str, dict[str, float]]:
    """images/s of the whole text -> image call at each batch size (compiled for that batch)."""
    out: dict[str, dict[str, float]] = {}
    for name in names:
        for b in args.throughput_batches:
            try:
                out.setdefault(name, {})[str(b)] = b / (_batch_ms(base, name, args, dev, timer, workdir, b) / 1000.0)
            except Exception as exc:  # e.g. out of memory at batch 16: keep the rest
                print(f"[bench] throughput {name} batch {b}: FAILED {type(exc).__name__}: {exc}"[:400], file=sys.stderr)
            _free(dev)
    return out


def _batch_ms(base, name, args, dev, timer, workdir, b: int) -> float:
    pipe, config, _ = build_variant(base, name, args, dev, b, workdir)
    return timer(lambda: pipe([config.prompt] * b, num_inference_steps=config.steps,
                              guidance_scale=config.guidance_scale, generator=torch.Generator().manual_seed(0),
                              height=config.size, width=config.size, output_type="pt"))


def run_fast_mode(keep: dict, args, timer, names: list[str]) -> dict[str, float]:
    """Total ms with DPM-Solver++ at --fast-steps steps, on the pipelines built for the table."""
    out = {}
    for name in names:
        pipe, config = keep[name]
        fast = dataclasses.replace(config, steps=args.fast_steps)
        out[name] = measure_components(pipe, fast, timer, scheduler="dpmsolver++")["total"]
    return out


# ----------------------------------------------------------------------------------------- report
def best_variant(results: dict[str, dict]) -> str:
    return min((n for n in results if "ms" in results[n]), key=lambda n: results[n]["ms"]["total"])


def comparable_to_goals(args: argparse.Namespace, dev: torch.device, final_size: int) -> bool:
    """The goals are for the paper preset on a GPU, batch 1, 50 steps, 1024 px: judge nothing else."""
    return args.preset == "paper" and args.model is None and dev.type == "cuda" and final_size == 1024 \
        and args.batch == 1 and args.steps == 50


def goal_rows(results, throughput, fast, best: str, comparable: bool = True) -> list[dict[str, Any]]:
    ms = results[best]["ms"]
    tp = max((v for per in throughput.values() for v in per.values()), default=None)
    measured = {"total_ms": ms["total"], "unet_ms_per_step": ms["unet_per_step"],
                "super_resolution_ms": ms["super_resolution"] or None, "vae_decoder_ms": ms["vae_decoder"],
                "throughput_images_per_s": tp, "fast_total_ms": min(fast.values()) if fast else None}
    rows = []
    for key, goal in GOALS.items():
        value = measured[key]
        higher_better = key == "throughput_images_per_s"
        met = None if value is None or not comparable else (value >= goal if higher_better else value <= goal)
        rows.append({"metric": key, "goal": goal, "measured": value, "met": met,
                     "direction": ">=" if higher_better else "<="})
    return rows


def format_table(results: dict[str, dict]) -> str:
    cols = ("text_encoder", "unet", "unet_per_step", "vae_decoder", "super_resolution", "total")
    head = f"{'variant':<32}" + "".join(f"{c:>18}" for c in cols)
    lines = [head, "-" * len(head)]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"{name:<32}  FAILED: {r['error'][:200]}")
            continue
        cells = []
        for c in cols:
            ratio = r["ratio_vs_eager"].get(c)
            cells.append(f"{r['ms'][c]:>10.3f}" + (f" x{ratio:<5.2f}" if ratio else "       "))
        lines.append(f"{name:<32}" + "".join(f"{c:>18}" for c in cells))
    return "\n".join(lines)


def format_goals(rows: list[dict[str, Any]], best: str, comparable: bool = True) -> str:
    lines = [f"goals (issue; paper preset on H100, batch 1, 50 PNDM steps, 1024 px) vs best variant '{best}':"]
    if not comparable:
        lines[0] += "\n  (NOT comparable: this run is not the paper preset at batch 1, 50 steps, 1024 px on a GPU; shown for scale only)"
    for r in rows:
        value = "n/a" if r["measured"] is None else f"{r['measured']:.3f}"
        mark = {True: "met", False: "NOT met", None: "-" if comparable else "n/c"}[r["met"]]
        lines.append(f"  {r['metric']:<26} goal {r['direction']} {r['goal']:<8} measured {value:<12} {mark}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=("tiny", "small", "paper"), help="random-weight pipeline preset")
    p.add_argument("--model", default=None, help="pipeline folder to time instead of random weights")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--size", type=int, default=None,
                   help="FINAL image size in pixels; with ESRGAN the diffusion runs at size/4 (Table 3: 1024 = 256 base "
                        "+ x4). Default: the model's own resolution (x4)")
    p.add_argument("--steps", type=int, default=50, help="PNDM steps (Table 3: 50)")
    p.add_argument("--fast-steps", type=int, default=20, help="DPM-Solver++ steps of the fewer-step mode")
    p.add_argument("--batch", type=int, default=1, help="batch of the per-component table")
    p.add_argument("--throughput-batches", type=int, nargs="*", default=[8, 16], help="batches for images/s")
    p.add_argument("--variants", default="auto", help=f"comma list, first is the baseline; from {', '.join(VARIANTS)}")
    p.add_argument("--extra-variants", default="auto",
                   help="variants for throughput and fewer-step mode (comma list; auto = eager + the fastest)")
    p.add_argument("--guidance-scale", type=float, default=7.5, help="classifier-free guidance (> 1: U-Net batch 2B)")
    p.add_argument("--prompt", default="一张小炒黄牛肉的照片", help="prompt")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls before timing (compiles, autotunes, caches)")
    p.add_argument("--iters", type=int, default=3, help="timed calls; the median is reported")
    p.add_argument("--inductor-mode", default="default",
                   help="torch.compile mode of the inductor variants (default compiles fast; auto = max-autotune-no-cudagraphs "
                        "on CUDA, slower to build); CUDA-graph variants always use reduce-overhead")
    p.add_argument("--json-out", default=None, help="also write the JSON result to this file")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads for torch (0 = torch's default). On a shared machine 1 gives stable CPU timings: "
                        "spinning OpenMP threads that lose their core to another job inflate single calls several-fold")
    args = p.parse_args(argv)
    dev = resolve_device(args.device)
    names = DEFAULT_CUDA if dev.type == "cuda" else DEFAULT_CPU
    args.variants = list(names) if args.variants == "auto" else [v.strip() for v in args.variants.split(",") if v.strip()]
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev = resolve_device(args.device)
    base = base_pipeline(args)
    args.size = base_size(args.size, base)
    timer = Timer(dev, args.warmup, args.iters)
    keep: dict = {}
    with tempfile.TemporaryDirectory(prefix="rapid-bench-") as work:
        results = run_variants(base, args, dev, timer, Path(work), keep)
        best = best_variant(results)
        extra = [args.variants[0], best] if args.extra_variants == "auto" else args.extra_variants.split(",")
        extra = [n for n in dict.fromkeys(extra) if n in keep]
        fast = run_fast_mode(keep, args, timer, extra)
        keep.clear()
        _free(dev)
        throughput = run_throughput(base, args, dev, timer, Path(work), extra)
    final_size = args.size * (4 if base.super_resolution is not None else 1)
    comparable = comparable_to_goals(args, dev, final_size)
    goals = goal_rows(results, throughput, fast, best, comparable)
    print(format_table(results))
    print(f"throughput (images/s): {json.dumps(throughput)}")
    print(f"DPM-Solver++ {args.fast_steps} steps, total ms: {json.dumps(fast)}")
    print(format_goals(goals, best, comparable))
    out = {"device": _device_name(dev), "preset": args.preset, "model": args.model, "size": args.size,
           "final_size": final_size, "goals_comparable": comparable, "steps": args.steps,
           "batch": args.batch, "torch": torch.__version__, "results": results, "best": best,
           "throughput": throughput, "fast_steps": args.fast_steps, "fast_total_ms": fast, "goals": goals}
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out, indent=1, default=str))
    print(json.dumps(out, default=str))
    return out


def base_size(final: int | None, pipe) -> int:
    """Diffusion resolution for a requested final size (ESRGAN multiplies by 4)."""
    factor = 4 if pipe.super_resolution is not None else 1
    if final is None:
        return pipe.default_size
    if final % (factor * pipe.vae_scale_factor):
        raise SystemExit(f"--size {final}: must be a multiple of {factor * pipe.vae_scale_factor} (x{factor} SR, VAE /{pipe.vae_scale_factor})")
    return final // factor


def _device_name(dev: torch.device) -> str:
    from rapid_pipeline.accel.artifact import device_model

    return device_model(dev)


if __name__ == "__main__":
    main()
