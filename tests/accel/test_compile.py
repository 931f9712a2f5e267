"""`rapid compile` on the tiny preset (CPU): parity against eager, parity.json, cache hits, serving load.

Tolerances: in fp32 an optimized U-Net differs from eager only by summation order (fused / re-tiled
reductions, another SDPA kernel, fused QKV matmul): ~1e-7 relative per op, measured ~2e-6 absolute on
the tiny U-Net whose outputs are O(1). 1e-4 leaves a 50x margin yet any real error (a wrong weight,
a dropped residual, a wrong kernel) is O(0.1..1). Final images: a 40 dB PSNR floor (rms error 1 % of
the range) versus inf / >150 dB measured.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rapid_pipeline.cli import invoke

SIZE = "32"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from rapid_pipeline.pipeline import build_random_pipeline

    folder = tmp_path_factory.mktemp("pipe") / "tiny"
    build_random_pipeline("tiny", seed=0).save_pretrained(folder)
    return folder


def _compile(home, model_dir, *flags: str) -> dict:
    return invoke(["compile", "--model", str(model_dir), "--size", SIZE, "--steps", "3", *flags], home=home.root)


def _image(pipe, seed: int = 0) -> torch.Tensor:
    return pipe(["一张小炒黄牛肉的照片"], num_inference_steps=3, generator=torch.Generator().manual_seed(seed),
                height=32, width=32, output_type="pt").images


def test_eager_options_parity_cache_and_load(home, model_dir):
    from rapid_pipeline.accel.artifact import load_optimized
    from rapid_pipeline.models.esrgan import psnr
    from rapid_pipeline.pipeline import RapidDiffusionPipeline

    flags = ("--compiler", "none", "--attention", "sdpa-math", "--fuse-qkv", "--channels-last")
    rep = _compile(home, model_dir, *flags)
    assert rep["status"] == "ok" and rep["extra"]["cache_hit"] is False
    folder = Path(rep["extra"]["artifact_dir"])
    assert folder.parent == home.models / "compiled" and folder.name == rep["extra"]["cache_key"]
    parity = json.loads((folder / "parity.json").read_text())
    assert parity == rep["extra"]["parity"] and parity["ok"] is True
    assert set(parity["component_max_abs_err"]) == {"text_encoder", "unet", "vae_decoder", "super_resolution"}
    assert 0 <= parity["unet_max_abs_err"] < 1e-4
    assert parity["image_psnr_db"] == "inf" or parity["image_psnr_db"] > 40
    meta = json.loads((folder / "artifact.json").read_text())
    assert meta["key_parts"]["torch"] == torch.__version__ and meta["key_parts"]["shapes"] == {"batch": 1, "size": 32}
    assert meta["options"]["fuse_qkv"] is True

    again = _compile(home, model_dir, *flags)  # same key: the stage cache answers
    assert again["status"] == "cached" and again["extra"]["cache_key"] == rep["extra"]["cache_key"]
    forced = _compile(home, model_dir, *flags, "--force")  # past the stage cache: the artifact folder is reused
    assert forced["status"] == "ok" and forced["extra"]["cache_hit"] is True
    assert forced["extra"]["compile_seconds"] == rep["extra"]["compile_seconds"]
    other = _compile(home, model_dir, "--compiler", "none", "--attention", "sdpa-math")  # other options: other key
    assert other["extra"]["cache_key"] != rep["extra"]["cache_key"]

    from rapid_pipeline.accel.compile import CompileConfig

    by_key = CompileConfig(compiler="none", attention="sdpa-math", fuse_qkv=True, channels_last=True, size=32, steps=7)
    assert load_optimized(model_dir, home=home, config=by_key).unet.original_attn_processors is not None
    pipe = load_optimized(model_dir, folder)
    eager = RapidDiffusionPipeline.from_pretrained(model_dir)
    assert pipe.unet.original_attn_processors is not None  # QKV fused, as compiled
    assert psnr(_image(pipe), _image(eager)) > 40


def test_bad_options_fail_clearly(home, model_dir):
    with pytest.raises(ValueError, match="cuda-graphs needs a CUDA device"):
        _compile(home, model_dir, "--compiler", "inductor", "--cuda-graphs", "--device", "cpu")
    with pytest.raises(ValueError, match="--attention sdpa-efficient cannot run on cpu"):
        _compile(home, model_dir, "--attention", "sdpa-efficient", "--device", "cpu")
    with pytest.raises(ValueError, match="torch_blade"):
        _compile(home, model_dir, "--compiler", "torch_blade")
    with pytest.raises(FileNotFoundError, match="not a pipeline folder"):
        _compile(home, home.root, "--compiler", "none")


def test_load_refuses_a_changed_model(home, model_dir, tmp_path):
    import shutil

    from rapid_pipeline.accel.artifact import ArtifactError, load_optimized

    copy = tmp_path / "copy"
    shutil.copytree(model_dir, copy)
    rep = _compile(home, copy, "--compiler", "none", "--components", "super_resolution")
    (copy / "scheduler" / "scheduler_config.json").write_text(
        (copy / "scheduler" / "scheduler_config.json").read_text().replace("}", ', "note": 1}', 1))
    with pytest.raises(ArtifactError, match="changed since the artifact was compiled"):
        load_optimized(copy, rep["extra"]["artifact_dir"])


@pytest.mark.slow
def test_torch_compile_unet_parity(home, model_dir):
    rep = _compile(home, model_dir, "--compiler", "inductor", "--components", "unet")
    parity = rep["extra"]["parity"]
    assert parity["ok"] is True
    assert 0 <= parity["unet_max_abs_err"] < 1e-4
    assert parity["image_psnr_db"] == "inf" or parity["image_psnr_db"] > 40


@pytest.mark.slow
def test_aot_inductor_package_parity_and_serving_load(home, model_dir, monkeypatch):
    from rapid_pipeline.accel.artifact import load_optimized
    from rapid_pipeline.models.esrgan import psnr
    from rapid_pipeline.pipeline import RapidDiffusionPipeline

    rep = _compile(home, model_dir, "--compiler", "aot-inductor", "--components", "unet")
    folder = Path(rep["extra"]["artifact_dir"])
    assert (folder / "unet.pt2").stat().st_size > 0
    parity = rep["extra"]["parity"]
    assert parity["ok"] is True and 0 <= parity["unet_max_abs_err"] < 1e-4

    def no_export(*a, **k):
        raise AssertionError("serving must load the .pt2, not export/compile again")

    monkeypatch.setattr(torch.export, "export", no_export)
    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", no_export)
    pipe = load_optimized(model_dir, folder)
    calls = []
    eager_eps = RapidDiffusionPipeline.unet_eps
    monkeypatch.setattr(RapidDiffusionPipeline, "unet_eps", lambda self, *a: calls.append(1) or eager_eps(self, *a))
    image = _image(pipe)
    assert calls == []  # every step went through the AOTInductor package
    assert psnr(image, _image(RapidDiffusionPipeline.from_pretrained(model_dir))) > 40


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("flags", [
    ("--precision", "fp16", "--attention", "sdpa-flash", "--compiler", "inductor", "--cuda-graphs", "--channels-last"),
    ("--precision", "bf16", "--attention", "sdpa-efficient", "--compiler", "aot-inductor", "--fuse-qkv"),
])
def test_cuda_low_precision_parity(home, model_dir, flags):
    rep = _compile(home, model_dir, "--device", "cuda", *flags)
    parity = rep["extra"]["parity"]
    assert rep["extra"]["device_model"].startswith("cuda:")
    assert parity["ok"] is True, parity
    assert parity["unet_rel_err"] <= parity["bounds"]["unet_rel_err"]


def test_diffusers_registry_backend_as_unet_processor(home, model_dir):
    from diffusers.models.attention_processor import Attention

    from rapid_pipeline.accel.attention import DispatchAttnProcessor
    from rapid_pipeline.accel.artifact import load_optimized

    rep = _compile(home, model_dir, "--compiler", "none", "--attention", "diffusers:_native_math", "--components", "unet")
    parity = rep["extra"]["parity"]
    assert parity["ok"] is True and 0 <= parity["unet_max_abs_err"] < 1e-4
    pipe = load_optimized(model_dir, rep["extra"]["artifact_dir"])
    procs = [m.processor for m in pipe.unet.modules() if isinstance(m, Attention)]
    assert procs and all(isinstance(p, DispatchAttnProcessor) for p in procs)
    with pytest.raises(ValueError, match="Hub-downloaded kernels are not allowed"):
        _compile(home, model_dir, "--attention", "diffusers:flash_hub")
    with pytest.raises(ValueError, match="--attention diffusers:flash cannot run"):
        _compile(home, model_dir, "--attention", "diffusers:flash")  # flash-attn package not installed here
