"""Webdataset shards per split, with entity annotations that index the TransE embeddings.

    rapid shard --domain demo --preset tiny
    rapid shard --domain demo --image-size 256 --max-samples-per-shard 5000 --max-bytes-per-shard 1000000000

Reads ``pairs`` (every partition; one row per pair_id), ``links`` and the image blobs, plus the TransE
embeddings CURRENT points at, and writes ``shards/<domain>/<split>/NNNNNN.tar`` + ``manifest.json``
(docs/CONTRACTS.md). Each sample: ``<pair_id>.jpg`` (RGB, shorter side resized to ``image_size`` then
centre-cropped, JPEG quality ``jpeg_quality``), ``<pair_id>.txt`` (caption), ``<pair_id>.json``
(pair_id, domain, split, caption, caption_simplified, entities [{entity_id, start, end, surface, emb_row}]).

Invariants:
* Byte-reproducible: the sample order is a seeded shuffle of pair_id-sorted rows (stable across runs and
  partition order), tar members have fixed mtime/owner/mode, so two runs give identical tars.
* Bounded shards: a shard closes before it would exceed ``max_samples_per_shard`` samples or
  ``max_bytes_per_shard`` bytes (a single sample larger than the byte bound gets a shard of its own).
* Nothing lost: ``rows_in == samples + quarantined + duplicate pair rows``; images that fail to decode
  now go to ``quarantine`` (stage ``shard``, partition ``shard-all``).
* The whole ``shards/<domain>/`` folder appears at once (staging + rename); the manifest lists every
  shard with its sample count, size and sha256, and the embeddings file by path and fingerprint.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa

from .core import lake
from .core.atomic import atomic_write_json, publish_dir, sha256_file, staging_dir
from .core.config import add_config_args, config_from_args, opt, preset
from .core.faults import fault_point
from .core.home import Home, check_name
from .core.images import ImageRejected, decode_image
from .core.progress import bar
from .core.schemas import table_schema
from .core.stage import DatasetRef, StageReport, StageResult, run_stage
from .core.warehouse import refresh_views

STAGE = "shard"
SPLITS = ("train", "val", "test")
MANIFEST = "manifest.json"
MTIME = 946684800  # 2000-01-01: fixed member mtime, so tars are byte-reproducible
TAR_BLOCK, TAR_RECORD = 512, 10240


@dataclass(frozen=True)
class ShardConfig:
    image_size: int = opt(256, "output image side in pixels (shorter side resized, then centre-cropped square)")
    jpeg_quality: int = opt(95, "JPEG quality of the re-encoded images")
    max_samples_per_shard: int = opt(1000, "close a shard at this many samples")
    max_bytes_per_shard: int = opt(1 << 30, "close a shard before it would exceed this many bytes")
    seed: int = opt(0, "seed of the per-split sample shuffle (stable across runs)")
    embeddings: str = opt("current", "TransE embeddings: 'current' (models/transe/<domain>/CURRENT), a run folder / "
                                     "embeddings.parquet path, or 'none' (every emb_row = -1)")


PRESETS = {
    "tiny": ShardConfig(image_size=64, max_samples_per_shard=64),
    "small": ShardConfig(image_size=128, max_samples_per_shard=1000),
    "paper": ShardConfig(image_size=256, max_samples_per_shard=5000),  # appendix C: 256x256 training images
}


# ----------------------------------------------------------------------------------------- inputs
@dataclass
class Embeddings:
    path: Path | None
    rows: dict[str, int]
    dim: int


def find_embeddings(home: Home, domain: str, spec: str) -> Embeddings:
    from .transe import EMBEDDINGS, domain_dir, load_embeddings, resolve_run

    if spec == "none":
        return Embeddings(None, {}, 0)
    if spec == "current":
        if not (domain_dir(home, domain) / "CURRENT").exists():
            raise FileNotFoundError(f"domain {domain!r} has no TransE embeddings: run `rapid kg transe --domain {domain}` "
                                    "first, or pass --embeddings none")
        path = resolve_run(domain_dir(home, domain)) / EMBEDDINGS
    else:
        path = Path(spec) if Path(spec).is_file() else resolve_run(spec) / EMBEDDINGS
    ids, matrix = load_embeddings(path)
    return Embeddings(path.resolve(), {e: i for i, e in enumerate(ids)}, int(matrix.shape[1]))


def unique_pairs(home: Home, domain: str) -> tuple[list[dict], int, int]:
    """One row per pair_id (first by partition, then source position); returns rows, rows_in, duplicates."""
    cols = ["partition", "pair_id", "caption", "caption_simplified", "image_sha256", "split", "source_file", "source_pos"]
    table = lake.read_table(home, "pairs", domain, cols)
    if table.num_rows:
        table = table.sort_by([("pair_id", "ascending"), ("partition", "ascending"), ("source_pos", "ascending")])
    rows, seen = [], set()
    for row in table.to_pylist():
        if row["pair_id"] not in seen:
            seen.add(row["pair_id"])
            rows.append(row)
    return rows, table.num_rows, table.num_rows - len(rows)


def entities_by_pair(home: Home, domain: str, emb: Embeddings) -> dict[str, list[dict]]:
    """Links per pair (deduplicated across partitions), sorted by offset, with their embedding row."""
    table = lake.read_table(home, "links", domain, ["pair_id", "entity_id", "start", "end", "surface"])
    out: dict[str, dict[tuple, dict]] = {}
    for link in table.to_pylist():
        pair_id = link.pop("pair_id")
        key = (link["start"], link["end"], link["entity_id"])
        out.setdefault(pair_id, {})[key] = {**link, "emb_row": emb.rows.get(link["entity_id"], -1)}
    return {pid: [spans[k] for k in sorted(spans)] for pid, spans in out.items()}


def ordered(rows: list[dict], split: str, seed: int) -> list[dict]:
    """The split's rows (pair_id order) shuffled by a seed that depends only on (seed, split)."""
    chosen = [r for r in rows if r["split"] == split]
    random.Random(f"{seed}:{split}").shuffle(chosen)
    return chosen


# ----------------------------------------------------------------------------------------- samples
def prepare_image(data: bytes, size: int, quality: int) -> bytes:
    """decode_image -> shorter side to `size` (bicubic) -> centre crop -> JPEG (fixed encoder settings)."""
    from PIL import Image

    img = decode_image(data)
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    img = img.crop((left, top, left + size, top + size))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality, subsampling=0 if quality >= 90 else 2, optimize=False)
    return buf.getvalue()


def sample_members(row: dict, domain: str, jpg: bytes, entities: list[dict]) -> dict[str, bytes]:
    meta = {"pair_id": row["pair_id"], "domain": domain, "split": row["split"], "caption": row["caption"],
            "caption_simplified": row["caption_simplified"], "entities": entities}
    return {"jpg": jpg, "txt": row["caption"].encode("utf-8"),
            "json": json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8")}


def tar_bytes(members: dict[str, bytes]) -> int:
    """Bytes the members take inside a tar (a header block each + data padded to 512)."""
    return sum(TAR_BLOCK + -(-len(v) // TAR_BLOCK) * TAR_BLOCK for v in members.values())


def final_tar_size(content: int) -> int:
    """File size of a tar with `content` member bytes: two zero blocks, padded to a 10 KiB record."""
    return -(-(content + 2 * TAR_BLOCK) // TAR_RECORD) * TAR_RECORD


# ----------------------------------------------------------------------------------------- writing
class ShardWriter:
    """Writes NNNNNN.tar files into one split folder, closing each before a bound would be crossed."""

    def __init__(self, folder: Path, config: ShardConfig):
        self.folder, self.config = folder, config
        self.shards: list[dict] = []
        self.writer = None
        self.samples = self.content = 0

    def _open(self) -> None:
        import webdataset as wds

        self.path = self.folder / f"{len(self.shards):06d}.tar"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.stream = open(self.path, "wb")
        self.writer = wds.TarWriter(self.stream, user="", group="", mode=0o444, encoder=False, mtime=MTIME)
        self.samples = self.content = 0

    def _full(self, size: int) -> bool:
        c = self.config
        return self.samples >= c.max_samples_per_shard or final_tar_size(self.content + size) > c.max_bytes_per_shard

    def write(self, key: str, members: dict[str, bytes]) -> None:
        size = tar_bytes(members)
        if self.writer is not None and self.samples and self._full(size):
            self.close()
        if self.writer is None:
            self._open()
        self.writer.write({"__key__": key, **members})
        self.samples, self.content = self.samples + 1, self.content + size

    def close(self) -> None:
        if self.writer is None:
            return
        self.writer.close()
        self.stream.flush()
        os.fsync(self.stream.fileno())
        self.stream.close()
        rel = f"{self.folder.name}/{self.path.name}"
        self.shards.append({"path": rel, "samples": self.samples, "bytes": self.path.stat().st_size,
                            "sha256": sha256_file(self.path)})
        self.writer = None

    def abort(self) -> None:
        """Release the open file after a failure (the staging folder is discarded anyway)."""
        if self.writer is not None:
            self.writer.close()  # finishes a tar nobody will list; the file stays in the discarded staging folder
            self.stream.close()
            self.writer = None


@dataclass
class Tally:
    written: int = 0
    quarantine: list = field(default_factory=list)


def quarantine_row(domain: str, row: dict, exc: Exception) -> dict:
    reason = exc.reason if isinstance(exc, ImageRejected) else "missing_blob"
    return {"domain": domain, "partition": row["partition"], "stage": STAGE, "source_file": row["source_file"],
            "source_pos": row["source_pos"], "reason": reason, "detail": str(exc)[:500],
            "raw": json.dumps({"pair_id": row["pair_id"], "image_sha256": row["image_sha256"]})}


def write_split(home: Home, domain: str, rows: list[dict], folder: Path, links: dict, config: ShardConfig,
                tally: Tally, pbar) -> list[dict]:
    writer = ShardWriter(folder, config)
    try:
        for i, row in enumerate(rows):
            write_sample(home, domain, row, links, config, writer, tally)
            pbar.update(1)
            if i == len(rows) // 2:
                fault_point(STAGE, "mid_write")
    except BaseException:
        writer.abort()
        raise
    writer.close()
    return writer.shards


def write_sample(home: Home, domain: str, row: dict, links: dict, config: ShardConfig, writer: ShardWriter,
                 tally: Tally) -> None:
    from .ingest.blobs import read_blob

    try:
        jpg = prepare_image(read_blob(home, row["image_sha256"]), config.image_size, config.jpeg_quality)
    except (ImageRejected, FileNotFoundError) as exc:
        tally.quarantine.append(quarantine_row(domain, row, exc))
        return
    writer.write(row["pair_id"], sample_members(row, domain, jpg, links.get(row["pair_id"], [])))
    tally.written += 1


def manifest(domain: str, config: ShardConfig, splits: dict, emb: Embeddings, root: Path) -> dict:
    ref = None
    if emb.path is not None:
        ref = {"path": os.path.relpath(emb.path, root), "absolute_path": str(emb.path),
               "fingerprint": sha256_file(emb.path), "dim": emb.dim, "rows": len(emb.rows)}
    return {"version": 1, "domain": domain, "splits": splits, "embeddings": ref, "image_size": config.image_size,
            "image_format": {"type": "jpeg", "quality": config.jpeg_quality, "resize": "shorter side, bicubic",
                             "crop": "centre", "mode": "RGB"},
            "seed": config.seed, "config": asdict(config),
            "samples": sum(s["samples"] for s in splits.values())}


def publish_quarantine(home: Home, domain: str, rows: list[dict]) -> DatasetRef:
    table = pa.Table.from_pylist(rows, schema=table_schema("quarantine"))
    return lake.publish_table(home, "quarantine", domain, check_name(f"{STAGE}-all", "partition"), table, STAGE)


def shard_body(home: Home, domain: str, config: ShardConfig) -> StageResult:
    emb = find_embeddings(home, domain, config.embeddings)
    rows, rows_in, dups = unique_pairs(home, domain)
    if not rows:
        raise FileNotFoundError(f"domain {domain!r} has no pairs: run `rapid ingest pairs ... --domain {domain}` first")
    links = entities_by_pair(home, domain, emb)
    final = home.shards / check_name(domain, "domain")
    for stale in final.parent.glob(f".tmp-*-{domain}"):  # a crashed earlier run's staging (we hold the stage lock)
        shutil.rmtree(stale, ignore_errors=True)
    tmp, tally, splits = staging_dir(final), Tally(), {}
    fault_point(STAGE, "start_write")
    with bar("shard", total=len(rows), unit="sample") as pbar:
        for split in SPLITS:
            shards = write_split(home, domain, ordered(rows, split, config.seed), tmp / split, links, config, tally, pbar)
            splits[split] = {"shards": shards, "samples": sum(s["samples"] for s in shards)}
    atomic_write_json(tmp / MANIFEST, manifest(domain, config, splits, emb, final))
    q_ref = publish_quarantine(home, domain, tally.quarantine)
    publish_dir(tmp, final)
    fault_point(STAGE, "end_write")
    refresh_views(home)
    out = DatasetRef.of(final / MANIFEST, rows=tally.written)
    extra = {"shard_root": str(final), "splits": {s: v["samples"] for s, v in splits.items()},
             "shards": sum(len(v["shards"]) for v in splits.values()), "embeddings": str(emb.path) if emb.path else None}
    return StageResult([out, q_ref], rows_in=rows_in, rows_out=tally.written, rows_quarantined=len(tally.quarantine),
                       rows_duplicate=dups, extra=extra)


def _inputs(home: Home, domain: str, config: ShardConfig) -> list:
    refs = lake.table_refs(home, "pairs", domain) + lake.table_refs(home, "links", domain)
    if config.embeddings != "none":
        refs.append(find_embeddings(home, domain, config.embeddings).path)
    return refs


def run(config: ShardConfig, home: Home, domain: str, force: bool = False) -> StageReport:
    """Write the domain's shard set under the stage runner (cache, lock, lineage, reconcile)."""
    check_name(domain, "domain")
    if config.image_size < 8 or not 1 <= config.jpeg_quality <= 100 or config.max_samples_per_shard < 1:
        raise ValueError("need --image-size >= 8, 1 <= --jpeg-quality <= 100 and --max-samples-per-shard >= 1")
    return run_stage(home, STAGE, config, _inputs(home, domain, config), lambda rep: shard_body(home, domain, config),
                     domain=domain, force=force)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--domain", required=True, help="domain whose pairs to shard")
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="tiny (64 px), small (128 px), paper (256 px)")
    parser.add_argument("--force", action="store_true", help="rewrite even if the step cache says nothing changed")
    add_config_args(parser, ShardConfig)


def main(args: argparse.Namespace, home: Home) -> StageReport:
    return run(config_from_args(preset(PRESETS, args.preset), args), home, args.domain, force=args.force)

