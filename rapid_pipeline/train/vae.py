"""Train the KL autoencoder (diffusers ``AutoencoderKL``) of a preset on a domain's shard images.

    rapid train vae --domain demo --preset tiny
    rapid train vae --domain food --preset small --steps 4000 --resume auto
    rapid train vae --domain demo --preset tiny --kl-weight 1e-6 --loss mse --out /tmp/vae

Why: without local SD-1.x weights (``rapid train diffusion --init-from``) the VAE would stay random and
every generated image would be noise. This stage trains ``models.ldm.build_vae(preset)`` so the latent
diffusion model has a meaningful latent space; ``rapid train diffusion`` picks the newest one up
(``--vae auto``).

Objective (LDM's KL-regularised autoencoder, without the GAN / LPIPS terms): per-sample
``sum |x - D(z)| + kl_weight * KL(q(z|x) || N(0, I))`` with ``z ~ q(z|x)``, both divided by the pixel
count so the learning rate does not depend on the resolution. Adam, constant learning rate.

Invariants:
* ``models/vae/<domain>/vae-<fingerprint>/`` is fixed by the config minus run-length fields and the
  shard manifest, so ``--resume auto`` (or a rerun with more ``--steps``) continues from the newest
  complete checkpoint (weights, optimizer, RNG, step, data position). Per-step randomness (the latent
  sample) comes from a generator seeded by (seed, step): the step after a resume computes the same loss.
* The published folder is ``save_pretrained`` output (``config.json`` + safetensors) whose
  ``scaling_factor`` = 1 / std of latents of train images (Stable Diffusion's rule), so the diffusion
  model sees ~unit-variance latents. It is built in a staging folder and renamed into place; a folder
  without ``config.json`` (a run still training) is never picked up by ``--vae auto``.
* Validation PSNR (posterior mean, val split) is measured before and after training and written to
  the report and the warehouse ``metrics`` table.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..core.atomic import atomic_write_json, publish_dir, staging_dir
from ..core.config import add_config_args, config_from_args, opt, preset
from ..core.faults import fault_point
from ..core.fingerprint import fingerprint_obj
from ..core.home import Home, check_name
from ..core.progress import bar
from ..core.stage import DatasetRef, StageReport, StageResult, run_stage
from ..models import ldm
from ..data import loader
from . import common

STAGE = "train_vae"
WEIGHTS = "diffusion_pytorch_model.safetensors"


@dataclass(frozen=True)
class VAEConfig:
    model: str = opt("paper", "autoencoder architecture preset (models.ldm): tiny, small or paper (Table 6, KL-f8)")
    steps: int = opt(20000, "total optimizer steps (a rerun with more steps continues the same run)")
    batch_size: int = opt(8, "images per step")
    lr: float = opt(1e-4, "Adam learning rate (constant)")
    kl_weight: float = opt(1e-6, "weight of the KL term (LDM: 1e-6; small keeps detail, the latent scale is fixed after)")
    loss: str = opt("l1", "pixel reconstruction loss: l1 or mse")
    max_grad_norm: float = opt(1.0, "gradient clipping norm (0 = off)")
    checkpoint_every: int = opt(1000, "steps between checkpoints (the last step always checkpoints)")
    keep_checkpoints: int = opt(2, "newest complete checkpoints kept")
    val_images: int = opt(64, "val-split images for the PSNR before / after training")
    scale_images: int = opt(256, "train images whose latent std sets scaling_factor")
    seed: int = opt(0, "seed of init, data order and latent sampling")
    device: str = opt("auto", "auto, cpu, cuda, cuda:1, ...")
    log_every: int = opt(50, "steps between loss rows in the warehouse metrics table")


PRESETS: dict[str, VAEConfig] = {
    # tiny: 32 px, 2 levels; enough steps to beat the random VAE clearly (make demo: PSNR 7.8 -> 22.0 dB).
    "tiny": VAEConfig(model="tiny", steps=300, batch_size=8, lr=2e-3, checkpoint_every=100, val_images=32,
                      scale_images=64, log_every=25),
    "small": VAEConfig(model="small", steps=3000, batch_size=16, lr=5e-4, checkpoint_every=500, val_images=64),
    "paper": VAEConfig(),
}
# Fields that do not change what step k computes: a run continues across changes of these.
_RUN_INDEPENDENT = {"steps", "checkpoint_every", "keep_checkpoints", "val_images", "scale_images", "device",
                    "log_every"}


# ------------------------------------------------------------------------------------------ data
def image_size(config: VAEConfig) -> int:
    return ldm.ldm_config(config.model).image_size


def to_pixels(image, size: int) -> torch.Tensor:
    """PIL -> [3, size, size] in [-1, 1]: the same resize + centre crop the diffusion stage uses."""
    from .diffusion import image_tensor

    return image_tensor(image, size)


class ImageStream:
    """Train images in the diffusion stage's sample order (one process's `SampleStream`) as [B, 3, H, W]
    tensors; ``position`` = {epoch, index} (samples consumed), the same contract as diffusion's."""

    def __init__(self, shard_root: Path, seed: int, size: int, position: dict | None = None):
        from .diffusion import SampleStream

        self.samples, self.size = SampleStream(shard_root, seed, position), size

    @property
    def position(self) -> dict:
        return self.samples.position

    def next_batch(self, batch_size: int) -> torch.Tensor:
        return torch.stack([to_pixels(s["image"], self.size) for s in self.samples.next_batch(batch_size)])


def fixed_images(shard_root: Path, split: str, n: int, size: int) -> torch.Tensor | None:
    """The first `n` images of a split in manifest order (None when the split is missing or empty)."""
    out = []
    try:
        for sample in loader.iter_samples(shard_root, split):
            out.append(to_pixels(sample["image"], size))
            if len(out) >= n:
                break
    except (ValueError, FileNotFoundError):
        return None
    return torch.stack(out) if out else None


# ------------------------------------------------------------------------------------------ trainer
@dataclass
class Trainer:
    config: VAEConfig
    vae: torch.nn.Module
    optimizer: torch.optim.Optimizer
    device: torch.device


def build_trainer(config: VAEConfig) -> Trainer:
    common.seed_everything(config.seed)
    device = common.pick_device(config.device)
    vae = ldm.build_vae(config.model).to(device).train()
    optimizer = torch.optim.Adam(vae.parameters(), lr=config.lr)
    return Trainer(config, vae, optimizer, device)


def step_generator(config: VAEConfig, step: int) -> torch.Generator:
    """All randomness of step `step` comes from here, so a resumed step repeats exactly."""
    return torch.Generator().manual_seed(config.seed * 1_000_003 + step)


def vae_loss(t: Trainer, images: torch.Tensor, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Reconstruction + kl_weight * KL, per pixel (see module doc)."""
    images = images.to(t.device)
    posterior = t.vae.encode(images).latent_dist
    z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen).to(t.device)
    recon = t.vae.decode(z).sample
    rec_fn = F.l1_loss if t.config.loss == "l1" else F.mse_loss
    rec = rec_fn(recon, images)
    kl = posterior.kl().mean() / images[0].numel()  # KL summed over latent dims, per pixel of one sample
    return {"loss": rec + t.config.kl_weight * kl, "rec": rec, "kl": kl}


def train_step(t: Trainer, images: torch.Tensor, step: int) -> dict[str, float]:
    parts = vae_loss(t, images, step_generator(t.config, step))
    parts["loss"].backward()
    if t.config.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(t.vae.parameters(), t.config.max_grad_norm)
    t.optimizer.step()
    t.optimizer.zero_grad(set_to_none=True)
    return {k: float(v.detach()) for k, v in parts.items()}


# ------------------------------------------------------------------------------------------ measurements
@torch.no_grad()
def psnr(vae: torch.nn.Module, images: torch.Tensor | None, chunk: int = 16) -> float | None:
    """PSNR (dB, pixels in [0, 1]) of posterior-mean reconstructions; None without images."""
    if images is None:
        return None
    was = vae.training
    vae.eval()
    device = next(vae.parameters()).device
    err = 0.0
    for part in images.split(chunk):
        part = part.to(device)
        recon = vae.decode(vae.encode(part).latent_dist.mean).sample.clamp(-1, 1)
        err += float(((recon - part) / 2).pow(2).sum())
    vae.train(was)
    return 10 * math.log10(1.0 / max(err / images.numel(), 1e-12))


@torch.no_grad()
def latent_std(vae: torch.nn.Module, images: torch.Tensor, seed: int, chunk: int = 16) -> float:
    """Std of sampled latents over all elements (as SD computed its 0.18215)."""
    device = next(vae.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    zs = []
    for part in images.split(chunk):
        post = vae.encode(part.to(device)).latent_dist
        zs.append((post.mean + post.std * torch.randn(post.mean.shape, generator=gen).to(device)).cpu())
    return float(torch.cat(zs).std())


# ------------------------------------------------------------------------------------------ save / resume / publish
def run_name(config: VAEConfig, input_fingerprints: list[str]) -> str:
    d = {k: v for k, v in dataclasses.asdict(config).items() if k not in _RUN_INDEPENDENT}
    return "vae-" + fingerprint_obj([d, input_fingerprints])[:16]


def save_ckpt(t: Trainer, run_dir: Path, step: int, position: dict, extra: dict) -> None:
    common.save_checkpoint(run_dir, step, {"vae": t.vae}, t.optimizer, None, data_position=position,
                           extra=extra, keep=t.config.keep_checkpoints)


def maybe_resume(t: Trainer, run_dir: Path, resume: str) -> common.TrainState:
    ckpt = common.resolve_resume(run_dir, resume)
    if ckpt is None:
        return common.TrainState()
    return common.load_checkpoint(ckpt, {"vae": t.vae}, t.optimizer)


def publish(t: Trainer, run_dir: Path, scaling_factor: float, meta: dict) -> None:
    """save_pretrained (with the measured scaling_factor) + links to checkpoints, then swap the folder in."""
    for stale in run_dir.parent.glob(f".tmp-*-{run_dir.name}"):  # a crashed earlier publish of this run
        shutil.rmtree(stale, ignore_errors=True)
    stage = staging_dir(run_dir)
    t.vae.register_to_config(scaling_factor=scaling_factor)
    t.vae.save_pretrained(stage, safe_serialization=True)
    fault_point(STAGE, "mid_write")
    if (run_dir / common.CKPT_DIR).exists():  # hard links: no copy, and no window without them
        shutil.copytree(run_dir / common.CKPT_DIR, stage / common.CKPT_DIR, copy_function=os.link)
    atomic_write_json(stage / "training.json", meta)
    fault_point(STAGE, "before_publish")
    publish_dir(stage, run_dir)


# ------------------------------------------------------------------------------------------ run
def train_loop(t: Trainer, stream: ImageStream, run_dir: Path, state: common.TrainState,
               buffer: common.MetricBuffer | None) -> list[dict]:
    cfg, step, history = t.config, state.step, []
    with bar("train vae", total=max(0, cfg.steps - step), unit="step") as pbar:
        while step < cfg.steps:
            logs = train_step(t, stream.next_batch(cfg.batch_size), step)
            step += 1
            history.append({"step": step, **logs})
            _after_step(t, step, stream.position, run_dir, logs, buffer, state.extra)
            pbar.update(1)
    return history


def _after_step(t: Trainer, step: int, position: dict, run_dir: Path, logs: dict,
                buffer: common.MetricBuffer | None, extra: dict) -> None:
    cfg = t.config
    if not math.isfinite(logs["loss"]):
        raise FloatingPointError(f"VAE loss is {logs['loss']} at step {step}: lower --lr")
    if buffer is not None and step % cfg.log_every == 0:
        buffer.add({"loss": logs["loss"], "rec": logs["rec"], "kl": logs["kl"]}, step)
    if step % cfg.checkpoint_every == 0 or step == cfg.steps:
        save_ckpt(t, run_dir, step, position, extra)
    fault_point(STAGE, "after_step")


def _check_config(config: VAEConfig) -> None:
    ldm.ldm_config(config.model)
    if config.steps < 1 or config.batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1 (got {config.steps}, {config.batch_size})")
    if config.loss not in ("l1", "mse"):
        raise ValueError(f"--loss must be l1 or mse, got {config.loss!r}")
    if config.kl_weight < 0 or config.lr <= 0:
        raise ValueError(f"need kl_weight >= 0 and lr > 0 (got {config.kl_weight}, {config.lr})")
    if config.checkpoint_every < 1 or config.log_every < 1:  # both are step moduli
        raise ValueError(f"checkpoint_every and log_every must be >= 1 (got {config.checkpoint_every}, {config.log_every})")


def run(config: VAEConfig, home: Home, domain: str, resume: str = "auto", force: bool = False,
        out: str | None = None) -> StageReport:
    check_name(domain, "domain")
    shard_root = home.shards / domain
    manifest = loader.manifest_path(shard_root)
    _check_config(config)
    inputs = [DatasetRef.of(manifest)]
    run_dir = Path(out) if out else home.models / "vae" / domain / run_name(config, [r.fingerprint for r in inputs])

    def body(report: StageReport) -> StageResult:
        return _train(config, home, domain, shard_root, run_dir, resume, report)

    return run_stage(home, STAGE, config, inputs, body, domain=domain, force=force)


def _train(config: VAEConfig, home: Home, domain: str, shard_root: Path, run_dir: Path, resume: str,
           report: StageReport) -> StageResult:
    t = build_trainer(config)
    size = image_size(config)
    val = fixed_images(shard_root, "val", config.val_images, size)
    psnr_before = psnr(t.vae, val)  # of the weights this run starts from (random, or the resumed ones)
    state = maybe_resume(t, run_dir, resume)
    # PSNR of the random init travels in every checkpoint, so a resumed run still reports it.
    state.extra = {"psnr_before": state.extra.get("psnr_before", psnr_before)}
    psnr_before = state.extra["psnr_before"]
    stream = ImageStream(shard_root, config.seed, size, state.data_position)
    buffer = common.MetricBuffer(home, report.run_id, STAGE, domain=domain, subject=str(run_dir), every=10)
    fault_point(STAGE, "start")
    history = train_loop(t, stream, run_dir, state, buffer)
    buffer.flush()
    meta = _measure(t, shard_root, size, val, psnr_before, state, history)
    common.log_metrics(home, report.run_id, STAGE, _finite(meta), step=config.steps, domain=domain, subject=str(run_dir))
    publish(t, run_dir, meta["scaling_factor"], meta)
    fault_point(STAGE, "end")
    return StageResult(outputs=[DatasetRef.of(run_dir)], extra={**meta, "run_dir": str(run_dir), "history": history[-200:]})


def _measure(t: Trainer, shard_root: Path, size: int, val: torch.Tensor | None, psnr_before: float | None,
             state: common.TrainState, history: list[dict]) -> dict[str, Any]:
    cfg = t.config
    train_imgs = fixed_images(shard_root, "train", cfg.scale_images, size)
    std = latent_std(t.vae, train_imgs, cfg.seed)
    return {"psnr_before": psnr_before, "psnr_after": psnr(t.vae, val), "latent_std": std,
            "scaling_factor": 1.0 / max(std, 1e-6), "resumed_from_step": state.step, "steps": cfg.steps,
            "final_loss": history[-1]["loss"] if history else None, "val_images": 0 if val is None else len(val),
            "config": dataclasses.asdict(cfg)}


def _finite(meta: dict) -> dict[str, float]:
    return {k: float(v) for k, v in meta.items() if isinstance(v, float) and math.isfinite(v)}


# ------------------------------------------------------------------------------------------ CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    common.add_run_arguments(parser, PRESETS, "domain whose shard images (shards/<domain>/train) are used",
                             "tiny (CPU, well under a minute), small, paper (Table 6 KL-f8 autoencoder)")
    parser.add_argument("--out", default=None,
                        help="run folder to train in and publish to (default: models/vae/<domain>/vae-<fingerprint>)")
    add_config_args(parser, VAEConfig)


def main(args: argparse.Namespace, home: Home) -> StageReport:
    config = config_from_args(preset(PRESETS, args.preset), args)
    return run(config, home, args.domain, resume=args.resume, force=args.force, out=args.out)
