"""Shard fixtures for the training tests, built in code in the docs/CONTRACTS.md layout:
``shards/<domain>/<split>/000000.tar`` (webdataset ``.jpg/.txt/.json``), ``manifest.json`` and, when
entities are given, ``embeddings.parquet`` (one random vector per entity, row k = entity k).

Each test module passes its own captions and its own image function (solid colours for CLIP and
diffusion, smooth sinusoids for the VAE, ...); the tar/manifest/embedding layout lives only here.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from rapid_pipeline.core.atomic import sha256_file

ImageFn = Callable[[int, np.random.Generator], bytes]  # (sample index, rng) -> JPEG bytes


def jpeg(arr: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def noisy_colour(rgb: Sequence[int], rng: np.random.Generator, size: int, sd: float = 10.0) -> bytes:
    """A solid colour with Gaussian noise: the image of an entity whose look is its colour."""
    return jpeg(np.array(rgb, np.float32) + rng.normal(0, sd, (size, size, 3)))


def entity_sample(i: int, split: str, names: Sequence[str], templates: Sequence[str], image: bytes,
                  domain: str = "demo") -> dict:
    """Sample i: entity k = i mod len(names) named in a templated caption, with its span and embedding row."""
    k = i % len(names)
    caption = templates[(i // len(names)) % len(templates)].format(names[k])
    start = caption.index(names[k])
    key = f"{split}{i:05d}"
    ent = {"entity_id": f"e{k:015d}", "start": start, "end": start + len(names[k]), "surface": names[k], "emb_row": k}
    meta = {"pair_id": key, "domain": domain, "split": split, "caption": caption, "caption_simplified": caption,
            "entities": [ent]}
    return {"__key__": key, "jpg": image, "txt": caption.encode(), "json": json.dumps(meta, ensure_ascii=False).encode()}


def write_embeddings(root: Path, n_entities: int, dim: int) -> dict:
    vectors = np.random.default_rng(1).normal(size=(n_entities, dim)).astype(np.float32)
    pq.write_table(pa.table({"entity_id": [f"e{k:015d}" for k in range(n_entities)],
                             "row": pa.array(range(n_entities), pa.int32()),
                             "vector": pa.array(list(vectors), pa.list_(pa.float32()))}), root / "embeddings.parquet")
    # The loader checks the file against the manifest's fingerprint.
    return {"path": "embeddings.parquet", "fingerprint": sha256_file(root / "embeddings.parquet"), "dim": dim,
            "rows": n_entities}


def write_shards(home, sample: Callable[[int, str, np.random.Generator], dict], sizes: Sequence[tuple[str, int]],
                 domain: str = "demo", n_entities: int = 0, dim: int = 8, image_size: int = 40) -> Path:
    """One tar per split holding ``sample(i, split, rng)`` for i < n; returns ``shards/<domain>``."""
    import webdataset as wds

    root = home.shards / domain
    rng = np.random.default_rng(0)
    splits = {}
    for split, n in sizes:
        (root / split).mkdir(parents=True, exist_ok=True)
        path = root / split / "000000.tar"
        with wds.TarWriter(str(path)) as sink:
            for i in range(n):
                sink.write(sample(i, split, rng))
        splits[split] = {"shards": [{"path": f"{split}/000000.tar", "samples": n, "bytes": path.stat().st_size,
                                     "sha256": sha256_file(path)}], "samples": n}
    embeddings = write_embeddings(root, n_entities, dim) if n_entities else None
    manifest = {"splits": splits, "embeddings": embeddings, "image_size": image_size, "seed": 0}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root
