"""Helpers for the evaluation tests, built in code: a tiny test split in webdataset tars (per the
shard contract), a tiny stand-in CKCLIP (encode_image / encode_text + tokenizer) and stand-in
pipelines whose output quality we control (close to the real images, or pure noise; per sampler
protocol with `SamplerStandIn`)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

COLOURS = ["红色", "绿色", "蓝色", "黄色", "紫色", "青色", "橙色", "白色", "黑色", "灰色", "粉色", "棕色"]


def real_image(i: int, size: int = 48) -> Image.Image:
    rng = np.random.default_rng(i)
    base = rng.integers(0, 256, size=3)
    yy, xx = np.mgrid[0:size, 0:size]
    arr = np.clip(base[None, None, :] + (xx[..., None] * (i % 3 + 1)) - yy[..., None] * (i % 2), 0, 255)
    return Image.fromarray(arr.astype(np.uint8), "RGB")


def caption(i: int) -> str:
    return f"一个{COLOURS[i % len(COLOURS)]}的方块{i}"


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_split(shard_root: Path, n: int = 12, per_shard: int = 5, split: str = "test") -> Path:
    """shards/<domain>/test/NNNNNN.tar (.jpg/.txt/.json members) + manifest.json."""
    (shard_root / split).mkdir(parents=True, exist_ok=True)
    shards = []
    for s, start in enumerate(range(0, n, per_shard)):
        path = shard_root / split / f"{s:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(start, min(n, start + per_shard)):
                buf = io.BytesIO()
                real_image(i).save(buf, format="JPEG", quality=95)
                key = f"p{i:015d}"
                _add(tar, f"{key}.jpg", buf.getvalue())
                _add(tar, f"{key}.txt", caption(i).encode())
                _add(tar, f"{key}.json", json.dumps({"pair_id": key, "caption": caption(i), "entities": []}).encode())
        shards.append({"path": f"{split}/{path.name}", "samples": min(n, start + per_shard) - start,
                       "bytes": path.stat().st_size, "sha256": __import__("hashlib").sha256(path.read_bytes()).hexdigest()})
    (shard_root / "manifest.json").write_text(json.dumps({"splits": {split: {"shards": shards, "samples": n}}}))
    return shard_root


class TinyClip(torch.nn.Module):
    """Stand-in for CKCLIPModel: encode_image(pixel_values) / encode_text(batch) -> [B, 16]."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = torch.nn.Conv2d(3, 16, 5, stride=4)
        self.img = torch.nn.Linear(16, 16)
        self.tok = torch.nn.EmbeddingBag(101, 16)
        self.image_size = 32

    def encode_image(self, pixel_values):
        return self.img(torch.relu(self.conv(pixel_values)).mean(dim=(2, 3)))

    def encode_text(self, batch):
        return self.tok(batch["input_ids"])


def tiny_tokenizer(texts, max_length=32):
    ids = torch.tensor([[ord(c) % 101 for c in t[:max_length].ljust(max_length)] for t in texts])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def tiny_clip_features(seed: int = 0):
    from rapid_pipeline.metrics.features import CKCLIPFeatures

    return CKCLIPFeatures(TinyClip(seed), tiny_tokenizer, model_id=f"tinyclip{seed:08d}")


class _Out:
    def __init__(self, images):
        self.images = images


class StandInPipeline:
    """`noise` = 0: the real image of the prompt (plus a little seeded noise); 1: pure noise."""

    def __init__(self, noise: float, n: int = 64):
        self.noise = noise
        self.by_caption = {caption(i): np.asarray(real_image(i), dtype=np.float64) for i in range(n)}
        self.calls = []

    def __call__(self, prompt, num_inference_steps=50, guidance_scale=7.5, generator=None, height=None, width=None,
                 scheduler=None, super_resolution=True, output_type="pil"):
        self.calls.append((prompt, generator.initial_seed()))
        base = self.by_caption[prompt]
        noise = torch.rand(base.shape, generator=generator, dtype=torch.float64).numpy() * 255
        arr = (1 - self.noise) * base + self.noise * noise + (1 - self.noise) * (noise - 127.5) * 0.05
        return _Out([Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))])


class SamplerStandIn(StandInPipeline):
    """A stand-in whose quality depends on the sampler it is asked for, the way `evaluate.generate_batch`
    asks (scheduler=, num_inference_steps=): noise_for[(scheduler, steps)], else `noise`. Records every
    (scheduler, steps) it was called with, so a test sees that the candidate really was generated."""

    def __init__(self, noise_for: dict, noise: float = 0.05, n: int = 64):
        super().__init__(noise, n)
        self.noise_for, self.default_noise, self.protocols = dict(noise_for), noise, []

    def __call__(self, prompt, num_inference_steps=50, scheduler=None, **kw):
        self.protocols.append((scheduler, num_inference_steps))
        self.noise = self.noise_for.get((scheduler, num_inference_steps), self.default_noise)
        return super().__call__(prompt, num_inference_steps=num_inference_steps, scheduler=scheduler, **kw)


def make_model_dir(home, domain: str, run: str, marker: str = "") -> Path:
    """A pipeline-shaped folder (model_index.json) so fingerprints and gate pointers are real."""
    d = home.models / "pipeline" / domain / run
    d.mkdir(parents=True, exist_ok=True)
    (d / "model_index.json").write_text(json.dumps({"_class_name": "RapidDiffusionPipeline", "marker": marker or run}))
    return d


