"""Ingest image-text pairs into the lake: ``pairs`` + ``quarantine`` + ``ingest_stats`` + image blobs.

    rapid ingest pairs landing/demo/2025-01-01/pairs --domain demo --partition 2025-01-01
    rapid ingest pairs wukong.parquet --domain demo --image-root /data/wukong/images
    rapid ingest pairs --images my_folder/ --domain demo          # images + sidecar .txt captions

Inputs: Wukong CSV/TSV or Parquet (``url`` + ``caption`` columns, names configurable), img2dataset
tars, image folders with sidecar ``.txt`` captions; a folder PATH means every CSV/Parquet/tar in it.

Every sample gets exactly one outcome (img2dataset style): ``accepted`` (a ``pairs`` row), ``duplicate``
((image_sha256, caption) already seen in this partition or, by default, in another partition of the
domain) or a quarantine reason code. Invariants:

* ``rows_in == accepted + quarantined + duplicates`` (checked by `core.stage.run_stage`).
* Captions only through `core.text.normalize`; images only through `core.images.decode_image`
  (byte cap, format allowlist, header pixel cap, full decode, min side, max aspect).
* Accepted original bytes are stored once in ``lake/blobs/<sha[:2]>/<sha256>`` before the pairs
  manifest that references them is published, so a published row always has its blob.
* Split = 80/10/10 by a hash of image_sha256: one image never lands in two splits.
* Each table partition is replaced whole (`core.lake.publish_table`), so a rerun or a backfill of
  a partition never duplicates rows; an unchanged rerun is a step-cache hit.
* Bounded memory: samples stream; only ids (pair ids, image outcomes) are kept per run.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pyarrow as pa

from ..core import lake, warehouse
from ..core.config import add_config_args, config_from_args, opt
from ..core.faults import fault_point
from ..core.home import Home, check_name
from ..core.images import ImageLimits, ImageRejected, decode_image
from ..core.progress import bar
from ..core.schemas import table_schema
from ..core.stage import StageReport, StageResult, run_stage
from ..core.text import TextRejected, decode_strict, normalize
from . import side_partition, stats_row, total_row
from .blobs import put_blob, sync_blobs
from .readers_pairs import RawSample, SampleRejected, discover, read_csv, read_folder, read_parquet, read_tar, table_kind

STAGE = "ingest_pairs"
BATCH_ROWS = 4096


@dataclass(frozen=True)
class PairsIngestConfig:
    url_column: str = opt("url", "column holding the image path / file:// URL in CSV and Parquet inputs")
    caption_column: str = opt("caption", "column holding the caption in CSV and Parquet inputs")
    min_side: int = opt(64, "reject images whose shorter side is below this many pixels (reason too_small)")
    max_aspect: float = opt(3.0, "reject images whose long/short side ratio exceeds this (reason bad_aspect; img2dataset uses 3.0)")
    max_caption_chars: int = opt(512, "reject captions longer than this many characters (reason too_long)")
    max_image_bytes: int = opt(32 << 20, "reject image files larger than this many bytes (reason too_many_bytes)")
    max_pixels: int = opt(40_000_000, "reject images whose header claims more pixels (decompression-bomb guard; reason too_many_pixels)")
    formats: tuple[str, ...] = opt(("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF"), "image formats accepted (PIL names; reason format_not_allowed)")
    dedupe_across_partitions: bool = opt(True, "also count a pair as duplicate when another partition of the domain already holds it")
    val_percent: int = opt(10, "percent of images (by hash of image_sha256) in the val split")
    test_percent: int = opt(10, "percent of images (by hash of image_sha256) in the test split")

    def limits(self) -> ImageLimits:
        return ImageLimits(self.max_image_bytes, self.max_pixels, tuple(self.formats), self.min_side, self.max_aspect)


@dataclass(frozen=True)
class Sources:
    """What to read: tables/tars (`paths`), image folders (`images`), and the base of relative URLs."""

    paths: tuple[Path, ...] = ()
    images: tuple[Path, ...] = ()
    image_root: Path | None = None


# --------------------------------------------------------------------------- judging one sample

def split_of(image_sha: str, cfg: PairsIngestConfig) -> str:
    bucket = int(hashlib.sha256(b"split\0" + image_sha.encode()).hexdigest()[:8], 16) % 100
    if bucket < 100 - cfg.val_percent - cfg.test_percent:
        return "train"
    return "val" if bucket < 100 - cfg.test_percent else "test"


def pair_id(image_sha: str, caption: str) -> str:
    return hashlib.sha256((image_sha + "\0" + caption).encode()).hexdigest()[:16]


def judge_caption(sample: RawSample, cfg: PairsIngestConfig):
    if sample.caption is None:
        raise SampleRejected("missing_caption", "no caption")
    text = decode_strict(sample.caption) if isinstance(sample.caption, bytes) else sample.caption
    return normalize(text, max_chars=cfg.max_caption_chars)


class ImageJudge:
    """Decode each distinct image once per run (same bytes under two names cost one decode)."""

    def __init__(self, cfg: PairsIngestConfig):
        self.limits = cfg.limits()
        self.seen: dict[str, tuple[int, int] | tuple[str, str]] = {}  # sha -> (w, h) or (reason, detail)

    def __call__(self, data: bytes) -> tuple[str, int, int]:
        sha = hashlib.sha256(data).hexdigest()
        if len(self.seen) >= 200_000:  # bounded memory; a forgotten image is merely decoded again
            self.seen.clear()
        if sha not in self.seen:
            try:
                img = decode_image(data, self.limits)
                self.seen[sha] = img.size
            except ImageRejected as exc:
                self.seen[sha] = (exc.reason, str(exc))
        got = self.seen[sha]
        if isinstance(got[0], str):
            raise SampleRejected(*got)
        return sha, got[0], got[1]


def judge(sample: RawSample, cfg: PairsIngestConfig, images: ImageJudge) -> tuple[dict, bytes]:
    """-> (pairs row without domain/partition, original image bytes), or raises SampleRejected."""
    if sample.error is not None:
        raise sample.error
    try:
        cap = judge_caption(sample, cfg)
    except TextRejected as exc:
        raise SampleRejected(exc.reason, str(exc)[:300]) from None
    data = sample.load_image()
    sha, w, h = images(data)
    row = {"pair_id": pair_id(sha, cap.text), "caption_raw": cap.raw, "caption": cap.text, "caption_simplified": cap.simplified,
           "image_sha256": sha, "width": w, "height": h, "split": split_of(sha, cfg),
           "source_file": sample.source_file, "source_pos": sample.source_pos}
    return row, data


# --------------------------------------------------------------------------- one run

class Tally:
    """Outcome counts per source file, and the quarantine rows (small: raw is truncated to 2 KB)."""

    def __init__(self, domain: str, partition: str):
        self.domain, self.partition = domain, partition
        self.accepted: Counter = Counter()
        self.duplicates: Counter = Counter()
        self.reasons: dict[str, Counter] = defaultdict(Counter)
        self.files: list[str] = []
        self.quarantine: list[dict] = []       # pending rows, moved to compact Arrow batches every BATCH_ROWS
        self.quarantine_batches: list[pa.Table] = []

    def see(self, source: str) -> None:
        if source not in self.files:
            self.files.append(source)

    def reject(self, sample: RawSample, exc: SampleRejected) -> None:
        self.see(sample.source_file)
        self.reasons[sample.source_file][exc.reason] += 1
        self.quarantine.append({"domain": self.domain, "partition": self.partition, "stage": STAGE,
                                "source_file": sample.source_file, "source_pos": sample.source_pos,
                                "reason": exc.reason, "detail": (exc.detail or str(exc))[:500], "raw": sample.raw})
        if len(self.quarantine) >= BATCH_ROWS:
            self.quarantine_batches.append(pa.Table.from_pylist(self.quarantine, schema=table_schema("quarantine")))
            self.quarantine = []

    def quarantine_table(self) -> pa.Table:
        return pa.concat_tables([*self.quarantine_batches, pa.Table.from_pylist(self.quarantine, schema=table_schema("quarantine"))])

    def totals(self) -> tuple[int, int, int]:
        return sum(self.accepted.values()), sum(self.duplicates.values()), sum(sum(c.values()) for c in self.reasons.values())

    def stats_rows(self, seconds: float) -> list[dict]:
        rows = [stats_row(self.domain, self.partition, STAGE, f, self.accepted[f], self.duplicates[f], self.reasons[f])
                for f in self.files]
        return rows + [total_row(self.domain, self.partition, STAGE, rows, seconds)]


def iter_samples(sources: Sources, cfg: PairsIngestConfig) -> Iterator[RawSample]:
    for path in sources.paths:
        for kind, file, label in discover(path):
            root = sources.image_root or file.parent
            if kind == "csv":
                yield from read_csv(file, label, root, cfg.url_column, cfg.caption_column, cfg.max_image_bytes)
            elif kind == "parquet":
                yield from read_parquet(file, label, root, cfg.url_column, cfg.caption_column, cfg.max_image_bytes)
            else:
                yield from read_tar(file, label, cfg.max_image_bytes)
            fault_point(STAGE, "after_source")
    for folder in sources.images:
        yield from read_folder(folder, folder.name, cfg.max_image_bytes)


def known_pair_ids(home: Home, domain: str, partition: str) -> set[str]:
    """pair_ids already published by OTHER partitions of the domain (cross-partition dedupe)."""
    out: set[str] = set()
    for part in lake.partitions(home, "pairs", domain):
        if part != partition:
            out.update(lake.read_partition(home, "pairs", domain, part, ["pair_id"]).column(0).to_pylist())
    return out


def admit(home: Home, tally: Tally, seen: set[str], sample: RawSample, row: dict, data: bytes) -> bool:
    """Count a judged sample as accepted (blob stored) or duplicate; True when accepted."""
    tally.see(sample.source_file)
    if row["pair_id"] in seen:
        tally.duplicates[sample.source_file] += 1
        return False
    seen.add(row["pair_id"])
    put_blob(home, data, row["image_sha256"], durable=False)
    tally.accepted[sample.source_file] += 1
    return True


def pair_batches(home: Home, sources: Sources, cfg: PairsIngestConfig, tally: Tally, seen: set[str]) -> Iterator[pa.Table]:
    """Judge every sample; yield accepted rows in Arrow batches (blobs stored as they are accepted)."""
    images, rows = ImageJudge(cfg), []
    with bar(f"ingest pairs [{tally.domain}/{tally.partition}]", unit="pair") as progress:
        for sample in iter_samples(sources, cfg):
            progress.update(1)
            try:
                row, data = judge(sample, cfg, images)
            except SampleRejected as exc:
                tally.reject(sample, exc)
                continue
            if admit(home, tally, seen, sample, row, data):
                rows.append({"domain": tally.domain, "partition": tally.partition, **row})
            if len(rows) >= BATCH_ROWS:
                yield pa.Table.from_pylist(rows)
                rows = []
    sync_blobs(home)  # every blob is on disk before the manifest that references it
    if rows:
        yield pa.Table.from_pylist(rows)


def ingest(home: Home, sources: Sources, cfg: PairsIngestConfig, domain: str, partition: str) -> StageResult:
    t0 = time.perf_counter()
    tally = Tally(domain, partition)
    seen = known_pair_ids(home, domain, partition) if cfg.dedupe_across_partitions else set()
    pairs_ref = lake.publish_table(home, "pairs", domain, partition, pair_batches(home, sources, cfg, tally, seen), STAGE)
    side = side_partition(STAGE, partition)
    q_ref = lake.publish_table(home, "quarantine", domain, side, tally.quarantine_table(), STAGE)
    stats = tally.stats_rows(round(time.perf_counter() - t0, 3))
    s_ref = lake.publish_table(home, "ingest_stats", domain, side, pa.Table.from_pylist(stats), STAGE)
    warehouse.refresh_views(home)
    accepted, duplicates, quarantined = tally.totals()
    return StageResult([pairs_ref, q_ref, s_ref], rows_in=accepted + duplicates + quarantined, rows_out=accepted,
                       rows_quarantined=quarantined, rows_duplicate=duplicates,
                       extra={"reasons": json.loads(stats[-1]["reasons"]), "files": tally.files, "seconds": stats[-1]["seconds"]})


# --------------------------------------------------------------------------- entry points

def _inputs(home: Home, sources: Sources, cfg: PairsIngestConfig, domain: str, partition: str) -> list:
    """Cache inputs: every input path, the folders relative URLs resolve against, other partitions."""
    paths: list = list(sources.paths) + list(sources.images)
    if sources.image_root is not None:
        paths.append(sources.image_root)
    else:
        paths += sorted({p.parent for p in sources.paths if p.is_file() and table_kind(p) in ("csv", "parquet")} - set(sources.paths))
    if cfg.dedupe_across_partitions:
        paths += [r for r in lake.table_refs(home, "pairs", domain) if not r.uri.endswith(f"part={partition}")]
    return paths


def run(config: PairsIngestConfig, home: Home, paths, domain: str, partition: str = "manual",
        images=(), image_root: Path | None = None, force: bool = False) -> StageReport:
    """Python entry: ingest `paths` (+ image folders `images`) into partition `partition` of `domain`."""
    check_name(domain, "domain"), check_name(partition, "partition")
    sources = Sources(tuple(Path(p).resolve() for p in paths), tuple(Path(p).resolve() for p in images),
                      Path(image_root).resolve() if image_root else None)
    if not sources.paths and not sources.images:
        raise ValueError("nothing to ingest: give PATH... and/or --images DIR")
    if min(config.val_percent, config.test_percent) < 0 or config.val_percent + config.test_percent > 100:
        raise ValueError("--val-percent and --test-percent must be >= 0 and sum to at most 100")
    for p in (*sources.paths, *sources.images):
        if not p.exists():
            raise FileNotFoundError(f"input {p} does not exist")
    return run_stage(home, STAGE, config, _inputs(home, sources, config, domain, partition),
                     lambda report: ingest(home, sources, config, domain, partition),
                     domain=domain, partition=partition, force=force)


def add_arguments(parser) -> None:
    parser.add_argument("paths", nargs="*", metavar="PATH", help="CSV/TSV, Parquet or img2dataset tar files, or folders holding them")
    parser.add_argument("--domain", required=True, help="domain the pairs belong to (e.g. demo)")
    parser.add_argument("--partition", default="manual", help="lake partition to (re)write: the landing date from the DAG, or 'manual'")
    parser.add_argument("--images", action="append", default=[], metavar="DIR", help="image folder with sidecar .txt captions (repeatable)")
    parser.add_argument("--image-root", default=None, help="base folder for relative image URLs in tables (default: each table's own folder)")
    parser.add_argument("--force", action="store_true", help="run even if the step cache says nothing changed")
    add_config_args(parser, PairsIngestConfig)


def main(args, home: Home) -> StageReport:
    cfg = config_from_args(PairsIngestConfig(), args)
    return run(cfg, home, args.paths, args.domain, args.partition, images=args.images, image_root=args.image_root, force=args.force)
