"""Fine-tune the latent diffusion U-Net (and the CKCLIP text tower) on a domain's shards.

    rapid train diffusion --domain demo --preset tiny
    rapid train diffusion --domain food --preset paper --clip models/ckclip/food/<run> \\
        --init-from /local/sd-1.x-diffusers --precompute-latents --resume auto
    accelerate launch --multi_gpu --num_processes 8 -m rapid_pipeline train diffusion --domain food --preset paper
    torchrun --nproc_per_node 2 -m rapid_pipeline train diffusion --domain demo --preset tiny --device cpu  # gloo
    rapid train diffusion --preset paper --print-params

Objective (paper eq. 1): ``MSE(eps, eps_theta(x_t, t, tau(y)))`` with ``x_t`` from a DDPM schedule
(1000 steps, scaled-linear betas, SD-1.x values) on VAE latents, ``tau`` = CKCLIP text encoder fed
TransE vectors at entity tokens. Captions are replaced by the empty prompt with p=0.1 (classifier-free
guidance). Appendix C: lr 5e-5, batch 80, 256 px, 32x32 latents, context 768.

Invariants:
* ``<run>`` (``models/pipeline/<domain>/<run>/``) is fixed by the config minus run-length fields and
  the inputs, so ``--resume auto`` after a crash, or a rerun with more ``--steps``, continues from the
  newest complete checkpoint (model, EMA, optimizer, LR schedule, RNG, global step, data position). All
  per-step randomness (caption dropout, timesteps, noise, latent sampling) is drawn from a generator
  seeded by (seed, step, rank), so the step after a resume computes the same loss as an uninterrupted run.
* The VAE is frozen: ``--vae auto`` takes the newest `rapid train vae` run of the domain (it enters the
  step-cache key and lineage as an input; without one the VAE is random and the report warns). With ``--precompute-latents`` its posterior parameters are cached once per
  (shard set, VAE, image size) and sampled per step exactly as the online path does (JPEGs are then
  not even decoded). A prefetch thread reads/decodes the next batches; checkpoints record the data
  position of the last batch trained on, never of a prefetched one.
* Several processes (``accelerate launch``): one global batch = ``batch_size * processes`` consecutive
  samples of the shuffled sequence, dealt round-robin; each process decodes only its own share.
* The published folder is a complete `RapidDiffusionPipeline` (EMA U-Net weights when EMA is on),
  built in a staging folder and renamed into place. Validation images are decoded in fp32.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import io
import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from ..core.atomic import atomic_write_bytes, atomic_write_json, publish_dir, staging_dir
from ..core.config import add_config_args, config_from_args, opt, preset
from ..core.faults import fault_point
from ..core.fingerprint import fingerprint_obj, fingerprint_path
from ..core.home import Home, check_name
from ..core.progress import bar
from ..core.stage import DatasetRef, StageReport, StageResult, run_stage
from ..models import ldm
from ..pipeline import write_folder_manifest
from ..data import loader
from . import common

STAGE = "train_diffusion"


@dataclass(frozen=True)
class DiffusionConfig:
    model: str = opt("paper", "LDM architecture preset: tiny, small or paper (Table 6)")
    steps: int = opt(20000, "total optimizer steps (a rerun with more steps continues the same run)")
    batch_size: int = opt(80, "images per step per process (appendix C: 80)")
    lr: float = opt(5e-5, "U-Net learning rate (appendix C: 5e-5)")
    text_lr: float = opt(1e-5, "CKCLIP text-encoder learning rate; 0 freezes the text encoder")
    weight_decay: float = opt(1e-2, "AdamW weight decay")
    warmup_steps: int = opt(0, "linear LR warm-up steps, constant afterwards")
    max_grad_norm: float = opt(1.0, "gradient clipping norm (0 = off)")
    caption_dropout: float = opt(0.1, "probability of training on the empty prompt (classifier-free guidance)")
    prompt_template: str = opt("", "template applied to captions, e.g. 一张{object}的照片 (empty = none)")
    max_length: int = opt(32, "text context length (Table 6: 32)")
    precision: str = opt("auto", "auto (bf16 on CUDA, fp32 on CPU), fp32, bf16 or fp16")
    gradient_checkpointing: bool = opt(False, "recompute activations in backward (less memory, more compute per step)")
    ema: bool = opt(True, "keep an exponential moving average of the U-Net (published weights)")
    ema_decay: float = opt(0.9999, "EMA decay ceiling; the effective decay warms up as (1+n)/(10+n)")
    checkpoint_every: int = opt(1000, "steps between checkpoints (the last step always checkpoints)")
    keep_checkpoints: int = opt(3, "newest complete checkpoints kept")
    validate_every: int = opt(1000, "steps between validation images (0 = only at the end)")
    val_images: int = opt(4, "validation images per validation round (prompts from the val split)")
    val_steps: int = opt(25, "PNDM steps of validation sampling")
    val_guidance: float = opt(7.5, "guidance scale of validation sampling")
    precompute_latents: bool = opt(False, "encode shard images once with the VAE and train from cached latents")
    init_from: str = opt("", "local SD-1.x diffusers folder (unet/, vae/) to start from; empty = random init")
    clip: str = opt("", "CKCLIP folder (default: the newest models/ckclip/<domain>/*)")
    vae: str = opt("auto", "autoencoder (frozen): auto = the newest `rapid train vae` run of the domain "
                   "(models/vae/<domain>/*; else --init-from's vae/, else random with a warning), none = random, "
                   "or a folder `rapid train vae` published")
    seed: int = opt(0, "seed of init, data order and per-step noise")
    device: str = opt("auto", "auto, cpu, cuda, cuda:1, ... (under accelerate launch: the process's GPU)")
    log_every: int = opt(50, "steps between metric rows in the warehouse")


PRESETS: dict[str, DiffusionConfig] = {
    "tiny": DiffusionConfig(model="tiny", steps=20, batch_size=4, lr=1e-3, text_lr=1e-4, checkpoint_every=10,
                            validate_every=0, val_images=2, val_steps=3, log_every=5),
    "small": DiffusionConfig(model="small", steps=2000, batch_size=16, lr=1e-4, checkpoint_every=500,
                             validate_every=500, val_steps=20),
    "paper": DiffusionConfig(),
}
# Fields that do not change what step k computes: a run continues across changes of these.
_RUN_INDEPENDENT = {"steps", "checkpoint_every", "keep_checkpoints", "validate_every", "val_images", "val_steps",
                    "val_guidance", "log_every", "device", "precompute_latents"}


# ------------------------------------------------------------------------------------------ EMA
class EMA:
    """EMA of trainable parameters (fp32 shadow). ``state_dict`` / ``load_state_dict`` so checkpoints carry it."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay, self.num_updates = decay, 0
        self.shadow = {n: p.detach().float().clone() for n, p in module.named_parameters() if p.requires_grad}

    def current_decay(self) -> float:
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        d = self.current_decay()
        self.num_updates += 1
        for n, p in module.named_parameters():
            if n in self.shadow:
                self.shadow[n].lerp_(p.detach().float(), 1.0 - d)

    @torch.no_grad()
    def copy_to(self, module: torch.nn.Module) -> None:
        for n, p in module.named_parameters():
            if n in self.shadow:
                p.copy_(self.shadow[n].to(p.dtype))

    def to(self, device: torch.device) -> "EMA":
        self.shadow = {n: v.to(device) for n, v in self.shadow.items()}
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**{f"shadow.{n}": v for n, v in self.shadow.items()}, "num_updates": torch.tensor(self.num_updates)}

    def load_state_dict(self, sd: dict[str, torch.Tensor], strict: bool = True) -> None:
        names = {k.removeprefix("shadow.") for k in sd if k.startswith("shadow.")}
        if strict and names != set(self.shadow):
            raise KeyError(f"EMA checkpoint does not match the model ({len(names)} vs {len(self.shadow)} tensors)")
        dev = next(iter(self.shadow.values())).device
        self.shadow = {n: sd[f"shadow.{n}"].float().to(dev) for n in names}
        self.num_updates = int(sd["num_updates"])


# ------------------------------------------------------------------------------------------ data
def _iter_samples(shard_root: Path, split: str, seed: int | None, start: int, keep: Any = None,
                  images: bool = True) -> Iterator[dict | None]:
    """The global sample sequence of D's loader (all processes); samples `keep(index)` rejects are yielded
    as None without decoding, so each process decodes only its own share. ``images=False`` (training from
    cached latents) skips JPEG decoding altogether."""
    matrix = None
    for index, key, members in loader.iter_raw(shard_root, split, seed, start):
        if keep is not None and not keep(index):
            yield None
            continue
        sample = loader.decode_sample(key, members) if images else _text_only(key, members)
        if matrix is None:
            matrix = loader.load_embeddings_for(shard_root)
        sample["entity_vectors"] = loader.entity_vectors(sample["entities"], matrix) if matrix.size else None
        yield sample


def _text_only(key: str, members: dict[str, bytes]) -> dict:
    meta = json.loads(members["json"].decode("utf-8"))
    return {"key": key, "caption": members["txt"].decode("utf-8"), "entities": meta["entities"]}


class SampleStream:
    """Train samples in a (seed + epoch)-shuffled order; ``position`` = (epoch, global samples consumed in it).

    A global batch is ``batch_size * world`` consecutive samples; process ``rank`` takes every world-th one.
    """

    def __init__(self, shard_root: Path, seed: int, position: dict | None = None, rank: int = 0, world: int = 1,
                 images: bool = True):
        pos = position or {}
        self.shard_root, self.seed, self.rank, self.world, self.images = shard_root, seed, rank, world, images
        self.epoch, self.index = int(pos.get("epoch", 0)), int(pos.get("index", 0))
        self._it = self._open()

    @property
    def position(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def _open(self) -> Iterator[dict | None]:
        # Ownership is by position inside the global batch (set in next_batch just before each pull),
        # so a batch that spans an epoch boundary is still dealt out the same way.
        return _iter_samples(self.shard_root, "train", self.seed + self.epoch, self.index, keep=lambda i: self._want,
                             images=self.images)

    _want = True

    def _next(self) -> dict | None:
        for _ in range(2):
            try:
                item = next(self._it)
                self.index += 1
                return item
            except StopIteration:
                if self.index == 0:
                    raise ValueError(f"no train samples under {self.shard_root}")
                self.epoch, self.index = self.epoch + 1, 0
                self._it = self._open()
        raise ValueError(f"no train samples under {self.shard_root}")

    def next_batch(self, batch_size: int) -> list[dict]:
        """This process's share of the next global batch of ``batch_size * world`` samples."""
        out = []
        for j in range(batch_size * self.world):
            self._want = j % self.world == self.rank
            item = self._next()
            if self._want:
                out.append(item)
        return out


class Prefetcher:
    """Reads and decodes the next batches in a thread while the accelerator computes (PIL releases the GIL).

    Yields ``(samples, position_after)``; checkpoints store the position of the last *consumed* batch, so a
    resume never skips the batches that were prefetched but not trained on.
    """

    def __init__(self, stream: SampleStream, batch_size: int, prepare: Any = None, depth: int = 2):
        import queue
        import threading

        self.stream, self.batch_size, self.prepare = stream, batch_size, prepare
        self.queue: Any = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._work, name="diffusion-prefetch", daemon=True)
        self.thread.start()

    def _work(self) -> None:
        try:
            while not self.stop.is_set():
                samples = self.stream.next_batch(self.batch_size)
                if self.prepare is not None:
                    samples = self.prepare(samples)
                self._put((samples, dict(self.stream.position)))
        except BaseException as exc:  # handed to the training thread, raised there
            self._put(exc)

    def _put(self, item: Any) -> None:
        import queue

        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def next(self) -> tuple[list[dict], dict]:
        item = self.queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)


def image_tensor(image, size: int) -> torch.Tensor:
    """PIL -> [3, size, size] in [-1, 1] (shorter side resized, centre crop), the VAE's input range."""
    from torchvision.transforms import functional as TF

    img = TF.center_crop(TF.resize(image.convert("RGB"), size, antialias=True), size)
    return TF.to_tensor(img) * 2 - 1


# ------------------------------------------------------------------------------------------ trainer
@dataclass
class Trainer:
    config: DiffusionConfig
    accelerator: Any
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: Any
    noise_scheduler: Any
    optimizer: Any
    lr_scheduler: Any
    ema: EMA | None
    device: torch.device
    dtype: torch.dtype
    latent_cache: dict[str, torch.Tensor] | None = None
    notes: list[str] = field(default_factory=list)
    vae_dir: Path | None = None  # the trained VAE in use (None: --init-from's or a random one)

    @property
    def train_text(self) -> bool:
        return self.config.text_lr > 0

    def raw(self, module: torch.nn.Module) -> torch.nn.Module:
        return self.accelerator.unwrap_model(module)


def noise_scheduler_for(config: DiffusionConfig):
    from diffusers import DDPMScheduler

    local = Path(config.init_from) / "scheduler" if config.init_from else None
    if local is not None and (local / "scheduler_config.json").exists():
        return DDPMScheduler.from_pretrained(local)
    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         prediction_type="epsilon", clip_sample=False)


def load_text_tower(clip_dir: Path) -> tuple[torch.nn.Module, Any]:
    from ..models.ckclip import CKCLIPTextEncoder, KnowledgeTokenizer

    return CKCLIPTextEncoder.from_pretrained(clip_dir), KnowledgeTokenizer.from_pretrained(clip_dir)


def build_models(config: DiffusionConfig, clip_dir: Path, vae_dir: Path | None = None
                 ) -> tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module, Any]:
    """(unet, vae, text_encoder, tokenizer): random init of the preset, or a local SD-1.x folder; a trained
    VAE folder (`vae_dir`, from `rapid train vae`) replaces the random / local VAE."""
    torch.manual_seed(config.seed)
    text_encoder, tokenizer = load_text_tower(clip_dir)
    if config.init_from:
        unet, vae = ldm.load_local(config.init_from, context_dim=text_encoder.hidden_size)
    else:
        unet, vae = ldm.build_unet(config.model, context_dim=text_encoder.hidden_size), ldm.build_vae(config.model)
    if vae_dir is not None:
        vae = ldm.load_vae(vae_dir)
        check_vae_fits(vae, unet, ldm.ldm_config(config.model).image_size, vae_dir)
    vae.requires_grad_(False).eval()
    text_encoder.requires_grad_(config.text_lr > 0)
    return unet, vae, text_encoder, tokenizer


def _accelerator(config: DiffusionConfig):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    device = common.pick_device(config.device) if config.device != "auto" else None
    dtype = common.pick_dtype(device or common.pick_device("auto"), config.precision)
    mp = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "no")
    # The mixed-precision state is a process-wide singleton; an in-process rerun with another precision
    # (tests, DAG tasks in one worker) must start a fresh one. The distributed state is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(mixed_precision=mp, cpu=device is not None and device.type == "cpu"), dtype


def check_vae_fits(vae: torch.nn.Module, unet: torch.nn.Module, image_size: int, vae_dir: Path) -> None:
    """A VAE of another preset fails here, with both shapes, not later inside a convolution."""
    down = 2 ** (len(vae.config.block_out_channels) - 1)
    latent = (vae.config.latent_channels, image_size // down)
    wanted = (unet.config.in_channels, unet.config.sample_size)
    if latent != wanted:
        raise ValueError(f"--vae {vae_dir}: its latents are {latent[0]} x {latent[1]}x{latent[1]} at {image_size} px, "
                         f"the U-Net takes {wanted[0]} x {wanted[1]}x{wanted[1]}: train the VAE with the same --preset")


def _optimizer(config: DiffusionConfig, unet: torch.nn.Module, text_encoder: torch.nn.Module):
    groups = [{"params": [p for p in unet.parameters() if p.requires_grad], "lr": config.lr}]
    if config.text_lr > 0:
        groups.append({"params": [p for p in text_encoder.parameters() if p.requires_grad], "lr": config.text_lr})
    opt_ = torch.optim.AdamW(groups, weight_decay=config.weight_decay)
    warm = max(1, config.warmup_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt_, lambda s: min(1.0, (s + 1) / warm))
    return opt_, sched


def build_trainer(config: DiffusionConfig, clip_dir: Path, vae_dir: Path | None = None) -> Trainer:
    accelerator, dtype = _accelerator(config)
    unet, vae, text_encoder, tokenizer = build_models(config, clip_dir, vae_dir)
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        tm = text_encoder.text_model
        enable = getattr(tm, "activation_checkpointing_enable", None) or getattr(tm, "gradient_checkpointing_enable", None)
        if config.text_lr > 0 and enable is not None:
            enable()
    ema = EMA(unet, config.ema_decay) if config.ema else None
    optimizer, lr_scheduler = _optimizer(config, unet, text_encoder)
    unet.train()
    text_encoder.train(config.text_lr > 0)
    if config.text_lr > 0:
        unet, text_encoder, optimizer = accelerator.prepare(unet, text_encoder, optimizer)
    else:
        unet, optimizer = accelerator.prepare(unet, optimizer)
        text_encoder.to(accelerator.device)
    vae.to(accelerator.device)
    if ema is not None:
        ema.to(accelerator.device)
    return Trainer(config, accelerator, unet, vae, text_encoder, tokenizer, noise_scheduler_for(config), optimizer,
                   lr_scheduler, ema, accelerator.device, dtype, vae_dir=vae_dir)


# ------------------------------------------------------------------------------------------ one step
def step_generator(config: DiffusionConfig, step: int, rank: int = 0) -> torch.Generator:
    """All randomness of step `step` comes from here, so a resumed step repeats exactly."""
    return torch.Generator().manual_seed((config.seed * 1_000_003 + step) * 64 + rank)


def _template_shift(template: str) -> tuple[str, int]:
    return (template, template.index("{object}")) if template and "{object}" in template else ("", 0)


def text_batch(t: Trainer, samples: list[dict], drop: torch.Tensor) -> dict[str, torch.Tensor]:
    """Tokenize captions (template applied, entity spans shifted); dropped captions become the empty prompt."""
    template, shift = _template_shift(t.config.prompt_template)
    texts, ents, vecs = [], [], []
    for s, dropped in zip(samples, drop.tolist()):
        if dropped:
            texts.append(""), ents.append([]), vecs.append(None)
            continue
        texts.append(template.format(object=s["caption"]) if template else s["caption"])
        mentions = [{**m, "start": m["start"] + shift, "end": m["end"] + shift} for m in s.get("entities", [])]
        ents.append(mentions)
        vecs.append(_mention_vectors(t, s))
    batch = t.tokenizer(texts, max_length=t.config.max_length, entities=ents, entity_vectors=vecs)
    return {k: v.to(t.device) for k, v in batch.items()}


def _mention_vectors(t: Trainer, sample: dict) -> np.ndarray | None:
    """The shard's TransE vectors per mention (``emb_row``); None lets the tokenizer use its own entity table."""
    vecs = sample.get("entity_vectors")
    if vecs is None or len(vecs) == 0 or np.asarray(vecs).shape[-1] != t.tokenizer.entity_dim:
        return None
    return np.asarray(vecs, dtype=np.float32)


@torch.no_grad()
def posterior_params(t: Trainer, samples: list[dict]) -> torch.Tensor:
    """[B, 2C, h, w] VAE posterior (mean, logvar), from the latent cache when there is one."""
    if t.latent_cache is not None:
        return torch.stack([t.latent_cache[s["key"]] for s in samples]).to(t.device)
    images = torch.stack([pixels(t, s) for s in samples]).to(t.device)
    with torch.autocast(device_type=t.device.type, enabled=False):
        return t.vae.encode(images.float()).latent_dist.parameters.float()


def pixels(t: Trainer, sample: dict) -> torch.Tensor:
    """The sample's VAE input (prepared by the prefetch thread when it ran there)."""
    if "pixels" in sample:
        return sample["pixels"]
    return image_tensor(sample["image"], ldm.ldm_config(t.config.model).image_size)


def prepare_batch(t: Trainer, samples: list[dict]) -> list[dict]:
    """Runs in the prefetch thread: decode-side work (resize, crop, to tensor) off the training thread."""
    if t.latent_cache is None:
        for s in samples:
            s["pixels"] = pixels(t, s)
    return samples


def sample_latents(t: Trainer, params: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    mean, logvar = params.chunk(2, dim=1)
    eps = torch.randn(mean.shape, generator=gen).to(mean.device)
    std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
    return (mean + std * eps) * t.vae.config.scaling_factor


def diffusion_loss(t: Trainer, samples: list[dict], gen: torch.Generator) -> torch.Tensor:
    """Eq. (1): MSE between the added noise and the U-Net's prediction at a random timestep."""
    n = len(samples)
    drop = torch.rand(n, generator=gen) < t.config.caption_dropout
    timesteps = torch.randint(0, t.noise_scheduler.config.num_train_timesteps, (n,), generator=gen)
    latents = sample_latents(t, posterior_params(t, samples), gen)
    noise = torch.randn(latents.shape, generator=gen).to(t.device)
    timesteps = timesteps.to(t.device)
    noisy = t.noise_scheduler.add_noise(latents, noise, timesteps)
    with t.accelerator.autocast(), torch.set_grad_enabled(t.train_text and torch.is_grad_enabled()):
        context = t.text_encoder(**text_batch(t, samples, drop))
    with t.accelerator.autocast():
        pred = t.unet(noisy, timesteps, encoder_hidden_states=context, return_dict=False)[0]
    return F.mse_loss(pred.float(), noise.float())


def train_step(t: Trainer, samples: list[dict], step: int) -> dict[str, float]:
    loss = diffusion_loss(t, samples, step_generator(t.config, step, t.accelerator.process_index))
    t.accelerator.backward(loss)
    if t.config.max_grad_norm > 0:
        params = [p for g in t.optimizer.param_groups for p in g["params"]]
        t.accelerator.clip_grad_norm_(params, t.config.max_grad_norm)
    t.optimizer.step()
    t.lr_scheduler.step()
    t.optimizer.zero_grad(set_to_none=True)
    if t.ema is not None:
        t.ema.update(t.raw(t.unet))
    return {"loss": float(t.accelerator.reduce(loss.detach(), "mean")), "lr": t.lr_scheduler.get_last_lr()[0]}


# ------------------------------------------------------------------------------------------ latent cache
def latent_cache_path(home: Home, domain: str, config: DiffusionConfig, shard_root: Path,
                      vae_dir: Path | None = None) -> Path:
    manifest = json.loads((shard_root / "manifest.json").read_text())
    shards = [s["sha256"] for s in manifest["splits"].get("train", {}).get("shards", [])]
    vae_id = fingerprint_path(Path(config.init_from) / "vae") if config.init_from else ["random", config.model, config.seed]
    if vae_dir is not None:
        vae_id = fingerprint_path(vae_dir)
    key = fingerprint_obj([shards, vae_id, ldm.ldm_config(config.model).image_size])
    return home.models / "pipeline" / domain / ".latents" / f"{key[:24]}.safetensors"


def build_latent_cache(t: Trainer, shard_root: Path, path: Path, chunk: int = 16) -> dict[str, torch.Tensor]:
    """Encode every train image once (posterior mean + logvar); reused while shards and VAE are unchanged."""
    from ..core.checkpoint import load_state_dict, save_state_dict

    if path.exists():
        return load_state_dict(path)
    cache: dict[str, torch.Tensor] = {}
    pending: list[dict] = []
    with bar("encode latents", unit="img") as pbar:
        for sample in _iter_samples(shard_root, "train", seed=None, start=0):
            pending.append(sample)
            if len(pending) == chunk:
                cache.update(_encode_chunk(t, pending)), pbar.update(len(pending))
                pending = []
        cache.update(_encode_chunk(t, pending))
    if t.accelerator.is_main_process:
        save_state_dict(cache, path)
    return cache


def _encode_chunk(t: Trainer, samples: list[dict]) -> dict[str, torch.Tensor]:
    if not samples:
        return {}
    saved, t.latent_cache = t.latent_cache, None
    params = posterior_params(t, samples).cpu()
    t.latent_cache = saved
    return {s["key"]: p.clone() for s, p in zip(samples, params)}


# ------------------------------------------------------------------------------------------ validation
def validation_prompts(shard_root: Path, n: int) -> list[str]:
    prompts = []
    for split in ("val", "train"):
        try:
            for s in _iter_samples(shard_root, split, seed=None, start=0):
                prompts.append(s["caption"])
                if len(prompts) >= n:
                    return prompts
        except (FileNotFoundError, KeyError, ValueError):
            continue
    return prompts or ["一张照片"]


def inference_pipeline(t: Trainer, use_ema: bool = True):
    """A RapidDiffusionPipeline over the current weights (EMA U-Net copy when EMA is on)."""
    from ..pipeline import RapidDiffusionPipeline, make_scheduler

    unet = t.raw(t.unet)
    if use_ema and t.ema is not None:
        unet = copy.deepcopy(unet)
        t.ema.copy_to(unet)
    sched = make_scheduler("pndm", t.noise_scheduler.config)
    template = t.config.prompt_template or None
    return RapidDiffusionPipeline(t.raw(t.text_encoder), t.tokenizer, unet, t.vae, sched, None,
                                  prompt_template=template, max_length=t.config.max_length)


@torch.no_grad()
def validate(t: Trainer, step: int, run_dir: Path, prompts: list[str]) -> dict[str, float]:
    """Write validation PNGs (+ stats.json) for `step`; decode in fp32 so half precision never gives black."""
    pipe = inference_pipeline(t)
    modes = [(m, m.training) for m in (pipe.unet, pipe.text_encoder)]
    for m, _ in modes:
        m.eval()
    with t.accelerator.autocast():
        images = pipe(prompts, num_inference_steps=t.config.val_steps, guidance_scale=t.config.val_guidance,
                      generator=torch.Generator().manual_seed(t.config.seed), output_type="pt").images
    for m, was in modes:
        m.train(was)
    return _write_validation(run_dir / "validation" / f"step-{step:07d}", images, prompts)


def _write_validation(folder: Path, images: torch.Tensor, prompts: list[str]) -> dict[str, float]:
    from PIL import Image

    for i, img in enumerate(images):
        buf = io.BytesIO()
        Image.fromarray((img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(buf, format="PNG")
        atomic_write_bytes(folder / f"{i:02d}.png", buf.getvalue())
    stats = {"val_mean": float(images.mean()), "val_std": float(images.std()),
             "val_black_fraction": float((images.amax(dim=(1, 2, 3)) < 0.02).float().mean())}
    atomic_write_json(folder / "stats.json", {**stats, "prompts": prompts})
    return stats


# ------------------------------------------------------------------------------------------ save / resume / publish
def run_name(config: DiffusionConfig, input_fingerprints: list[str]) -> str:
    d = {k: v for k, v in dataclasses.asdict(config).items() if k not in _RUN_INDEPENDENT}
    return "ldm-" + fingerprint_obj([d, input_fingerprints])[:16]


def _ckpt_modules(t: Trainer) -> dict[str, Any]:
    mods: dict[str, Any] = {"unet": t.raw(t.unet)}
    if t.train_text:
        mods["text_encoder"] = t.raw(t.text_encoder)
    if t.ema is not None:
        mods["ema"] = t.ema
    return mods


def save_ckpt(t: Trainer, run_dir: Path, step: int, position: dict, extra: dict) -> None:
    t.accelerator.wait_for_everyone()
    if t.accelerator.is_main_process:
        common.save_checkpoint(run_dir, step, _ckpt_modules(t), t.optimizer, t.lr_scheduler,
                               data_position=position, extra=extra, keep=t.config.keep_checkpoints)


def maybe_resume(t: Trainer, run_dir: Path, resume: str) -> common.TrainState:
    ckpt = common.resolve_resume(run_dir, resume)
    if ckpt is None:
        return common.TrainState()
    return common.load_checkpoint(ckpt, _ckpt_modules(t), t.optimizer, t.lr_scheduler)


def publish(t: Trainer, run_dir: Path, meta: dict) -> None:
    """Stage the full pipeline folder (+ links to checkpoints / validation images), then swap it in."""
    for stale in run_dir.parent.glob(f".tmp-*-{run_dir.name}"):  # a crashed earlier publish of this run
        shutil.rmtree(stale, ignore_errors=True)
    stage = staging_dir(run_dir)
    inference_pipeline(t).save_pretrained(stage)
    fault_point(STAGE, "mid_write")
    for sub in (common.CKPT_DIR, "validation"):
        if (run_dir / sub).exists():  # hard links: no copy, and no window without them
            shutil.copytree(run_dir / sub, stage / sub, copy_function=os.link)
    atomic_write_json(stage / "training.json", meta)
    write_folder_manifest(stage, stage=STAGE)
    fault_point(STAGE, "before_publish")
    publish_dir(stage, run_dir)


# ------------------------------------------------------------------------------------------ run
def train_loop(t: Trainer, stream: SampleStream, run_dir: Path, state: common.TrainState,
               ctx: dict) -> tuple[list[dict], dict]:
    """Steps from the resumed one to ``steps``; returns (per-step logs, data position after the last step)."""
    cfg, step, history, position = t.config, state.step, [], stream.position
    feed = Prefetcher(stream, cfg.batch_size, prepare=lambda b: prepare_batch(t, b))
    try:
        with bar("train diffusion", total=max(0, cfg.steps - step), unit="step") as pbar:
            while step < cfg.steps:
                samples, position = feed.next()
                logs = train_step(t, samples, step)
                step += 1
                history.append({"step": step, **logs, "keys": [s["key"] for s in samples]})
                _after_step(t, step, position, run_dir, ctx, logs)
                pbar.update(1)
    finally:
        feed.close()
    return history, position


def _after_step(t: Trainer, step: int, position: dict, run_dir: Path, ctx: dict, logs: dict) -> None:
    cfg = t.config
    if not math.isfinite(logs["loss"]):
        raise FloatingPointError(f"loss is {logs['loss']} at step {step}: lower --lr or use --precision fp32")
    if ctx.get("buffer") is not None and step % cfg.log_every == 0:
        ctx["buffer"].add({"loss": logs["loss"], "lr": logs["lr"]}, step)
    if cfg.validate_every and step % cfg.validate_every == 0 and t.accelerator.is_main_process:
        ctx["validation"][step] = validate(t, step, run_dir, ctx["prompts"])
    if step % cfg.checkpoint_every == 0 or step == cfg.steps:
        save_ckpt(t, run_dir, step, position, {"val": ctx["validation"]})
    fault_point(STAGE, "after_step")


def find_clip(home: Home, domain: str, clip: str) -> Path:
    """--clip, else the newest CKCLIP run of the domain (its CURRENT pointer when there is one)."""
    if clip:
        path = Path(clip)
    else:
        root = home.models / "ckclip" / domain
        path = _newest_model(root, "config.json")
        if path is None:
            raise FileNotFoundError(f"no CKCLIP model under {root}: train one (rapid train clip) or pass --clip DIR")
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"--clip {path}: not a CKCLIP folder (no config.json)")
    return path


def find_vae(home: Home, domain: str, config: DiffusionConfig) -> Path | None:
    """The trained VAE folder --vae names (auto: newest of the domain unless --init-from); None = no trained VAE."""
    if config.vae == "none":
        return None
    if config.vae == "auto":
        return None if config.init_from else _newest_model(home.models / "vae" / domain, "config.json")
    path = Path(config.vae)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"--vae {config.vae}: not a VAE folder from `rapid train vae` (no config.json)")
    return path


def _vae_note(config: DiffusionConfig, vae_dir: Path | None) -> str | None:
    if vae_dir is not None:
        return None
    if config.init_from:
        return f"VAE from --init-from {config.init_from}/vae"
    if config.vae == "none":
        return "VAE is random (--vae none): generated images are not meaningful"
    return ("WARNING: no trained VAE under models/vae/<domain>/ (run `rapid train vae` first): the VAE is random, "
            "so generated images are noise")


def _newest_model(root: Path, marker: str) -> Path | None:
    current = root / "CURRENT"
    if current.is_file() and (root / current.read_text().strip() / marker).exists():
        return root / current.read_text().strip()
    runs = [p for p in root.glob("*") if p.is_dir() and not p.name.startswith(".") and (p / marker).exists()]
    return max(runs, key=lambda p: (p / marker).stat().st_mtime) if runs else None


def run(config: DiffusionConfig, home: Home, domain: str, resume: str = "auto", force: bool = False,
        out: str | None = None) -> StageReport:
    check_name(domain, "domain")
    shard_root = home.shards / domain
    manifest = loader.manifest_path(shard_root)
    _check_config(config)
    clip_dir = find_clip(home, domain, config.clip)
    vae_dir = find_vae(home, domain, config)
    inputs = [DatasetRef.of(manifest), DatasetRef.of(clip_dir)] + _embedding_inputs(shard_root)
    if config.init_from:
        inputs.append(DatasetRef.of(config.init_from))
    if vae_dir is not None:  # the trained VAE is an input: a new one gives a new run and a cache miss
        inputs.append(DatasetRef.of(vae_dir))
    run_dir = Path(out) if out else home.models / "pipeline" / domain / run_name(config, [r.fingerprint for r in inputs])

    def body(report: StageReport) -> StageResult:
        return _train(config, home, domain, shard_root, clip_dir, run_dir, resume, report, vae_dir)

    rank, world = _launch_rank_world()
    if world > 1 and rank != 0:
        # Other ranks train in lock-step with rank 0 but leave the lock, cache and lineage to it (a rank
        # waiting on rank 0's partition lock would deadlock the first all-reduce).
        report = StageReport(STAGE, domain, "all", f"rank-{rank}", "running", {}, "", "")
        body(report)
        report.status = "ok"
        return report
    # Under a multi-process launch every rank must train, so rank 0 never answers from the step cache;
    # `--resume auto` makes a repeated launch cheap instead (it resumes at the last step and republishes).
    return run_stage(home, STAGE, config, inputs, body, domain=domain, force=force or world > 1)


def _launch_rank_world() -> tuple[int, int]:
    """Rank and world size that accelerate / torchrun export to each process (0, 1 when not launched)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _embedding_inputs(shard_root: Path) -> list[DatasetRef]:
    emb = json.loads((shard_root / "manifest.json").read_text()).get("embeddings") or {}
    path = Path(emb["path"]) if emb.get("path") else None
    if path is not None and not path.is_absolute():
        path = shard_root / path
    return [DatasetRef.of(path)] if path is not None and path.exists() else []


def _check_config(config: DiffusionConfig) -> None:
    ldm.ldm_config(config.model)
    if config.steps < 1 or config.batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1 (got {config.steps}, {config.batch_size})")
    if not 0 <= config.caption_dropout < 1:
        raise ValueError(f"caption_dropout must be in [0, 1), got {config.caption_dropout}")
    if config.prompt_template and "{object}" not in config.prompt_template:
        raise ValueError(f"prompt_template must contain {{object}}, got {config.prompt_template!r}")
    if config.init_from and not Path(config.init_from).is_dir():
        raise FileNotFoundError(f"--init-from {config.init_from}: no such local folder (nothing is downloaded)")


def _train(config: DiffusionConfig, home: Home, domain: str, shard_root: Path, clip_dir: Path, run_dir: Path,
           resume: str, report: StageReport, vae_dir: Path | None = None) -> StageResult:
    t = build_trainer(config, clip_dir, vae_dir)
    note = _vae_note(config, vae_dir)
    if note:
        t.notes.append(note)
    if config.precompute_latents:
        t.latent_cache = build_latent_cache(t, shard_root, latent_cache_path(home, domain, config, shard_root, vae_dir))
    state = maybe_resume(t, run_dir, resume)
    stream = SampleStream(shard_root, config.seed, state.data_position, t.accelerator.process_index,
                          t.accelerator.num_processes, images=t.latent_cache is None)
    ctx = {"prompts": validation_prompts(shard_root, config.val_images), "validation": dict(state.extra.get("val", {})),
           "buffer": common.MetricBuffer(home, report.run_id, STAGE, domain=domain, subject=str(run_dir), every=10)
           if t.accelerator.is_main_process else None}
    fault_point(STAGE, "start")
    history, position = train_loop(t, stream, run_dir, state, ctx)
    if ctx["buffer"] is not None:
        ctx["buffer"].flush()
    final_val = validate(t, config.steps, run_dir, ctx["prompts"]) if t.accelerator.is_main_process else {}
    meta = _meta(t, state, history, final_val, clip_dir, position)
    if t.accelerator.is_main_process:
        _log_final(home, report, domain, run_dir, meta)
        publish(t, run_dir, meta)
    fault_point(STAGE, "end")
    return StageResult(outputs=[DatasetRef.of(run_dir)] if t.accelerator.is_main_process else [],
                       extra={**meta, "run_dir": str(run_dir), "history": _compact(history)})


def _compact(history: list[dict], keep: int = 200, with_keys: int = 20) -> list[dict]:
    """The report's tail of per-step logs; sample keys only for the newest steps (reports stay small)."""
    tail = history[-keep:]
    return [h if i >= len(tail) - with_keys else {k: v for k, v in h.items() if k != "keys"} for i, h in enumerate(tail)]


def _meta(t: Trainer, state: common.TrainState, history: list[dict], final_val: dict, clip_dir: Path,
          position: dict) -> dict:
    return {"resumed_from_step": state.step, "steps": t.config.steps, "final_loss": history[-1]["loss"] if history else None,
            "data_position": position, "clip": str(clip_dir), "ema": t.ema is not None,
            "vae": str(t.vae_dir) if t.vae_dir is not None else ("init_from" if t.config.init_from else "random"),
            "precision": str(t.dtype).removeprefix("torch."), "processes": t.accelerator.num_processes,
            "latent_cache": t.latent_cache is not None, "notes": t.notes, **final_val,
            "config": dataclasses.asdict(t.config)}


def _log_final(home: Home, report: StageReport, domain: str, run_dir: Path, meta: dict) -> None:
    values = {k: v for k, v in meta.items() if isinstance(v, float) and math.isfinite(v)}
    common.log_metrics(home, report.run_id, STAGE, values, step=meta["steps"], domain=domain, subject=str(run_dir))


# ------------------------------------------------------------------------------------------ CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    common.add_run_arguments(parser, PRESETS, "domain whose shards (shards/<domain>/) are used",
                             "tiny (CPU tests, seconds), small, paper (Table 6 / appendix C)")
    parser.add_argument("--out", default=None,
                        help="run folder to train in and publish to (default: models/pipeline/<domain>/ldm-<fingerprint>)")
    parser.add_argument("--print-params", action="store_true",
                        help="print U-Net / VAE / text encoder (/ ESRGAN) parameter counts of the preset and exit")
    add_config_args(parser, DiffusionConfig)


def param_counts(config: DiffusionConfig) -> dict[str, Any]:
    """Parameter counts of the preset's components, built on the meta device (no memory, no weights)."""
    from ..models import esrgan
    from ..models.ckclip import build_ckclip

    text = ldm.build_on_meta(build_ckclip, "paper" if config.model == "paper" else config.model,
                             vocab_size=21128 if config.model == "paper" else 4096, entity_dim=100).text_encoder
    width = text.hidden_size
    counts = {"unet": ldm.count_params(ldm.build_on_meta(ldm.build_unet, config.model, context_dim=width)),
              "vae": ldm.count_params(ldm.build_on_meta(ldm.build_vae, config.model)),
              "text_encoder": ldm.count_params(text)}
    sr = ldm.build_on_meta(esrgan.build_generator) if config.model == "paper" else None
    counts["esrgan"] = ldm.count_params(sr)
    counts["total"] = sum(counts.values())
    lines = [f"{k:>12}: {v:>13,} ({v / 1e6:8.2f}M)" for k, v in counts.items()]
    return {**counts, "text": f"{config.model} preset parameters (Table 5 of the paper: 1.06B with ESRGAN)\n" + "\n".join(lines)}


def main(args: argparse.Namespace, home: Home) -> StageReport | dict:
    config = config_from_args(preset(PRESETS, args.preset), args)
    if args.print_params:
        return param_counts(config)
    return run(config, home, args.domain, resume=args.resume, force=args.force, out=args.out)
