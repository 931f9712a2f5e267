"""Read the shards `rapid shard` writes: ``shards/<domain>/<split>/NNNNNN.tar`` + ``manifest.json``.

    from rapid_pipeline.data.loader import iter_samples, ShardDataset, load_embeddings_for
    for s in iter_samples(home.shards / "demo", "train", seed=epoch, start=resume_at): ...
    DataLoader(ShardDataset(root, "train", transform=tf, seed=epoch, start=pos), num_workers=2, collate_fn=...)

Order (the invariant resume depends on): with ``seed=None`` the manifest's shard order and the tar's
sample order; with a seed, a seeded shuffle of the shard order followed by a seeded buffer shuffle
(``buffer`` samples). The same (manifest, seed, buffer) always gives the same sequence, so ``start=n``
continues exactly at the n-th sample of it (skipped samples are read but never decoded).

`ShardDataset` deals the global sequence out by index: sample i goes to process ``i % world_size`` and,
inside it, to DataLoader worker ``(i // world_size) % num_workers``; every sample is read by exactly one slot, none twice. ``start`` counts
samples of the global sequence (all processes together). Images are decoded with `core.images.decode_image`;
`load_embeddings_for` checks the embeddings file against the manifest's sha256 before using it.
The tars are plain webdataset: ``webdataset.WebDataset(urls)`` reads them too.
"""

from __future__ import annotations

import json
import os
import random
import tarfile
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from ..core.atomic import sha256_file
from ..core.images import decode_image

MANIFEST = "manifest.json"
SHUFFLE_BUFFER = 1000


def manifest_path(shard_root: str | os.PathLike) -> Path:
    """``<shard_root>/manifest.json``, which must exist: a stage fails here, before any training."""
    path = Path(shard_root) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"no shards at {shard_root} (missing {MANIFEST}): run `rapid shard --domain ...` first")
    return path


def read_manifest(shard_root: str | os.PathLike) -> dict:
    return json.loads(manifest_path(shard_root).read_text(encoding="utf-8"))


def shard_entries(manifest: dict, split: str) -> list[dict]:
    if split not in manifest["splits"]:
        raise ValueError(f"unknown split {split!r}: the manifest has {', '.join(manifest['splits'])}")
    return list(manifest["splits"][split]["shards"])


def split_size(shard_root: str | os.PathLike, split: str) -> int:
    return int(read_manifest(shard_root)["splits"][split]["samples"])


# ----------------------------------------------------------------------------------------- raw order
def _tar_samples(path: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) for consecutive members sharing a key (webdataset's grouping rule)."""
    key, members = None, {}
    with tarfile.open(path, mode="r|") as tar:  # streaming: one pass, no member index in memory
        for info in tar:
            if not info.isfile():
                continue
            base = info.name.rsplit("/", 1)[-1]
            k, ext = base.split(".", 1) if "." in base else (base, "")
            if k != key and members:
                yield key, members
                members = {}
            key, members[ext] = k, tar.extractfile(info).read()
    if members:
        yield key, members


def _buffer_shuffle(items: Iterator, rng: random.Random, size: int) -> Iterator:
    buf: list = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        j = rng.randrange(len(buf))
        yield buf[j]
        buf[j] = item
    rng.shuffle(buf)
    yield from buf


def _ordered_raw(root: Path, entries: list[dict], seed: int | None, buffer: int) -> Iterator[tuple[str, dict]]:
    if seed is None:
        for entry in entries:
            yield from _tar_samples(root / entry["path"])
        return
    rng = random.Random(seed)
    entries = entries[:]
    rng.shuffle(entries)
    yield from _buffer_shuffle((s for e in entries for s in _tar_samples(root / e["path"])), rng, buffer)


def iter_raw(shard_root: str | os.PathLike, split: str, seed: int | None = None, start: int = 0,
             buffer: int = SHUFFLE_BUFFER) -> Iterator[tuple[int, str, dict[str, bytes]]]:
    """(global index, key, member bytes) from `start` on, in the deterministic order (nothing decoded)."""
    root = Path(shard_root)
    entries = shard_entries(read_manifest(root), split)
    skip = start
    if seed is None:  # unshuffled: whole shards before `start` are not even opened
        while entries and skip >= entries[0]["samples"]:
            skip -= entries.pop(0)["samples"]
    index = start - skip
    for key, members in _ordered_raw(root, entries, seed, buffer):
        if index >= start:
            yield index, key, members
        index += 1


def decode_sample(key: str, members: dict[str, bytes]) -> dict[str, Any]:
    meta = json.loads(members["json"].decode("utf-8"))
    return {"key": key, "image": decode_image(members["jpg"]), "caption": members["txt"].decode("utf-8"),
            "caption_simplified": meta.get("caption_simplified", meta["caption"]), "entities": meta["entities"],
            "split": meta.get("split"), "domain": meta.get("domain")}


def iter_samples(shard_root: str | os.PathLike, split: str, seed: int | None = None, start: int = 0,
                 buffer: int = SHUFFLE_BUFFER) -> Iterator[dict]:
    """Decoded samples ``{"key", "image" (PIL RGB), "caption", "caption_simplified", "entities", ...}``."""
    for _, key, members in iter_raw(shard_root, split, seed, start, buffer):
        yield decode_sample(key, members)


# ----------------------------------------------------------------------------------------- embeddings
def embeddings_path(shard_root: str | os.PathLike, manifest: dict | None = None) -> Path | None:
    ref = (manifest or read_manifest(shard_root)).get("embeddings")
    if not ref:
        return None
    path = Path(shard_root) / ref["path"]  # relative to the shard folder, so a moved home still works
    return path if path.exists() else Path(ref.get("absolute_path", path))


def load_embeddings_for(shard_root: str | os.PathLike) -> np.ndarray:
    """The float32 [rows, dim] vectors the manifest references (emb_row indexes them), checked by sha256."""
    from ..transe import load_embeddings

    manifest = read_manifest(shard_root)
    path = embeddings_path(shard_root, manifest)
    if path is None:
        return np.zeros((0, 0), dtype=np.float32)
    if not path.exists():
        raise FileNotFoundError(f"embeddings {path} named by {Path(shard_root) / MANIFEST} are gone: re-run `rapid shard`")
    ref = manifest["embeddings"]
    if sha256_file(path) != ref["fingerprint"]:
        raise ValueError(f"embeddings {path} changed since the shards were written (sha256 mismatch): re-run `rapid shard`")
    _, matrix = load_embeddings(path)
    if matrix.shape != (ref["rows"], ref["dim"]):
        raise ValueError(f"embeddings {path} are {matrix.shape}, the manifest says ({ref['rows']}, {ref['dim']})")
    return matrix


def entity_vectors(entities: list[dict], matrix: np.ndarray) -> np.ndarray:
    """[n_entities, dim]: the entity's TransE row, zeros where emb_row is -1."""
    out = np.zeros((len(entities), matrix.shape[1]), dtype=np.float32)
    for i, ent in enumerate(entities):
        if ent["emb_row"] >= 0:
            out[i] = matrix[ent["emb_row"]]
    return out


# ----------------------------------------------------------------------------------------- torch
def _dist_rank_world() -> tuple[int, int]:
    """torch.distributed if initialised, else the RANK / WORLD_SIZE variables accelerate/torchrun set."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _torch_iterable():
    from torch.utils.data import IterableDataset

    return IterableDataset


class ShardDataset(_torch_iterable()):
    """torch IterableDataset over one split; adds ``entity_vectors`` and applies `transform` to the image.

    ``rank`` / ``world_size`` default to the distributed environment; pass ``rank=0, world_size=1`` when the
    caller already deals samples to processes itself.
    """

    def __init__(self, shard_root: str | os.PathLike, split: str, transform: Callable | None = None,
                 seed: int | None = None, start: int = 0, rank: int | None = None, world_size: int | None = None,
                 buffer: int = SHUFFLE_BUFFER):
        super().__init__()
        self.shard_root, self.split, self.transform = Path(shard_root), split, transform
        self.seed, self.start, self.buffer = seed, start, buffer
        auto_rank, auto_world = _dist_rank_world()
        self.rank = auto_rank if rank is None else rank
        self.world_size = auto_world if world_size is None else world_size
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not in [0, world_size={self.world_size})")
        read_manifest(self.shard_root)  # fail at construction, not in a worker, when the shards are missing
        self._matrix: np.ndarray | None = None

    def _mine(self) -> Callable[[int], bool]:
        """Sample i belongs to process i % world_size, and within it to worker (i // world_size) % workers."""
        from torch.utils.data import get_worker_info

        info = get_worker_info()
        workers, worker = (1, 0) if info is None else (info.num_workers, info.id)
        world, rank = self.world_size, self.rank
        return lambda i: i % world == rank and (i // world) % workers == worker

    def matrix(self) -> np.ndarray:
        if self._matrix is None:
            self._matrix = load_embeddings_for(self.shard_root)
        return self._matrix

    def __iter__(self) -> Iterator[dict]:
        mine = self._mine()
        for index, key, members in iter_raw(self.shard_root, self.split, self.seed, self.start, self.buffer):
            if not mine(index):
                continue
            sample = decode_sample(key, members)
            sample["index"] = index
            sample["entity_vectors"] = entity_vectors(sample["entities"], self.matrix())
            if self.transform is not None:
                sample["image"] = self.transform(sample["image"])
            yield sample

    def __len__(self) -> int:
        """Samples this (process, all workers) share will see from `start` on."""
        total = split_size(self.shard_root, self.split)
        return len(range(self.start + self.rank, total, self.world_size)) if total > self.start else 0
