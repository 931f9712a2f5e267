"""Ingest knowledge-graph triples into the lake.

    rapid ingest kg triples.tsv dump.nt.gz --domain demo [--partition 2025-01-01]
    rapid ingest kg kg.csv --domain demo --columns head=subj,relation=pred,tail=obj

Formats (by suffix, or ``--format``): TSV/CSV (header autodetected, or ``--columns``), N-Triples,
Turtle (pyoxigraph, streaming; IRIs become their percent-decoded local names, literals their
value), JSONL (``--json-keys``); ``.gz`` / ``.bz2`` transparently. Writes ``kg_triples``
(this partition), ``quarantine`` and ``ingest_stats`` (partition ``ingest_kg-<partition>``), and
rebuilds ``kg_entities`` / ``kg_relations`` (partition ``all``) of the domain from every current
``kg_triples`` partition (under a per-domain lock), then refreshes the warehouse views. Alias
triples (``--alias-relations``) fold their tail into the head's ``aliases``; the tail also stays an
entity, so no triple points at a missing entity.

Invariants:
* Bounded memory: input is read in byte chunks / row batches and staged to Parquet; deduplication
  (GROUP BY over the staged file, keeping the first occurrence) and the entity rebuild run in
  DuckDB under ``--duckdb-memory`` (it spills to disk), never as a Python set of triples. Names are
  normalised once per distinct name (an Arrow-side cache of ``--name-cache`` names), not once per
  occurrence. Memory is bounded by ``--duckdb-memory`` + ``--name-cache`` + one 1M-row output file,
  not by the input: measured peak RSS of the whole process 1.05 GB at 1M and 1.69 GB at 5M triples
  (625k distinct entities) with the defaults (bench/ingest.py).
* Every name goes through `core.text.normalize`; ids are ``e``/``r`` + sha256(domain \\0 name)[:15].
* Nothing lost: rows_in == triples_out + quarantined + duplicates (checked by `run_stage`);
  every rejected row is in ``quarantine`` with file, line and reason.
* Re-ingesting a partition replaces it (idempotent); same inputs give byte-identical files.
"""

from __future__ import annotations

import contextlib
import functools
from collections import Counter
import fcntl
import hashlib
import resource
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..core import atomic, lake, warehouse
from ..core.config import add_config_args, config_from_args, opt
from ..core.home import Home, check_name
from ..core.progress import bar
from ..core.schemas import table_schema
from ..core.stage import DatasetRef, StageReport, StageResult, run_stage
from ..core.text import TextRejected, normalize
from . import side_partition, stats_row, total_row
from .kg_readers import RawBatch, ReadOptions, Reject, read_triples

STAGE = "ingest_kg"
ALIASES = ("别名", "又称", "中文名", "英文名", "简称", "外文名")
OUT_ROWS = 100_000  # fixed batch size into publish_table, so file boundaries (and bytes) are reproducible


@dataclass(frozen=True)
class KGIngestConfig:
    format: str = opt("auto", "input format: auto (by suffix) | tsv | csv | ntriples | turtle | jsonl")
    columns: str = opt("", "TSV/CSV column mapping, by index (head=0,relation=1,tail=2) or header name (head=subj,...)")
    header: str = opt("auto", "TSV/CSV header row: auto (detect head/relation/tail-like names) | yes | no")
    json_keys: str = opt("head,relation,tail", "JSONL keys holding head, relation and tail (comma-separated)")
    alias_relations: tuple[str, ...] = opt(ALIASES, "relations whose tail is an alias of the head (folded into kg_entities.aliases)")
    to_simplified: bool = opt(True, "fill *_simplified columns with OpenCC traditional->simplified (off: a copy of the name)")
    max_name_chars: int = opt(256, "names longer than this (code points, before cleaning) are quarantined as too_long")
    batch_rows: int = opt(100_000, "rows per read batch (bounds memory of the Python side)")
    name_cache: int = opt(1_000_000, "distinct names kept normalised in memory before the cache is cleared")
    duckdb_memory: str = opt("1GB", "DuckDB memory limit for dedupe / entity rebuild (it spills to disk beyond)")
    duckdb_threads: int = opt(2, "DuckDB threads")

    def read_options(self) -> ReadOptions:
        return ReadOptions(self.format, self.columns, self.header, self.json_keys, self.batch_rows)


def stable_id(prefix: str, domain: str, name: str) -> str:
    """``e``/``r`` + sha256(domain \\0 name)[:15]: stable across runs, partitions and machines.

    (The stage computes the same hash in DuckDB, ``sha256(domain || chr(0) || name)``, once per distinct name.)
    """
    return prefix + hashlib.sha256(f"{domain}\0{name}".encode()).hexdigest()[:15]


# ---------------------------------------------------------------- names (distinct raw name -> normalised)

# Names made only of ASCII letters/digits/underscore and CJK unified ideographs are printable, NFKC-stable
# and have no spaces to collapse: `core.text.clean` returns them unchanged, so they skip Python.
_CLEAN_NAME = r"^[0-9A-Za-z_\x{4E00}-\x{9FFF}]+$"
NAMES = pa.schema([("raw", pa.string()), ("name", pa.string()), ("simplified", pa.string()), ("reason", pa.string())])


@functools.lru_cache(maxsize=1)
def _traditional_pattern() -> str:
    """RE2 class of every character OpenCC t2s may change: names without one convert to themselves."""
    from ..core.text import _traditional_chars

    return "[" + "".join(f"\\x{{{ord(c):X}}}" for c in sorted(_traditional_chars())) + "]"


def _normalise_one(raw: str, config: KGIngestConfig) -> tuple[str | None, str | None, str | None]:
    try:
        n = normalize(raw, config.max_name_chars, config.to_simplified)
    except TextRejected as exc:
        return None, None, "empty_field" if exc.reason == "empty_text" else exc.reason
    return n.text, n.simplified, None


def normalise_names(raw: pa.Array, config: KGIngestConfig) -> pa.Table:
    """[raw, name, simplified, reason] for distinct raw names: Arrow proves most clean, Python does the rest."""
    fast = pc.and_(pc.match_substring_regex(raw, _CLEAN_NAME), pc.less_equal(pc.utf8_length(raw), config.max_name_chars))
    if config.to_simplified:
        fast = pc.and_(fast, pc.invert(pc.match_substring_regex(raw, _traditional_pattern())))
    clean = raw.filter(fast)
    rest = raw.filter(pc.invert(fast)).to_pylist()
    done = [_normalise_one(x, config) for x in rest]
    cols = [pa.array([d[k] for d in done], pa.string()) for k in range(3)]
    return pa.table([pa.concat_arrays([clean, pa.array(rest, pa.string())]),
                     pa.concat_arrays([clean, cols[0]]), pa.concat_arrays([clean, cols[1]]),
                     pa.concat_arrays([pa.nulls(len(clean), pa.string()), cols[2]])], schema=NAMES)


def build_names(con, config: KGIngestConfig, domain: str) -> None:
    """Table `names` (raw, name, simplified, reason, hash) over this run's distinct raw names, in batches."""
    con.execute("CREATE TABLE names (raw VARCHAR, name VARCHAR, simplified VARCHAR, reason VARCHAR, hash VARCHAR)")
    writer = con.cursor()  # the reader below streams on `con`
    reader = con.sql(warehouse.read_sql("ingest_kg_names.sql")).to_arrow_reader(config.name_cache)
    for rb in reader:
        batch = normalise_names(pa.Table.from_batches([rb]).column("raw").combine_chunks(), config)  # noqa: F841 (read by DuckDB)
        writer.execute("INSERT INTO names SELECT raw, name, simplified, reason, "
                       "CASE WHEN reason IS NULL THEN substr(sha256($prefix || name), 1, 15) END FROM batch",
                       {"prefix": domain + "\0"})
    writer.close()


# ---------------------------------------------------------------- staging (stream -> DuckDB table)

ORD_BITS = 40  # ord = file index << 40 | line: input order as one int64 (2^40 lines per file)


@dataclass
class Counts:
    rows_in: int = 0
    staged: int = 0
    quarantined: int = 0


class Stager:
    """Appends raw triples to DuckDB table `staged` and line-level rejects to a Parquet file as batches arrive."""

    def __init__(self, con, scratch: Path, domain: str, partition: str, sources: list[str]):
        self.con, self.domain, self.partition, self.sources = con, domain, partition, sources
        self.rejects_path = scratch / "rejects.parquet"
        con.execute("CREATE TABLE staged (h VARCHAR, r VARCHAR, t VARCHAR, ord BIGINT)")
        self.rejects = pq.ParquetWriter(self.rejects_path, table_schema("quarantine"), compression="lz4")
        self.reasons: dict[str, Counter] = {s: Counter() for s in sources}
        self.staged_by_file: Counter = Counter()
        self.counts = Counts()

    def write(self, batch: RawBatch, file_idx: int) -> None:
        if len(batch.pos):
            raw = pa.table({"h": batch.head, "r": batch.relation, "t": batch.tail,  # noqa: F841 (read by DuckDB)
                            "ord": pc.add(batch.pos, file_idx << ORD_BITS)})
            self.con.execute("INSERT INTO staged SELECT * FROM raw")
        self.add_rejects(batch.rejects, file_idx)
        self.staged_by_file[file_idx] += len(batch.pos)
        self.counts.rows_in += batch.rows_in
        self.counts.staged += len(batch.pos)

    def add_rejects(self, rejects: list[Reject], file_idx: int) -> None:
        if not rejects:
            return
        source, n = self.sources[file_idx], len(rejects)
        cols = {"domain": [self.domain] * n, "partition": [self.partition] * n, "stage": [STAGE] * n,
                "source_file": [source] * n, "source_pos": [r.pos for r in rejects], "reason": [r.reason for r in rejects],
                "detail": [r.detail for r in rejects], "raw": [r.raw for r in rejects]}
        self.rejects.write_table(pa.Table.from_pydict(cols, schema=table_schema("quarantine")))
        self.reasons[source].update(r.reason for r in rejects)
        self.counts.quarantined += n

    def close(self) -> None:
        self.rejects.close()


def stage_inputs(config: KGIngestConfig, paths: Sequence[Path], stager: Stager) -> Counts:
    with bar("ingest kg", unit="rows") as progress:
        for file_idx, path in enumerate(paths):
            for batch in read_triples(path, config.read_options()):
                stager.write(batch, file_idx)
                progress.update(batch.rows_in)
    return stager.counts


def quarantine_bad_names(con, stager: Stager) -> None:
    """Staged rows with a rejected name join the line-level rejects (their rows leave the staged count)."""
    reader = con.sql(warehouse.read_sql("ingest_kg_name_rejects.sql")).to_arrow_reader(OUT_ROWS)
    for rb in reader:
        by_file: dict[int, list[Reject]] = {}
        for row in rb.to_pylist():
            file_idx, pos = row["ord"] >> ORD_BITS, row["ord"] & ((1 << ORD_BITS) - 1)
            role, reason = next((role, row[f"{role}_reason"]) for role in ("head", "relation", "tail") if row[f"{role}_reason"])
            raw = "\t".join((row["h"], row["r"], row["t"]))[:2048]
            by_file.setdefault(file_idx, []).append(Reject(pos, reason, f"{role}: {reason}", raw))
        for file_idx, rejects in by_file.items():
            stager.add_rejects(rejects, file_idx)
            stager.staged_by_file[file_idx] -= len(rejects)
            stager.counts.staged -= len(rejects)


# ---------------------------------------------------------------- DuckDB phase (dedupe, entities)

@contextlib.contextmanager
def duck(config: KGIngestConfig, scratch: Path) -> Iterator[duckdb.DuckDBPyConnection]:
    con = duckdb.connect(config={"memory_limit": config.duckdb_memory, "threads": config.duckdb_threads,
                                 "temp_directory": str(scratch / "duckdb_tmp"), "preserve_insertion_order": True})
    try:
        yield con
    finally:
        con.close()


def fixed_batches(reader: pa.RecordBatchReader, rows: int = OUT_ROWS) -> Iterator[pa.Table]:
    """Re-chunk a record batch stream into tables of exactly `rows` rows (the last one shorter)."""
    pending: list[pa.RecordBatch] = []
    have = 0
    for rb in reader:
        pending.append(rb)
        have += rb.num_rows
        while have >= rows:
            table = pa.Table.from_batches(pending)
            yield table.slice(0, rows)
            rest = table.slice(rows)
            pending, have = rest.to_batches(), rest.num_rows
    if have:
        yield pa.Table.from_batches(pending, schema=reader.schema)


def publish_query(home: Home, con, sql_name: str, params: dict, table: str, domain: str, partition: str) -> DatasetRef:
    reader = con.sql(warehouse.read_sql(sql_name), params=params).to_arrow_reader(OUT_ROWS)
    return lake.publish_table(home, table, domain, partition, fixed_batches(reader), stage=STAGE)


def publish_triples(home: Home, con, stager: Stager) -> DatasetRef:
    sources = pa.table({"file_idx": pa.array(range(len(stager.sources)), pa.int64()), "source_file": stager.sources})
    con.register("sources", sources)
    return publish_query(home, con, "ingest_kg_dedupe.sql", {"domain": stager.domain, "partition": stager.partition},
                         "kg_triples", stager.domain, stager.partition)


def publish_quarantine(home: Home, con, stager: Stager) -> DatasetRef:
    """Line-level and name-level rejects together, in input order (file, then line)."""
    rel = con.sql("SELECT * FROM read_parquet($path) ORDER BY list_position($sources, source_file), source_pos",
                  params={"path": str(stager.rejects_path), "sources": stager.sources})
    batches = fixed_batches(rel.to_arrow_reader(OUT_ROWS))
    return lake.publish_table(home, "quarantine", stager.domain, side_partition(STAGE, stager.partition), batches, stage=STAGE)


def publish_stats(home: Home, stager: Stager, triples: DatasetRef, seconds: float) -> DatasetRef:
    """ingest_stats: one row per input file plus the '*' total (accepted/duplicates from the valid and kept rows)."""
    kept = _count_by_file([str(p) for p in atomic.manifest_paths(triples.path)])
    rows = []
    for idx, src in enumerate(stager.sources):
        valid = stager.staged_by_file.get(idx, 0)
        rows.append(stats_row(stager.domain, stager.partition, STAGE, src, kept.get(src, 0), valid - kept.get(src, 0),
                              stager.reasons[src]))
    rows.append(total_row(stager.domain, stager.partition, STAGE, rows, round(seconds, 3)))
    table = pa.Table.from_pylist(rows, schema=table_schema("ingest_stats"))
    return lake.publish_table(home, "ingest_stats", stager.domain, side_partition(STAGE, stager.partition), table, stage=STAGE)


def _count_by_file(files: list[str]) -> dict[str, int]:
    with duckdb.connect() as con:
        return dict(con.execute("SELECT source_file, count(*) FROM read_parquet(?) GROUP BY source_file", [files]).fetchall())


@contextlib.contextmanager
def domain_lock(home: Home, domain: str):
    """kg_entities/kg_relations of a domain are rebuilt by any partition's ingest: one at a time."""
    with open(home.locks / f"{STAGE}.{domain}.entities.lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def rebuild_entities(home: Home, config: KGIngestConfig, domain: str, scratch: Path) -> list[DatasetRef]:
    files = [str(p) for part in lake.partitions(home, "kg_triples", domain)
             for p in atomic.manifest_paths(home.partition_dir("kg_triples", domain, part))]
    aliases = sorted({normalize(a).text for a in config.alias_relations})
    params = {"domain": domain, "alias_relations": aliases}
    with domain_lock(home, domain), duck(config, scratch) as con:
        con.read_parquet(files).create_view("triples")
        con.execute(f"CREATE TABLE t AS {warehouse.read_sql('ingest_kg_distinct.sql')}")
        return [publish_query(home, con, "ingest_kg_entities.sql", params, "kg_entities", domain, "all"),
                publish_query(home, con, "ingest_kg_relations.sql", params, "kg_relations", domain, "all")]


# ---------------------------------------------------------------- the stage

def _check_paths(paths: Sequence[str | Path]) -> list[Path]:
    out = [Path(p).expanduser().resolve() for p in paths]
    if not out:
        raise ValueError("ingest kg needs at least one input file")
    missing = [str(p) for p in out if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"input file(s) not found: {', '.join(missing)}")
    return out


def _stage_and_publish(home: Home, config: KGIngestConfig, paths: list[Path], domain: str, partition: str,
                       scratch: Path) -> tuple[Stager, DatasetRef, DatasetRef, float]:
    """Read -> staged table -> names -> quarantine + deduplicated kg_triples, all in one DuckDB session."""
    with duck(config, scratch) as con:
        t0 = time.perf_counter()
        stager = Stager(con, scratch, domain, partition, [str(p) for p in paths])
        stage_inputs(config, paths, stager)
        build_names(con, config, domain)
        quarantine_bad_names(con, stager)
        stager.close()
        t1 = time.perf_counter()
        triples = publish_triples(home, con, stager)
        quarantine = publish_quarantine(home, con, stager)
    return stager, triples, quarantine, t1 - t0


def _body(home: Home, config: KGIngestConfig, paths: list[Path], domain: str, partition: str) -> StageResult:
    # One scratch folder per (domain, partition): run_stage holds that partition's lock, so a leftover
    # here is from a killed run and is safe to remove.
    scratch = home.root / ".scratch" / f"{STAGE}-{domain}-{partition}"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    try:
        t0 = time.perf_counter()
        stager, triples, quarantine, read_s = _stage_and_publish(home, config, paths, domain, partition, scratch)
        entities = rebuild_entities(home, config, domain, scratch)
        t2 = time.perf_counter()
        stats = publish_stats(home, stager, triples, t2 - t0)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    warehouse.refresh_views(home)
    reasons = sum(stager.reasons.values(), Counter())
    counts = stager.counts
    extra = {"reasons": dict(sorted(reasons.items())), "entities": entities[0].rows, "relations": entities[1].rows,
             "seconds_read": round(read_s, 3), "seconds_dedupe_publish": round(t2 - t0 - read_s, 3),
             "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    return StageResult([triples, quarantine, *entities, stats], rows_in=counts.rows_in, rows_out=triples.rows,
                       rows_quarantined=counts.quarantined, rows_duplicate=counts.staged - (triples.rows or 0), extra=extra)


def run(config: KGIngestConfig, home: Home, paths: Sequence[str | Path], domain: str, partition: str = "manual",
        force: bool = False) -> StageReport:
    """Ingest `paths` as partition `partition` of `domain` (see module doc)."""
    check_name(domain, "domain"), check_name(partition, "partition"), side_partition(STAGE, partition)
    files = _check_paths(paths)
    return run_stage(home, STAGE, config, files, lambda report: _body(home, config, files, domain, partition),
                     domain=domain, partition=partition, force=force)


def add_arguments(parser) -> None:
    parser.add_argument("paths", nargs="+", help="triple files (.tsv .csv .nt .ttl .jsonl, optionally .gz/.bz2)")
    parser.add_argument("--domain", required=True, help="knowledge domain these triples belong to, e.g. demo")
    parser.add_argument("--partition", default="manual", help="ingest partition (a date like 2025-01-01, default: manual)")
    parser.add_argument("--force", action="store_true", help="run even if the step cache says nothing changed")
    add_config_args(parser, KGIngestConfig)


def main(args, home: Home) -> StageReport:
    config = config_from_args(KGIngestConfig(), args)
    return run(config, home, args.paths, args.domain, args.partition, force=args.force)
