"""``rapid run-demo``: the main job, end to end, on the built-in demo domain.

    rapid run-demo --preset tiny                       # CPU, minutes
    rapid run-demo --preset tiny --pairs 120 --quick   # CPU smoke run: fewer steps everywhere, same chain
    rapid --home /data/rapid run-demo --preset small --pairs 5000 --skip-latency

Runs every stage the DAGs run, in the same order, through the same commands (``rapid ...`` in process):

    demo-data → ingest kg → ingest pairs → link → coverage → kg transe → shard →
    train clip --ablation (CKCLIP with and without the KG; CURRENT = the knowledge model) → train vae →
    train diffusion (that CKCLIP + that VAE) → train sr → pipeline assemble (that U-Net + that ESRGAN) →
    evaluate --gate → compile → serve (real REST API on a loopback port, one POST, PNG saved) →
    latency table (bench/latency.py) → generate one image

Invariants:
* Each stage is a cached stage, so a rerun with the same options only redoes what changed (the training
  stages answer ``cached``). Run folders flow explicitly from step to step (``--clip``, ``--vae``,
  ``--pipeline``, ``--sr``, ``--model``): a rerun never picks up another run's folder by mtime.
* The first failing step stops the run; the summary (each step's status and seconds, CKCLIP R@1 with and
  without the KG, evaluation metrics and gate, compile parity, served PNG, latency table, image) is
  written atomically to ``reports/<domain>/run-demo.json`` and ``.txt`` in either case.
* ``--quick`` changes only step counts and sample sizes (see QUICK), never which steps run.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from .core.atomic import atomic_write_bytes, atomic_write_json
from .core.config import add_config_args, config_from_args, opt
from .core.home import Home

PROMPT = "一张草莓的照片"
PRESETS = ("tiny", "small", "paper")
BENCH = Path(__file__).resolve().parents[1] / "bench" / "latency.py"  # a repository script, not package code


@dataclass(frozen=True)
class DemoConfig:
    preset: str = opt("tiny", "model size preset of every training stage: tiny, small or paper")
    domain: str = opt("demo", "domain name to use for the demo data")
    date: str = opt("2025-01-01", "landing partition date for the demo drop")
    pairs: int = opt(2000, "number of demo image-text pairs")
    seed: int = opt(0, "seed of the demo data")
    quick: bool = opt(False, "fewer training / sampling steps and evaluation samples everywhere (smoke runs, tests)")
    compiler: str = opt("auto", "rapid compile --compiler: auto = inductor on CUDA, none (eager + attention "
                        "backend, parity still measured) on CPU, where compiling takes minutes")
    skip_serve: bool = opt(False, "skip the REST API check")
    skip_latency: bool = opt(False, "skip the latency table")


# --quick: extra flags per step. The last value of a repeated flag wins, so these override the preset.
QUICK: dict[str, tuple[str, ...]] = {
    "kg transe": ("--epochs", "5"),
    "train clip": ("--steps", "40"),
    "train vae": ("--steps", "60"),
    "train diffusion": ("--steps", "6"),
    "evaluate": ("--samples", "8", "--steps", "4"),
    "compile": ("--steps", "4"),
    "generate": ("--steps", "4"),
}
SAMPLER_STEPS = {False: 50, True: 4}  # serve request and latency bench: the paper's 50 PNDM steps, or quick


@dataclass
class Context:
    """What the steps share: the options, the home folder and each finished step's result."""
    cfg: DemoConfig
    home: Home
    results: dict[str, dict] = field(default_factory=dict)
    error: Exception | None = None  # of the failed step, chained into run-demo's own error

    @property
    def landing(self) -> Path:
        return self.home.landing / self.cfg.domain / self.cfg.date

    @property
    def reports(self) -> Path:
        return self.home.reports / self.cfg.domain

    def out_dir(self, step: str) -> str:
        """The run folder a step published (its first output)."""
        found = self.published(step)
        if found is None:
            raise RuntimeError(f"step {step!r} published no output folder")
        return found

    def published(self, step: str) -> str | None:
        outs = (self.results.get(step) or {}).get("outputs") or []
        return outs[0]["uri"].removeprefix("file://") if outs else None


# ------------------------------------------------------------------------------------------ CLI steps
def rapid(ctx: Context, step: str, argv: list[str]) -> dict:
    """One ``rapid`` command in process (plus the --quick flags of the step)."""
    from .cli import invoke

    extra = list(QUICK.get(step, ())) if ctx.cfg.quick else []
    return invoke([*argv, *extra], home=ctx.home.root) or {}


def _dp(ctx: Context) -> list[str]:
    return ["--domain", ctx.cfg.domain, "--preset", ctx.cfg.preset]


def step_demo_data(ctx: Context) -> dict:
    c = ctx.cfg
    return rapid(ctx, "demo-data", ["demo-data", "--out", str(ctx.landing), "--seed", str(c.seed), "--pairs", str(c.pairs)])


def step_ingest_kg(ctx: Context) -> dict:
    kg = ctx.landing / "kg" / "triples.tsv"
    return rapid(ctx, "ingest kg", ["ingest", "kg", str(kg), "--domain", ctx.cfg.domain, "--partition", ctx.cfg.date])


def step_ingest_pairs(ctx: Context) -> dict:
    pairs = ctx.landing / "pairs"
    return rapid(ctx, "ingest pairs", ["ingest", "pairs", str(pairs), "--domain", ctx.cfg.domain, "--partition", ctx.cfg.date])


def step_train_clip(ctx: Context) -> dict:
    """CKCLIP with and without the KG (same data, order, init); CURRENT ends on the knowledge model."""
    out = rapid(ctx, "train clip", ["train", "clip", *_dp(ctx), "--ablation"])
    statuses = {r["status"] for r in out["reports"].values()}
    knowledge = out["reports"]["knowledge"]
    # The step's output is the knowledge model: the one CURRENT names and diffusion is trained with.
    return {**out, "status": "cached" if statuses == {"cached"} else "ok", "outputs": knowledge["outputs"]}


def step_train_diffusion(ctx: Context) -> dict:
    return rapid(ctx, "train diffusion", ["train", "diffusion", *_dp(ctx), "--clip", ctx.out_dir("train clip"),
                                          "--vae", ctx.out_dir("train vae")])


def step_assemble(ctx: Context) -> dict:
    return rapid(ctx, "pipeline assemble", ["pipeline", "assemble", "--domain", ctx.cfg.domain,
                                            "--pipeline", ctx.out_dir("train diffusion"), "--sr", ctx.out_dir("train sr")])


def model(ctx: Context) -> str:
    return ctx.out_dir("pipeline assemble")


def step_evaluate(ctx: Context) -> dict:
    return rapid(ctx, "evaluate", ["evaluate", "--model", model(ctx), "--domain", ctx.cfg.domain, "--gate"])


def step_compile(ctx: Context) -> dict:
    import torch

    from .models.ldm import ldm_config

    cuda = torch.cuda.is_available()
    compiler = ctx.cfg.compiler if ctx.cfg.compiler != "auto" else ("inductor" if cuda else "none")
    size = str(ldm_config(ctx.cfg.preset).image_size)  # the diffusion resolution the pipeline was trained at
    return rapid(ctx, "compile", ["compile", "--model", model(ctx), "--compiler", compiler, "--size", size])


def step_generate(ctx: Context) -> dict:
    png = ctx.reports / "demo.png"
    out = rapid(ctx, "generate", ["generate", PROMPT, "--model", model(ctx), "-o", str(png), "--seed", "0"])
    return {**out, "png": str(png), "decoded_size": list(decode_png(png.read_bytes()))}


def cli_step(name: str, *argv: str, preset: bool = False) -> Callable[[Context], dict]:
    """A step that is one fixed command over the domain (``--preset`` too when asked)."""
    def run(ctx: Context) -> dict:
        return rapid(ctx, name, [*argv, *(_dp(ctx) if preset else ["--domain", ctx.cfg.domain])])

    return run


# ------------------------------------------------------------------------------------------ serve check
def decode_png(data: bytes) -> tuple[int, int]:
    """(width, height) of a PNG that fully decodes; raises otherwise."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        if img.format != "PNG":
            raise ValueError(f"expected a PNG, got {img.format}")
        img.load()
        return img.size


@contextlib.contextmanager
def serving(app: Any, timeout: float = 120.0) -> Iterator[str]:
    """uvicorn on a loopback port the kernel picked (the socket is bound before the server starts: no
    race for the port) in a background thread; yields the base URL once the model is loaded."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="run-demo-serve", daemon=True)
    thread.start()
    try:
        _wait(lambda: server.started, timeout, "the API server did not start")
        _wait(app.state.worker.loaded.is_set, timeout, "the API server did not load the model")
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def _wait(done: Callable[[], bool], timeout: float, message: str) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{message} within {timeout:g} s")
        time.sleep(0.05)


def http(method: str, url: str, body: dict | None = None, timeout: float = 600.0) -> tuple[int, dict, bytes]:
    """(status, headers, body) of one request (stdlib only; 4xx/5xx are returned, not raised)."""
    import urllib.error
    import urllib.request

    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def step_serve(ctx: Context) -> dict:
    """The real REST API (compiled artifact when `rapid compile` built one): POST one prompt, keep the PNG."""
    from .serve import ServeSettings, create_app, default_loader, newest_artifact

    steps = SAMPLER_STEPS[ctx.cfg.quick]
    settings = ServeSettings(model=model(ctx), default_steps=steps, timeout=600.0)
    with serving(create_app(default_loader(settings, ctx.home), settings)) as url:
        health = json.loads(http("GET", url + "/healthz")[2])
        status, headers, png = http("POST", url + "/v1/generate", {"prompt": PROMPT, "seed": 0})
    if status != 200 or not health.get("model_loaded"):
        raise RuntimeError(f"POST /v1/generate answered {status}: {png[:300]!r} (healthz {health})")
    size = decode_png(png)
    path = ctx.reports / "served.png"
    atomic_write_bytes(path, png)
    artifact = newest_artifact(ctx.home, Path(model(ctx)))
    return {"status": "ok", "png": str(path), "size": list(size), "steps": steps, "url": url,
            "elapsed_ms": headers.get("x-elapsed-ms") or headers.get("X-Elapsed-Ms"),
            "artifact": str(artifact) if artifact else None}


# ------------------------------------------------------------------------------------------ latency table
def bench_argv(ctx: Context, json_out: Path) -> list[str]:
    steps = SAMPLER_STEPS[ctx.cfg.quick]
    quick = ctx.cfg.quick
    return [sys.executable, str(BENCH), "--model", model(ctx), "--steps", str(steps),
            "--fast-steps", str(max(2, steps // 2)), "--iters", "1" if quick else "3", "--warmup", "1",
            "--throughput-batches", "2", "--variants", "eager,sdpa-math" if quick else "auto", "--json-out", str(json_out),
            "--threads", "0" if _has_cuda() else "1"]  # 1 CPU thread: stable timings on a shared machine


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def step_latency(ctx: Context) -> dict:
    """bench/latency.py on the assembled model in a child process; its printed table is kept as text."""
    if not BENCH.exists():
        return {"status": "skipped", "reason": f"{BENCH} not found (installed package without the repository)"}
    json_out = ctx.reports / "latency.json"
    json_out.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(bench_argv(ctx, json_out), capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"bench/latency.py failed (exit {proc.returncode}): {proc.stderr.strip()[-600:]}")
    lines = proc.stdout.strip().splitlines()
    result = json.loads(lines[-1])  # the bench's last stdout line is its JSON result
    return {"status": "ok", "table": "\n".join(lines[:-1]), "best": result.get("best"), "json": str(json_out),
            "device": result.get("device")}


# ------------------------------------------------------------------------------------------ the chain
def steps() -> list[tuple[str, Callable[[Context], dict]]]:
    return [
        ("demo-data", step_demo_data),
        ("ingest kg", step_ingest_kg),
        ("ingest pairs", step_ingest_pairs),
        ("link", cli_step("link", "link")),
        ("coverage", cli_step("coverage", "coverage")),
        ("kg transe", cli_step("kg transe", "kg", "transe", preset=True)),
        ("shard", cli_step("shard", "shard", preset=True)),
        ("train clip", step_train_clip),
        ("train vae", cli_step("train vae", "train", "vae", preset=True)),
        ("train diffusion", step_train_diffusion),
        ("train sr", cli_step("train sr", "train", "sr", preset=True)),
        ("pipeline assemble", step_assemble),
        ("evaluate", step_evaluate),
        ("compile", step_compile),
        ("serve", step_serve),
        ("latency", step_latency),
        ("generate", step_generate),
    ]


def skipped(cfg: DemoConfig, name: str) -> str | None:
    """Why an optional step does not run (None: it runs)."""
    if name == "serve" and cfg.skip_serve:
        return "--skip-serve"
    if name == "latency" and cfg.skip_latency:
        return "--skip-latency"
    return None


def run_step(ctx: Context, name: str, fn: Callable[[Context], dict]) -> dict:
    """Run one step; its row: name, status (ok / cached / skipped / failed), seconds, error."""
    t0 = time.perf_counter()
    why = skipped(ctx.cfg, name)
    try:
        ctx.results[name] = {"status": "skipped", "reason": why} if why else fn(ctx)
    except Exception as exc:
        ctx.error = exc
        return {"name": name, "status": "failed", "seconds": round(time.perf_counter() - t0, 2),
                "error": f"{type(exc).__name__}: {exc}"[:1000]}
    return {"name": name, "status": str(ctx.results[name].get("status", "ok")),
            "seconds": round(time.perf_counter() - t0, 2)}


def run_config(cfg: DemoConfig, home: Home) -> dict[str, Any]:
    """The whole chain; stops at the first failed step. Writes the summary either way."""
    check_config(cfg)
    ctx, rows, t0 = Context(cfg, home), [], time.perf_counter()
    for name, fn in steps():
        rows.append(run_step(ctx, name, fn))
        if rows[-1]["status"] == "failed":
            break
    summary = summarize(ctx, rows, time.perf_counter() - t0)
    write_summary(ctx, summary)
    if summary["status"] != "ok":
        raise RuntimeError(f"run-demo: step {rows[-1]['name']!r} failed: {rows[-1]['error']} "
                           f"(summary: {ctx.reports / 'run-demo.txt'})") from ctx.error
    return summary


def check_config(cfg: DemoConfig) -> None:
    if cfg.preset not in PRESETS:
        raise ValueError(f"--preset must be one of {', '.join(PRESETS)}, got {cfg.preset!r}")
    if cfg.pairs < 20:
        raise ValueError(f"--pairs {cfg.pairs}: the 80/10/10 split needs at least 20 pairs")
    if cfg.compiler not in ("auto", "inductor", "aot-inductor", "torch_blade", "none"):
        raise ValueError(f"--compiler {cfg.compiler!r}: auto, inductor, aot-inductor, torch_blade or none")


# ------------------------------------------------------------------------------------------ summary
def r_at_1(ctx: Context) -> dict[str, dict[str, Any]]:
    """CKCLIP retrieval R@1 with the KG (knowledge) and without it (no_knowledge), both directions."""
    table = (ctx.results.get("train clip") or {}).get("retrieval") or {}
    return {name: {"t2i_R@1": m.get("t2i_R@1"), "i2t_R@1": m.get("i2t_R@1"), "mean_R": m.get("mean_R"),
                   "pairs": m.get("pairs"), "split": m.get("split")} for name, m in table.items()}


def evaluation(ctx: Context) -> dict[str, Any]:
    ev = ctx.results.get("evaluate") or {}
    metrics = {k: v for k, v in (ev.get("metrics") or {}).items() if isinstance(v, (int, float))}
    gate = ev.get("gate") or {}
    return {"metrics": metrics, "metric": (ev.get("metric_kind") or {}).get("name"),
            "gate": gate.get("decision"), "gate_reason": gate.get("reason"), "report_dir": ev.get("report_dir")}


def compile_info(ctx: Context) -> dict[str, Any]:
    result = ctx.results.get("compile") or {}
    extra, parity = result.get("extra") or {}, (result.get("extra") or {}).get("parity") or {}
    keep = ("ok", "unet_max_abs_err", "unet_rel_err", "image_psnr_db", "precision")
    return {"parity": {k: parity.get(k) for k in keep}, "artifact_dir": extra.get("artifact_dir"),
            "compiler": (result.get("config") or {}).get("compiler")}


def parts(ctx: Context) -> dict[str, str | None]:
    """The run folders this build is made of (CKCLIP = the knowledge model of the ablation)."""
    steps = {"ckclip": "train clip", "vae": "train vae", "diffusion": "train diffusion", "esrgan": "train sr"}
    return {part: ctx.published(step) for part, step in steps.items()}


def vae_info(ctx: Context) -> dict[str, Any]:
    """Val PSNR of the autoencoder before / after training: the latent space diffusion learns in."""
    extra = (ctx.results.get("train vae") or {}).get("extra") or {}
    return {k: extra.get(k) for k in ("psnr_before", "psnr_after", "scaling_factor", "steps")}


def serve_info(ctx: Context) -> dict[str, Any]:
    served = ctx.results.get("serve") or {}
    return {k: served.get(k) for k in ("status", "size", "steps", "elapsed_ms", "artifact", "reason")}


def summarize(ctx: Context, rows: list[dict], seconds: float) -> dict[str, Any]:
    failed = any(r["status"] == "failed" for r in rows)
    summary = {
        "status": "failed" if failed else "ok", "config": dataclasses.asdict(ctx.cfg), "seconds": round(seconds, 1),
        "steps": rows, "r_at_1": r_at_1(ctx), "vae": vae_info(ctx), "evaluation": evaluation(ctx),
        "compile": compile_info(ctx),
        "model": ctx.published("pipeline assemble"),
        "parts": parts(ctx), "served_png": (ctx.results.get("serve") or {}).get("png"), "serve": serve_info(ctx),
        "latency_table": (ctx.results.get("latency") or {}).get("table"),
        "image": (ctx.results.get("generate") or {}).get("png"),
    }
    summary["text"] = summary_text(summary)
    return summary


def summary_text(s: dict[str, Any]) -> str:
    c = s["config"]
    lines = [f"run-demo: preset {c['preset']}, domain {c['domain']}, {c['pairs']} pairs"
             f"{', quick' if c['quick'] else ''} -> {s['status']} in {s['seconds']:.1f}s", ""]
    lines += [f"  {r['name']:<18} {r['status']:<8} {r['seconds']:8.1f}s" + (f"  {r['error']}" if r.get("error") else "")
              for r in s["steps"]]
    lines += ["", *_r_at_1_lines(s["r_at_1"]), _vae_line(s["vae"]), *_eval_lines(s["evaluation"]),
              *_compile_lines(s["compile"])]
    lines += [_serve_line(s), f"model: {s['model']}", f"image: {s['image']}"]
    if s["latency_table"]:
        lines += ["", "latency (ms; x = speed-up vs eager):", s["latency_table"]]
    return "\n".join(lines)


def _fmt(x: Any, spec: str = ".3f") -> str:
    return format(x, spec) if isinstance(x, (int, float)) else "n/a"


def _r_at_1_lines(table: dict[str, dict]) -> list[str]:
    if not table:
        return ["CKCLIP R@1: n/a"]
    first = next(iter(table.values()))
    names = {"knowledge": "with KG", "no_knowledge": "without KG"}
    return [f"CKCLIP R@1 ({first.get('pairs')} {first.get('split')} pairs):"] + [
        f"  {names.get(k, k):<11} text->image {_fmt(m['t2i_R@1'])}  image->text {_fmt(m['i2t_R@1'])}"
        for k, m in table.items()]


def _vae_line(vae: dict[str, Any]) -> str:
    return (f"VAE val PSNR: {_fmt(vae['psnr_before'], '.2f')} dB (random init) -> {_fmt(vae['psnr_after'], '.2f')} dB "
            f"after {vae['steps']} steps; scaling_factor {_fmt(vae['scaling_factor'], '.4f')}")


def _eval_lines(ev: dict[str, Any]) -> list[str]:
    metrics = ", ".join(f"{k} {_fmt(v, '.4f')}" for k, v in ev["metrics"].items()) or "n/a"
    return [f"evaluation: {metrics}", f"gate: {ev['gate'] or 'n/a'} ({ev['gate_reason'] or ''})"]


def _compile_lines(info: dict[str, Any]) -> list[str]:
    p = info["parity"]
    if p.get("ok") is None:
        return ["compile parity: n/a"]
    return [f"compile ({info['compiler']}): parity {'ok' if p['ok'] else 'NOT ok'}: U-Net max abs err "
            f"{_fmt(p['unet_max_abs_err'], '.2e')}, image PSNR {p['image_psnr_db']} dB vs eager fp32"]


def _serve_line(s: dict[str, Any]) -> str:
    served = s["serve"]
    if not s["served_png"]:
        return f"served PNG: {served.get('reason') or 'n/a'}"
    w, h = served["size"]
    source = "compiled artifact" if served["artifact"] else "eager pipeline"
    return f"served PNG: {s['served_png']} ({w}x{h}, {served['steps']} steps, {served['elapsed_ms']} ms, {source})"


def write_summary(ctx: Context, summary: dict[str, Any]) -> None:
    atomic_write_json(ctx.reports / "run-demo.json", summary)
    atomic_write_bytes(ctx.reports / "run-demo.txt", (summary["text"] + "\n").encode("utf-8"))


# ------------------------------------------------------------------------------------------ CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_args(p, DemoConfig)


def run(args: argparse.Namespace, home: Home) -> dict[str, Any]:
    return run_config(config_from_args(DemoConfig(), args), home)


def main(args: argparse.Namespace, home: Home) -> dict[str, Any]:
    return run(args, home)
