"""Image features for Fréchet distances and CLIP scores, with decoding in parallel workers.

One preprocessing for every image, real or generated (clean-fid's rule): 8-bit RGB → PIL bicubic
resize to 299×299 on uint8 → ``uint8 [3, 299, 299]`` tensor (`clean_resize`, id `RESIZE_ID`).
Generated images never pass through JPEG: they stay in memory as uint8 (and PNG on disk).

Real test-split images are read straight from the webdataset tars the manifest lists
(`index_split`: header scan, fixed order, first N samples), then decoded with
`core.images.decode_image` and resized in `torch.utils.data.DataLoader` worker processes
(`iter_uint8_batches`), so the network only sees ready batches — feature extraction is decode-bound.

Extractors map ``uint8 [B, 3, 299, 299]`` → ``float64 [B, D]``:
* `InceptionFeatures` — torchmetrics' InceptionV3 (torch-fidelity's FID network, 2048-d pool
  features) from a LOCAL weights file only (validated with `core.checkpoint.load_state_dict`,
  never downloaded). Its numbers are called ``fid``.
* `CKCLIPFeatures` — L2-normalised CKCLIP image embeddings; its numbers are called
  ``frechet_ckclip`` (never FID: a different feature space, not comparable with published FIDs).
"""

from __future__ import annotations

import io
import json
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Protocol

import numpy as np
import torch
from PIL import Image

from ..core.fingerprint import fingerprint_obj, fingerprint_path
from ..core.images import decode_image

RESIZE_SIZE = 299
RESIZE_ID = "pil-bicubic-uint8-299"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # Chinese-CLIP / OpenAI CLIP image normalisation
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clean_resize(image: Image.Image, size: int = RESIZE_SIZE) -> torch.Tensor:
    """8-bit RGB → uint8 [3, size, size] by PIL bicubic (the single resize used for real and generated)."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    resized = image.resize((size, size), resample=Image.BICUBIC)
    return torch.from_numpy(np.ascontiguousarray(np.asarray(resized, dtype=np.uint8).transpose(2, 0, 1)))


def to_pil(image: Any) -> Image.Image:
    """A pipeline output (PIL, float array in [0, 1], uint8 array, CHW tensor) → 8-bit RGB PIL."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    arr = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
        arr = arr.transpose(1, 2, 0)
    if arr.dtype != np.uint8:
        arr = np.clip(np.round(arr.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
    return Image.fromarray(arr.squeeze(-1) if arr.shape[-1] == 1 else arr).convert("RGB")


# ---------------------------------------------------------------- real images from shards
@dataclass(frozen=True)
class SampleRef:
    key: str
    tar: str
    offset: int  # byte offset of the image member's data inside the tar
    size: int
    caption: str


def split_manifest(shard_root: Path, split: str) -> dict:
    manifest_path = Path(shard_root) / "manifest.json"
    if not manifest_path.exists():
        raise FileNotFoundError(f"no shard manifest at {manifest_path}: run `rapid shard --domain ...` first")
    splits = json.loads(manifest_path.read_text(encoding="utf-8")).get("splits", {})
    if split not in splits or not splits[split].get("shards"):
        raise ValueError(f"shard manifest {manifest_path} has no {split!r} split with samples")
    return splits[split]


def split_fingerprint(shard_root: Path, split: str) -> str:
    """Fingerprint of a split: its shards' content hashes in manifest order."""
    info = split_manifest(shard_root, split)
    return fingerprint_obj([split, [s.get("sha256") or fingerprint_path(Path(shard_root) / s["path"]) for s in info["shards"]]])


def _scan_tar(path: Path) -> Iterator[tuple[str, dict[str, tarfile.TarInfo], tarfile.TarFile]]:
    """(key, {ext: member}) per sample, in tar order (webdataset: members of one key are adjacent)."""
    with tarfile.open(path, "r") as tar:
        key, members = None, {}
        for m in tar:
            if not m.isfile() or "." not in Path(m.name).name:
                continue
            folder, _, base = m.name.rpartition("/")
            stem, ext = base.split(".", 1)  # webdataset: key = path up to the first dot of the basename
            k = f"{folder}/{stem}" if folder else stem
            if k != key and key is not None:
                yield key, members, tar
                members = {}
            key, members[ext.lower()] = k, m
        if key is not None:
            yield key, members, tar


def _ref(path: Path, key: str, members: dict[str, tarfile.TarInfo], tar: tarfile.TarFile) -> SampleRef | None:
    image = next((members[e] for e in ("jpg", "jpeg", "png", "webp") if e in members), None)
    if image is None:
        return None
    caption = tar.extractfile(members["txt"]).read().decode("utf-8").strip() if "txt" in members else ""
    return SampleRef(Path(key).name, str(path), image.offset_data, image.size, caption)


def index_split(shard_root: Path, split: str, limit: int | None = None) -> list[SampleRef]:
    """The first `limit` samples of a split in manifest/tar order (header scan, no image decoding)."""
    refs: list[SampleRef] = []
    for shard in split_manifest(shard_root, split)["shards"]:
        for key, members, tar in _scan_tar(Path(shard_root) / shard["path"]):
            ref = _ref(Path(shard_root) / shard["path"], key, members, tar)
            if ref is not None:
                refs.append(ref)
            if limit is not None and len(refs) >= limit:
                return refs
    return refs


class ShardImages(torch.utils.data.Dataset):
    """Map-style dataset: index → clean-resized uint8 image read at its byte offset (worker-safe)."""

    def __init__(self, refs: list[SampleRef], size: int = RESIZE_SIZE):
        self.refs, self.size = refs, size

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, i: int) -> torch.Tensor:
        ref = self.refs[i]
        with open(ref.tar, "rb") as f:
            f.seek(ref.offset)
            data = f.read(ref.size)
        return clean_resize(decode_image(data), self.size)


class PilImages(torch.utils.data.Dataset):
    def __init__(self, images: list[Image.Image], size: int = RESIZE_SIZE):
        self.images, self.size = images, size

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return clean_resize(self.images[i], self.size)


def iter_uint8_batches(dataset: torch.utils.data.Dataset, batch_size: int = 32, workers: int = 0) -> Iterable[torch.Tensor]:
    """Batches in dataset order; decoding/resizing runs in `workers` processes (0 = in this process)."""
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                                       prefetch_factor=4 if workers else None, pin_memory=torch.cuda.is_available())


# ---------------------------------------------------------------- extractors
class FeatureExtractor(Protocol):
    metric: str  # "fid" | "frechet_ckclip": the name every number from this extractor carries
    extractor_id: str  # what produced the features (network + weights fingerprint)
    dim: int

    def __call__(self, images: torch.Tensor) -> np.ndarray: ...


class InceptionFeatures:
    """torchmetrics' FID InceptionV3 (2048-d pool3) with weights from a local file."""

    metric = "fid"

    def __init__(self, weights_path: str | Path, device: str = "cpu"):
        self.weights_path = Path(weights_path)
        self.extractor_id = "inception-v3-compat:" + fingerprint_path(self.weights_path)[:16]
        self.fid = _build_fid_metric(self.weights_path).to(device)
        self.device, self.dim = device, 2048

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> np.ndarray:
        return self.fid.inception(images.to(self.device)).double().cpu().numpy()


def _build_fid_metric(weights_path: Path):
    """FrechetInceptionDistance whose network loads `weights_path` — after we checked it is plain tensors.

    torch-fidelity unpickles the path with ``weights_only=False``; so it only ever sees a file we wrote
    from a state dict that `core.checkpoint.load_state_dict` (safetensors / weights_only=True) accepted.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    from ..core.checkpoint import load_state_dict

    state = load_state_dict(weights_path)
    with tempfile.TemporaryDirectory() as tmp:
        safe_copy = Path(tmp) / "inception.pt"
        torch.save(state, safe_copy)
        return FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=str(safe_copy))


class CKCLIPFeatures:
    """CKCLIP image embeddings (L2-normalised) of clean-resized images, and text embeddings of prompts."""

    metric = "frechet_ckclip"

    def __init__(self, model: Any, tokenizer: Any, model_id: str, image_size: int | None = None, device: str = "cpu"):
        self.model, self.tokenizer, self.device = model.eval().to(device), tokenizer, device
        self.image_size = image_size or _clip_image_size(model)
        self.extractor_id = f"ckclip:{model_id[:16]}"
        self.dim = int(self(torch.zeros(1, 3, 8, 8, dtype=torch.uint8)).shape[1])

    def pixel_values(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device, torch.float32) / 255.0
        x = torch.nn.functional.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic",
                                            align_corners=False, antialias=True).clamp(0, 1)
        mean = torch.tensor(CLIP_MEAN, device=self.device).view(1, 3, 1, 1)
        return (x - mean) / torch.tensor(CLIP_STD, device=self.device).view(1, 3, 1, 1)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> np.ndarray:
        z = self.model.encode_image(self.pixel_values(images)).float()
        return torch.nn.functional.normalize(z, dim=-1).double().cpu().numpy()

    @torch.no_grad()
    def text(self, prompts: list[str], batch_size: int = 64) -> np.ndarray:
        out = []
        for i in range(0, len(prompts), batch_size):
            batch = self.tokenizer(list(prompts[i:i + batch_size]))
            batch = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in dict(batch).items()}
            out.append(torch.nn.functional.normalize(self.model.encode_text(batch).float(), dim=-1).double().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.dim))


def _clip_image_size(model: Any) -> int:
    for path in ("config.vision_config.image_size", "vision_config.image_size", "image_size"):
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, int):
            return obj
    return 224


def load_ckclip(model_dir: Path, device: str = "cpu") -> CKCLIPFeatures:
    """CKCLIP model + tokenizer from a LOCAL `models/ckclip/<domain>/<run>/` folder."""
    from ..models.ckclip import CKCLIPModel, KnowledgeTokenizer

    model = CKCLIPModel.from_pretrained(str(model_dir))
    tokenizer = KnowledgeTokenizer.from_pretrained(str(model_dir))
    return CKCLIPFeatures(model, tokenizer, fingerprint_path(model_dir), device=device)


def extract(extractor: FeatureExtractor, batches: Iterable[torch.Tensor], keep: bool = False) -> tuple[Any, np.ndarray | None]:
    """Stream `batches` through `extractor` into GaussianStats (and the raw features if `keep`)."""
    from .frechet import GaussianStats

    stats, kept = GaussianStats(extractor.dim), []
    for batch in batches:
        feats = extractor(batch)
        stats.update(feats)
        if keep:
            kept.append(feats)
    return stats, (np.concatenate(kept) if keep and kept else None)


def image_bytes_png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")  # lossless, never JPEG
    return buf.getvalue()
