"""`rapid serve` against a REAL server: uvicorn on 127.0.0.1 (free port) in a background thread,
requests with httpx. A tiny random pipeline (engineer F's `build_random_pipeline`) answers prompts;
a gated stand-in pipeline (blocks until released) drives the queue-full (503) and timeout (504) paths."""

from __future__ import annotations

import contextlib
import io
import socket
import threading
import time

import httpx
import pytest
from PIL import Image

from rapid_pipeline.serve import ServeSettings, create_app


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(app, wait_loaded: bool = True):
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=_free_port(), log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started, "uvicorn did not start"
    if wait_loaded:
        assert app.state.worker.loaded.wait(60)
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=20)


@pytest.fixture(scope="module")
def tiny_pipeline():
    from rapid_pipeline.pipeline import build_random_pipeline

    return build_random_pipeline("tiny", seed=0)


@pytest.fixture(scope="module")
def server(tiny_pipeline):
    settings = ServeSettings(max_prompt_chars=20, max_body_bytes=512, max_steps=4, default_steps=2, max_size=256)
    with running(create_app(lambda: tiny_pipeline, settings)) as url:
        yield url


def _png(resp) -> Image.Image:
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == "image/png"
    img = Image.open(io.BytesIO(resp.content))
    assert img.format == "PNG"
    img.load()
    return img


def test_prompt_returns_png_of_requested_size(server):
    plain = _png(httpx.post(f"{server}/v1/generate", json={"prompt": "一张红色方块的照片", "seed": 3, "size": 40,
                                                           "super_resolution": False}, timeout=60))
    assert plain.size == (40, 40)
    upscaled = _png(httpx.post(f"{server}/v1/generate", json={"prompt": "蓝色的猫", "steps": 1, "size": 64}, timeout=60))
    assert upscaled.size == (64, 64)  # 16 px diffusion + ESRGAN x4
    a = httpx.post(f"{server}/v1/generate", json={"prompt": "蓝色的猫", "seed": 5, "size": 32, "super_resolution": False}, timeout=60)
    b = httpx.post(f"{server}/v1/generate", json={"prompt": "蓝色的猫", "seed": 5, "size": 32, "super_resolution": False}, timeout=60)
    assert a.content == b.content and a.headers["x-seed"] == "5"  # same seed, same image


@pytest.mark.parametrize("kwargs, status, code", [
    ({"json": {"prompt": ""}}, 422, "prompt_empty"),
    ({"json": {"prompt": " \u200b\t "}}, 422, "prompt_empty"),
    ({"json": {"prompt": "猫" * 21}}, 422, "prompt_too_long"),
    ({"json": {"prompt": 123}}, 422, "prompt_not_text"),
    ({"json": {"prompt": ["一只猫"]}}, 422, "prompt_not_text"),
    ({"json": {"steps": 2}}, 422, "prompt_missing"),
    ({"json": ["一只猫"]}, 422, "invalid_body"),
    ({"json": {"prompt": "猫", "steps": 0}}, 422, "out_of_range"),
    ({"json": {"prompt": "猫", "steps": "2"}}, 422, "invalid_field"),
    ({"json": {"prompt": "猫", "size": 36, "super_resolution": False}}, 422, "invalid_size"),
    ({"json": {"prompt": "猫", "size": 4096}}, 422, "out_of_range"),
    ({"json": {"prompt": "猫", "guidance": -1}}, 422, "out_of_range"),
    ({"json": {"prompt": "猫", "nsfw": True}}, 422, "unknown_field"),
    ({"content": "一只猫".encode(), "headers": {"content-type": "text/plain"}}, 415, "unsupported_media_type"),
    ({"content": b'{"prompt": ', "headers": {"content-type": "application/json"}}, 400, "malformed_json"),
    ({"json": {"prompt": "猫", "pad": "x" * 600}}, 413, "body_too_large"),
])
def test_bad_requests_get_clear_4xx(server, kwargs, status, code):
    resp = httpx.post(f"{server}/v1/generate", timeout=30, **kwargs)
    assert resp.status_code == status, resp.text
    assert resp.json()["error"]["code"] == code and resp.json()["error"]["message"]


def test_chunked_oversized_body_is_413(server):
    def chunks():
        for _ in range(10):
            yield b'{"prompt": "' + b"a" * 100
    resp = httpx.post(f"{server}/v1/generate", content=chunks(), headers={"content-type": "application/json"}, timeout=30)
    assert resp.status_code == 413


def test_health_openapi_and_docs(server):
    health = httpx.get(f"{server}/healthz").json()
    assert health["status"] == "ok" and health["model_loaded"] is True and health["queue_depth"] == 0
    spec = httpx.get(f"{server}/openapi.json").json()
    op = spec["paths"]["/v1/generate"]["post"]
    assert "image/png" in op["responses"]["200"]["content"]
    assert op["requestBody"]["content"]["application/json"]["schema"]["required"] == ["prompt"]
    assert httpx.get(f"{server}/docs").status_code == 200


class GatedPipeline:
    """Blocks every call until `release` is set; returns a solid 8x8 image."""

    super_resolution = None

    def __init__(self):
        self.release, self.started = threading.Event(), threading.Event()

    def __call__(self, prompt, **kw):
        self.started.set()
        assert self.release.wait(30)

        class Out:
            images = [Image.new("RGB", (8, 8), (200, 10, 10))]
        return Out()


def test_queue_full_returns_503_with_retry_after():
    pipe = GatedPipeline()
    with running(create_app(lambda: pipe, ServeSettings(max_queue=1, timeout=30))) as url:
        results, threads = [], []

        def post():
            results.append(httpx.post(f"{url}/v1/generate", json={"prompt": "猫"}, timeout=40))

        shed = None
        for _ in range(6):  # bounded: worker holds 1, queue holds 1, so the 3rd at the latest is shed
            t = threading.Thread(target=post)
            t.start()
            threads.append(t)
            if len(threads) == 1:
                assert pipe.started.wait(10)
            time.sleep(0.3)
            shed = next((r for r in results if r.status_code == 503), None)
            if shed is not None:
                break
        assert shed is not None and shed.headers["retry-after"] == "2" and shed.json()["error"]["code"] == "queue_full"
        assert httpx.get(f"{url}/healthz").json()["queue_depth"] == 1
        pipe.release.set()
        for t in threads:
            t.join(30)
        assert sorted(r.status_code for r in results) == [200, 200, 503]


def test_timeout_returns_504_and_health_while_loading():
    pipe, loading = GatedPipeline(), threading.Event()

    def slow_loader():
        assert loading.wait(30)
        return pipe

    with running(create_app(slow_loader, ServeSettings(timeout=0.5)), wait_loaded=False) as url:
        health = httpx.get(f"{url}/healthz")
        assert health.status_code == 503 and health.json()["status"] == "loading"
        assert httpx.post(f"{url}/v1/generate", json={"prompt": "猫"}).status_code == 503
        loading.set()
        time.sleep(0.2)
        resp = httpx.post(f"{url}/v1/generate", json={"prompt": "猫"}, timeout=10)
        assert resp.status_code == 504 and resp.json()["error"]["code"] == "timeout"
        pipe.release.set()


def test_failed_model_load_is_reported():
    def broken():
        raise FileNotFoundError("no model_index.json in /nowhere")

    with running(create_app(broken, ServeSettings())) as url:
        health = httpx.get(f"{url}/healthz")
        assert health.status_code == 503 and "model_index.json" in health.json()["error"]


def test_default_loader_loads_a_saved_pipeline_folder_eagerly(tmp_path, tiny_pipeline):
    """Without a compiled artifact the CLI's loader falls back to the eager pipeline from the folder."""
    from rapid_pipeline.core.home import Home
    from rapid_pipeline.serve import default_loader

    home = Home.from_env(tmp_path / "home")
    run_dir = home.models / "pipeline" / "demo" / "r1"
    tiny_pipeline.save_pretrained(run_dir)
    (run_dir.parent / "production").write_text("r1\n")
    pipe = default_loader(ServeSettings(model=str(run_dir.parent / "production"), device="cpu"), home)()
    assert type(pipe).__name__ == "RapidDiffusionPipeline" and pipe.super_resolution is not None


def test_default_loader_prefers_a_passing_compiled_artifact(tmp_path, tiny_pipeline, monkeypatch):
    import json

    from rapid_pipeline.accel import artifact as A
    from rapid_pipeline.core.fingerprint import fingerprint_path
    from rapid_pipeline.core.home import Home
    from rapid_pipeline.serve import default_loader

    home = Home.from_env(tmp_path / "home")
    run_dir = home.models / "pipeline" / "demo" / "r1"
    tiny_pipeline.save_pretrained(run_dir)
    for name, ok, model in (("failed", False, fingerprint_path(run_dir)), ("good", True, fingerprint_path(run_dir)),
                            ("other-model", True, "0" * 64)):
        folder = home.models / "compiled" / name
        folder.mkdir(parents=True)
        (folder / A.ARTIFACT_JSON).write_text(json.dumps({"key_parts": {"model": model}}))
        (folder / A.PARITY_JSON).write_text(json.dumps({"ok": ok}))
    calls = []
    monkeypatch.setattr(A, "load_optimized", lambda model_dir, artifact_dir, device: calls.append(artifact_dir.name) or "compiled")
    settings = ServeSettings(model=str(run_dir), device="cpu")
    assert default_loader(settings, home)() == "compiled" and calls == ["good"]

    def incompatible(model_dir, artifact_dir, device):
        raise A.ArtifactError("artifact built for NVIDIA H100, this is cpu: recompile")

    monkeypatch.setattr(A, "load_optimized", incompatible)
    with pytest.warns(UserWarning, match="serving the eager pipeline"):
        pipe = default_loader(settings, home)()
    assert type(pipe).__name__ == "RapidDiffusionPipeline"


def test_pipeline_failure_is_a_json_500_and_the_worker_survives():
    class Flaky:
        super_resolution = None
        calls = 0

        def __call__(self, prompt, **kw):
            Flaky.calls += 1
            if Flaky.calls == 1:
                raise RuntimeError("CUDA out of memory (simulated)")

            class Out:
                images = [Image.new("RGB", (8, 8))]
            return Out()

    with running(create_app(lambda: Flaky(), ServeSettings())) as url:
        first = httpx.post(f"{url}/v1/generate", json={"prompt": "猫"}, timeout=10)
        assert first.status_code == 500 and first.json()["error"]["code"] == "generation_failed"
        assert "out of memory" in first.json()["error"]["message"]
        assert _png(httpx.post(f"{url}/v1/generate", json={"prompt": "猫"}, timeout=10)).size == (8, 8)
