"""Shared fixtures. Everything a test needs is built in code under tmp_path; no committed binaries."""

from __future__ import annotations

import os

# Two cores in CI and several test processes: keep every torch/BLAS pool at one thread.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ["RAPID_PROGRESS"] = "0"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A fresh RAPID_HOME under tmp_path (also exported, for code that reads the variable)."""
    from rapid_pipeline.core.home import Home

    monkeypatch.setenv("RAPID_HOME", str(tmp_path / "rapid_home"))
    for k in [k for k in os.environ if k.startswith("OPENLINEAGE")]:
        monkeypatch.delenv(k)
    return Home.from_env(tmp_path / "rapid_home")


@pytest.fixture
def load_bench():
    """``load_bench("latency")``: a script of bench/ imported as a module (bench/ is not a package)."""
    import importlib.util
    from pathlib import Path

    def load(name: str):
        path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(f"rapid_bench_{name}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        torch.set_num_threads(1)
        has_cuda = torch.cuda.is_available()
    except Exception:
        has_cuda = False
    skip_gpu = pytest.mark.skip(reason="needs CUDA: torch.cuda.is_available() is false")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)
