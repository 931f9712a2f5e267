"""Optimized-artifact folders: cache key, parity record, and loading for serving.

    from rapid_pipeline.accel.artifact import load_optimized
    pipe = load_optimized("models/pipeline/demo/<run>", artifact_dir="models/compiled/<key>")
    pipe = load_optimized(model_dir, home=home, config=CompileConfig(compiler="aot-inductor"))  # by key

Folder ``models/compiled/<cache_key>/`` (published atomically, ``parity.json`` written into the
staging folder last): ``artifact.json`` (options, key parts, model path + fingerprint, compile
seconds, files), ``parity.json`` (U-Net max abs error vs eager on a fixed input, per-component
errors, final-image PSNR vs eager for a fixed prompt/seed, the bounds and ``ok``), and for
``aot-inductor`` one ``<component>.pt2`` AOTInductor package per component (``torch_blade``:
``<component>.blade.pt`` TorchScript). ``inductor`` (JIT) artifacts hold no binary: serving
re-applies ``torch.compile`` with the recorded options (inductor's on-disk FX cache makes that fast).

Invariants:
* cache key = sha256(model fingerprint, input shapes, device model, torch version, options): the same
  key is the same artifact, so a second ``rapid compile`` is a hit and never recompiles.
* `load_optimized` refuses an artifact built for another model, device model or torch version, and
  one whose parity failed (unless ``allow_failed_parity=True``).
"""

from __future__ import annotations

import dataclasses
import json
import platform
from pathlib import Path
from typing import Any

import torch

from ..core.fingerprint import fingerprint_obj, fingerprint_path

ARTIFACT_JSON, PARITY_JSON = "artifact.json", "parity.json"

# Options that only steer the parity check, not what gets compiled: kept out of the key.
PARITY_ONLY = ("steps", "prompt", "seed", "guidance_scale", "allow_failed_parity")


class ArtifactError(RuntimeError):
    pass


def device_model(device: torch.device) -> str:
    """What a compiled binary is specific to: GPU name + compute capability, or the CPU model."""
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(idx)
        return f"cuda:{torch.cuda.get_device_name(idx)}:sm{major}{minor}"
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu:{name}"


def key_parts(model_fingerprint: str, options: dict[str, Any], device: torch.device) -> dict[str, Any]:
    compiled = {k: v for k, v in options.items() if k not in PARITY_ONLY}
    return {"model": model_fingerprint, "shapes": {"batch": options["batch"], "size": options["size"]},
            "device_model": device_model(device), "torch": torch.__version__, "options": compiled}


def cache_key(parts: dict[str, Any]) -> str:
    return fingerprint_obj(parts)[:24]


def artifact_dir(home, key: str) -> Path:
    return home.models / "compiled" / key


def is_complete(folder: Path) -> bool:
    return (Path(folder) / ARTIFACT_JSON).exists() and (Path(folder) / PARITY_JSON).exists()


def read_artifact(folder: Path) -> tuple[dict, dict]:
    folder = Path(folder)
    if not is_complete(folder):
        raise ArtifactError(f"{folder} is not a complete compiled artifact (artifact.json / parity.json missing)")
    return json.loads((folder / ARTIFACT_JSON).read_text()), json.loads((folder / PARITY_JSON).read_text())


def parity_bounds(precision: str) -> dict[str, float]:
    """Acceptance bounds for the optimized model against eager fp32.

    fp32: only summation order changes (fused / re-tiled reductions, another SDPA kernel); errors are
    ~1e-6 relative per op and stay far below 1e-3 of the output scale through a U-Net; images of the
    full sampler stay > 40 dB. fp16 (10-bit mantissa) / bf16 (7-bit): per-op relative error 5e-4 /
    4e-3, a few percent after ~40 layers, and the sampler amplifies it over the steps, so the bound on
    images is what a viewer cannot tell apart (>= 25 dB fp16, >= 20 dB bf16).
    """
    return {"fp32": {"unet_rel_err": 1e-3, "image_psnr_db": 40.0},
            "fp16": {"unet_rel_err": 5e-2, "image_psnr_db": 25.0},
            "bf16": {"unet_rel_err": 1e-1, "image_psnr_db": 20.0}}[precision]


def parity_record(unet_ref: torch.Tensor, unet_opt: torch.Tensor, img_ref: torch.Tensor, img_opt: torch.Tensor,
                  precision: str, components: dict[str, float]) -> dict[str, Any]:
    from ..models.esrgan import psnr

    err = (unet_ref.float() - unet_opt.float()).abs().max().item()
    scale = max(unet_ref.float().abs().max().item(), 1e-12)
    image_psnr = psnr(img_ref.float(), img_opt.float())
    bounds = parity_bounds(precision)
    ok = err / scale <= bounds["unet_rel_err"] and image_psnr >= bounds["image_psnr_db"]
    return {"unet_max_abs_err": err, "unet_output_max_abs": scale, "unet_rel_err": err / scale,
            "image_psnr_db": image_psnr if image_psnr != float("inf") else "inf",
            "component_max_abs_err": components, "bounds": bounds, "precision": precision, "ok": bool(ok)}


def load_optimized(model_dir: str | Path | None = None, artifact_dir: str | Path | None = None, *, home=None,
                   config: Any = None, device: str | torch.device | None = None,
                   allow_failed_parity: bool = False, warmup: bool = True):
    """The pipeline of `model_dir` with the artifact's optimized components swapped in.

    Give `artifact_dir`, or `home` + `config` (a ``CompileConfig``) to find it by cache key.
    `warmup` runs each component once on its compiled shapes, so an ``inductor`` artifact compiles (from
    inductor's on-disk cache when warm) at load time rather than in the first request.
    """
    from . import compile as C
    from ..pipeline import resolve_pipeline_dir

    folder = _find(model_dir, artifact_dir, home, config, device)
    meta, parity = read_artifact(folder)
    if not parity.get("ok") and not allow_failed_parity:
        raise ArtifactError(f"{folder}: parity against eager failed ({parity}); rebuild or pass allow_failed_parity")
    model = resolve_pipeline_dir(model_dir or meta["model_dir"])
    options = C.CompileConfig(**_tuples(meta["options"]))
    dev = C.resolve_device(options.device if device is None else str(device))
    _check_compatible(meta, model, dev)
    return C.build_optimized(model, options, dev, folder, load_only=True, warmup=warmup).pipe


def _find(model_dir, artifact_dir, home, config, device) -> Path:
    if artifact_dir is not None:
        return Path(artifact_dir)
    if home is None or config is None or model_dir is None:
        raise ArtifactError("load_optimized needs artifact_dir, or model_dir + home + config")
    from . import compile as C
    from ..pipeline import resolve_pipeline_dir

    dev = C.resolve_device(config.device if device is None else str(device))
    options = dataclasses.asdict(dataclasses.replace(config, device=str(dev)))
    key = cache_key(key_parts(fingerprint_path(resolve_pipeline_dir(model_dir)), options, dev))
    folder = globals()["artifact_dir"](home, key)  # the module function (the argument shadows it)
    if not is_complete(folder):
        raise ArtifactError(f"no compiled artifact {key} for these options; run `rapid compile --model {model_dir}` first")
    return folder


def _tuples(d: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


def _check_compatible(meta: dict, model: Path, dev: torch.device) -> None:
    if meta["key_parts"]["torch"] != torch.__version__:
        raise ArtifactError(f"artifact built with torch {meta['key_parts']['torch']}, running {torch.__version__}: recompile")
    if meta["key_parts"]["device_model"] != device_model(dev):
        raise ArtifactError(f"artifact built for {meta['key_parts']['device_model']}, this is {device_model(dev)}: recompile")
    if fingerprint_path(model) != meta["key_parts"]["model"]:
        raise ArtifactError(f"{model} changed since the artifact was compiled (model fingerprint differs): recompile")
