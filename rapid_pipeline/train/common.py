"""Shared training utilities: seeding, device/precision, checkpoints, metric logging.

Used by ``rapid train clip`` / ``rapid train diffusion`` / ``rapid train sr``. The API is stable:

* ``seed_everything(seed)`` — python, numpy and torch (CPU + CUDA) generators.
* ``pick_device(name="auto") -> torch.device``; ``pick_dtype(device, precision="auto") -> torch.dtype``
  (bf16 on CUDA when supported, else fp32); ``autocast(device, dtype)`` — a no-op context for fp32.
* ``save_checkpoint(run_dir, step, modules, optimizer=None, scheduler=None, data_position=None, extra=None)``
  writes ``<run_dir>/checkpoints/step-NNNNNNN/`` (one ``<name>.safetensors`` per module,
  ``optimizer.safetensors`` + ``rng.safetensors`` for tensors, ``state.json`` for everything else) in a staging
  folder renamed into place, so a crash never leaves a half checkpoint that resume would pick up.
* ``latest_checkpoint(run_dir) -> Path | None`` — the newest complete one (``state.json`` present).
* ``load_checkpoint(ckpt_dir, modules, optimizer=None, scheduler=None, restore_rng=True) -> TrainState``.
* ``resolve_resume(run_dir, resume)`` — ``"auto"`` (newest, if any), ``"none"`` or an explicit path.
* ``log_metrics(home, run_id, stage, values, step=None, domain=None, subject=None, ...)`` — rows in the
  warehouse ``metrics`` table (``sql/insert_metric.sql``); ``MetricBuffer`` batches per-step rows.

Invariant: a checkpoint restores model + optimizer + scheduler + every RNG + the data position, so the
step after a resume computes exactly what an uninterrupted run computes at that step.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch

from ..core.atomic import atomic_write_json, fsync_path
from ..core.checkpoint import load_state_dict, save_state_dict
from ..core.home import Home

CKPT_DIR = "checkpoints"
STATE_JSON = "state.json"


# ----------------------------------------------------------------------------------------- seeding / device
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)  # also seeds every CUDA device


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` = CUDA when available, else CPU; otherwise any torch device string."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return device


def pick_dtype(device: torch.device, precision: str = "auto") -> torch.dtype:
    """Autocast dtype: ``auto`` = bf16 on a CUDA device that supports it, else fp32 (CPU stays exact)."""
    table = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if precision == "auto":
        ok = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if ok else torch.float32
    if precision not in table:
        raise ValueError(f"unknown precision {precision!r}; choose auto, fp32, bf16 or fp16")
    return table[precision]


def autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# ----------------------------------------------------------------------------------------- RNG state
def _rng_tensors() -> dict[str, torch.Tensor]:
    out = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"torch_cuda_{i}"] = s
    _, keys, pos, has_gauss, cached = np.random.get_state()
    out["numpy_keys"] = torch.from_numpy(keys.astype(np.int64))
    out["numpy_meta"] = torch.tensor([pos, has_gauss], dtype=torch.int64)
    out["numpy_cached"] = torch.tensor([cached], dtype=torch.float64)
    return out


def _python_rng() -> list:
    version, state, gauss = random.getstate()
    return [version, list(state), gauss]


def _restore_rng(tensors: Mapping[str, torch.Tensor], python_state: list) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("torch_cuda_"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    pos, has_gauss = (int(x) for x in tensors["numpy_meta"])
    np.random.set_state(("MT19937", tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss,
                         float(tensors["numpy_cached"][0])))
    random.setstate((python_state[0], tuple(python_state[1]), python_state[2]))


# ----------------------------------------------------------------------------------------- optimizer state
def _split_optimizer(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors go to safetensors (``state.<param>.<name>``), everything else stays JSON."""
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for name, value in st.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{idx}.{name}"] = value
            else:
                scalars.setdefault(str(idx), {})[name] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _join_optimizer(tensors: Mapping[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    for idx, st in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(st)
    return {"state": state, "param_groups": meta["param_groups"]}


# ----------------------------------------------------------------------------------------- checkpoints
@dataclass
class TrainState:
    step: int = 0
    data_position: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None


def checkpoint_dir(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / CKPT_DIR / f"step-{step:07d}"


def _scheduler_json(scheduler: Any) -> dict | None:
    if scheduler is None:
        return None
    # LambdaLR keeps callables out of its state_dict (they are rebuilt from the config), rest is plain data.
    return json.loads(json.dumps(scheduler.state_dict(), default=lambda o: None))


def save_checkpoint(run_dir: str | os.PathLike, step: int, modules: Mapping[str, torch.nn.Module],
                    optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None,
                    data_position: Mapping[str, Any] | None = None, extra: Mapping[str, Any] | None = None,
                    keep: int | None = 3) -> Path:
    """Write checkpoint `step` (staging folder + rename); keep only the newest `keep` ones."""
    final = checkpoint_dir(run_dir, step)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".tmp-{os.getpid()}-{final.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for name, module in modules.items():
        save_state_dict(_unshared(module.state_dict()), tmp / f"{name}.safetensors")
    state = {"step": int(step), "data_position": dict(data_position or {}), "extra": dict(extra or {}),
             "modules": sorted(modules), "python_rng": _python_rng(), "scheduler": _scheduler_json(scheduler)}
    if optimizer is not None:
        tensors, state["optimizer"] = _split_optimizer(optimizer.state_dict())
        save_state_dict(tensors, tmp / "optimizer.safetensors")
    save_state_dict(_rng_tensors(), tmp / "rng.safetensors")
    atomic_write_json(tmp / STATE_JSON, state)  # last: its presence marks the checkpoint complete
    _swap_in(tmp, final)
    _prune(Path(run_dir) / CKPT_DIR, keep)
    return final


def _unshared(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors that share storage (tied weights): store independent copies.
    seen: set[int] = set()
    out = {}
    for k, v in sd.items():
        ptr = v.untyped_storage().data_ptr() if v.numel() else -1
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    return out


def _swap_in(tmp: Path, final: Path) -> None:
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_path(final.parent)


def _prune(root: Path, keep: int | None) -> None:
    if not keep:
        return
    done = sorted(p for p in root.glob("step-*") if (p / STATE_JSON).exists())
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    done = sorted(p for p in (Path(run_dir) / CKPT_DIR).glob("step-*") if (p / STATE_JSON).exists())
    return done[-1] if done else None


def resolve_resume(run_dir: str | os.PathLike, resume: str | None) -> Path | None:
    """``auto``: newest complete checkpoint under run_dir (None if none); ``none``: None; else a path."""
    if resume in (None, "", "none"):
        return None
    if resume == "auto":
        return latest_checkpoint(run_dir)
    path = Path(resume)
    if path.is_dir() and not (path / STATE_JSON).exists():
        found = latest_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"--resume {resume}: no complete checkpoint (state.json) there")
        return found
    if not (path / STATE_JSON).exists():
        raise FileNotFoundError(f"--resume {resume}: not a checkpoint folder (no {STATE_JSON})")
    return path


def load_checkpoint(ckpt_dir: str | os.PathLike, modules: Mapping[str, torch.nn.Module],
                    optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None,
                    restore_rng: bool = True) -> TrainState:
    """Restore modules (strict), optimizer, scheduler and RNGs from `ckpt_dir`; returns step + data position."""
    ckpt_dir = Path(ckpt_dir)
    state = json.loads((ckpt_dir / STATE_JSON).read_text())
    for name, module in modules.items():
        module.load_state_dict(load_state_dict(ckpt_dir / f"{name}.safetensors"), strict=True)
    if optimizer is not None and "optimizer" in state:
        optimizer.load_state_dict(_join_optimizer(load_state_dict(ckpt_dir / "optimizer.safetensors"), state["optimizer"]))
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    if restore_rng:
        _restore_rng(load_state_dict(ckpt_dir / "rng.safetensors"), state["python_rng"])
    return TrainState(state["step"], state["data_position"], state["extra"], ckpt_dir)


# ----------------------------------------------------------------------------------------- metrics
def log_metrics(home: Home, run_id: str, stage: str, values: Mapping[str, float], step: int | None = None,
                domain: str | None = None, subject: str | None = None, subject_fingerprint: str | None = None,
                data_fingerprint: str | None = None, extra: Mapping[str, Any] | None = None) -> None:
    """Insert one ``metrics`` row per (name, value)."""
    rows = [[run_id, stage, domain, subject, subject_fingerprint, data_fingerprint, name, float(value), step,
             json.dumps(dict(extra), ensure_ascii=False, default=str) if extra else None]
            for name, value in values.items()]
    _insert_rows(home, rows)


def _insert_rows(home: Home, rows: list[list]) -> None:
    if not rows:
        return
    from ..core.warehouse import connect, read_sql

    sql = read_sql("insert_metric.sql")
    with connect(home, write=True) as con:
        con.executemany(sql, rows)


class MetricBuffer:
    """Collects per-step metric rows and writes them every `every` steps (one warehouse lock per flush)."""

    def __init__(self, home: Home, run_id: str, stage: str, domain: str | None = None, subject: str | None = None,
                 every: int = 50):
        self.home, self.run_id, self.stage, self.domain, self.subject, self.every = home, run_id, stage, domain, subject, every
        self.rows: list[list] = []

    def add(self, values: Mapping[str, float], step: int) -> None:
        self.rows += [[self.run_id, self.stage, self.domain, self.subject, None, None, k, float(v), step, None]
                      for k, v in values.items()]
        if len(self.rows) >= self.every * max(1, len(values)):
            self.flush()

    def flush(self) -> None:
        rows, self.rows = self.rows, []
        _insert_rows(self.home, rows)


def iter_forever(make_iter, start_epoch: int = 0) -> Iterator[tuple[int, Any]]:
    """Yield (epoch, item) over an iterable rebuilt each epoch by ``make_iter(epoch)``."""
    epoch = start_epoch
    while True:
        empty = True
        for item in make_iter(epoch):
            empty = False
            yield epoch, item
        if empty:
            raise ValueError("training data is empty")
        epoch += 1


def add_run_arguments(parser, presets, domain_help: str, preset_help: str) -> None:
    """The flags every training command shares: --domain, --preset, --resume, --force."""
    parser.add_argument("--domain", default="demo", help=domain_help)
    parser.add_argument("--preset", default="tiny", choices=sorted(presets), help=preset_help)
    parser.add_argument("--resume", default="auto",
                        help="auto: newest complete checkpoint of this run, none: start over, or a checkpoint path")
    parser.add_argument("--force", action="store_true", help="ignore the step cache and train again")
