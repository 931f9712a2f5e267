"""The Rapid Diffusion text-to-image pipeline object (diffusers `DiffusionPipeline` subclass).

    from rapid_pipeline.pipeline import RapidDiffusionPipeline, build_random_pipeline
    pipe = RapidDiffusionPipeline.from_pretrained("rapid_home/models/pipeline/demo/<run_id>")
    images = pipe("一张小炒黄牛肉的照片", num_inference_steps=50, guidance_scale=7.5,
                  generator=torch.Generator().manual_seed(0)).images

Stages of one call, each a method so the acceleration code can swap one of them:
``encode_prompt`` (KnowledgeTokenizer + CKCLIP, cond and uncond) -> ``denoise`` (classifier-free
guidance: cond and uncond in ONE U-Net call of batch 2B; PNDM by default, DDIM / DPM-Solver++
selectable) -> ``decode_latents`` (VAE, always in fp32 so fp16 pipelines never give black images,
cf. diffusers issues 7310 / 9558) -> ``upscale`` (ESRGAN x4, optional).

Invariants:
* ``height`` / ``width`` are the diffusion resolution; with super-resolution the output is 4x that.
* Folder layout is the diffusers one (``model_index.json`` + one sub-folder per component,
  safetensors everywhere; ``super_resolution/`` = ``generator.safetensors`` + ``config.json``;
  ``knowledge/`` = entity table for linking prompts). Loading is local-only; component classes are
  imported only from an allow-list of packages, so a folder cannot make us import arbitrary code.
"""

from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DDIMScheduler, DiffusionPipeline, DPMSolverMultistepScheduler, PNDMScheduler
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

SCHEDULERS = {"pndm": PNDMScheduler, "ddim": DDIMScheduler, "dpmsolver++": DPMSolverMultistepScheduler}
_ALLOWED_LIBRARIES = ("rapid_pipeline", "diffusers", "transformers")
SR_DIR, KNOWLEDGE_DIR = "super_resolution", "knowledge"


@dataclass
class RapidPipelineOutput(BaseOutput):
    """``images``: list of PIL images, a float tensor [B,3,H,W] in [0,1] (``pt``) or an array [B,H,W,3] (``np``)."""

    images: Any


def make_scheduler(name: str | None, config: Any) -> Any:
    """A sampling scheduler by name, sharing the noise schedule (betas) of `config`."""
    name = name or "pndm"
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    extra = {"algorithm_type": "dpmsolver++"} if name == "dpmsolver++" else {}
    if name == "pndm":
        extra = {"skip_prk_steps": True}  # PLMS as in SD / LDM sampling
    return SCHEDULERS[name].from_config(config, **extra)


def default_noise_scheduler_config() -> dict:
    """SD-1.x / LDM training schedule: 1000 steps, scaled-linear betas 0.00085..0.012, epsilon prediction."""
    return dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                prediction_type="epsilon", steps_offset=1, set_alpha_to_one=False, clip_sample=False)


class RapidDiffusionPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "text_encoder->unet->vae"
    _optional_components = ["super_resolution"]

    def __init__(self, text_encoder, tokenizer, unet, vae, scheduler, super_resolution=None,
                 prompt_template: str | None = None, max_length: int = 32):
        super().__init__()
        self.register_modules(text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, vae=vae,
                              scheduler=scheduler, super_resolution=super_resolution)
        self.register_to_config(prompt_template=prompt_template, max_length=max_length)
        from .core.progress import enabled

        self.set_progress_bar_config(disable=not enabled(), leave=False)

    # ------------------------------------------------------------------ properties
    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def default_size(self) -> int:
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    @property
    def exec_device(self) -> torch.device:
        return self.unet.device

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    def modules_by_name(self) -> dict[str, torch.nn.Module]:
        return {n: m for n in ("text_encoder", "unet", "vae", "super_resolution")
                if isinstance(m := getattr(self, n, None), torch.nn.Module)}

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None, *args: Any,
           **_: Any) -> "RapidDiffusionPipeline":
        """Move / cast every module (plain nn.Modules too, which diffusers' `to` does not expect)."""
        for a in args:
            dtype, device = (a, device) if isinstance(a, torch.dtype) else (dtype, a)
        for m in self.modules_by_name().values():
            _quiet_to(m, device, dtype)
        return self

    # ------------------------------------------------------------------ prompts
    def apply_template(self, prompts: list[str], template: str | None) -> list[str]:
        """``一张{object}的照片`` + ``小炒黄牛肉`` -> ``一张小炒黄牛肉的照片``; prompts already in it are kept."""
        if not template:
            return prompts
        head = template.split("{object}")[0]
        return [p if (head and p.startswith(head)) else template.format(object=p) for p in prompts]

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """[B, L, D] hidden states of the knowledge-enhanced text encoder (entity vectors included)."""
        batch = self.tokenizer(texts, max_length=self.config.max_length)
        dev = next(self.text_encoder.parameters()).device
        batch = {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
        out = self.text_encoder(**batch)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out
        return hidden.to(self.unet.dtype)

    def encode_prompt(self, prompt: str | list[str], negative_prompt: str | list[str] | None = None,
                      do_cfg: bool = True, prompt_template: str | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(cond, uncond) text states; uncond is the empty prompt (what caption dropout trained) or the negative."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        template = self.config.prompt_template if prompt_template is None else prompt_template
        cond = self.encode_text(self.apply_template(prompts, template))
        if not do_cfg:
            return cond, None
        neg = negative_prompt if negative_prompt is not None else ""
        negs = [neg] * len(prompts) if isinstance(neg, str) else list(neg)
        if len(negs) != len(prompts):
            raise ValueError(f"{len(negs)} negative prompts for {len(prompts)} prompts")
        return cond, self.encode_text(negs)

    # ------------------------------------------------------------------ denoising
    def prepare_latents(self, batch: int, height: int, width: int, generator=None) -> torch.Tensor:
        f = self.vae_scale_factor
        if height % f or width % f:
            raise ValueError(f"height and width must be multiples of {f} (got {height}x{width})")
        shape = (batch, self.unet.config.in_channels, height // f, width // f)
        return randn_tensor(shape, generator=generator, device=self.exec_device, dtype=self.unet.dtype)

    def unet_eps(self, latents: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """One U-Net evaluation (the hot spot the acceleration code replaces)."""
        return self.unet(latents, t, encoder_hidden_states=context, return_dict=False)[0]

    @torch.no_grad()
    def denoise(self, latents: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor | None, steps: int,
                guidance: float, scheduler: Any = None) -> torch.Tensor:
        """Run the sampler; with `uncond`, cond + uncond go through the U-Net as one batch of 2B."""
        sched = scheduler or self.scheduler
        sched.set_timesteps(steps, device=latents.device)
        latents = latents * sched.init_noise_sigma
        context = cond if uncond is None else torch.cat([uncond, cond])
        for t in self.progress_bar(sched.timesteps):
            inp = latents if uncond is None else torch.cat([latents] * 2)
            eps = self.unet_eps(sched.scale_model_input(inp, t), t, context)
            if uncond is not None:
                eps_u, eps_c = eps.chunk(2)
                eps = eps_u + guidance * (eps_c - eps_u)
            latents = sched.step(eps, t, latents, return_dict=False)[0]
        return latents

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images [B,3,H,W] in [0,1], decoded in fp32 (fp16 VAE decodes overflow to black/NaN)."""
        vae = self.vae
        restore = vae.dtype
        if restore != torch.float32:
            _quiet_to(vae, torch.float32)
        try:
            with torch.autocast(device_type=latents.device.type, enabled=False):
                x = vae.decode(latents.float() / vae.config.scaling_factor, return_dict=False)[0]
        finally:
            if restore != torch.float32:
                _quiet_to(vae, restore)
        return ((x.float() + 1) / 2).clamp(0, 1)

    @torch.no_grad()
    def upscale(self, images: torch.Tensor) -> torch.Tensor:
        """ESRGAN x4 on [B,3,H,W] images in [0,1]; returns [B,3,4H,4W] in [0,1] (float32)."""
        sr = self.super_resolution
        if sr is None:
            return images
        p = next(sr.parameters())
        return sr(images.to(p.device, p.dtype)).float().clamp(0, 1)

    # ------------------------------------------------------------------ call
    @torch.no_grad()
    def __call__(self, prompt: str | list[str], num_inference_steps: int = 50, guidance_scale: float = 7.5,
                 negative_prompt: str | list[str] | None = None, height: int | None = None, width: int | None = None,
                 generator: torch.Generator | None = None, scheduler: str | None = None, super_resolution: bool = True,
                 output_type: str = "pil", prompt_template: str | None = None) -> RapidPipelineOutput:
        if output_type not in ("pil", "pt", "np"):
            raise ValueError(f"output_type must be pil, pt or np (got {output_type!r})")
        if isinstance(prompt, list) and not prompt:
            raise ValueError("empty prompt list")
        do_cfg = guidance_scale > 1.0
        cond, uncond = self.encode_prompt(prompt, negative_prompt, do_cfg, prompt_template)
        h, w = height or self.default_size, width or self.default_size
        latents = self.prepare_latents(cond.shape[0], h, w, generator)
        sched = make_scheduler(scheduler, self.scheduler.config) if scheduler else self.scheduler
        latents = self.denoise(latents, cond, uncond, num_inference_steps, guidance_scale, sched)
        images = self.decode_latents(latents)
        if super_resolution and self.super_resolution is not None:
            images = self.upscale(images)
        return RapidPipelineOutput(images=to_output(images, output_type))

    # ------------------------------------------------------------------ save / load
    def save_pretrained(self, save_directory: str | os.PathLike, **_: Any) -> None:
        """Write the diffusers folder layout (safetensors); callers publish it atomically (staging + rename)."""
        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        quiet_hf_progress()
        self.save_config(out)
        self.text_encoder.save_pretrained(out / "text_encoder")
        self.tokenizer.save_pretrained(out / "tokenizer")
        self.unet.save_pretrained(out / "unet", safe_serialization=True)
        self.vae.save_pretrained(out / "vae", safe_serialization=True)
        self.scheduler.save_pretrained(out / "scheduler")
        if self.super_resolution is not None:
            save_super_resolution(self.super_resolution, out / SR_DIR)
        export_knowledge(out / "tokenizer", out / KNOWLEDGE_DIR)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, torch_dtype: torch.dtype | None = None,
                        device: str | torch.device | None = None, **_: Any) -> "RapidDiffusionPipeline":
        """Load a local pipeline folder (or a ``production`` pointer file next to run folders)."""
        folder = resolve_pipeline_dir(pretrained_model_name_or_path)
        quiet_hf_progress()
        index = json.loads((folder / "model_index.json").read_text())
        parts = {name: _load_component(folder / name, entry) for name, entry in index.items()
                 if not name.startswith("_") and isinstance(entry, list) and name != SR_DIR}
        sr = load_super_resolution(folder / SR_DIR) if (folder / SR_DIR / "generator.safetensors").exists() else None
        pipe = cls(**parts, super_resolution=sr, prompt_template=index.get("prompt_template"),
                   max_length=int(index.get("max_length", 32)))
        for m in (pipe.text_encoder, pipe.unet, pipe.vae, pipe.super_resolution):
            if m is not None:
                m.eval()
        if device is not None or torch_dtype is not None:
            pipe.to(device=device, dtype=torch_dtype)
        return pipe


# ---------------------------------------------------------------------- helpers
def write_folder_manifest(folder: Path, exclude: tuple[str, ...] = ("checkpoints", "validation"),
                          stage: str = "publish") -> dict:
    """``_manifest.json`` over the pipeline files (not training checkpoints / validation images), so the
    folder's fingerprint (`core.fingerprint.fingerprint_path`) is cheap and names the model itself."""
    from .core.atomic import MANIFEST, FileEntry, commit_manifest, sha256_file

    files = [p for p in sorted(Path(folder).rglob("*")) if p.is_file() and p.name != MANIFEST
             and p.relative_to(folder).parts[0] not in exclude and not p.name.startswith(".tmp-")]
    entries = [FileEntry(str(p.relative_to(folder)), 0, p.stat().st_size, sha256_file(p)) for p in files]
    return commit_manifest(Path(folder), entries, {"kind": "rapid_pipeline"}, stage=stage)


def quiet_hf_progress() -> None:
    """transformers / diffusers draw their own load/save bars; follow ``RAPID_PROGRESS`` like ours do."""
    from .core.progress import enabled

    if enabled():
        return
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.disable_progress_bar()
    tlog.disable_progress_bar()


def _quiet_to(module: torch.nn.Module, device: Any = None, dtype: torch.dtype | None = None) -> None:
    """``module.to`` without diffusers' "modules that should be kept in float32: []" warning on every decode."""
    from diffusers.utils import logging as dlog

    if isinstance(device, torch.dtype):
        device, dtype = None, device
    level = dlog.get_verbosity()
    dlog.set_verbosity_error()
    try:
        module.to(device=device, dtype=dtype)
    finally:
        dlog.set_verbosity(level)


def to_output(images: torch.Tensor, output_type: str) -> Any:
    if output_type == "pt":
        return images.cpu()
    arr = images.permute(0, 2, 3, 1).cpu().numpy()
    if output_type == "np":
        return arr
    from PIL import Image

    return [Image.fromarray((a * 255).round().astype(np.uint8)) for a in arr]


def resolve_pipeline_dir(path: str | os.PathLike) -> Path:
    """A pipeline folder, or a pointer file (``production`` / ``CURRENT``) naming a sibling run folder."""
    p = Path(path)
    if p.is_file():
        name = p.read_text().strip()
        p = p.parent / name
    if not (p / "model_index.json").exists():
        raise FileNotFoundError(f"{path} is not a pipeline folder (no model_index.json)")
    return p


def _load_component(sub: Path, entry: list) -> Any:
    library, class_name = entry
    if library is None:
        return None
    if library.split(".")[0] not in _ALLOWED_LIBRARIES or not hasattr(importlib.import_module(library), class_name):
        raise ValueError(f"{sub.name}: component {library}.{class_name} is not allowed (only classes of {_ALLOWED_LIBRARIES})")
    module = importlib.import_module(library)
    klass = getattr(module, class_name)
    if library.startswith("rapid_pipeline."):
        return klass.from_pretrained(sub)  # our classes read local folders only
    if "Scheduler" in class_name:
        return klass.from_pretrained(sub)
    return klass.from_pretrained(sub, local_files_only=True)


def save_super_resolution(module: torch.nn.Module, folder: Path) -> None:
    """ESRGAN generator as ``generator.safetensors`` + ``config.json`` (the contract of models/esrgan)."""
    from .core.checkpoint import save_state_dict
    from .models.esrgan import infer_arch, write_generator_config

    folder.mkdir(parents=True, exist_ok=True)
    state = module.state_dict()
    save_state_dict(state, folder / "generator.safetensors")
    if getattr(module, "arch_config", None) is None:
        module.arch_config = infer_arch(state)
    write_generator_config(module, folder)


def load_super_resolution(folder: str | os.PathLike) -> torch.nn.Module:
    """The ESRGAN generator of a ``super_resolution/`` (or ``models/esrgan/<d>/<run>/``) folder."""
    from .models.esrgan import load_generator

    return load_generator(Path(folder)).eval()


def export_knowledge(tokenizer_dir: Path, folder: Path) -> None:
    """Top-level ``knowledge/entities.parquet`` (entity_id, names, vector): the entity table prompts are linked
    against at inference; the KnowledgeTokenizer keeps its own copy under ``tokenizer/knowledge/``."""
    import shutil

    src = tokenizer_dir / "knowledge" / "entities.parquet"
    if src.exists():
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, folder / "entities.parquet")


# ---------------------------------------------------------------------- random tiny pipeline
def build_random_pipeline(preset: str = "tiny", seed: int = 0, super_resolution: bool = True,
                          prompt_template: str | None = None) -> RapidDiffusionPipeline:
    """Random-init components of `preset` (tests and benchmarks of other stages; nothing trained or downloaded)."""
    from .models.ldm import build_unet, build_vae

    torch.manual_seed(seed)
    text_encoder, tokenizer = random_text_tower(preset)
    unet = build_unet(preset, context_dim=text_hidden_size(text_encoder))
    vae = build_vae(preset)
    sched = make_scheduler("pndm", default_noise_scheduler_config())
    sr = random_esrgan(preset) if super_resolution else None
    pipe = RapidDiffusionPipeline(text_encoder, tokenizer, unet, vae, sched, sr, prompt_template=prompt_template)
    for m in (text_encoder, unet, vae, sr):
        if m is not None:
            m.eval()
    return pipe


def text_hidden_size(text_encoder: Any) -> int:
    for attr in ("hidden_size", "width"):
        if hasattr(text_encoder, attr):
            return int(getattr(text_encoder, attr))
    return int(text_encoder.config.hidden_size)


def random_esrgan(preset: str = "tiny") -> torch.nn.Module:
    """ESRGAN x4 RRDBNet: Table 6 shape for ``paper`` (64 features, 23 blocks, growth 32), a 1-block net for ``tiny``."""
    from .models.esrgan import build_generator

    blocks, feats, growth = {"paper": (23, 64, 32), "small": (6, 32, 16)}.get(preset, (1, 8, 8))
    return build_generator(num_blocks=blocks, num_features=feats, growth=growth)


# Characters of the random tower's vocabulary: the paper's example prompts and the demo domains' words.
_RANDOM_VOCAB_TEXT = ("一张的照片图画小炒黄牛肉鱼香肉丝米饭大杯烧仙草奶茶红富士苹果爆款冬季女士羽绒服玫瑰金项链夏季新款运动帆布鞋"
                      "停车坐爱枫林晚霜叶于二月花千山鸟飞绝万径人踪灭接天莲荷无穷碧映日别样abcdefghijklmnopqrstuvwxyz0123456789")
_RANDOM_ENTITIES = (("e_random_beef", ["小炒黄牛肉", "黄牛肉"]), ("e_random_apple", ["红富士苹果", "苹果"]),
                    ("e_random_tea", ["烧仙草奶茶"]))


def random_text_tower(preset: str = "tiny", entity_dim: int = 16) -> tuple[Any, Any]:
    """(CKCLIPTextEncoder, KnowledgeTokenizer) with random weights, a character vocab and 3 random entities."""
    import tempfile

    import numpy as np

    from .models.char_tokenizer import build_vocab, load_tokenizer
    from .models.ckclip import KnowledgeTokenizer, build_ckclip

    with tempfile.TemporaryDirectory() as d:
        build_vocab([_RANDOM_VOCAB_TEXT], d)
        tok = load_tokenizer(d)
    rng = np.random.default_rng(0)
    ids, names = [e for e, _ in _RANDOM_ENTITIES], [n for _, n in _RANDOM_ENTITIES]
    ktok = KnowledgeTokenizer(tok, ids, rng.standard_normal((len(ids), entity_dim)).astype(np.float32), names)
    clip = build_ckclip(preset, vocab_size=len(tok), entity_dim=entity_dim)
    return clip.text_encoder, ktok
