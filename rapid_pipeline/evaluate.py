"""``rapid evaluate``: FID (or frechet_ckclip), CLIP score and retrieval of a pipeline build on a
domain's test split, and the promotion gate.

    rapid evaluate --model rapid_home/models/pipeline/demo/<run> --domain demo \\
        [--samples 1000] [--inception-weights pt_inception-2015-12-05.pth] [--clip DIR] \\
        [--steps 50 --scheduler pndm --guidance 7.5] [--workers 2] [--gate --margin 0.5] \\
        [--accept-fast-sampler --fast-scheduler dpmsolver++ --fast-steps 20 --fast-margin M]

Invariants (what makes two numbers comparable):
* The metric is ``fid`` only with local InceptionV3 weights (torchmetrics / torch-fidelity network);
  otherwise the Fréchet distance is computed on CKCLIP image embeddings and called ``frechet_ckclip``
  in every name, file and table. Nothing is ever downloaded.
* Fixed protocol: the first N test samples in shard order (N = min(split, --samples), recorded),
  prompt i generated with seed ``seed + i``, one resize (PIL bicubic uint8 → 299) for real and
  generated images, generated images lossless (in-memory uint8, PNG on disk).
* The data fingerprint covers the test split's shard hashes and N; the metric kind covers the
  extractor and its weights. The gate compares only equal (data fingerprint, metric kind) pairs.
* Reference statistics are cached in ``reports/fid_stats/<key>.npz`` keyed by (split fingerprint, N,
  extractor, resize). Results go to ``reports/<domain>/<run>/metrics.json`` (published atomically)
  and the warehouse ``metrics`` table; ``reports/<domain>/index.html`` is regenerated.
* One report per sampling protocol (scheduler, steps); the build's main ``reports/<domain>/<run>/``
  holds the reference protocol (the defaults, pndm 50 steps), or the first protocol measured while it
  has none (quick runs). Any other protocol goes to ``<run>/protocols/<scheduler>-<steps>/`` (``+`` →
  ``p``: ``dpmsolverpp-20``) and never replaces the main report, which keeps ``protocols/`` and
  ``fast_sampler.json`` when it is republished. The step cache has one partition per (build, protocol).
  ``--gate`` gates the main report only (an evaluation that went to ``protocols/`` is refused).
* ``--accept-fast-sampler``: evaluates this protocol (the reference, cached if done) and the candidate
  ``--fast-scheduler``/``--fast-steps`` (default dpmsolver++ 20) with everything else equal (split, N,
  seeds, extractor, guidance, size, SR); ``accepted`` iff the docs compare (same data fingerprint and
  metric kind, same build and setup) and the candidate's Fréchet metric ≤ reference + ``--fast-margin``
  (default 0.5 for ``fid``, 0.01 for ``frechet_ckclip``; the reason names the metric and both values).
  Written atomically to ``reports/<domain>/<run>/fast_sampler.json`` and under ``"fast_sampler"`` in
  the output; ``rapid serve --fast-sampler`` serves only an accepted one. Rejected is a result (exit 0).
* Gate: production is ``models/pipeline/<domain>/production`` (a file with the run folder name).
  Promote (atomic rewrite) iff the Fréchet metric is ≤ production + margin (production's report of
  the same protocol when it has one, else its main report; a production measured with another
  sampler, step count, guidance, seed, size or SR is refused, and ``--reevaluate-production``
  measures it again with the candidate's settings) and CLIP score is
  ≥ production − clip margin; otherwise ``{"decision": "blocked", "reason": ...}`` (exit status 0:
  a blocked build is a result, not an error).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .core.atomic import atomic_write_bytes, atomic_write_json, publish_dir, staging_dir
from .core.config import add_config_args, config_from_args, opt
from .core.fingerprint import fingerprint_obj, fingerprint_path
from .core.home import Home, check_name
from .core.progress import progress
from .core.stage import DatasetRef, StageReport, StageResult, config_dict, replace_config, run_stage
from .core.warehouse import connect, read_sql
from .metrics import features as F
from .metrics.frechet import GaussianStats, frechet_from_stats

STAGE = "evaluate"
FRECHET_METRICS = ("fid", "frechet_ckclip")  # lower is better
DEFAULT_MARGINS = {"fid": 0.5, "frechet_ckclip": 0.01}  # frechet_ckclip lives on unit-norm embeddings
FAST_SAMPLER_FILE = "fast_sampler.json"


@dataclass(frozen=True)
class EvalConfig:
    model: str = opt("", "pipeline folder models/pipeline/<domain>/<run> (or a production pointer file)")
    domain: str = opt("demo", "domain whose test split (shards/<domain>/) is the reference")
    samples: int = opt(1000, "images per side (capped at the test split size; the count used is recorded)")
    inception_weights: str = opt("", "LOCAL InceptionV3 weights (torch-fidelity pt_inception-2015-12-05 .pth/.safetensors) -> fid; without: frechet_ckclip")
    clip: str = opt("", "CKCLIP folder models/ckclip/<domain>/<run> for CLIP score, retrieval and frechet_ckclip (default: newest)")
    steps: int = opt(50, "denoising steps per image")
    scheduler: str = opt("pndm", "sampler: pndm | ddim | dpmsolver++")
    guidance: float = opt(7.5, "classifier-free guidance scale")
    seed: int = opt(0, "base seed: prompt i is generated with seed + i")
    size: int = opt(0, "diffusion height/width in pixels (0 = the pipeline's default)")
    super_resolution: bool = opt(True, "apply the pipeline's ESRGAN x4 before measuring")
    gen_batch: int = opt(1, "prompts per pipeline call (each keeps its own seeded generator; >1 is faster on a GPU)")
    workers: int = opt(2, "decode/resize worker processes for real images (0 = in-process)")
    batch_size: int = opt(32, "images per feature-network batch")
    grid: int = opt(8, "generated samples kept as PNG for the HTML report grid")
    device: str = opt("cpu", "torch device for generation and features (cpu, cuda)")


# ---------------------------------------------------------------- resolution of inputs
def resolve_model_dir(path: str) -> Path:
    p = Path(path)
    if p.is_file():  # production / CURRENT pointer
        p = p.parent / p.read_text().strip()
    if not (p / "model_index.json").exists():
        raise FileNotFoundError(f"{path} is not a pipeline folder (no model_index.json)")
    return p.resolve()


def newest_clip_dir(home: Home, domain: str) -> Path | None:
    """models/ckclip/<domain>/CURRENT when `rapid train clip` wrote one, else the newest run folder."""
    root = home.models / "ckclip" / domain
    current = root / "CURRENT"
    if current.is_file() and (root / current.read_text().strip()).is_dir():
        return root / current.read_text().strip()
    runs = [p for p in root.glob("*") if p.is_dir() and not p.name.startswith(".")] if root.exists() else []
    return max(runs, key=lambda p: p.stat().st_mtime) if runs else None


def load_pipeline(model_dir: Path, device: str) -> Any:
    """The eager pipeline: evaluation measures the trained weights, not a compiled approximation of them."""
    from .pipeline import RapidDiffusionPipeline

    return RapidDiffusionPipeline.from_pretrained(str(model_dir), device=device)


# ---------------------------------------------------------------- real side
def reference_key(split_fp: str, n: int, extractor_id: str) -> str:
    return fingerprint_obj({"split": split_fp, "samples": n, "extractor": extractor_id, "resize": F.RESIZE_ID})


def reference_stats(home: Home, refs: list, split_fp: str, extractor: Any, cfg: EvalConfig) -> tuple[GaussianStats, bool]:
    """(stats of the real images, cache hit?) — cached under reports/fid_stats/."""
    path = home.reports / "fid_stats" / f"{reference_key(split_fp, len(refs), extractor.extractor_id)}.npz"
    if path.exists():
        return GaussianStats.load(path), True
    batches = F.iter_uint8_batches(F.ShardImages(refs), cfg.batch_size, cfg.workers)
    stats, _ = F.extract(extractor, progress(batches, "real features", unit="batch"))
    stats.save(path)
    return stats, False


def real_clip_features(refs: list, clip: Any, cfg: EvalConfig) -> np.ndarray:
    batches = F.iter_uint8_batches(F.ShardImages(refs), cfg.batch_size, cfg.workers)
    _, feats = F.extract(clip, progress(batches, "real CKCLIP features", unit="batch"), keep=True)
    return feats


# ---------------------------------------------------------------- generated side
def generate_batch(pipe: Any, prompts: list[str], seeds: list[int], cfg: EvalConfig) -> list:
    """One pipeline call; each prompt has its own generator, so its image does not depend on the batch."""
    gens = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
    size = cfg.size or None
    out = pipe(prompts if len(prompts) > 1 else prompts[0], num_inference_steps=cfg.steps, guidance_scale=cfg.guidance,
               generator=gens if len(gens) > 1 else gens[0], height=size, width=size, scheduler=cfg.scheduler,
               super_resolution=cfg.super_resolution, output_type="pil")
    return [F.to_pil(image) for image in out.images]


def generate_images(pipe: Any, prompts: list[str], cfg: EvalConfig) -> tuple[torch.Tensor, list]:
    """uint8 [N, 3, 299, 299] of every generated image (lossless) + the first `grid` full-size PIL images."""
    resized, kept = [], []
    starts = range(0, len(prompts), cfg.gen_batch)
    for start in progress(starts, "generate", total=len(starts), unit="batch"):
        chunk = prompts[start:start + cfg.gen_batch]
        for image in generate_batch(pipe, chunk, [cfg.seed + start + j for j in range(len(chunk))], cfg):
            resized.append(F.clean_resize(image))
            if len(kept) < cfg.grid:
                kept.append(image)
    return torch.stack(resized), kept


def batched(images: torch.Tensor, size: int):
    for i in range(0, images.shape[0], size):
        yield images[i:i + size]


# ---------------------------------------------------------------- metrics
def fid_value(extractor: F.InceptionFeatures, real: GaussianStats, fake: GaussianStats) -> float:
    """FID through torchmetrics' own compute, its states filled with our (streamed, cached) sums."""
    metric = extractor.fid
    metric.reset()
    for side, stats in (("real", real), ("fake", fake)):
        setattr(metric, f"{side}_features_sum", torch.from_numpy(stats.total))
        setattr(metric, f"{side}_features_cov_sum", torch.from_numpy(stats.outer))
        setattr(metric, f"{side}_features_num_samples", torch.tensor(stats.n))
    metric.orig_dtype = torch.float64
    with warnings.catch_warnings():  # states were filled directly, not through update(): expected
        warnings.filterwarnings("ignore", message=".*called before the ``update`` method.*")
        return float(metric.compute())


def clip_score(image_feats: np.ndarray, text_feats: np.ndarray) -> float:
    """Mean cosine(generated image, its prompt) x 100 (both embeddings unit-norm)."""
    return float(100.0 * np.mean(np.sum(image_feats * text_feats, axis=1)))


def retrieval_metrics(image_feats: np.ndarray, text_feats: np.ndarray) -> dict[str, float]:
    """R@1/5/10 image->text and text->image on the real test split (engineer E's retrieval module)."""
    from . import retrieval

    return retrieval.recall_at_k(text_feats @ image_feats.T, ks=(1, 5, 10))  # rows = texts, pair i on the diagonal


# ---------------------------------------------------------------- one evaluation
@dataclass
class Inputs:
    """What an evaluation runs on; tests inject tiny stand-ins for `pipeline` / `extractor` / `clip`."""

    model_dir: Path
    refs: list
    split_fp: str
    pipeline: Any = None
    extractor: Any = None  # InceptionFeatures | CKCLIPFeatures
    clip: Any = None  # CKCLIPFeatures or None


def prepare(cfg: EvalConfig, home: Home, pipeline: Any = None, extractor: Any = None, clip: Any = None) -> Inputs:
    check_name(cfg.domain, "domain")
    if cfg.gen_batch < 1:
        raise ValueError(f"--gen-batch must be >= 1, got {cfg.gen_batch}")
    if cfg.samples < 2:
        raise ValueError(f"--samples must be >= 2 (a covariance needs two images), got {cfg.samples}")
    model_dir = resolve_model_dir(cfg.model)
    shard_root = home.shards / cfg.domain
    refs = F.index_split(shard_root, "test", limit=cfg.samples)
    if len(refs) < 2:
        raise ValueError(f"test split of {cfg.domain!r} has {len(refs)} samples; need at least 2")
    clip = clip if clip is not None else _load_clip(home, cfg)
    extractor = extractor or _extractor(cfg, clip)
    return Inputs(model_dir, refs, F.split_fingerprint(shard_root, "test"), pipeline, extractor, clip)


def _load_clip(home: Home, cfg: EvalConfig) -> Any:
    clip_dir = Path(cfg.clip) if cfg.clip else newest_clip_dir(home, cfg.domain)
    if clip_dir is None:
        return None
    if not clip_dir.is_dir():
        raise FileNotFoundError(f"--clip {clip_dir} is not a folder")
    return F.load_ckclip(clip_dir, cfg.device)


def _extractor(cfg: EvalConfig, clip: Any) -> Any:
    if cfg.inception_weights:
        return F.InceptionFeatures(cfg.inception_weights, cfg.device)
    if clip is None:
        raise ValueError("need --inception-weights LOCAL.pth (fid) or a CKCLIP model (--clip DIR or models/ckclip/<domain>/*) for frechet_ckclip")
    return clip


def data_fingerprint(split_fp: str, n: int) -> str:
    return fingerprint_obj({"split_fingerprint": split_fp, "samples": n})


def compute_metrics(inp: Inputs, cfg: EvalConfig, home: Home) -> tuple[dict, list]:
    real, cache_hit = reference_stats(home, inp.refs, inp.split_fp, inp.extractor, cfg)
    pipe = inp.pipeline if inp.pipeline is not None else load_pipeline(inp.model_dir, cfg.device)
    prompts = [r.caption for r in inp.refs]
    fake_u8, kept = generate_images(pipe, prompts, cfg)
    fake, fake_feats = F.extract(inp.extractor, batched(fake_u8, cfg.batch_size), keep=True)
    name = inp.extractor.metric
    values: dict[str, Any] = {name: fid_value(inp.extractor, real, fake) if name == "fid" else frechet_from_stats(real, fake)}
    if inp.clip is not None:
        gen_clip = fake_feats if inp.clip is inp.extractor else F.extract(inp.clip, batched(fake_u8, cfg.batch_size), keep=True)[1]
        text_feats = inp.clip.text(prompts)  # generated image i and real image i share prompt i
        values["clip_score"] = clip_score(gen_clip, text_feats)
        values["retrieval"] = retrieval_metrics(real_clip_features(inp.refs, inp.clip, cfg), text_feats)
    values["_reference_cache_hit"] = cache_hit
    return values, list(zip(prompts, kept))


def metrics_doc(inp: Inputs, cfg: EvalConfig, values: dict, run_id: str) -> dict:
    n = len(inp.refs)
    return {
        "domain": cfg.domain, "model_run": inp.model_dir.name, "model_dir": str(inp.model_dir),
        "model_fingerprint": fingerprint_path(inp.model_dir), "data_fingerprint": data_fingerprint(inp.split_fp, n),
        "split_fingerprint": inp.split_fp, "samples": n, "run_id": run_id,
        "metric_kind": {"name": inp.extractor.metric, "extractor": inp.extractor.extractor_id, "resize": F.RESIZE_ID},
        "protocol": {k: getattr(cfg, k) for k in ("steps", "scheduler", "guidance", "seed", "size", "super_resolution", "gen_batch")},
        "metrics": {k: v for k, v in values.items() if not k.startswith("_")},
        "reference_cache_hit": values.get("_reference_cache_hit", False),
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


# ---------------------------------------------------------------- where a protocol's report goes
REFERENCE_PROTOCOL = (EvalConfig().scheduler, EvalConfig().steps)  # ("pndm", 50): what the paper's FID uses
PROTOCOLS_DIR = "protocols"  # <run>/protocols/<slug>/: reports of protocols other than the main one
KEPT_ON_REPUBLISH = (PROTOCOLS_DIR, FAST_SAMPLER_FILE)  # results of their own, not of the metrics.json replaced


def protocol_of(doc: dict) -> tuple[str, int] | None:
    protocol = doc.get("protocol") or {}
    return (protocol["scheduler"], protocol["steps"]) if "scheduler" in protocol else None


def protocol_slug(scheduler: str, steps: int) -> str:
    """Folder-safe name of a sampling protocol ('dpmsolver++', 20 -> 'dpmsolverpp-20'), validated."""
    return check_name(f"{scheduler.replace('+', 'p')}-{steps}", "sampling protocol")


def main_report_dir(home: Home, domain: str, run: str) -> Path:
    return home.reports / check_name(domain, "domain") / check_name(run, "model run")


def report_dir(home: Home, domain: str, run: str, scheduler: str, steps: int) -> Path:
    """The build's folder for the reference protocol, or for the first protocol measured (quick runs such
    as the demo's --steps 4 keep their place); any other protocol goes to protocols/<slug>/ below it, so
    it never replaces the report the gate reads."""
    own = main_report_dir(home, domain, run)
    held = load_metrics_doc(home, domain, run)
    if (scheduler, steps) == REFERENCE_PROTOCOL or held is None or protocol_of(held) == (scheduler, steps):
        return own
    return protocol_report_dir(own, scheduler, steps)


def protocol_report_dir(main: Path, scheduler: str, steps: int) -> Path:
    return main / PROTOCOLS_DIR / protocol_slug(scheduler, steps)


def eval_partition(run: str, scheduler: str, steps: int) -> str:
    """Step-cache partition, one per (build, protocol): the cache keeps one entry per partition, so
    evaluating DPM-20 must not evict PNDM-50's entry."""
    check_name(run, "model run")
    if (scheduler, steps) == REFERENCE_PROTOCOL:
        return run  # unchanged for the reference: its existing cache entries stay valid
    return check_name(f"{run}--{protocol_slug(scheduler, steps)}", "evaluation partition (model run--protocol)")


def _carry_over(old: Path, tmp: Path) -> None:
    """Keep the other protocols' reports and the fast-sampler decision when the main report is replaced."""
    for name in KEPT_ON_REPUBLISH:
        src = old / name
        if src.is_dir():
            shutil.copytree(src, tmp / name, ignore=shutil.ignore_patterns(".tmp-*", ".old-*"))
        elif src.is_file():
            shutil.copy2(src, tmp / name)


def write_report_dir(home: Home, doc: dict, samples: list) -> Path:
    """`report_dir(...)` with metrics.json + samples/NNN.png, swapped in atomically."""
    final = report_dir(home, doc["domain"], doc["model_run"], doc["protocol"]["scheduler"], doc["protocol"]["steps"])
    tmp = staging_dir(final)
    if final == main_report_dir(home, doc["domain"], doc["model_run"]):
        _carry_over(final, tmp)
    (tmp / "samples").mkdir()
    doc["grid"] = []
    for i, (prompt, image) in enumerate(samples):
        (tmp / "samples" / f"{i:03d}.png").write_bytes(F.image_bytes_png(image))
        doc["grid"].append({"prompt": prompt, "seed": doc["protocol"]["seed"] + i, "png": f"samples/{i:03d}.png"})
    atomic_write_json(tmp / "metrics.json", doc)
    publish_dir(tmp, final)
    return final


def flat_metrics(doc: dict) -> dict[str, float]:
    out = {k: float(v) for k, v in doc["metrics"].items() if isinstance(v, (int, float))}
    out.update({f"retrieval_{k}": float(v) for k, v in doc["metrics"].get("retrieval", {}).items()})
    return out


def record_metrics(home: Home, doc: dict) -> None:
    """One warehouse `metrics` row per number, keyed by model and data fingerprints (bound parameters)."""
    extra = json.dumps({"metric_kind": doc["metric_kind"], "samples": doc["samples"], "protocol": doc["protocol"],
                        "model_run": doc["model_run"]}, ensure_ascii=False, sort_keys=True)
    rows = [[doc["run_id"], STAGE, doc["domain"], doc["model_dir"], doc["model_fingerprint"], doc["data_fingerprint"],
             name, value, None, extra] for name, value in flat_metrics(doc).items()]
    with connect(home, write=True) as con:
        con.executemany(read_sql("insert_metric.sql"), rows)


def run(cfg: EvalConfig, home: Home, pipeline: Any = None, extractor: Any = None, clip: Any = None,
        force: bool = False) -> StageReport:
    """Evaluate one build (cached by model, data, config and code via `run_stage`)."""
    inp = prepare(cfg, home, pipeline, extractor, clip)
    manifest = home.shards / cfg.domain / "manifest.json"
    extra_inputs = [Path(cfg.inception_weights)] if cfg.inception_weights else []

    def body(report: StageReport) -> StageResult:
        values, samples = compute_metrics(inp, cfg, home)
        doc = metrics_doc(inp, cfg, values, report.run_id)
        out = write_report_dir(home, doc, samples)
        record_metrics(home, doc)
        return StageResult([DatasetRef.of(out / "metrics.json")], rows_in=len(inp.refs), rows_out=len(inp.refs),
                           extra={"metrics": doc["metrics"], "metric_kind": doc["metric_kind"],
                                  "report_dir": str(out), "data_fingerprint": doc["data_fingerprint"]})

    key_cfg = {**config_dict(cfg), "extractor": inp.extractor.extractor_id,
               "clip": getattr(inp.clip, "extractor_id", None), "workers": None, "batch_size": None}
    return run_stage(home, STAGE, key_cfg, [inp.model_dir, manifest, *extra_inputs], body, domain=cfg.domain,
                     partition=eval_partition(inp.model_dir.name, cfg.scheduler, cfg.steps), force=force)


# ---------------------------------------------------------------- gate
def production_pointer(home: Home, domain: str) -> Path:
    return home.models / "pipeline" / check_name(domain, "domain") / "production"


def load_metrics_doc(home: Home, domain: str, run: str) -> dict | None:
    """The build's main report (the reference protocol's, or the only protocol it was measured with)."""
    path = home.reports / domain / run / "metrics.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def find_metrics_doc(home: Home, domain: str, run: str, protocol: tuple[str, int] | None) -> dict | None:
    """The build's report measured with `protocol` (scheduler, steps) if it has one, else its main report."""
    held = load_metrics_doc(home, domain, run)
    if protocol is None or (held is not None and protocol_of(held) == protocol):
        return held
    path = protocol_report_dir(main_report_dir(home, domain, run), *protocol) / "metrics.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else held


def report_doc(report: StageReport) -> dict:
    """The metrics.json a (possibly cached) evaluation published, wherever its protocol put it."""
    return json.loads((Path(report.extra["report_dir"]) / "metrics.json").read_text(encoding="utf-8"))


def comparable(new: dict, prod: dict, against: str = "production") -> str | None:
    """None when the two docs may be compared, else why not (`against` names the second doc)."""
    if new["data_fingerprint"] != prod["data_fingerprint"]:
        return (f"refusing to compare: data fingerprints differ ({new['data_fingerprint'][:12]} vs {against} "
                f"{prod['data_fingerprint'][:12]}; test split or sample count changed) — re-evaluate {against} with the same settings")
    if new["metric_kind"] != prod["metric_kind"]:
        return f"refusing to compare: metric kinds differ ({new['metric_kind']} vs {against} {prod['metric_kind']})"
    return None


SETUP_KEYS = ("guidance", "seed", "size", "super_resolution")  # what shapes the images, besides the sampler


def gate_comparable(new: dict, prod: dict) -> str | None:
    """`comparable`, and for the gate the same sampling protocol too: a build measured with 4 steps is not
    judged against a production measured with 50."""
    why_not = comparable(new, prod)
    diff = [] if why_not else _protocol_diff(new, prod, ("scheduler", "steps", *SETUP_KEYS), "production")
    return why_not or (f"refusing to compare: sampling protocols differ ({'; '.join(diff)}) — re-evaluate "
                       f"production with the same settings" if diff else None)


def compare(new: dict, prod: dict, margin: float | None, clip_margin: float) -> tuple[bool, list[str]]:
    """(not worse?, per-metric explanations). Fréchet: lower is better; CLIP score: higher is better."""
    name = new["metric_kind"]["name"]
    m = DEFAULT_MARGINS[name] if margin is None else margin
    a, b = new["metrics"][name], prod["metrics"][name]
    ok = a <= b + m
    notes = [f"{name} {a:.4f} {'<=' if ok else '>'} production {b:.4f} + margin {m}"]
    if "clip_score" in new["metrics"] and "clip_score" in prod["metrics"]:
        c, d = new["metrics"]["clip_score"], prod["metrics"]["clip_score"]
        clip_ok = c >= d - clip_margin
        notes.append(f"clip_score {c:.3f} {'>=' if clip_ok else '<'} production {d:.3f} - margin {clip_margin}")
        ok = ok and clip_ok
    return ok, notes


def gate(home: Home, new: dict, margin: float | None = None, clip_margin: float = 0.5) -> dict:
    """Promote `new` (a metrics.json doc) over the domain's production build, or block with the reason."""
    pointer = production_pointer(home, new["domain"])
    prod_run = pointer.read_text().strip() if pointer.exists() else None
    decision = _decide(home, new, prod_run, margin, clip_margin)
    if decision["decision"] == "promoted":
        atomic_write_bytes(pointer, (new["model_run"] + "\n").encode())
    decision.update(candidate=new["model_run"], production_before=prod_run,
                    production_after=pointer.read_text().strip() if pointer.exists() else None,
                    decided_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
    atomic_write_json(home.reports / new["domain"] / new["model_run"] / "gate.json", decision)
    return decision


def _decide(home: Home, new: dict, prod_run: str | None, margin: float | None, clip_margin: float) -> dict:
    if prod_run is None:
        return {"decision": "promoted", "reason": "no production build yet"}
    if prod_run == new["model_run"]:
        return {"decision": "unchanged", "reason": f"{prod_run} already is production"}
    prod = find_metrics_doc(home, new["domain"], prod_run, protocol_of(new))
    if prod is None:
        return {"decision": "blocked", "reason": f"production build {prod_run} has no metrics.json: run `rapid evaluate --model {prod_run}` first"}
    why_not = gate_comparable(new, prod)
    if why_not:
        return {"decision": "blocked", "reason": why_not}
    ok, notes = compare(new, prod, margin, clip_margin)
    return {"decision": "promoted" if ok else "blocked", "reason": "; ".join(notes), "production_metrics": prod["metrics"]}


def ensure_production_evaluated(home: Home, cfg: EvalConfig, new: dict) -> str | None:
    """Evaluate production under `cfg` when its metrics cannot be compared with `new`; returns its status."""
    pointer = production_pointer(home, cfg.domain)
    prod_run = pointer.read_text().strip() if pointer.exists() else None
    if prod_run is None or prod_run == new["model_run"]:
        return None
    prod = find_metrics_doc(home, cfg.domain, prod_run, protocol_of(new))
    if prod is not None and gate_comparable(new, prod) is None:
        return "comparable"
    prod_dir = pointer.parent / prod_run
    if not (prod_dir / "model_index.json").exists():
        return f"production folder {prod_dir} is missing"
    return run(replace_config(cfg, model=str(prod_dir)), home).status


# ---------------------------------------------------------------- fast-sampler acceptance
@dataclass(frozen=True)
class FastSampler:
    """The candidate protocol of `--accept-fast-sampler`: everything else is the reference's."""

    scheduler: str = "dpmsolver++"
    steps: int = 20
    margin: float | None = None  # None: DEFAULT_MARGINS of the metric kind


def check_fast_sampler(cfg: EvalConfig, fast: FastSampler) -> None:
    """Refuse a candidate that cannot be a fewer-step mode of the reference, before any work."""
    from .pipeline import SCHEDULERS

    if fast.scheduler not in SCHEDULERS:
        raise ValueError(f"--fast-scheduler {fast.scheduler!r} is not one of {', '.join(SCHEDULERS)}")
    if not 1 <= fast.steps <= cfg.steps:
        raise ValueError(f"--fast-steps {fast.steps} must be in [1, --steps {cfg.steps}]: a fast sampler takes fewer steps")
    if (fast.scheduler, fast.steps) == (cfg.scheduler, cfg.steps):
        raise ValueError(f"the candidate {fast.scheduler} {fast.steps} steps is the reference protocol itself")
    if fast.margin is not None and fast.margin < 0:
        raise ValueError(f"--fast-margin must be >= 0, got {fast.margin}")


def _side(doc: dict) -> dict:
    name = doc["metric_kind"]["name"]
    scheduler, steps = protocol_of(doc) or (None, None)
    return {"scheduler": scheduler, "steps": steps, "metric": name, "value": doc["metrics"].get(name)}


def _protocol_diff(new: dict, old: dict, keys: tuple[str, ...], against: str) -> list[str]:
    a, b = new.get("protocol") or {}, old.get("protocol") or {}
    return [f"{k}: {a.get(k)!r} vs {against} {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]


def _same_setup(cand: dict, ref: dict) -> str | None:
    """Only the sampler may differ: same build, seeds, guidance, size and super-resolution."""
    if cand.get("model_fingerprint") != ref.get("model_fingerprint"):
        return "refusing to compare: the candidate and the reference are different builds (model fingerprints differ)"
    diff = _protocol_diff(cand, ref, SETUP_KEYS, "reference")
    return f"refusing to compare: protocols differ beyond the sampler ({'; '.join(diff)})" if diff else None


def _verdict(ref: dict, cand: dict, margin: float | None) -> tuple[bool, str, float]:
    """(accepted?, reason naming the metric and both values, margin used)."""
    name = ref["metric_kind"]["name"]  # fid or frechet_ckclip, never renamed
    m = DEFAULT_MARGINS[name] if margin is None else margin
    why_not = comparable(cand, ref, against="reference") or _same_setup(cand, ref)
    if why_not:
        return False, why_not, m
    (c, r), (cs, rs) = (cand["metrics"][name], ref["metrics"][name]), (_side(cand), _side(ref))
    ok = bool(c <= r + m)  # NaN compares False: rejected
    return ok, (f"{name} of {cs['scheduler']} {cs['steps']} steps {c:.4f} {'<=' if ok else '>'} reference "
                f"{rs['scheduler']} {rs['steps']} steps {r:.4f} + margin {m}"), m


def decide_fast_sampler(ref: dict, cand: dict, margin: float | None = None) -> dict:
    """accepted iff the docs compare and the candidate's Fréchet metric <= the reference's + margin."""
    ok, reason, m = _verdict(ref, cand, margin)
    return {"decision": "accepted" if ok else "rejected", "reason": reason, "reference": _side(ref),
            "candidate": _side(cand), "margin": m, "samples": ref["samples"], "data_fingerprint": ref["data_fingerprint"],
            "domain": ref["domain"], "model_run": ref["model_run"], "model_fingerprint": ref.get("model_fingerprint"),
            "decided_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}


def fast_sampler_path(home: Home, domain: str, run: str) -> Path:
    return main_report_dir(home, domain, run) / FAST_SAMPLER_FILE


def accept_fast_sampler(cfg: EvalConfig, fast: FastSampler, home: Home, pipeline: Any = None, extractor: Any = None,
                        clip: Any = None, force: bool = False) -> tuple[dict, StageReport]:
    """Evaluate the reference (`cfg`) and the candidate (only scheduler/steps changed: same split, N, seeds,
    extractor), decide, write fast_sampler.json atomically; returns (decision, the reference's report)."""
    check_fast_sampler(cfg, fast)
    inp = prepare(cfg, home, pipeline, extractor, clip)  # one feature extractor for both sides
    ref_report = run(cfg, home, inp.pipeline, inp.extractor, inp.clip, force=force)
    cand_cfg = replace_config(cfg, scheduler=fast.scheduler, steps=fast.steps)
    cand_report = run(cand_cfg, home, inp.pipeline, inp.extractor, inp.clip, force=force)
    ref = report_doc(ref_report)
    decision = decide_fast_sampler(ref, report_doc(cand_report), fast.margin)
    decision["candidate_report_dir"] = cand_report.extra["report_dir"]
    atomic_write_json(fast_sampler_path(home, ref["domain"], ref["model_run"]), decision)
    return decision, ref_report


# ---------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_args(parser, EvalConfig)
    parser.add_argument("--gate", action="store_true", help="after evaluating, promote the build over production if not worse")
    parser.add_argument("--margin", type=float, default=None,
                        help=f"allowed Fréchet regression for the gate (default {DEFAULT_MARGINS})")
    parser.add_argument("--clip-margin", type=float, default=0.5, help="allowed CLIP-score drop (x100 scale) for the gate")
    parser.add_argument("--force", action="store_true", help="re-run even if the step cache has this exact evaluation")
    parser.add_argument("--reevaluate-production", action=argparse.BooleanOptionalAction, default=True,
                        help="with --gate: evaluate the production build with these same settings when its metrics "
                             "are missing or were measured on other data / another metric kind (default: yes)")
    parser.add_argument("--accept-fast-sampler", action="store_true",
                        help="also evaluate a fewer-step sampler (--fast-scheduler, --fast-steps) with the same split, N, "
                             "seeds, extractor, guidance, size and SR; accept it iff its Fréchet metric <= this protocol's "
                             "+ --fast-margin. Writes reports/<domain>/<run>/fast_sampler.json (rapid serve --fast-sampler "
                             "reads it); its own report goes to protocols/<scheduler>-<steps>/. Rejected is a result (exit 0)")
    parser.add_argument("--fast-scheduler", default=None,
                        help=f"with --accept-fast-sampler: the candidate sampler (default {FastSampler.scheduler})")
    parser.add_argument("--fast-steps", type=int, default=None,
                        help=f"with --accept-fast-sampler: the candidate's denoising steps (default {FastSampler.steps})")
    parser.add_argument("--fast-margin", type=float, default=None,
                        help=f"with --accept-fast-sampler: allowed Fréchet increase over the reference (default {DEFAULT_MARGINS})")


def fast_sampler_from_args(args: argparse.Namespace) -> FastSampler | None:
    given = {k: getattr(args, f"fast_{k}", None) for k in ("scheduler", "steps", "margin")}
    if not getattr(args, "accept_fast_sampler", False):
        if any(v is not None for v in given.values()):
            raise ValueError("--fast-scheduler / --fast-steps / --fast-margin need --accept-fast-sampler")
        return None
    return FastSampler(**{k: v for k, v in given.items() if v is not None})


def gate_doc(home: Home, cfg: EvalConfig, report: StageReport) -> dict:
    """The gate compares main reports only (production's is its main one): refuse a protocols/ report."""
    doc = report_doc(report)
    own = main_report_dir(home, cfg.domain, doc["model_run"])
    if Path(report.extra["report_dir"]) != own:
        raise ValueError(f"--gate compares the build's main report {own / 'metrics.json'}, measured with another "
                         f"protocol; this evaluation ({cfg.scheduler} {cfg.steps} steps) went to {report.extra['report_dir']}")
    return doc


def main(args: argparse.Namespace, home: Home) -> dict:
    cfg = config_from_args(EvalConfig(), args)
    if not cfg.model:
        raise ValueError("--model DIR is required (models/pipeline/<domain>/<run> or its production pointer)")
    fast = fast_sampler_from_args(args)
    fast_decision = None
    if fast is None:
        report = run(cfg, home, force=args.force)
    else:
        fast_decision, report = accept_fast_sampler(cfg, fast, home, force=args.force)
    result = {"stage": STAGE, "status": report.status, "run_id": report.run_id, **report.extra}
    if fast_decision is not None:
        result["fast_sampler"] = fast_decision
    if args.gate:
        doc = gate_doc(home, cfg, report)
        if args.reevaluate_production:
            result["production_evaluation"] = ensure_production_evaluated(home, cfg, doc)
        result["gate"] = gate(home, doc, args.margin, args.clip_margin)
    from .report import build_report

    result["html"] = str(build_report(home, cfg.domain))
    return result
