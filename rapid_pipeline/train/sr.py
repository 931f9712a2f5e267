"""Fine-tune the ESRGAN x4 super-resolution model on a domain's images.

    rapid train sr --domain demo --preset tiny
    rapid train sr --domain food --preset paper --init-from RealESRGAN_x4plus.pth \\
        --vgg-weights vgg19-dcbb9e9d.pth --resume auto
    rapid train sr --preset paper --print-params

Appendix C of the paper: LR inputs are bicubic x4 downsamplings of HR crops from the domain's
train-split shard images; the generator (and discriminator) start from a pre-trained ESRGAN when
given; Adam(0.9, 0.999), batch 16, lr 1e-4 halved at [50k, 100k, 200k, 300k]. Losses: L1 pixel +
VGG19 conv5_4 (pre-activation) perceptual + vanilla BCE GAN against a U-Net discriminator with
spectral norm (Real-ESRGAN's recipe; ``--gan-loss relativistic`` gives ESRGAN's RaGAN).

Invariants:
* Output ``models/esrgan/<domain>/<run>/`` (``generator.safetensors``, ``discriminator.safetensors``,
  ``config.json``, ``metrics.json``, ``checkpoints/``) is built in a staging folder and renamed into place.
* ``<run>`` is fixed by the config minus ``steps`` (and the inputs), so ``--resume auto`` after a crash,
  or a rerun with more ``--steps``, continues from the newest complete checkpoint; the step after a
  resume computes exactly the loss an uninterrupted run computes (model, optimizer, scheduler, RNG and
  data position are restored; crops are derived from (seed, epoch, sample index), not from RNG state).
* Without ``--vgg-weights`` the perceptual term is OFF and the report says so: a random VGG is never used.
* PSNR on the val split is recorded before and after training (and for plain bicubic upsampling).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from ..core.atomic import atomic_write_json, publish_dir, staging_dir
from ..core.checkpoint import save_state_dict
from ..core.config import add_config_args, config_from_args, opt, preset
from ..core.faults import fault_point
from ..core.fingerprint import fingerprint_obj
from ..core.home import Home, check_name
from ..core.progress import bar
from ..core.stage import DatasetRef, StageReport, StageResult, run_stage
from ..models import esrgan as E
from ..data import loader
from . import common

STAGE = "train_sr"


@dataclass(frozen=True)
class SRConfig:
    num_blocks: int = opt(23, "RRDB blocks in the generator (Table 6: 23)")
    num_features: int = opt(64, "generator hidden features (Table 6: 64)")
    growth: int = opt(32, "RRDB growth channels (Table 6: 32)")
    d_features: int = opt(64, "U-Net discriminator base features (Table 6: 64)")
    hr_size: int = opt(256, "HR crop size in pixels; the LR input is hr_size/4")
    batch_size: int = opt(16, "HR crops per step (appendix C: 16)")
    steps: int = opt(400_000, "total optimisation steps (a rerun with more steps resumes)")
    lr: float = opt(1e-4, "Adam learning rate for G and D (appendix C: 1e-4)")
    milestones: tuple[int, ...] = opt((50_000, 100_000, 200_000, 300_000), "steps at which lr is halved")
    pixel_weight: float = opt(1.0, "weight of the L1 pixel loss")
    perceptual_weight: float = opt(1.0, "weight of the VGG19 conv5_4 perceptual loss (needs --vgg-weights)")
    gan_weight: float = opt(0.1, "weight of the generator's adversarial loss")
    gan_loss: str = opt("vanilla", "vanilla (BCE, Real-ESRGAN) or relativistic (RaGAN, ESRGAN)")
    init_from: str | None = opt(None, "local ESRGAN / Real-ESRGAN generator checkpoint (.pth/.safetensors)")
    init_discriminator_from: str | None = opt(None, "local UNetDiscriminatorSN checkpoint for D")
    vgg_weights: str | None = opt(None, "local torchvision VGG19 state dict (.pth); without it no perceptual loss")
    seed: int = opt(0, "seed for init, data order and crops")
    checkpoint_every: int = opt(5_000, "steps between checkpoints")
    val_samples: int = opt(64, "val-split images used for PSNR")
    device: str = opt("auto", "auto, cpu, cuda, cuda:N")


PRESETS = {
    "tiny": SRConfig(num_blocks=2, num_features=16, growth=8, d_features=8, hr_size=32, batch_size=4, steps=6,
                     milestones=(3, 5), checkpoint_every=2, val_samples=4, lr=2e-4),
    "small": SRConfig(num_blocks=6, num_features=32, growth=16, d_features=32, hr_size=128, batch_size=8,
                      steps=2_000, milestones=(500, 1_000, 1_500), checkpoint_every=250, val_samples=32),
    "paper": SRConfig(),
}

# Keys that do not change what one training step computes: excluded from the run folder name so
# that a rerun with more steps (or another checkpoint cadence) resumes the same run.
_RUN_INDEPENDENT = ("steps", "checkpoint_every", "val_samples", "device")


# ------------------------------------------------------------------------------------------ setup
@dataclass
class Trainer:
    config: SRConfig
    device: torch.device
    generator: torch.nn.Module
    discriminator: torch.nn.Module
    vgg: torch.nn.Module | None
    optimizer: torch.optim.Optimizer
    scheduler: Any
    notes: list[str]


def build_trainer(config: SRConfig) -> Trainer:
    common.seed_everything(config.seed)
    device = common.pick_device(config.device)
    g = E.build_generator(config.num_blocks, config.num_features, config.growth)
    if config.init_from:
        E.init_generator_from(g, config.init_from)
    d = E.UNetDiscriminatorSN(3, config.d_features)
    if config.init_discriminator_from:
        d.load_state_dict(E.load_state_dict(config.init_discriminator_from), strict=True)
    vgg, notes = _perceptual(config)
    g, d = g.to(device), d.to(device)
    vgg = vgg.to(device) if vgg is not None else None
    # One Adam over two param groups: a step only moves parameters that received gradients, so
    # G and D update separately, and a single optimizer/scheduler pair is checkpointed.
    opt_ = torch.optim.Adam([{"params": g.parameters()}, {"params": d.parameters()}], lr=config.lr, betas=(0.9, 0.999))
    sched = torch.optim.lr_scheduler.MultiStepLR(opt_, milestones=list(config.milestones), gamma=0.5)
    return Trainer(config, device, g, d, vgg, opt_, sched, notes)


def _perceptual(config: SRConfig) -> tuple[torch.nn.Module | None, list[str]]:
    if config.perceptual_weight <= 0:
        return None, ["perceptual loss disabled (perceptual_weight=0)"]
    if not config.vgg_weights:
        msg = ("perceptual loss DISABLED: no --vgg-weights given (a randomly initialised VGG19 would be "
               "meaningless, and nothing is downloaded); training uses L1 + GAN only")
        warnings.warn(msg, stacklevel=2)
        return None, [msg]
    return E.VGGFeatures(config.vgg_weights), [f"perceptual loss: VGG19 conv5_4 from {config.vgg_weights}"]


# ------------------------------------------------------------------------------------------ data
def _to_tensor(image) -> torch.Tensor:
    import numpy as np

    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0


def _fit(img: torch.Tensor, size: int) -> torch.Tensor:
    """Upscale (bicubic) an image whose short side is below `size`, so a crop always fits."""
    h, w = img.shape[-2:]
    if min(h, w) >= size:
        return img
    s = size / min(h, w)
    out = F.interpolate(img[None], size=(max(size, round(h * s)), max(size, round(w * s))), mode="bicubic",
                        align_corners=False, antialias=True)
    return out[0].clamp(0, 1)


def random_crop(img: torch.Tensor, size: int, seed: int, epoch: int, index: int) -> torch.Tensor:
    """Crop + flip chosen by a generator seeded from (seed, epoch, index): reproducible after resume."""
    img = _fit(img, size)
    digest = hashlib.sha256(f"{seed}:{epoch}:{index}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
    h, w = img.shape[-2:]
    top = int(torch.randint(0, h - size + 1, (1,), generator=gen))
    left = int(torch.randint(0, w - size + 1, (1,), generator=gen))
    crop = img[:, top:top + size, left:left + size]
    return crop.flip(-1) if bool(torch.randint(0, 2, (1,), generator=gen)) else crop


def center_crop(img: torch.Tensor, size: int) -> torch.Tensor:
    img = _fit(img, size)
    h, w = img.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    return img[:, top:top + size, left:left + size]


def bicubic_down(hr: torch.Tensor, factor: int = 4) -> torch.Tensor:
    """Appendix C: LR = bicubic downsampling of HR (antialiased, as MATLAB imresize)."""
    return F.interpolate(hr, scale_factor=1 / factor, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)


class CropStream:
    """Batches of HR crops from the train split; `position` is (epoch, sample index) for resume."""

    def __init__(self, shard_root: Path, config: SRConfig, position: dict | None = None):
        self.root, self.config = shard_root, config
        self.epoch = int((position or {}).get("epoch", 0))
        self.index = int((position or {}).get("index", 0))
        self._it = self._open()

    def _open(self) -> Iterator[dict]:
        return loader.iter_samples(self.root, "train", seed=self.config.seed + self.epoch, start=self.index)

    @property
    def position(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def _next_sample(self) -> dict:
        for _ in range(2):
            sample = next(self._it, None)
            if sample is not None:
                return sample
            if self.index == 0:
                break
            self.epoch, self.index = self.epoch + 1, 0
            self._it = self._open()
        raise ValueError(f"no training images in the train split of {self.root}")

    def next_batch(self) -> torch.Tensor:
        crops = []
        for _ in range(self.config.batch_size):
            img = _to_tensor(self._next_sample()["image"])
            crops.append(random_crop(img, self.config.hr_size, self.config.seed, self.epoch, self.index))
            self.index += 1
        return torch.stack(crops)


def val_batches(shard_root: Path, config: SRConfig) -> list[torch.Tensor]:
    """Fixed val set: the first `val_samples` val images (unshuffled), centre-cropped to hr_size."""
    crops = []
    for sample in loader.iter_samples(shard_root, "val", seed=None, start=0):
        crops.append(center_crop(_to_tensor(sample["image"]), config.hr_size))
        if len(crops) >= config.val_samples:
            break
    return [torch.stack(crops[i:i + config.batch_size]) for i in range(0, len(crops), config.batch_size)]


# ------------------------------------------------------------------------------------------ step
def _gan_terms(t: Trainer, real_logits: torch.Tensor, fake_logits: torch.Tensor, for_generator: bool) -> torch.Tensor:
    bce = F.binary_cross_entropy_with_logits
    if t.config.gan_loss == "relativistic":
        r, f = real_logits - fake_logits.mean(), fake_logits - real_logits.mean()
        real_t, fake_t = (0.0, 1.0) if for_generator else (1.0, 0.0)
        return (bce(r, torch.full_like(r, real_t)) + bce(f, torch.full_like(f, fake_t))) / 2
    if for_generator:
        return bce(fake_logits, torch.ones_like(fake_logits))
    return bce(real_logits, torch.ones_like(real_logits)) + bce(fake_logits, torch.zeros_like(fake_logits))


def generator_step(t: Trainer, lr_img: torch.Tensor, hr: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    t.discriminator.requires_grad_(False)  # D is a fixed critic during the G update
    fake = t.generator(lr_img)
    terms = {"l1": F.l1_loss(fake, hr) * t.config.pixel_weight}
    if t.vgg is not None:
        terms["perceptual"] = F.l1_loss(t.vgg(fake), t.vgg(hr)) * t.config.perceptual_weight
    if t.config.gan_weight > 0:
        real_logits = t.discriminator(hr).detach() if t.config.gan_loss == "relativistic" else None
        fake_logits = t.discriminator(fake)
        terms["gan_g"] = _gan_terms(t, real_logits, fake_logits, True) * t.config.gan_weight
    loss = sum(terms.values())
    t.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    t.optimizer.step()
    return fake.detach(), {k: float(v.detach()) for k, v in terms.items()} | {"loss_g": float(loss.detach())}


def discriminator_step(t: Trainer, fake: torch.Tensor, hr: torch.Tensor) -> dict[str, float]:
    t.discriminator.requires_grad_(True)
    loss = _gan_terms(t, t.discriminator(hr), t.discriminator(fake), False)
    t.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    t.optimizer.step()
    return {"loss_d": float(loss.detach())}


def train_step(t: Trainer, hr: torch.Tensor) -> dict[str, float]:
    hr = hr.to(t.device)
    lr_img = bicubic_down(hr)
    fake, logs = generator_step(t, lr_img, hr)
    if t.config.gan_weight > 0:
        logs |= discriminator_step(t, fake, hr)
    t.scheduler.step()
    return logs


# ------------------------------------------------------------------------------------------ validate
@torch.no_grad()
def evaluate_psnr(generator: torch.nn.Module, batches: list[torch.Tensor], device: torch.device) -> dict[str, float]:
    """Mean PSNR of SR(bicubic_down(HR)) and of bicubic upsampling, against HR."""
    was_training = generator.training
    generator.eval()
    sr, bic = [], []
    for hr in batches:
        hr = hr.to(device)
        lr_img = bicubic_down(hr)
        up = F.interpolate(lr_img, scale_factor=4, mode="bicubic", align_corners=False).clamp(0, 1)
        out = generator(lr_img).clamp(0, 1)
        sr += [E.psnr(o, h) for o, h in zip(out, hr)]
        bic += [E.psnr(u, h) for u, h in zip(up, hr)]
    generator.train(was_training)
    if not sr:
        return {}
    return {"psnr": sum(sr) / len(sr), "psnr_bicubic": sum(bic) / len(bic)}


# ------------------------------------------------------------------------------------------ save / resume
def run_name(config: SRConfig, input_fingerprints: list[str]) -> str:
    d = {k: v for k, v in dataclasses.asdict(config).items() if k not in _RUN_INDEPENDENT}
    return "sr-" + fingerprint_obj([d, input_fingerprints])[:16]


def save_ckpt(t: Trainer, run_dir: Path, step: int, stream: CropStream, extra: dict) -> None:
    common.save_checkpoint(run_dir, step, {"generator": t.generator, "discriminator": t.discriminator},
                           t.optimizer, t.scheduler, data_position=stream.position, extra=extra)


def maybe_resume(t: Trainer, run_dir: Path, resume: str) -> common.TrainState:
    ckpt = common.resolve_resume(run_dir, resume)
    if ckpt is None:
        return common.TrainState()
    return common.load_checkpoint(ckpt, {"generator": t.generator, "discriminator": t.discriminator},
                                  t.optimizer, t.scheduler)


def publish(t: Trainer, run_dir: Path, metrics: dict) -> None:
    """Stage generator + discriminator + config + metrics (+ hard links to checkpoints), then swap in."""
    stage = staging_dir(run_dir)
    save_state_dict(t.generator.state_dict(), stage / "generator.safetensors")
    save_state_dict(t.discriminator.state_dict(), stage / "discriminator.safetensors")
    fault_point(STAGE, "mid_write")
    E.write_generator_config(t.generator, stage)
    atomic_write_json(stage / "discriminator.json", {"type": "UNetDiscriminatorSN", "in_channels": 3,
                                                     "num_features": t.config.d_features, "skip_connection": True})
    if (run_dir / common.CKPT_DIR).exists():  # keep checkpoints (links: no copy, no window without them)
        shutil.copytree(run_dir / common.CKPT_DIR, stage / common.CKPT_DIR, copy_function=os.link)
    atomic_write_json(stage / "metrics.json", metrics)
    fault_point(STAGE, "before_publish")
    publish_dir(stage, run_dir)


# ------------------------------------------------------------------------------------------ run
def train_loop(t: Trainer, stream: CropStream, run_dir: Path, state: common.TrainState, extra: dict,
               buffer: common.MetricBuffer | None) -> list[dict]:
    history = []
    step = state.step
    with bar("train sr", total=t.config.steps - step, unit="step") as pbar:
        while step < t.config.steps:
            logs = train_step(t, stream.next_batch())
            step += 1
            history.append({"step": step, **logs})
            if buffer is not None:
                buffer.add(logs, step)
            if step % t.config.checkpoint_every == 0 or step == t.config.steps:
                save_ckpt(t, run_dir, step, stream, extra)
            pbar.update(1)
    return history


def run(config: SRConfig, home: Home, domain: str, resume: str = "auto", force: bool = False) -> StageReport:
    check_name(domain, "domain")
    shard_root = home.shards / domain
    manifest = loader.manifest_path(shard_root)
    _check_config(config)
    inputs = [DatasetRef.of(manifest)] + [DatasetRef.of(p) for p in (config.init_from, config.vgg_weights,
                                                                      config.init_discriminator_from) if p]
    run_dir = home.models / "esrgan" / domain / run_name(config, [r.fingerprint for r in inputs])

    def body(report: StageReport) -> StageResult:
        return _train(config, home, domain, shard_root, run_dir, resume, report)

    return run_stage(home, STAGE, config, inputs, body, domain=domain, force=force)


def _check_config(config: SRConfig) -> None:
    if config.hr_size % 4 or config.hr_size < 16:
        raise ValueError(f"hr_size must be a multiple of 4 and >= 16 (the U-Net D downsamples 3x), got {config.hr_size}")
    if config.gan_loss not in ("vanilla", "relativistic"):
        raise ValueError(f"gan_loss must be vanilla or relativistic, got {config.gan_loss!r}")


def _train(config: SRConfig, home: Home, domain: str, shard_root: Path, run_dir: Path, resume: str,
           report: StageReport) -> StageResult:
    t = build_trainer(config)
    state = maybe_resume(t, run_dir, resume)
    val = val_batches(shard_root, config)
    before = state.extra.get("psnr_before") or evaluate_psnr(t.generator, val, t.device)
    extra = {"psnr_before": before}
    stream = CropStream(shard_root, config, state.data_position)
    buffer = common.MetricBuffer(home, report.run_id, STAGE, domain=domain, subject=str(run_dir))
    fault_point(STAGE, "start")
    history = train_loop(t, stream, run_dir, state, extra, buffer)
    buffer.flush()
    after = evaluate_psnr(t.generator, val, t.device)
    metrics = _metrics(t, state, before, after, history)
    common.log_metrics(home, report.run_id, STAGE, {k: v for k, v in metrics.items() if isinstance(v, float)},
                       step=config.steps, domain=domain, subject=str(run_dir))
    publish(t, run_dir, metrics)
    fault_point(STAGE, "end")
    return StageResult(outputs=[DatasetRef.of(run_dir / "generator.safetensors"), DatasetRef.of(run_dir / "config.json")],
                       extra={**metrics, "run_dir": str(run_dir), "history": history[-200:]})


def _metrics(t: Trainer, state: common.TrainState, before: dict, after: dict, history: list[dict]) -> dict:
    out: dict[str, Any] = {"resumed_from_step": state.step, "steps": t.config.steps, "notes": t.notes,
                           "generator_params": E.count_params(t.generator),
                           "discriminator_params": E.count_params(t.discriminator)}
    for k, v in before.items():
        out[f"val_{k}_before" if k == "psnr" else f"val_{k}"] = v
    if "psnr" in after:
        out["val_psnr_after"] = after["psnr"]
    if history:
        out["final_loss_g"] = history[-1]["loss_g"]
    return out


# ------------------------------------------------------------------------------------------ CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    common.add_run_arguments(parser, PRESETS, "domain whose shards (shards/<domain>/) are used",
                             "tiny (CPU tests, seconds), small, paper (Table 6 / appendix C)")
    parser.add_argument("--print-params", action="store_true",
                        help="print generator / discriminator parameter counts of the preset and exit")
    add_config_args(parser, SRConfig)


def param_counts(config: SRConfig) -> dict[str, Any]:
    g = E.build_generator(config.num_blocks, config.num_features, config.growth)
    d = E.UNetDiscriminatorSN(3, config.d_features)
    gp, dp = E.count_params(g), E.count_params(d)
    text = f"generator RRDBNet ({config.num_blocks} blocks, {config.num_features} features, growth " \
           f"{config.growth}): {gp:,} params ({gp / 1e6:.1f}M); discriminator UNetDiscriminatorSN " \
           f"({config.d_features} features): {dp:,} params ({dp / 1e6:.2f}M)"
    return {"generator_params": gp, "discriminator_params": dp, "text": text}


def main(args: argparse.Namespace, home: Home) -> StageReport | dict:
    config = config_from_args(preset(PRESETS, args.preset), args)
    if args.print_params:
        return param_counts(config)
    return run(config, home, args.domain, resume=args.resume, force=args.force)
