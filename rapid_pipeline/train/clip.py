"""Train the knowledge-enhanced Chinese CLIP (CKCLIP) on a domain's shards.

    rapid train clip --domain demo --preset tiny --steps 200
    rapid train clip --domain demo --preset small --no-knowledge          # the same model without injection
    rapid train clip --domain demo --preset tiny --ablation                # both, and both retrieval figures
    rapid train clip --domain demo --preset paper --init-from /models/chinese-clip-vit-base-patch16
    rapid train clip --preset paper --print-params                         # parameter count per component

Reads ``shards/<domain>/`` (train split + the manifest's TransE embeddings), trains with the symmetric
InfoNCE loss (AdamW, linear warmup + cosine decay, bf16 autocast on CUDA), checkpoints every
``--checkpoint-every`` steps, evaluates R@1/5/10 in both directions on the val split (test, if val is
empty) and publishes ``models/ckclip/<domain>/<run>/`` atomically (transformers layout + tokenizer +
``knowledge.*`` + ``knowledge/entities.parquet`` + ``report.json``; ``CURRENT`` names the newest run).

Invariants:
* Resume (``--resume auto``, the default) restores model, optimizer, scheduler, every RNG and the data
  position (epoch, samples consumed); the next step computes what an uninterrupted run would have.
* ``--no-knowledge`` changes only whether entity vectors are injected: same data, order, seed, init of
  all shared weights.
* Per-step loss/lr go to the warehouse ``metrics`` table; retrieval figures too, and into report.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from ..core.atomic import atomic_write_bytes, atomic_write_json, publish_dir, staging_dir
from ..core.config import add_config_args, config_from_args, opt, preset
from ..core.faults import fault_point
from ..core.fingerprint import fingerprint_obj, fingerprint_path
from ..core.home import Home, check_name
from ..core.progress import bar
from ..core.stage import DatasetRef, StageResult, run_stage
from ..data.loader import read_manifest
from . import common

STAGE = "train_clip"


@dataclass(frozen=True)
class ClipTrainConfig:
    preset: str = opt("tiny", "architecture preset: tiny (CPU seconds), small (CPU minutes), paper (Table 6 + ViT-B/16)")
    steps: int = opt(300, "optimizer steps")
    batch_size: int = opt(32, "image-text pairs per step (the contrastive negatives are the rest of the batch)")
    lr: float = opt(1e-3, "peak AdamW learning rate")
    weight_decay: float = opt(0.1, "AdamW weight decay (not applied to biases, norms, embeddings, logit scale)")
    warmup_steps: int = opt(30, "linear warmup steps before the cosine decay")
    seed: int = opt(0, "seed of init, data order and dropout")
    knowledge: bool = opt(True, "inject TransE entity vectors at entity tokens (--no-knowledge: plain Chinese CLIP)")
    init_from: str = opt("", "LOCAL Chinese-CLIP checkpoint folder (HF layout) to start from; empty = random init")
    context_length: int = opt(32, "text tokens per caption (Table 6: 32)")
    vocab_min_freq: int = opt(1, "without --init-from: keep characters seen at least this often in train captions")
    vocab_max_size: int = opt(21128, "without --init-from: vocabulary size cap (Table 6: 21128)")
    checkpoint_every: int = opt(100, "save a resumable checkpoint every N steps (0 = only at the end)")
    eval_split: str = opt("val", "split for the final retrieval evaluation (falls back to test, then train)")
    eval_max: int = opt(1000, "at most this many pairs in the retrieval evaluation")
    device: str = opt("auto", "torch device (auto = CUDA when available)")
    precision: str = opt("auto", "autocast precision: auto (bf16 on CUDA, fp32 on CPU), fp32, bf16, fp16")
    log_every: int = opt(10, "write buffered per-step metrics to the warehouse every N steps")


PRESETS: dict[str, ClipTrainConfig] = {
    "tiny": ClipTrainConfig(),
    "small": ClipTrainConfig(preset="small", steps=1000, batch_size=64, lr=5e-4, warmup_steps=100, checkpoint_every=200),
    # Appendix C defers CKCLIP pre-training to Wukong (Gu et al. 2022), whose values are not in the paper
    # text; these are CLIP-style fine-tuning values for a 224 px ViT-B/16 + 12-layer text tower.
    "paper": ClipTrainConfig(preset="paper", steps=20000, batch_size=128, lr=5e-5, weight_decay=0.2,
                             warmup_steps=500, checkpoint_every=1000, eval_max=5000),
}


# ----------------------------------------------------------------------------------------- data
def split_size(manifest: dict, split: str) -> int:
    return int(manifest.get("splits", {}).get(split, {}).get("samples", 0))


def open_split(shard_root: Path, split: str, seed: int | None = None, start: int = 0) -> Iterator[dict]:
    """Decoded samples (+ ``entity_vectors``) of one split from sample `start` of the seeded order.

    Every process sees the whole sequence (rank 0 of 1): the trainers deal samples to processes
    themselves, so the data position means the same thing with one GPU or many.
    """
    from ..data.loader import ShardDataset

    return iter(ShardDataset(shard_root, split, seed=seed, start=start, rank=0, world_size=1))


def load_shard_embeddings(shard_root: Path, manifest: dict) -> tuple[list[str], np.ndarray] | None:
    """(entity ids by row, vectors [N, De]) from the manifest's embeddings file; None when there is none."""
    from ..data.loader import embeddings_path
    from ..transe import load_embeddings

    path = embeddings_path(shard_root, manifest)
    if path is None:
        return None
    ids, vectors = load_embeddings(path)  # row order: emb_row in the shards indexes these rows
    return list(ids), np.asarray(vectors, dtype=np.float32)


# ----------------------------------------------------------------------------------------- setup
@dataclass
class Trainer:
    cfg: ClipTrainConfig
    home: Home
    domain: str
    shard_root: Path
    work_dir: Path
    model: Any
    ktok: Any
    transform: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    device: torch.device
    dtype: torch.dtype
    step: int = 0
    epoch: int = 0
    position: int = 0  # samples of the current epoch already consumed
    losses: list[float] = field(default_factory=list)
    accelerator: Any = None  # set when launched with `accelerate launch` on several processes
    wrapped: Any = None  # the DDP-wrapped model used for the training forward pass
    _stream: Iterator[dict] | None = None

    @property
    def is_main(self) -> bool:
        return self.accelerator is None or self.accelerator.is_main_process

    def wait(self) -> None:
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()


def _entity_table(home: Home, domain: str, ids: list[str], vectors: np.ndarray, seen: dict[str, set[str]]):
    """(ids, vectors, names): names from the KG entities table when present, else surfaces seen in captions."""
    names = {e: sorted(s) for e, s in seen.items()}
    try:
        from ..core.lake import read_table

        kg = read_table(home, "kg_entities", domain, ["entity_id", "name", "name_simplified", "aliases"]).to_pydict()
        for eid, name, simp, aliases in zip(kg["entity_id"], kg["name"], kg["name_simplified"], kg["aliases"]):
            names[eid] = list(dict.fromkeys([name, simp, *(aliases or []), *names.get(eid, [])]))
    except (FileNotFoundError, KeyError, ValueError):
        pass  # no KG table in this home (e.g. shards copied in): caption surfaces still name the entities
    return ids, vectors, [names.get(e, []) for e in ids]


def _scan_train(shard_root: Path) -> tuple[list[str], dict[str, set[str]]]:
    """Train captions (for the vocabulary) and the surfaces each entity was linked as; images stay undecoded."""
    import json

    from ..data.loader import iter_raw

    captions, seen = [], {}
    for _, _, members in iter_raw(shard_root, "train"):
        meta = json.loads(members["json"].decode("utf-8"))
        captions.append(members["txt"].decode("utf-8"))
        for ent in meta["entities"]:
            seen.setdefault(ent["entity_id"], set()).add(ent["surface"])
    if not captions:
        raise ValueError(f"{shard_root}: the train split is empty")
    return captions, seen


def build_tokenizer(cfg: ClipTrainConfig, home: Home, domain: str, shard_root: Path, manifest: dict, work_dir: Path):
    from ..models.char_tokenizer import build_vocab, load_tokenizer
    from ..models.ckclip import KnowledgeTokenizer

    captions, seen = _scan_train(shard_root)
    if cfg.init_from:
        tokenizer = load_tokenizer(cfg.init_from)
    else:
        tokenizer = load_tokenizer(build_vocab(captions, work_dir / "vocab", cfg.vocab_min_freq, cfg.vocab_max_size).parent)
    emb = load_shard_embeddings(shard_root, manifest)
    if emb is None:
        if cfg.knowledge:
            raise ValueError(f"{shard_root}/manifest.json names no entity embeddings; run `rapid kg transe` and "
                             "`rapid shard` first, or train with --no-knowledge")
        emb = ([], np.zeros((0, 1), dtype=np.float32))
    return KnowledgeTokenizer(tokenizer, *_entity_table(home, domain, *emb, seen))


def build_model(cfg: ClipTrainConfig, vocab_size: int, entity_dim: int):
    from ..models.ckclip import CKCLIPModel, build_ckclip

    torch.manual_seed(cfg.seed)  # same shared-weight init with and without knowledge (ablation)
    if cfg.init_from:
        model = CKCLIPModel.from_pretrained(cfg.init_from, entity_dim=entity_dim, knowledge=cfg.knowledge)
    else:
        model = build_ckclip(cfg.preset, vocab_size, entity_dim, knowledge=False)
        if cfg.knowledge:  # created after the shared weights so their init does not depend on the flag
            from ..models.ckclip import _new_projection

            model = CKCLIPModel(model.clip, _new_projection(entity_dim, model.clip.config.text_config.hidden_size,
                                                            model.clip.config.text_config.initializer_range))
    if model.clip.config.text_config.vocab_size < vocab_size:
        raise ValueError(f"tokenizer has {vocab_size} tokens but the text model only {model.clip.config.text_config.vocab_size}")
    return model


def build_optimizer(cfg: ClipTrainConfig, model: torch.nn.Module):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        # CLIP convention: no weight decay on gains, biases, embeddings and the temperature.
        (no_decay if p.ndim < 2 or "embeddings" in name or "logit_scale" in name else decay).append(p)
    opt_ = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    return opt_, torch.optim.lr_scheduler.LambdaLR(opt_, lambda s: lr_factor(s, cfg.warmup_steps, cfg.steps))


def lr_factor(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def setup(cfg: ClipTrainConfig, home: Home, domain: str, work_dir: Path) -> Trainer:
    from ..models.ckclip import image_transform

    shard_root = home.shards / check_name(domain, "domain")
    manifest = read_manifest(shard_root)
    work_dir.mkdir(parents=True, exist_ok=True)
    ktok = build_tokenizer(cfg, home, domain, shard_root, manifest, work_dir)
    model = build_model(cfg, len(ktok), max(1, ktok.entity_dim))
    acc = _accelerator(cfg)
    device = acc.device if acc is not None else common.pick_device(cfg.device)
    model.to(device)
    optimizer, scheduler = build_optimizer(cfg, model)
    transform = image_transform(int(model.clip.config.vision_config.image_size))
    common.seed_everything(cfg.seed)
    tr = Trainer(cfg, home, domain, shard_root, work_dir, model, ktok, transform, optimizer, scheduler, device,
                 common.pick_dtype(device, cfg.precision), accelerator=acc)
    if acc is not None:
        # The scheduler stays unprepared: it steps once per optimizer step, whatever the process count.
        tr.wrapped, tr.optimizer = acc.prepare(model, optimizer)
    return tr


def _accelerator(cfg: ClipTrainConfig):
    """An `accelerate.Accelerator` when launched on several processes (``accelerate launch``), else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import Accelerator

    return Accelerator(mixed_precision="no")  # autocast is ours (common.autocast), as on one device


# ----------------------------------------------------------------------------------------- resume / save
def resume(tr: Trainer, resume_arg: str | None) -> bool:
    ckpt = common.resolve_resume(tr.work_dir, resume_arg)
    if ckpt is None:
        return False
    state = common.load_checkpoint(ckpt, {"model": tr.model}, tr.optimizer, tr.scheduler)
    tr.step, tr.epoch, tr.position = state.step, state.data_position["epoch"], state.data_position["position"]
    tr.losses = list(state.extra.get("losses", []))
    tr._stream = None  # reopened at (epoch, position) on the next batch
    return True


def save(tr: Trainer) -> Path:
    fault_point(STAGE, "checkpoint")
    path = common.checkpoint_dir(tr.work_dir, tr.step)
    if tr.is_main:  # one writer; the other processes wait so nobody races ahead of a half-written checkpoint
        common.save_checkpoint(tr.work_dir, tr.step, {"model": tr.model}, tr.optimizer, tr.scheduler,
                               {"epoch": tr.epoch, "position": tr.position}, {"losses": tr.losses}, keep=2)
    tr.wait()
    return path


# ----------------------------------------------------------------------------------------- step
def _epoch_seed(tr: Trainer) -> int:
    return tr.cfg.seed * 100_003 + tr.epoch  # a fresh, reproducible order every epoch


def next_samples(tr: Trainer) -> list[dict]:
    """The next `batch_size` train samples; a partial batch at an epoch's end is dropped (equal-size negatives)."""
    out: list[dict] = []
    rank, world = _rank(tr)
    while len(out) < tr.cfg.batch_size:
        if tr._stream is None:
            tr._stream = open_split(tr.shard_root, "train", seed=_epoch_seed(tr), start=tr.position)
        sample = next(tr._stream, None)
        if sample is None:
            if tr.position < tr.cfg.batch_size * world:  # not one full batch per epoch: would loop forever
                raise ValueError(f"the train split has {tr.position} samples, fewer than one batch "
                                 f"(--batch-size {tr.cfg.batch_size} x {world} processes)")
            tr.epoch, tr.position, tr._stream, out = tr.epoch + 1, 0, None, []
            continue
        tr.position += 1
        if (tr.position - 1) % world == rank:  # several processes: each takes every world-th sample
            out.append(sample)
    return out


def _rank(tr: Trainer) -> tuple[int, int]:
    acc = tr.accelerator
    return (0, 1) if acc is None else (acc.process_index, acc.num_processes)


def collate(tr: Trainer, samples: list[dict]) -> dict[str, torch.Tensor]:
    batch = tr.ktok([s["caption"] for s in samples], max_length=tr.cfg.context_length,
                    entities=[s["entities"] for s in samples],
                    entity_vectors=[s.get("entity_vectors") for s in samples])
    batch["pixel_values"] = torch.stack([tr.transform(s["image"].convert("RGB")) for s in samples])
    return {k: v.to(tr.device) for k, v in batch.items()}


def train_step(tr: Trainer, batch: dict[str, torch.Tensor]) -> float:
    tr.model.train()
    with common.autocast(tr.device, tr.dtype):
        loss = (tr.wrapped or tr.model)(batch)
    tr.optimizer.zero_grad(set_to_none=True)
    if tr.accelerator is not None:
        tr.accelerator.backward(loss)  # DDP gradient all-reduce
    else:
        loss.backward()
    torch.nn.utils.clip_grad_norm_(tr.model.parameters(), 1.0)
    tr.optimizer.step()
    tr.scheduler.step()
    tr.step += 1
    return float(loss.detach())


def train(tr: Trainer, run_id: str) -> None:
    subject = str(tr.work_dir.with_name(tr.work_dir.name.removeprefix(".work-")))
    logger = common.MetricBuffer(tr.home, run_id, STAGE, tr.domain, subject, every=tr.cfg.log_every)
    if not tr.is_main:
        logger.add = lambda values, step: None  # one process writes the metrics
    with bar(f"train clip ({'kg' if tr.cfg.knowledge else 'no kg'})", total=tr.cfg.steps, unit="step") as pbar:
        pbar.update(tr.step)
        while tr.step < tr.cfg.steps:
            loss = train_step(tr, collate(tr, next_samples(tr)))
            tr.losses.append(loss)
            logger.add({"loss": loss, "lr": tr.scheduler.get_last_lr()[0]}, tr.step)
            pbar.set_postfix(loss=f"{loss:.4f}"), pbar.update(1)
            if tr.cfg.checkpoint_every and tr.step % tr.cfg.checkpoint_every == 0 and tr.step < tr.cfg.steps:
                logger.flush()
                save(tr)
    logger.flush()


# ----------------------------------------------------------------------------------------- validate
def _eval_split(tr: Trainer, manifest: dict) -> str:
    for split in (tr.cfg.eval_split, "test", "val", "train"):
        if split_size(manifest, split) >= 2:
            return split
    raise ValueError("no split has 2 or more samples to evaluate retrieval on")


@torch.no_grad()
def encode_split(tr: Trainer, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    tr.model.eval()
    texts, images, pending, n = [], [], [], 0
    for sample in open_split(tr.shard_root, split):
        pending.append(sample)
        n += 1
        if len(pending) == 64 or n >= tr.cfg.eval_max:
            _encode(tr, pending, texts, images)
            pending = []
        if n >= tr.cfg.eval_max:
            break
    if pending:
        _encode(tr, pending, texts, images)
    return torch.cat(texts), torch.cat(images)


def _encode(tr: Trainer, samples: list[dict], texts: list, images: list) -> None:
    batch = collate(tr, samples)
    with common.autocast(tr.device, tr.dtype):
        texts.append(tr.model.encode_text(batch).float().cpu())
        images.append(tr.model.encode_image(batch["pixel_values"]).float().cpu())


def validate(tr: Trainer, manifest: dict) -> dict[str, Any]:
    from ..retrieval import recall_at_k, similarity

    split = _eval_split(tr, manifest)
    text, image = encode_split(tr, split)
    return {"split": split, "pairs": int(text.shape[0]), **recall_at_k(similarity(text, image))}


def entity_coverage(tr: Trainer, samples: int = 256) -> float:
    """Fraction of train captions with at least one injected entity token (0 means the KG cannot help)."""
    hit = n = 0
    for sample in open_split(tr.shard_root, "train"):
        b = tr.ktok([sample["caption"]], tr.cfg.context_length, [sample["entities"]], [sample.get("entity_vectors")])
        hit, n = hit + int(b["entity_mask"].any()), n + 1
        if n >= samples:
            break
    return hit / max(1, n)


# ----------------------------------------------------------------------------------------- publish
def model_root(home: Home, domain: str) -> Path:
    return home.models / "ckclip" / check_name(domain, "domain")


def run_name(cfg: ClipTrainConfig, data_fp: str) -> str:
    return f"{cfg.preset}-{'kg' if cfg.knowledge else 'nokg'}-{fingerprint_obj([cfg, data_fp])[:12]}"


def publish(tr: Trainer, final_dir: Path, report: dict) -> None:
    tmp = staging_dir(final_dir)
    tr.model.save_pretrained(tmp)
    tr.ktok.save_pretrained(tmp)
    fault_point(STAGE, "mid_write")
    atomic_write_json(tmp / "report.json", report)
    ckpts = tr.work_dir / common.CKPT_DIR
    if ckpts.exists():  # contract: <run dir>/checkpoints/step-N/ travel with the published run
        os.replace(ckpts, tmp / common.CKPT_DIR)
    publish_dir(tmp, final_dir)
    if final_dir.parent == model_root(tr.home, tr.domain):
        _write_current(final_dir)
    fault_point(STAGE, "end_write")


def _report(tr: Trainer, metrics: dict, seconds: float) -> dict:
    from ..models.ckclip import count_parameters

    return {"config": dataclasses.asdict(tr.cfg), "domain": tr.domain, "steps": tr.step, "epochs_started": tr.epoch + 1,
            "loss_first": tr.losses[0] if tr.losses else None, "loss_last": tr.losses[-1] if tr.losses else None,
            "loss_last10_mean": float(np.mean(tr.losses[-10:])) if tr.losses else None,
            "retrieval": metrics, "parameters": count_parameters(tr.model), "train_seconds": round(seconds, 2),
            "entity_coverage": entity_coverage(tr), "entities": len(tr.ktok.entity_ids), "device": str(tr.device)}


# ----------------------------------------------------------------------------------------- run
def run(cfg: ClipTrainConfig, home: Home, domain: str, resume_arg: str | None = "auto", out: str | None = None,
        force: bool = False):
    """Train one CKCLIP (or plain CLIP with ``knowledge=False``) under `run_stage`; returns its StageReport."""
    shard_root = home.shards / check_name(domain, "domain")
    manifest = read_manifest(shard_root)
    from ..data.loader import embeddings_path

    emb = embeddings_path(shard_root, manifest)
    inputs = [shard_root] + ([emb] if emb is not None else []) + ([cfg.init_from] if cfg.init_from else [])
    final_dir = Path(out) if out else model_root(home, domain) / run_name(cfg, fingerprint_path(shard_root))
    # Hidden (leading dot): readers that pick "the newest run folder" must never see an unfinished run.
    work_dir = final_dir.with_name(f".work-{final_dir.name}")
    if int(os.environ.get("RANK", "0")) > 0:
        # Mirrors the main process's step cache: a published run is not trained again.
        done = (final_dir / "report.json").exists() and not force
        return {"rank": int(os.environ["RANK"]), "status": "cached"} if done else _worker(cfg, home, domain, work_dir, resume_arg)

    def body(report) -> StageResult:
        tr = setup(cfg, home, domain, work_dir)
        resumed = resume(tr, resume_arg)
        t0 = time.perf_counter()
        train(tr, report.run_id)
        save(tr)  # the final state is resumable too (and travels with the published run)
        metrics = validate(tr, manifest)
        _log_retrieval(tr, report.run_id, metrics, final_dir)
        summary = _report(tr, metrics, time.perf_counter() - t0) | {"run_id": report.run_id, "resumed": resumed,
                                                                    "embeddings": str(emb) if emb else None}
        publish(tr, final_dir, summary)
        _cleanup(work_dir)
        return StageResult([DatasetRef.of(final_dir)], extra={"model_dir": str(final_dir), "retrieval": metrics,
                                                               "loss_last": summary["loss_last"],
                                                               "entity_coverage": summary["entity_coverage"]})

    return run_stage(home, STAGE, cfg, inputs, body, domain=domain,
                     partition=f"{cfg.preset}-{'kg' if cfg.knowledge else 'nokg'}", force=force)


def _worker(cfg: ClipTrainConfig, home: Home, domain: str, work_dir: Path, resume_arg: str | None) -> dict:
    """A non-main `accelerate` process: trains in lock-step; the main process evaluates, publishes, records."""
    tr = setup(cfg, home, domain, work_dir)
    resume(tr, resume_arg)
    train(tr, run_id=f"worker-{os.environ.get('RANK')}")
    save(tr)
    return {"rank": int(os.environ["RANK"]), "steps": tr.step}


def _log_retrieval(tr: Trainer, run_id: str, metrics: dict, final_dir: Path) -> None:
    values = {f"retrieval/{k}": v for k, v in metrics.items() if isinstance(v, float)}
    common.log_metrics(tr.home, run_id, STAGE, values, step=tr.step, domain=tr.domain, subject=str(final_dir),
                       extra={"split": metrics["split"], "pairs": metrics["pairs"], "knowledge": tr.cfg.knowledge})


def _cleanup(work_dir: Path) -> None:
    import shutil

    shutil.rmtree(work_dir, ignore_errors=True)


def run_ablation(cfg: ClipTrainConfig, home: Home, domain: str, resume_arg: str | None = "auto", force: bool = False) -> dict:
    """The same training with and without knowledge injection; both retrieval figures side by side."""
    reports = {name: run(dataclasses.replace(cfg, knowledge=flag), home, domain, resume_arg, force=force)
               for name, flag in (("knowledge", True), ("no_knowledge", False))}
    _point_current_at(home, domain, reports["knowledge"])  # downstream stages use the knowledge model, not the baseline
    table = {name: r.extra.get("retrieval", {}) for name, r in reports.items()}
    text = "\n".join(f"{name:>13}: t2i R@1 {m.get('t2i_R@1', float('nan')):.3f}  i2t R@1 {m.get('i2t_R@1', float('nan')):.3f}"
                     f"  mean R {m.get('mean_R', float('nan')):.3f}  ({m.get('pairs')} {m.get('split')} pairs)"
                     for name, m in table.items())
    return {"text": text, "retrieval": table, "reports": {k: r.to_dict() for k, r in reports.items()}}


def _write_current(model_dir: Path) -> None:
    """``<domain root>/CURRENT`` names the model downstream stages use."""
    atomic_write_bytes(model_dir.parent / "CURRENT", (model_dir.name + "\n").encode())


def _point_current_at(home: Home, domain: str, report) -> None:
    model_dir = Path(report.extra.get("model_dir") or "")
    if model_dir.parent == model_root(home, domain) and (model_dir / "report.json").exists():
        _write_current(model_dir)


def print_params(preset_name: str, vocab_size: int = 21128, entity_dim: int = 100) -> dict:
    """Parameter count per component of an architecture preset, built on the meta device (no weights)."""
    from ..models.ckclip import ARCH_PRESETS, build_ckclip, count_parameters

    with torch.device("meta"):
        model = build_ckclip(preset_name, vocab_size, entity_dim)
    tc = model.clip.config.text_config
    arch = {"text_layers": tc.num_hidden_layers, "text_width": tc.hidden_size, "text_heads": tc.num_attention_heads,
            "vocab_size": tc.vocab_size, "context_length": ARCH_PRESETS[preset_name].context_length,
            "vision_patch": model.clip.config.vision_config.patch_size,
            "image_size": model.clip.config.vision_config.image_size}
    counts = count_parameters(model)
    text = "\n".join(f"{k:>14}: {v:,}" for k, v in counts.items())
    return {"text": f"CKCLIP preset {preset_name}: {arch}\n{text}", "parameters": counts, "architecture": arch}


# ----------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--domain", default=None, help="domain whose shards (shards/<domain>/) to train on")
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS),
                        help="tiny (CPU seconds), small (CPU minutes), paper (Table 6 text tower + ViT-B/16 @ 224)")
    parser.add_argument("--resume", default="auto",
                        help="auto: continue from the newest checkpoint of this run if any; none: start over; "
                             "or a checkpoint folder")
    parser.add_argument("--out", default=None, help="publish the model here instead of models/ckclip/<domain>/<run>/")
    parser.add_argument("--ablation", action="store_true", help="train with AND without knowledge; report both R@K")
    parser.add_argument("--print-params", action="store_true",
                        help="print the parameter count per component of --preset and exit (no training, no weights)")
    parser.add_argument("--force", action="store_true", help="ignore the step cache and train again")
    add_config_args(parser, ClipTrainConfig, skip=("preset",))


def main(args: argparse.Namespace, home: Home):
    if args.print_params:
        return print_params(args.preset)
    if not args.domain:
        raise ValueError("--domain is required (the shards/<domain>/ folder to train on)")
    cfg = config_from_args(preset(PRESETS, args.preset), args)
    if args.ablation:
        return run_ablation(cfg, home, args.domain, args.resume, args.force)
    return run(cfg, home, args.domain, args.resume, args.out, args.force)
