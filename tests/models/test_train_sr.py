"""`rapid train sr` on the tiny preset: loss falls, resume is exact, outputs published, PSNR recorded."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import _shards
from rapid_pipeline.cli import invoke
from rapid_pipeline.models.esrgan import load_generator

SIZE = 48


def _image(rng: np.random.Generator, size: int) -> bytes:
    # Smooth random images (low-frequency sums of sinusoids): learnable by a tiny SR model.
    yy, xx = np.mgrid[0:size, 0:size] / size
    chans = []
    for _ in range(3):
        fx, fy, ph = rng.uniform(0.5, 3, 3)
        chans.append(0.5 + 0.4 * np.sin(2 * np.pi * (fx * xx + fy * yy) + ph * 6))
    arr = (np.stack(chans, -1) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _sample(i: int, split: str, rng) -> dict:
    key = f"{split}{i:04d}"
    meta = {"pair_id": key, "domain": "demo", "split": split, "caption": "图", "caption_simplified": "图", "entities": []}
    return {"__key__": key, "jpg": _image(rng, SIZE), "txt": "图", "json": json.dumps(meta)}


def write_shards(home, domain: str = "demo", n_train: int = 12, n_val: int = 4) -> Path:
    """A shard set without entities (ESRGAN reads only the images)."""
    return _shards.write_shards(home, _sample, (("train", n_train), ("val", n_val)), domain, image_size=SIZE)


def _train(home, *extra: str) -> dict:
    return invoke(["train", "sr", "--domain", "demo", "--preset", "tiny", *extra], home=home.root)


def test_loss_falls_and_outputs_published(home):
    write_shards(home)
    rep = _train(home, "--steps", "16", "--gan-weight", "0", "--lr", "1e-3", "--checkpoint-every", "8")
    assert rep["status"] == "ok"
    l1 = [h["l1"] for h in rep["extra"]["history"]]
    assert len(l1) == 16
    assert np.mean(l1[-4:]) < 0.7 * np.mean(l1[:4])
    run_dir = Path(rep["extra"]["run_dir"])
    for name in ("generator.safetensors", "discriminator.safetensors", "config.json", "metrics.json"):
        assert (run_dir / name).exists(), name
    assert json.loads((run_dir / "config.json").read_text())["growth"] == 8
    g = load_generator(run_dir)
    assert g(torch.rand(1, 3, 8, 8)).shape == (1, 3, 32, 32)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert "val_psnr_before" in metrics and "val_psnr_after" in metrics and "val_psnr_bicubic" in metrics
    assert metrics["val_psnr_after"] > metrics["val_psnr_before"]  # random init -> trained on L1
    assert any("perceptual loss DISABLED" in n for n in metrics["notes"])
    # same command again: step cache hit, nothing retrained
    assert _train(home, "--steps", "16", "--gan-weight", "0", "--lr", "1e-3", "--checkpoint-every", "8")["status"] == "cached"


def test_resume_gives_the_same_next_step_loss(home, tmp_path):
    from rapid_pipeline.core.home import Home

    write_shards(home)
    full = _train(home, "--steps", "4")  # GAN on: G and D both trained, both restored
    other = Home.from_env(tmp_path / "other_home")
    write_shards(other)
    first = _train(other, "--steps", "2")
    assert [h["step"] for h in first["extra"]["history"]] == [1, 2]
    resumed = _train(other, "--steps", "4")  # same run folder (steps not in its name): resumes at step 2
    assert resumed["extra"]["resumed_from_step"] == 2
    assert [h["step"] for h in resumed["extra"]["history"]] == [3, 4]
    for a, b in zip(full["extra"]["history"][2:], resumed["extra"]["history"]):
        for key in ("loss_g", "loss_d", "l1", "gan_g"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (key, a, b)


def test_perceptual_loss_with_local_vgg(home, tmp_path):
    from torchvision.models import vgg19

    write_shards(home, n_train=4, n_val=2)
    torch.manual_seed(0)
    vgg_path = tmp_path / "vgg19.pth"
    torch.save(vgg19(weights=None).state_dict(), vgg_path)
    rep = _train(home, "--steps", "2", "--vgg-weights", str(vgg_path), "--batch-size", "2")
    assert all(h["perceptual"] > 0 for h in rep["extra"]["history"])
    assert not any("DISABLED" in n for n in rep["extra"]["notes"])


def test_print_params_and_missing_shards(home):
    out = invoke(["train", "sr", "--preset", "paper", "--print-params"], home=home.root)
    assert 16_600_000 < out["generator_params"] < 16_800_000
    with pytest.raises(FileNotFoundError, match="rapid shard"):
        _train(home, "--steps", "1")


def test_crash_before_publish_then_resume_auto(home, monkeypatch):
    from rapid_pipeline.core.faults import InjectedFault

    write_shards(home, n_train=8, n_val=2)
    monkeypatch.setenv("RAPID_FAULT", "train_sr:mid_write:raise")
    with pytest.raises(InjectedFault):
        _train(home, "--steps", "4")
    run_dirs = [p for p in (home.models / "esrgan" / "demo").iterdir() if not p.name.startswith(".")]
    assert len(run_dirs) == 1 and not (run_dirs[0] / "generator.safetensors").exists()  # nothing half-published
    assert (run_dirs[0] / "checkpoints" / "step-0000004" / "state.json").exists()
    monkeypatch.delenv("RAPID_FAULT")
    rep = _train(home, "--steps", "4")  # --resume auto: the finished checkpoint, no step retrained
    assert rep["status"] == "ok" and rep["extra"]["resumed_from_step"] == 4 and rep["extra"]["history"] == []
    assert (Path(rep["extra"]["run_dir"]) / "generator.safetensors").exists()
