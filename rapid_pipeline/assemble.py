"""Assemble a pipeline folder with the ESRGAN x4 generator as its ``super_resolution/`` component.

    rapid pipeline assemble --domain demo                       # newest pipeline + newest ESRGAN run
    rapid pipeline assemble --domain food --pipeline models/pipeline/food/<run> --sr models/esrgan/food/<run>

Invariants:
* The result is a NEW run folder ``models/pipeline/<domain>/asm-<fingerprint>/`` (named by the two input
  folders' fingerprints), built in a staging folder and renamed into place; the inputs are never modified.
* Components other than ``super_resolution/`` are carried over unchanged (text encoder, tokenizer,
  U-Net, VAE, scheduler, knowledge table, prompt template).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from .core.atomic import publish_dir, staging_dir
from .core.fingerprint import fingerprint_obj
from .core.home import Home, check_name
from .core.stage import DatasetRef, StageReport, StageResult, run_stage

STAGE = "assemble_pipeline"


def newest_run(root: Path, marker: str, what: str, hint: str) -> Path:
    """The newest run folder under `root` holding `marker` (by the marker's modification time)."""
    runs = [p for p in root.glob("*") if p.is_dir() and not p.name.startswith(".") and (p / marker).exists()]
    if not runs:
        raise FileNotFoundError(f"no {what} under {root}: {hint}")
    return max(runs, key=lambda p: (p / marker).stat().st_mtime)


def resolve_inputs(home: Home, domain: str, pipeline: str | None, sr: str | None) -> tuple[Path, Path]:
    from .pipeline import resolve_pipeline_dir

    pipe_dir = resolve_pipeline_dir(pipeline) if pipeline else newest_run(
        home.models / "pipeline" / domain, "model_index.json", "pipeline", "run `rapid train diffusion` first or pass --pipeline")
    sr_dir = Path(sr) if sr else newest_run(home.models / "esrgan" / domain, "generator.safetensors", "ESRGAN model",
                                            "run `rapid train sr` first or pass --sr")
    if sr_dir.is_dir() and not (sr_dir / "generator.safetensors").exists():
        raise FileNotFoundError(f"--sr {sr_dir}: no generator.safetensors there")
    return pipe_dir, sr_dir


def assemble(pipe_dir: Path, sr_dir: Path, out_dir: Path) -> Path:
    """Load, attach the generator, save to a staging folder, swap in. Returns `out_dir`."""
    from .models.esrgan import load_generator
    from .pipeline import RapidDiffusionPipeline, write_folder_manifest

    pipe = RapidDiffusionPipeline.from_pretrained(pipe_dir)
    pipe.super_resolution = load_generator(sr_dir).eval()
    stage = staging_dir(out_dir)
    pipe.save_pretrained(stage)
    if (pipe_dir / "training.json").exists():  # provenance of the diffusion part travels with it
        shutil.copyfile(pipe_dir / "training.json", stage / "training.json")
    write_folder_manifest(stage, stage=STAGE)
    publish_dir(stage, out_dir)
    return out_dir


def run(home: Home, domain: str, pipeline: str | None = None, sr: str | None = None, force: bool = False) -> StageReport:
    check_name(domain, "domain")
    pipe_dir, sr_dir = resolve_inputs(home, domain, pipeline, sr)
    inputs = [DatasetRef.of(pipe_dir), DatasetRef.of(sr_dir)]
    out_dir = home.models / "pipeline" / domain / ("asm-" + fingerprint_obj([r.fingerprint for r in inputs])[:16])

    def body(report: StageReport) -> StageResult:
        assemble(pipe_dir, sr_dir, out_dir)
        return StageResult(outputs=[DatasetRef.of(out_dir)],
                           extra={"pipeline": str(out_dir), "from_pipeline": str(pipe_dir), "sr": str(sr_dir)})

    return run_stage(home, STAGE, {"pipeline": str(pipe_dir), "sr": str(sr_dir)}, inputs, body, domain=domain, force=force)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--domain", default="demo", help="domain whose models are assembled")
    parser.add_argument("--pipeline", default=None,
                        help="pipeline folder or production pointer (default: newest models/pipeline/<domain>/*)")
    parser.add_argument("--sr", default=None, help="ESRGAN run folder (default: newest models/esrgan/<domain>/*)")
    parser.add_argument("--force", action="store_true", help="ignore the step cache and assemble again")


def main(args: argparse.Namespace, home: Home) -> StageReport:
    return run(home, args.domain, args.pipeline, args.sr, force=args.force)
