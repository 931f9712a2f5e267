"""``rapid serve``: a REST API that turns a Chinese prompt into a PNG.

    rapid serve --model rapid_home/models/pipeline/demo/production [--host 127.0.0.1 --port 8000] \\
        [--max-queue 8] [--timeout 60] [--max-prompt-chars 200] [--max-body-bytes 16384] [--fast-sampler]

    curl -s -X POST localhost:8000/v1/generate -H 'content-type: application/json' \\
         -d '{"prompt": "一张小炒黄牛肉的照片", "steps": 25, "seed": 1}' -o out.png

Endpoints: ``POST /v1/generate`` (JSON ``{"prompt", "steps"?, "guidance"?, "seed"?, "size"?,
"super_resolution"?}`` → ``image/png``; ``size`` is the side of the returned image), ``GET /healthz``
(model loaded?, queue depth), ``/openapi.json`` and ``/docs`` (FastAPI defaults).

Invariants:
* Every bad request is a 4xx JSON ``{"error": {"code", "message"}}`` before any GPU work: 415 unless
  ``application/json``; 413 when the body exceeds ``--max-body-bytes``; 400 for malformed JSON; 422
  for an empty / too long / non-text prompt or an out-of-range field.
* GPU work is serialised: ONE worker thread owns the pipeline; requests wait in a bounded queue.
  A full queue answers 503 with ``Retry-After`` at once (load is shed, never buffered without bound);
  a request that waits longer than ``--timeout`` answers 504, and the worker skips it if not started.
* The pipeline is the compiled artifact of `rapid compile` when one exists for the model
  (`accel.artifact.load_optimized`), else the eager `RapidDiffusionPipeline`; nothing is downloaded.
* ``--fast-sampler``: requests without ``steps`` use the scheduler and steps that ``rapid evaluate
  --accept-fast-sampler`` ACCEPTED for the served build (``reports/<domain>/<run>/fast_sampler.json``,
  found from the model folder ``models/pipeline/<domain>/<run>``); requests with ``steps`` keep
  ``--scheduler``. Without an accepted decision the server refuses to start (one-line error).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import io
import json
import queue
import random
import threading
import time
import warnings
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from .core.config import add_config_args, config_from_args, opt
from .core.home import Home, check_name
from .core.text import TextRejected, normalize


@dataclass(frozen=True)
class ServeSettings:
    model: str = opt("", "pipeline folder models/pipeline/<domain>/<run> or its production pointer file")
    host: str = opt("127.0.0.1", "interface to bind (0.0.0.0 inside a container)")
    port: int = opt(8000, "TCP port")
    max_queue: int = opt(8, "requests waiting for the GPU beyond the one running; more -> 503 + Retry-After")
    timeout: float = opt(60.0, "seconds a request may wait + run before 504")
    max_prompt_chars: int = opt(200, "longest prompt accepted (characters)")
    max_body_bytes: int = opt(16384, "largest request body accepted (bytes) -> else 413")
    max_steps: int = opt(100, "most denoising steps a request may ask for")
    default_steps: int = opt(50, "denoising steps when the request gives none")
    default_guidance: float = opt(7.5, "classifier-free guidance when the request gives none")
    max_guidance: float = opt(30.0, "largest guidance scale accepted")
    min_size: int = opt(32, "smallest output side in pixels")
    max_size: int = opt(1024, "largest output side in pixels")
    scheduler: str = opt("pndm", "sampler: pndm | ddim | dpmsolver++")
    device: str = opt("auto", "auto (cuda when available) | cpu | cuda")
    retry_after: int = opt(2, "seconds suggested in Retry-After when the queue is full")
    fast_sampler: bool = opt(False, "requests without steps use the fast sampler (scheduler + steps) that `rapid evaluate "
                                    "--accept-fast-sampler` accepted for this build; refuse to start without one")
    # Filled from fast_sampler.json by `fast_sampler_settings`, not flags (no help text: no --flag).
    fast_scheduler: str = ""
    fast_steps: int = 0


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


# ---------------------------------------------------------------- request validation
FIELDS = {"prompt", "steps", "guidance", "seed", "size", "super_resolution"}


@dataclass(frozen=True)
class Job:
    prompt: str
    steps: int
    scheduler: str
    guidance: float
    seed: int
    base_size: int | None  # diffusion resolution (output / 4 with super-resolution)
    super_resolution: bool
    future: Future = field(default_factory=Future, compare=False)


def _int_field(body: dict, name: str, default: int | None, lo: int, hi: int) -> int | None:
    value = body.get(name, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(422, "invalid_field", f"{name} must be an integer, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise ApiError(422, "out_of_range", f"{name}={value} is outside [{lo}, {hi}]")
    return value


def check_prompt(value: Any, max_chars: int) -> str:
    if not isinstance(value, str):
        raise ApiError(422, "prompt_not_text", f"prompt must be a string, got {type(value).__name__}")
    if len(value) > max_chars:
        raise ApiError(422, "prompt_too_long", f"prompt has {len(value)} characters; at most {max_chars}")
    try:
        return normalize(value, max_chars=max_chars, convert=False).text
    except TextRejected as exc:
        raise ApiError(422, "prompt_empty" if exc.reason == "empty_text" else "prompt_invalid",
                       "prompt is empty" if exc.reason == "empty_text" else f"prompt rejected: {exc}") from exc


def _guidance(body: dict, s: ServeSettings) -> float:
    value = body.get("guidance", s.default_guidance)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= s.max_guidance:
        raise ApiError(422, "out_of_range", f"guidance must be a number in [0, {s.max_guidance}]")
    return float(value)


def _sizes(body: dict, s: ServeSettings, has_sr: bool) -> tuple[int | None, bool]:
    sr = body.get("super_resolution", True)
    if not isinstance(sr, bool):
        raise ApiError(422, "invalid_field", "super_resolution must be true or false")
    sr = sr and has_sr
    size = _int_field(body, "size", None, s.min_size, s.max_size)
    if size is None:
        return None, sr
    step = 32 if sr else 8  # VAE factor 8, times 4 for the ESRGAN x4
    if size % step:
        raise ApiError(422, "invalid_size", f"size={size} must be a multiple of {step}{' with super_resolution' if sr else ''}")
    return (size // 4 if sr else size), sr


def parse_job(body: Any, s: ServeSettings, has_sr: bool) -> Job:
    if not isinstance(body, dict):
        raise ApiError(422, "invalid_body", "body must be a JSON object with a prompt")
    unknown = set(body) - FIELDS
    if unknown:
        raise ApiError(422, "unknown_field", f"unknown field(s): {', '.join(sorted(unknown))}")
    if "prompt" not in body:
        raise ApiError(422, "prompt_missing", "prompt is required")
    prompt = check_prompt(body["prompt"], s.max_prompt_chars)
    steps, scheduler = _sampler(body, s)
    seed = _int_field(body, "seed", None, 0, 2**63 - 1)
    base, sr = _sizes(body, s, has_sr)
    return Job(prompt, steps, scheduler, _guidance(body, s), random.randrange(2**31) if seed is None else seed, base, sr)


def _sampler(body: dict, s: ServeSettings) -> tuple[int | None, str]:
    """(steps, scheduler): the accepted fast sampler replaces only the DEFAULT steps; explicit steps
    keep --scheduler, because the acceptance measured the fast scheduler at its own step count only."""
    if "steps" not in body and s.fast_steps:
        return s.fast_steps, s.fast_scheduler
    return _int_field(body, "steps", s.default_steps, 1, s.max_steps), s.scheduler


# ---------------------------------------------------------------- the GPU worker
class Worker:
    """One thread owns the pipeline; jobs arrive through a bounded queue."""

    def __init__(self, loader: Callable[[], Any], settings: ServeSettings):
        self.loader, self.settings = loader, settings
        self.jobs: queue.Queue = queue.Queue(maxsize=settings.max_queue)
        self.pipeline, self.error, self.busy = None, None, False
        self.loaded = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="rapid-serve-gpu", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        with contextlib.suppress(queue.Full):
            self.jobs.put(None, timeout=1)
        self.thread.join(timeout=10)

    def submit(self, job: Job) -> None:
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise ApiError(503, "queue_full", f"{self.settings.max_queue} requests already queued; retry later",
                           {"Retry-After": str(self.settings.retry_after)}) from None

    def _load(self) -> bool:
        try:
            self.pipeline = self.loader()
            return True
        except Exception as exc:  # reported by /healthz, requests get 503
            self.error = f"{type(exc).__name__}: {exc}"
            return False
        finally:
            self.loaded.set()

    def _loop(self) -> None:
        ok = self._load()
        while (job := self.jobs.get()) is not None:
            if not job.future.set_running_or_notify_cancel():  # timed out while queued: skip it
                continue
            if not ok:
                job.future.set_exception(ApiError(503, "model_unavailable", f"model failed to load: {self.error}"))
                continue
            self.busy = True
            try:
                job.future.set_result(self._run(job))
            except Exception as exc:
                job.future.set_exception(exc)
            finally:
                self.busy = False

    def _run(self, job: Job) -> bytes:
        import torch

        gen = torch.Generator(device="cpu").manual_seed(job.seed)
        out = self.pipeline(job.prompt, num_inference_steps=job.steps, guidance_scale=job.guidance, generator=gen,
                            height=job.base_size, width=job.base_size, scheduler=job.scheduler,
                            super_resolution=job.super_resolution, output_type="pil")
        buf = io.BytesIO()
        out.images[0].save(buf, format="PNG")
        return buf.getvalue()

    def health(self) -> dict:
        status = "ok" if self.pipeline is not None else ("error" if self.error else "loading")
        fast = {"scheduler": self.settings.fast_scheduler, "steps": self.settings.fast_steps} if self.settings.fast_steps else None
        return {"status": status, "model_loaded": self.pipeline is not None, "error": self.error,
                "queue_depth": self.jobs.qsize(), "max_queue": self.settings.max_queue, "busy": self.busy,
                "fast_sampler": fast}


# ---------------------------------------------------------------- the app
def _error(exc: ApiError) -> JSONResponse:
    return JSONResponse({"error": {"code": exc.code, "message": exc.message}}, status_code=exc.status, headers=exc.headers)


async def read_body(request: Request, limit: int) -> bytes:
    """The raw body, refusing (413) as soon as it exceeds `limit` — declared or actually sent."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, "body_too_large", f"body of {declared} bytes exceeds {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "body_too_large", f"body exceeds {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_json(request: Request, raw: bytes) -> Any:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise ApiError(415, "unsupported_media_type", f"content-type must be application/json, got {ctype or 'none'!r}")
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(400, "malformed_json", f"body is not valid UTF-8 JSON: {exc}") from exc


async def wait_result(job: Job, timeout: float) -> bytes:
    try:
        return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(job.future)), timeout)
    except (asyncio.TimeoutError, TimeoutError):
        job.future.cancel()  # dropped from the queue if the worker has not started it
        raise ApiError(504, "timeout", f"no image within {timeout:g} s") from None
    except ApiError:
        raise
    except Exception as exc:  # the pipeline failed: a JSON 500, the worker keeps serving
        raise ApiError(500, "generation_failed", f"{type(exc).__name__}: {str(exc)[:300]}") from exc


REQUEST_SCHEMA = {
    "type": "object", "required": ["prompt"], "additionalProperties": False,
    "properties": {
        "prompt": {"type": "string", "minLength": 1, "description": "Chinese prompt (max --max-prompt-chars)"},
        "steps": {"type": "integer", "minimum": 1, "description": "denoising steps (default --default-steps, or the accepted fast sampler's with --fast-sampler)"},
        "guidance": {"type": "number", "minimum": 0, "description": "classifier-free guidance scale"},
        "seed": {"type": "integer", "minimum": 0, "description": "random seed (random when absent; echoed in X-Seed)"},
        "size": {"type": "integer", "description": "side of the returned image in pixels (multiple of 8; of 32 with SR)"},
        "super_resolution": {"type": "boolean", "default": True, "description": "apply ESRGAN x4"},
    },
}


def create_app(pipeline_loader: Callable[[], Any], settings: ServeSettings = ServeSettings()) -> FastAPI:
    """The FastAPI app; `pipeline_loader()` runs once, in the GPU worker thread (tests inject a tiny one)."""
    worker = Worker(pipeline_loader, settings)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        worker.start()
        yield
        worker.stop()

    app = FastAPI(title="Rapid Diffusion", version="1", lifespan=lifespan,
                  description="Knowledge-enhanced Chinese text-to-image (Rapid Diffusion). POST a prompt, get a PNG.")
    app.state.worker = worker
    app.add_exception_handler(ApiError, lambda request, exc: _error(exc))

    @app.get("/healthz", summary="model loaded? queue depth")
    def healthz() -> JSONResponse:
        info = worker.health()
        return JSONResponse(info, status_code=200 if info["model_loaded"] else 503)

    @app.post("/v1/generate", summary="text -> PNG", response_class=Response,
              responses={200: {"content": {"image/png": {}}, "description": "the generated image"},
                         413: {"description": "body too large"}, 415: {"description": "not application/json"},
                         422: {"description": "invalid prompt or field"}, 503: {"description": "queue full (Retry-After)"},
                         504: {"description": "timed out"}},
              openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": REQUEST_SCHEMA}}}})
    async def generate(request: Request) -> Response:
        return await handle_generate(request, worker, settings)

    return app


async def handle_generate(request: Request, worker: Worker, settings: ServeSettings) -> Response:
    """Validate (4xx before any GPU work), enqueue (503 when full), wait (504 on timeout), answer the PNG."""
    body = parse_json(request, await read_body(request, settings.max_body_bytes))
    if worker.pipeline is None:
        raise ApiError(503, "model_unavailable", worker.error or "model is still loading",
                       {"Retry-After": str(settings.retry_after)})
    job = parse_job(body, settings, getattr(worker.pipeline, "super_resolution", None) is not None)
    t0 = time.perf_counter()
    worker.submit(job)
    png = await wait_result(job, settings.timeout)
    return Response(png, media_type="image/png", headers={
        "X-Seed": str(job.seed), "X-Steps": str(job.steps), "X-Scheduler": job.scheduler,
        "X-Elapsed-Ms": f"{(time.perf_counter() - t0) * 1e3:.0f}"})


# ---------------------------------------------------------------- CLI
def default_loader(settings: ServeSettings, home: Home) -> Callable[[], Any]:
    """Compiled artifact if `rapid compile` built one for this model (newest complete), else eager."""
    def load() -> Any:
        from .pipeline import RapidDiffusionPipeline, resolve_pipeline_dir

        model_dir = resolve_pipeline_dir(settings.model)
        device = _device(settings.device)
        artifact = newest_artifact(home, model_dir)
        if artifact is not None:
            from .accel.artifact import ArtifactError, load_optimized

            try:
                return load_optimized(model_dir, artifact_dir=artifact, device=device)
            except ArtifactError as exc:  # built for another GPU / torch: serve eager rather than not at all
                warnings.warn(f"not using compiled artifact {artifact.name}: {exc}; serving the eager pipeline")
        return RapidDiffusionPipeline.from_pretrained(str(model_dir), device=device)

    return load


def newest_artifact(home: Home, model_dir: Any) -> Any:
    """The newest complete `models/compiled/*` artifact recorded for `model_dir` with passing parity."""
    try:
        from .accel import artifact as A
    except ImportError:
        return None
    from .core.fingerprint import fingerprint_path

    model_fp, found = fingerprint_path(model_dir), []
    for folder in (home.models / "compiled").glob("*"):
        if not A.is_complete(folder):
            continue
        meta, parity = A.read_artifact(folder)
        if meta.get("key_parts", {}).get("model") == model_fp and parity.get("ok"):
            found.append(folder)
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def _device(name: str) -> str:
    import torch

    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


def fast_sampler_file(model: str, home: Home) -> Path:
    """reports/<domain>/<run>/fast_sampler.json of the served build. Serve has no --domain: the domain is
    the run folder's parent (models/pipeline/<domain>/<run>; a production pointer is resolved first)."""
    from .evaluate import fast_sampler_path, resolve_model_dir

    run_dir = resolve_model_dir(model)
    try:
        return fast_sampler_path(home, check_name(run_dir.parent.name, "domain"), run_dir.name)
    except ValueError:
        raise ValueError(f"--fast-sampler: {run_dir} is not a models/pipeline/<domain>/<run> folder, so its "
                         "evaluation report cannot be found") from None


def fast_sampler_settings(settings: ServeSettings, home: Home) -> ServeSettings:
    """With --fast-sampler: `settings` with the build's ACCEPTED fast scheduler/steps, else a one-line refusal."""
    if not settings.fast_sampler:
        return settings
    path = fast_sampler_file(settings.model, home)
    hint = f"run `rapid evaluate --model {settings.model} --domain {path.parent.parent.name} --accept-fast-sampler`"
    if not path.exists():
        raise ValueError(f"--fast-sampler: build {path.parent.name} has no fast-sampler decision ({path} is missing); {hint}")
    decision = json.loads(path.read_text(encoding="utf-8"))
    if decision.get("decision") != "accepted":
        raise ValueError(f"--fast-sampler: the fast sampler of build {path.parent.name} was "
                         f"{decision.get('decision')!r}, not accepted ({decision.get('reason')})")
    cand = decision["candidate"]
    if not 1 <= int(cand["steps"]) <= settings.max_steps:
        raise ValueError(f"--fast-sampler: accepted steps {cand['steps']} exceed --max-steps {settings.max_steps}")
    return dataclasses.replace(settings, fast_scheduler=cand["scheduler"], fast_steps=int(cand["steps"]))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_args(parser, ServeSettings)


def main(args: argparse.Namespace, home: Home) -> dict:
    import uvicorn

    settings = config_from_args(ServeSettings(), args)
    if not settings.model:
        raise ValueError("--model DIR is required (models/pipeline/<domain>/<run> or its production pointer)")
    settings = fast_sampler_settings(settings, home)  # refuse before binding a port or loading weights
    app = create_app(default_loader(settings, home), settings)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info")
    return {"stage": "serve", "status": "stopped", "host": settings.host, "port": settings.port,
            "fast_sampler": {"scheduler": settings.fast_scheduler, "steps": settings.fast_steps} if settings.fast_steps else None}
