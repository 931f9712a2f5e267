"""The one checkpoint loader: safetensors, or ``torch.load(weights_only=True)``.

A pickle a user supplied is never unpickled with arbitrary code. Common containers are unwrapped
(realesrgan/basicsr ``params_ema`` / ``params``, Lightning ``state_dict``, ``model``), so official
ESRGAN / Real-ESRGAN ``.pth`` files load. `save_state_dict` writes safetensors atomically.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import torch

_CONTAINERS = ("params_ema", "params", "state_dict", "model", "module")


class CheckpointError(ValueError):
    pass


def load_state_dict(path: str | os.PathLike, prefer: tuple[str, ...] = _CONTAINERS) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError for anything beyond tensors and plain containers
        raise CheckpointError(f"refusing to load {path}: not a plain tensor checkpoint ({type(exc).__name__}: {str(exc)[:200]})") from exc
    for key in prefer:
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} holds no flat state dict of tensors")
    return obj


def save_state_dict(state: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex}-{path.name}")
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)
