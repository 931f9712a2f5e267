"""RapidDiffusionPipeline: sizes with / without SR, schedulers, save/load round trip, fp32 decode, templates."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rapid_pipeline.pipeline import RapidDiffusionPipeline, build_random_pipeline, resolve_pipeline_dir


@pytest.fixture(scope="module")
def pipe():
    return build_random_pipeline("tiny", seed=0)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_generates_requested_size_without_and_with_sr(pipe):
    out = pipe("一张小炒黄牛肉的照片", num_inference_steps=3, height=32, width=48, generator=_gen(),
               super_resolution=False, output_type="pt")
    assert out.images.shape == (1, 3, 32, 48)
    out = pipe(["苹果", "奶茶"], num_inference_steps=3, height=32, width=32, generator=_gen(), output_type="pil")
    assert [im.size for im in out.images] == [(128, 128), (128, 128)]  # ESRGAN x4


def test_default_size_and_np_output(pipe):
    out = pipe("苹果", num_inference_steps=2, output_type="np", super_resolution=False, generator=_gen())
    assert out.images.shape == (1, 32, 32, 3)  # tiny: 16x16 latents, VAE factor 2
    assert 0.0 <= out.images.min() and out.images.max() <= 1.0


@pytest.mark.parametrize("name", ["pndm", "ddim", "dpmsolver++"])
def test_schedulers_are_deterministic_given_a_generator(pipe, name):
    a = pipe("苹果", num_inference_steps=3, scheduler=name, generator=_gen(3), output_type="pt", super_resolution=False)
    b = pipe("苹果", num_inference_steps=3, scheduler=name, generator=_gen(3), output_type="pt", super_resolution=False)
    c = pipe("苹果", num_inference_steps=3, scheduler=name, generator=_gen(4), output_type="pt", super_resolution=False)
    assert torch.equal(a.images, b.images)
    assert not torch.equal(a.images, c.images)


def test_unknown_scheduler_and_bad_size_are_clear_errors(pipe):
    with pytest.raises(ValueError, match="unknown scheduler"):
        pipe("x", num_inference_steps=2, scheduler="euler-foo")
    with pytest.raises(ValueError, match="multiples of 2"):
        pipe("x", num_inference_steps=2, height=33, width=32)


def test_cfg_runs_one_unet_call_of_batch_2b(pipe, monkeypatch):
    seen = []
    orig = pipe.unet_eps

    def spy(latents, t, context):
        seen.append((latents.shape[0], context.shape[0]))
        return orig(latents, t, context)

    monkeypatch.setattr(pipe, "unet_eps", spy)
    pipe(["a", "b", "c"], num_inference_steps=2, guidance_scale=7.5, scheduler="ddim", super_resolution=False)
    assert seen == [(6, 6), (6, 6)]
    seen.clear()
    pipe(["a"], num_inference_steps=2, guidance_scale=1.0, scheduler="ddim", super_resolution=False)
    assert seen == [(1, 1), (1, 1)]  # no guidance -> no uncond branch


def test_guidance_changes_the_image(pipe):
    kw = dict(num_inference_steps=3, scheduler="ddim", output_type="pt", super_resolution=False)
    a = pipe("苹果", guidance_scale=1.0, generator=_gen(), **kw).images
    b = pipe("苹果", guidance_scale=7.5, generator=_gen(), **kw).images
    assert (a - b).abs().max() > 1e-4


def test_prompt_template(pipe):
    assert pipe.apply_template(["苹果", "一张苹果的照片"], "一张{object}的照片") == ["一张苹果的照片", "一张苹果的照片"]
    assert pipe.apply_template(["苹果"], None) == ["苹果"]


def test_entity_tokens_reach_the_text_encoder(pipe):
    """Prompts are linked against the knowledge table; the TransE vectors change the U-Net's context."""
    batch = pipe.tokenizer(["一张小炒黄牛肉的照片"], max_length=32)
    assert batch["entity_mask"].sum() == 5  # 小炒黄牛肉: five characters, each an entity token
    hidden = pipe.encode_text(["一张小炒黄牛肉的照片"])
    assert hidden.shape == (1, 32, pipe.text_encoder.hidden_size)
    with torch.no_grad():
        plain = pipe.text_encoder(batch["input_ids"], batch["attention_mask"])
    assert (hidden - plain).abs().max() > 1e-4


def test_save_load_roundtrip_is_exact(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "p")
    index = json.loads((tmp_path / "p" / "model_index.json").read_text())
    assert index["_class_name"] == "RapidDiffusionPipeline"
    for sub in ("text_encoder", "tokenizer", "unet", "vae", "scheduler", "super_resolution", "knowledge"):
        assert (tmp_path / "p" / sub).is_dir(), sub
    assert not list((tmp_path / "p").rglob("*.bin")) and not list((tmp_path / "p").rglob("*.pt"))
    loaded = RapidDiffusionPipeline.from_pretrained(tmp_path / "p")
    kw = dict(num_inference_steps=3, output_type="pt", height=16, width=16)
    a = pipe("小炒黄牛肉", generator=_gen(1), **kw).images
    b = loaded("小炒黄牛肉", generator=_gen(1), **kw).images
    assert a.shape == (1, 3, 64, 64) and torch.equal(a, b)


def test_production_pointer_and_missing_folder(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "run1")
    (tmp_path / "production").write_text("run1\n")
    assert resolve_pipeline_dir(tmp_path / "production") == tmp_path / "run1"
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        RapidDiffusionPipeline.from_pretrained(tmp_path / "nothing")


def test_disallowed_component_library_is_refused(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "p")
    index = json.loads((tmp_path / "p" / "model_index.json").read_text())
    index["unet"] = ["os", "system"]
    (tmp_path / "p" / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="not allowed"):
        RapidDiffusionPipeline.from_pretrained(tmp_path / "p")


def test_half_precision_decode_is_fp32_and_not_black(pipe):
    """decode_latents upcasts: an fp16/bf16 VAE must not give black / NaN images (diffusers 7310, 9558)."""
    p = build_random_pipeline("tiny", seed=0, super_resolution=False)
    latents = torch.randn(1, 4, 16, 16, generator=_gen(5))
    ref = p.decode_latents(latents)
    p.vae.to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        img = p.decode_latents(latents.to(torch.bfloat16))
    assert p.vae.dtype == torch.bfloat16  # restored after decoding
    assert img.dtype == torch.float32 and torch.isfinite(img).all()
    assert img.std() > 0.01 and img.max() > 0.05  # not a constant black frame
    assert (img - ref).abs().max() < 0.05  # bf16 latents only; the decode itself ran in fp32


def test_bf16_pipeline_end_to_end(tmp_path):
    p = build_random_pipeline("tiny", seed=0, super_resolution=False).to(dtype=torch.bfloat16)
    img = p("苹果", num_inference_steps=2, output_type="np", generator=_gen()).images
    assert np.isfinite(img).all() and img.std() > 0.01


@pytest.mark.gpu
def test_fp16_pipeline_on_cuda_is_not_black():
    p = build_random_pipeline("tiny", seed=0).to("cuda", torch.float16)
    img = p("苹果", num_inference_steps=3, output_type="pt", generator=_gen()).images
    assert img.shape == (1, 3, 128, 128) and torch.isfinite(img).all() and img.std() > 0.01
    assert p.vae.dtype == torch.float16  # decode upcast only for the call
