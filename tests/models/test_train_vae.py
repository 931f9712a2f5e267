"""`rapid train vae` (tiny preset, CPU): the loss falls and val PSNR rises, the published folder is a
`save_pretrained` AutoencoderKL whose scaling_factor makes latents ~unit variance, a resume computes
the same next-step loss as an uninterrupted run, and `rapid train diffusion --vae auto|none|DIR` uses
(or refuses) it. Shards and a random tiny CKCLIP are built in code, as in test_train_diffusion.py.

    .venv/bin/python -m pytest tests/models/test_train_vae.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import _shards
from _shards import entity_sample, jpeg
from rapid_pipeline.cli import invoke
from rapid_pipeline.core.home import Home
from rapid_pipeline.core.warehouse import connect

ENTITIES = ["红烧肉", "青菜", "豆腐", "蓝莓"]
TEMPLATES = ["一张{}的照片", "桌上放着{}", "新鲜的{}"]
DIM = 8
STEPS = 30  # enough for a clear loss drop on these images; ~10 s on one busy core


def _jpeg(rng: np.random.Generator, size: int = 40) -> bytes:
    # Smooth images (low-frequency sinusoids per channel): a tiny autoencoder learns them in a few dozen steps.
    yy, xx = np.mgrid[0:size, 0:size] / size
    chans = []
    for _ in range(3):
        fx, fy, ph = rng.uniform(0.5, 2.5, 3)
        chans.append(0.5 + 0.4 * np.sin(2 * np.pi * (fx * xx + fy * yy) + ph * 6))
    return jpeg(np.stack(chans, -1) * 255, quality=95)


def _sample(i: int, split: str, rng: np.random.Generator) -> dict:
    return entity_sample(i, split, ENTITIES, TEMPLATES, _jpeg(rng))


def write_shards(home: Home, domain: str = "demo", n_train: int = 16, n_val: int = 8) -> Path:
    return _shards.write_shards(home, _sample, (("train", n_train), ("val", n_val)), domain,
                                n_entities=len(ENTITIES), dim=DIM, image_size=40)


def write_ckclip(home: Home, domain: str = "demo") -> Path:
    """A random tiny CKCLIP run folder where `rapid train clip` puts one (diffusion needs a text tower)."""
    from rapid_pipeline.models.char_tokenizer import build_vocab, load_tokenizer
    from rapid_pipeline.models.ckclip import KnowledgeTokenizer, build_ckclip

    out = home.models / "ckclip" / domain / "run-test"
    build_vocab([t.format(n) for t in TEMPLATES for n in ENTITIES], out)
    tok = load_tokenizer(out)
    torch.manual_seed(0)
    model = build_ckclip("tiny", vocab_size=len(tok), entity_dim=DIM)
    vectors = np.random.default_rng(1).normal(size=(len(ENTITIES), DIM)).astype(np.float32)
    KnowledgeTokenizer(tok, [f"e{k:015d}" for k in range(len(ENTITIES))], vectors, [[n] for n in ENTITIES]).save_pretrained(out)
    model.save_pretrained(out)
    return out


def train_vae(home: Home, *extra: str) -> dict:
    return invoke(["train", "vae", "--domain", "demo", "--preset", "tiny", *extra], home=home.root)


def train_diffusion(home: Home, *extra: str) -> dict:
    return invoke(["train", "diffusion", "--domain", "demo", "--preset", "tiny", "--steps", "2",
                   "--checkpoint-every", "2", "--val-images", "1", *extra], home=home.root)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One home with shards, a CKCLIP and a VAE trained for STEPS steps (shared: training is the slow part)."""
    home = Home.from_env(tmp_path_factory.mktemp("vae") / "rapid_home")
    write_shards(home)
    write_ckclip(home)
    report = train_vae(home, "--steps", str(STEPS), "--checkpoint-every", "10", "--log-every", "5")
    return home, report


def test_loss_falls_psnr_rises_and_the_folder_is_published(trained):
    home, rep = trained
    extra = rep["extra"]
    assert rep["status"] == "ok"
    losses = [h["loss"] for h in extra["history"]]
    assert len(losses) == STEPS and all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses
    assert extra["val_images"] == 8 and extra["psnr_after"] > extra["psnr_before"] + 1.0, extra
    run_dir = Path(extra["run_dir"])
    assert run_dir.parent == home.models / "vae" / "demo" and run_dir.name.startswith("vae-")
    assert {"config.json", "diffusion_pytorch_model.safetensors", "training.json"} <= {p.name for p in run_dir.iterdir()}
    assert rep["outputs"][0]["uri"].endswith(str(run_dir))
    sf = json.loads((run_dir / "config.json").read_text())["scaling_factor"]
    assert np.isfinite(sf) and sf > 0 and sf == pytest.approx(extra["scaling_factor"])
    with connect(home, write=False) as con:
        rows = dict(con.execute("SELECT name, count(*) FROM metrics WHERE stage = 'train_vae' GROUP BY name").fetchall())
    assert rows.get("psnr_after") == 1 and rows.get("loss") == STEPS // 5, rows


def test_scaling_factor_gives_unit_variance_latents(trained):
    """Independent of the stage's own measurement: reload the folder, sample latents of the train images."""
    from rapid_pipeline.data import loader
    from rapid_pipeline.models.ldm import load_vae
    from rapid_pipeline.train.diffusion import image_tensor

    home, rep = trained
    vae = load_vae(rep["extra"]["run_dir"]).eval()
    images = torch.stack([image_tensor(s["image"], 32) for s in loader.iter_samples(home.shards / "demo", "train")])
    with torch.no_grad():
        z = vae.encode(images).latent_dist.sample(torch.Generator().manual_seed(99)) * vae.config.scaling_factor
    assert 0.85 < float(z.std()) < 1.15, float(z.std())


def test_same_command_is_a_cache_hit(trained):
    home, rep = trained
    again = train_vae(home, "--steps", str(STEPS), "--checkpoint-every", "10", "--log-every", "5")
    assert again["status"] == "cached" and again["extra"]["run_dir"] == rep["extra"]["run_dir"]


def test_resume_gives_the_same_next_step_loss(tmp_path):
    args = ("--checkpoint-every", "3", "--batch-size", "4", "--val-images", "2", "--scale-images", "4")
    full_home, part_home = Home.from_env(tmp_path / "full"), Home.from_env(tmp_path / "part")
    write_shards(full_home, n_train=10, n_val=2)  # 10 samples, 4 per step: step 4 crosses an epoch boundary
    write_shards(part_home, n_train=10, n_val=2)
    full = train_vae(full_home, "--steps", "6", *args)["extra"]
    first = train_vae(part_home, "--steps", "3", *args)["extra"]
    rest = train_vae(part_home, "--steps", "6", *args)["extra"]
    assert first["run_dir"] == rest["run_dir"]  # same run: steps is not part of its identity
    assert rest["resumed_from_step"] == 3 and [h["step"] for h in rest["history"]] == [4, 5, 6]
    for a, b in zip(full["history"][3:], rest["history"]):
        for key in ("loss", "rec", "kl"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-8), (key, a, b)
    assert rest["psnr_before"] == pytest.approx(full["psnr_before"])  # the random init's PSNR survives a resume
    assert rest["psnr_after"] == pytest.approx(full["psnr_after"], rel=1e-5)


def test_diffusion_vae_auto_uses_the_trained_vae_and_none_is_random(trained):
    from rapid_pipeline.core.checkpoint import load_state_dict

    home, rep = trained
    vae_dir = rep["extra"]["run_dir"]
    auto = train_diffusion(home, "--vae", "auto")
    assert auto["status"] == "ok" and auto["extra"]["vae"] == vae_dir
    assert not any("random" in n for n in auto["extra"]["notes"])
    assert any(i["uri"].endswith(vae_dir) for i in auto["inputs"])  # the VAE is part of the cache key / lineage
    pipe_vae = Path(auto["extra"]["run_dir"]) / "vae"
    published = load_state_dict(pipe_vae / "diffusion_pytorch_model.safetensors")
    trained_sd = load_state_dict(Path(vae_dir) / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(published[k], trained_sd[k]) for k in trained_sd)
    assert json.loads((pipe_vae / "config.json").read_text())["scaling_factor"] == pytest.approx(rep["extra"]["scaling_factor"])
    none = train_diffusion(home, "--vae", "none")
    assert none["extra"]["vae"] == "random" and any("random" in n for n in none["extra"]["notes"])
    assert none["extra"]["run_dir"] != auto["extra"]["run_dir"]


def test_bad_vae_dir_and_bad_config_are_clear_errors(trained, tmp_path):
    home, _ = trained
    with pytest.raises(FileNotFoundError, match="not a VAE folder"):
        train_diffusion(home, "--vae", str(tmp_path / "no-such-vae"))
    with pytest.raises(FileNotFoundError, match="not a VAE folder"):
        train_diffusion(home, "--vae", str(home.models / "vae" / "demo"))  # the domain folder, not a run
    with pytest.raises(ValueError, match="l1 or mse"):
        train_vae(home, "--loss", "l2")
    with pytest.raises(FileNotFoundError, match="rapid shard"):
        train_vae(Home.from_env(tmp_path / "empty"))
    with pytest.raises(ValueError, match="checkpoint_every"):
        train_vae(home, "--checkpoint-every", "0")


def test_a_vae_of_another_preset_is_refused_before_training(trained, tmp_path):
    import dataclasses

    from rapid_pipeline.models import ldm

    home, _ = trained
    other = dataclasses.replace(ldm.ldm_config("tiny"), vae_channel_mult=(1, 2, 2))  # f4 latents, tiny U-Net wants f2
    ldm.build_vae(other).save_pretrained(tmp_path / "f4-vae")
    with pytest.raises(ValueError, match="same --preset"):
        train_diffusion(home, "--vae", str(tmp_path / "f4-vae"))
