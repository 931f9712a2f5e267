"""`rapid train diffusion` (tiny preset, CPU): loss falls, exact resume (step + data position), EMA updates,
precomputed latents match the online VAE path, validation images are not black, the published folder is a
working pipeline; `rapid pipeline assemble` and `rapid generate` on top of it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import _shards
from _shards import entity_sample, noisy_colour
from rapid_pipeline.cli import invoke
from rapid_pipeline.train import diffusion as td

ENTITIES = [("红烧肉", (150, 60, 40)), ("青菜", (60, 170, 70)), ("豆腐", (235, 230, 210)), ("蓝莓", (40, 50, 150))]
TEMPLATES = ["一张{}的照片", "桌上放着{}", "新鲜的{}"]
DIM = 8


def _sample(i: int, split: str, rng) -> dict:
    name, rgb = ENTITIES[i % len(ENTITIES)]
    return entity_sample(i, split, [n for n, _ in ENTITIES], TEMPLATES, noisy_colour(rgb, rng, 40))


def write_shards(home, domain="demo", n_train=12, n_val=4) -> Path:
    return _shards.write_shards(home, _sample, (("train", n_train), ("val", n_val)), domain,
                                n_entities=len(ENTITIES), dim=DIM, image_size=40)


def write_ckclip(home, domain="demo") -> Path:
    """A random tiny CKCLIP run folder (model + knowledge tokenizer) where `rapid train clip` puts one."""
    from rapid_pipeline.models.char_tokenizer import build_vocab, load_tokenizer
    from rapid_pipeline.models.ckclip import KnowledgeTokenizer, build_ckclip

    out = home.models / "ckclip" / domain / "run-test"
    captions = [t.format(n) for t in TEMPLATES for n, _ in ENTITIES]
    build_vocab(captions, out)
    tok = load_tokenizer(out)
    torch.manual_seed(0)
    model = build_ckclip("tiny", vocab_size=len(tok), entity_dim=DIM)
    vectors = np.random.default_rng(1).normal(size=(len(ENTITIES), DIM)).astype(np.float32)
    ktok = KnowledgeTokenizer(tok, [f"e{k:015d}" for k in range(len(ENTITIES))], vectors, [[n] for n, _ in ENTITIES])
    model.save_pretrained(out)
    ktok.save_pretrained(out)
    return out


@pytest.fixture
def data(home):
    write_shards(home)
    write_ckclip(home)
    return home


CFG = td.PRESETS["tiny"]


def _run(home, resume="auto", **changes):
    import dataclasses

    return td.run(dataclasses.replace(CFG, **changes), home, "demo", resume=resume)


def _fixed_loss(trainer, samples) -> float:
    with torch.no_grad():
        return float(td.diffusion_loss(trainer, samples, torch.Generator().manual_seed(123)))


def test_loss_falls_on_a_fixed_batch(data):
    clip_dir = td.find_clip(data, "demo", "")
    cfg = td.PRESETS["tiny"]
    t = td.build_trainer(cfg, clip_dir)
    stream = td.SampleStream(data.shards / "demo", cfg.seed)
    probe = stream.next_batch(8)
    before = _fixed_loss(t, probe)
    for step in range(25):
        td.train_step(t, stream.next_batch(4), step)
    after = _fixed_loss(t, probe)
    assert after < 0.8 * before, (before, after)


def test_ema_verifiably_updates(data):
    cfg = td.PRESETS["tiny"]
    t = td.build_trainer(cfg, td.find_clip(data, "demo", ""))
    init = {k: v.clone() for k, v in t.ema.shadow.items()}
    stream = td.SampleStream(data.shards / "demo", cfg.seed)
    for step in range(3):
        td.train_step(t, stream.next_batch(4), step)
    online = dict(t.raw(t.unet).named_parameters())
    moved = sum(not torch.equal(init[k], v) for k, v in t.ema.shadow.items())
    differs = sum(not torch.allclose(online[k].float(), v) for k, v in t.ema.shadow.items())
    assert t.ema.num_updates == 3
    assert moved > 0.9 * len(init) and differs > 0.9 * len(init), (moved, differs, len(init))
    # and the EMA really is between init and online: closer to online than init is after warm-up decay
    k = "conv_in.weight"
    assert (t.ema.shadow[k] - online[k]).abs().sum() < (init[k] - online[k]).abs().sum()


def test_resume_matches_uninterrupted_run(data, tmp_path):
    from rapid_pipeline.core.home import Home

    other = Home.from_env(tmp_path / "other")
    write_shards(other)
    write_ckclip(other)
    full = _run(other, steps=6, checkpoint_every=3)
    part = _run(data, steps=3, checkpoint_every=3)
    rest = _run(data, steps=6, checkpoint_every=3)
    assert part.extra["run_dir"] == rest.extra["run_dir"]  # same run: steps is not part of its identity
    assert rest.extra["resumed_from_step"] == 3
    h_full, h_rest = full.extra["history"], rest.extra["history"]
    assert [h["step"] for h in h_rest] == [4, 5, 6]
    for a, b in zip(h_full[3:], h_rest):
        assert a["keys"] == b["keys"]  # same data position
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-7)  # same next-step loss
    # 12 train samples, 4 per step: 6 steps = 2 epochs, ending at the epoch boundary
    assert rest.extra["data_position"] == full.extra["data_position"] == {"epoch": 1, "index": 12}


def test_precomputed_latents_match_online(data):
    online = _run(data, steps=2, checkpoint_every=2, resume="none")
    cached = _run(data, steps=2, checkpoint_every=2, resume="none", precompute_latents=True, seed=0)
    for a, b in zip(online.extra["history"], cached.extra["history"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    assert cached.extra["latent_cache"] is True
    assert list((data.models / "pipeline" / "demo" / ".latents").glob("*.safetensors"))


def test_published_pipeline_generates_and_validation_not_black(data):
    from rapid_pipeline.pipeline import RapidDiffusionPipeline

    rep = _run(data, steps=4, checkpoint_every=2, validate_every=2)
    run_dir = Path(rep.extra["run_dir"])
    for sub in ("model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler", "knowledge",
                "training.json", "validation/step-0000002/00.png", "validation/step-0000004/stats.json"):
        assert (run_dir / sub).exists(), sub
    manifest = json.loads((run_dir / "_manifest.json").read_text())
    paths = [f["path"] for f in manifest["files"]]
    assert "unet/diffusion_pytorch_model.safetensors" in paths and not [p for p in paths if p.startswith("checkpoints")]
    assert rep.outputs[0].path == run_dir and rep.outputs[0].fingerprint == manifest["fingerprint"]
    stats = json.loads((run_dir / "validation" / "step-0000004" / "stats.json").read_text())
    assert stats["val_black_fraction"] == 0.0 and stats["val_std"] > 0.005
    pipe = RapidDiffusionPipeline.from_pretrained(run_dir)
    img = pipe("一张豆腐的照片", num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert img.shape == (1, 32, 32, 3) and np.isfinite(img).all()
    # published U-Net = EMA weights, not the online ones
    from rapid_pipeline.train.common import latest_checkpoint
    from rapid_pipeline.core.checkpoint import load_state_dict

    ema = load_state_dict(latest_checkpoint(run_dir) / "ema.safetensors")
    w = dict(pipe.unet.named_parameters())["conv_in.weight"]
    assert torch.allclose(w, ema["shadow.conv_in.weight"])


def test_bf16_autocast_validation_decode_not_black(data):
    import dataclasses

    cfg = dataclasses.replace(CFG, precision="bf16", device="cpu")
    t = td.build_trainer(cfg, td.find_clip(data, "demo", ""))
    assert t.dtype == torch.bfloat16
    stream = td.SampleStream(data.shards / "demo", cfg.seed)
    logs = td.train_step(t, stream.next_batch(4), 0)
    assert np.isfinite(logs["loss"])
    stats = td.validate(t, 1, data.root / "val-bf16", ["一张豆腐的照片"])
    assert stats["val_black_fraction"] == 0.0 and stats["val_std"] > 0.005


def test_cli_end_to_end_assemble_and_generate(data, tmp_path):
    from rapid_pipeline.models.esrgan import build_generator, write_generator_config
    from rapid_pipeline.core.checkpoint import save_state_dict

    out = invoke(["train", "diffusion", "--domain", "demo", "--preset", "tiny", "--steps", "2",
                  "--checkpoint-every", "2", "--prompt-template", "一张{object}的照片"])
    assert out["status"] == "ok" and out["extra"]["final_loss"] > 0
    esr = data.models / "esrgan" / "demo" / "sr-test"
    g = build_generator(num_blocks=1, num_features=8, growth=8)
    save_state_dict(g.state_dict(), esr / "generator.safetensors")
    write_generator_config(g, esr)
    asm = invoke(["pipeline", "assemble", "--domain", "demo"])
    folder = Path(asm["extra"]["pipeline"])
    assert (folder / "super_resolution" / "generator.safetensors").exists()
    (folder.parent / "production").write_text(folder.name + "\n")
    png = tmp_path / "out.png"
    res = invoke(["generate", "豆腐", "--model", str(folder.parent / "production"), "-o", str(png), "--steps", "2",
                  "--size", "32", "--seed", "1"])
    assert Image.open(png).size == (128, 128) and res["size"] == [128, 128]
    invoke(["generate", "豆腐", "--model", str(folder), "-o", str(tmp_path / "b.png"), "--steps", "2",
            "--size", "32", "--no-sr"])
    assert Image.open(tmp_path / "b.png").size == (32, 32)


def test_print_params_paper_matches_table5():
    out = invoke(["train", "diffusion", "--preset", "paper", "--print-params"])
    assert 855e6 < out["unet"] < 865e6  # SD-1.x U-Net shape: 859.5M
    assert 83e6 < out["vae"] < 84.5e6
    assert 1.0e9 < out["total"] < 1.12e9  # Table 5: 1.06B with ESRGAN
    assert "unet" in out["text"]


def test_paper_preset_is_table6():
    from rapid_pipeline.models.ldm import LDM_PRESETS, build_on_meta, build_unet, build_vae

    unet = build_on_meta(build_unet, "paper", context_dim=768).config
    vae = build_on_meta(build_vae, "paper").config
    assert (unet.sample_size, unet.in_channels, unet.out_channels) == (32, 4, 4)
    assert tuple(unet.block_out_channels) == (320, 640, 1280, 1280)  # 320 x (1,2,4,4)
    assert tuple(unet.down_block_types) == ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)  # attn at 4,2,1
    assert unet.cross_attention_dim == 768 and unet.attention_head_dim == 8 and unet.transformer_layers_per_block == 1
    assert (vae.latent_channels, vae.sample_size) == (4, 256)
    assert tuple(vae.block_out_channels) == (128, 256, 512, 512)
    assert LDM_PRESETS["paper"].image_size // 2 ** (len(vae.block_out_channels) - 1) == 32  # KL-f8: 32x32 latents
    assert td.PRESETS["paper"].lr == 5e-5 and td.PRESETS["paper"].batch_size == 80


def test_bad_inputs_are_clear_errors(home):
    with pytest.raises(FileNotFoundError, match="rapid shard"):
        _run(home)
    write_shards(home)
    with pytest.raises(FileNotFoundError, match="rapid train clip"):
        _run(home)
    write_ckclip(home)
    with pytest.raises(ValueError, match="object"):
        _run(home, prompt_template="no placeholder")
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        _run(home, init_from="/nonexistent/sd15")


def test_gradient_checkpointing_gives_the_same_loss(data):
    import dataclasses

    losses = []
    for gc in (False, True):
        cfg = dataclasses.replace(CFG, gradient_checkpointing=gc)
        t = td.build_trainer(cfg, td.find_clip(data, "demo", ""))
        t.text_encoder.eval()  # dropout draws differ between the two paths; the math must not
        stream = td.SampleStream(data.shards / "demo", cfg.seed)
        samples = stream.next_batch(4)
        losses.append([td.train_step(t, samples, 0)["loss"], td.train_step(t, samples, 1)["loss"]])
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)


def test_init_from_local_sd_folder(data, tmp_path):
    from rapid_pipeline.models.ldm import build_unet, build_vae

    torch.manual_seed(7)
    unet, vae = build_unet("tiny", context_dim=64), build_vae("tiny")  # tiny CKCLIP text width is 64
    unet.save_pretrained(tmp_path / "sd" / "unet")
    vae.save_pretrained(tmp_path / "sd" / "vae")
    import dataclasses

    t = td.build_trainer(dataclasses.replace(CFG, init_from=str(tmp_path / "sd")), td.find_clip(data, "demo", ""))
    assert torch.equal(t.raw(t.unet).conv_in.weight, unet.conv_in.weight)
    assert torch.equal(t.vae.encoder.conv_in.weight, vae.encoder.conv_in.weight)
    assert not any(p.requires_grad for p in t.vae.parameters())  # the VAE stays frozen


def test_crash_mid_run_leaves_nothing_published_and_resumes(data, monkeypatch):
    from rapid_pipeline.core.faults import InjectedFault

    monkeypatch.setenv("RAPID_FAULT", "train_diffusion:before_publish:raise")
    with pytest.raises(InjectedFault):
        _run(data, steps=2, checkpoint_every=1)
    run_dirs = [p for p in (data.models / "pipeline" / "demo").iterdir() if p.name.startswith("ldm-")]
    assert len(run_dirs) == 1 and not (run_dirs[0] / "model_index.json").exists()  # never half published
    monkeypatch.delenv("RAPID_FAULT")
    rep = _run(data, steps=2, checkpoint_every=1)
    assert rep.extra["resumed_from_step"] == 2 and (Path(rep.extra["run_dir"]) / "model_index.json").exists()
    assert not [p for p in run_dirs[0].parent.iterdir() if p.name.startswith(".tmp-")]  # stale staging removed


def test_two_process_streams_split_the_global_batch(data):
    root = data.shards / "demo"
    single = td.SampleStream(root, 0)
    ranks = [td.SampleStream(root, 0, rank=r, world=2) for r in range(2)]
    for _ in range(4):  # 4 global batches of 6 = 2 epochs of 12 samples
        whole = [s["key"] for s in single.next_batch(6)]
        parts = [[s["key"] for s in st.next_batch(3)] for st in ranks]
        assert parts[0] == whole[0::2] and parts[1] == whole[1::2]
    assert ranks[0].position == ranks[1].position == single.position == {"epoch": 1, "index": 12}


@pytest.mark.gpu
def test_bf16_training_step_on_cuda(data):
    import dataclasses

    cfg = dataclasses.replace(CFG, device="cuda", precision="bf16")
    t = td.build_trainer(cfg, td.find_clip(data, "demo", ""))
    assert t.device.type == "cuda" and t.dtype == torch.bfloat16
    stream = td.SampleStream(data.shards / "demo", cfg.seed)
    losses = [td.train_step(t, stream.next_batch(4), s)["loss"] for s in range(3)]
    assert all(np.isfinite(losses))
    stats = td.validate(t, 3, data.root / "val-cuda", ["一张豆腐的照片"])
    assert stats["val_black_fraction"] == 0.0
