"""Ingest knowledge-graph triples into the lake.

    rapid ingest kg triples.tsv dump.nt.gz --domain demo [--partition 2025-01-01]
    rapid ingest kg kg.csv --domain demo --columns head=subj,relation=pred,tail=obj
    .venv/bin/python bench/ingest.py --triples 5000000   # throughput against DuckDB's own TSV -> Parquet copy
    .venv/bin/python -m pytest tests/data/test_ingest_kg.py  # incl. DuckDB reader == read_tsv, byte for byte

Formats (by suffix, or ``--format``): TSV/CSV (header autodetected, or ``--columns``), N-Triples,
Turtle (pyoxigraph, streaming; IRIs become their percent-decoded local names, literals their
value), JSONL (``--json-keys``); ``.gz`` / ``.bz2`` transparently. Writes ``kg_triples`` (this
partition: one file per input, rows in input order), ``quarantine`` and ``ingest_stats``
(partition ``ingest_kg-<partition>``), and rebuilds ``kg_entities`` / ``kg_relations`` (partition
``all``) of the domain from every current ``kg_triples`` partition (under a per-domain lock), then
refreshes the warehouse views. ``kg_triples`` holds names; ids live in the entity and relation
tables (``e``/``r`` + sha256(domain \\0 name)[:15]), and the ``kg_facts`` view joins them back.
Alias triples (``--alias-relations``) fold their tail into the head's ``aliases``; the tail also
stays an entity, so no triple points at a missing entity.

How, in one DuckDB session (``--duckdb-memory``, spilling to a scratch folder):

1. Stage every input into a table of its own (`kg_stage`: DuckDB's parallel reader for plain TSV,
   the streaming Python readers of `kg_readers` for the rest); rejected lines go to quarantine.
2. Names (sql/ingest_kg_names.sql): every raw name with its uses as head/tail and as relation, in
   two GROUP BYs. Those Arrow cannot prove clean go through `core.text.normalize` in Python; clean
   ones with a character OpenCC may change are converted in one call (table ``changed``). Rows with
   a rejected name are quarantined; names whose normal form differs are rewritten in place (an
   UPDATE, only when there are any).
3. Dedupe: a NumPy sort of the triples' 64-bit hashes (computed while staging) finds the repeated
   ones; sql/ingest_kg_dups.sql compares just those rows as strings and keeps the first occurrence.
   Dropped rows join table ``skip``.
4. kg_triples (sql/ingest_kg_triples.sql): a plain scan per input in file order, written by DuckDB's
   parallel Parquet writer through `core.lake.publish_query` (schema checked before the manifest
   swap). The rows in ``skip`` are dropped by a bit test against a bitstring DuckDB builds from
   them; a DuckDB-read row's line is its rowid plus the gaps before it (`LineMap.sql`, a binary
   search written as nested CASEs). Both stay in DuckDB's threads; a Python UDF takes over only
   for a file past a bitstring's index range or with more than ``MAX_SQL_GAPS`` gaps.
5. Entities and relations: when this partition is the domain's only one, from the run's own tables
   (name counts less the skipped rows: sql/ingest_kg_run_tables.sql), otherwise from the lake
   (sql/ingest_kg_lake_tables.sql); same rows either way (a test compares the bytes).

Invariants:
* Bounded memory: rows live in DuckDB (it spills), never in Python beyond one batch; Python holds
  at most ``--name-cache`` names at once, per DuckDB-read file its gap lines, and ``KEY_SLICE`` triple
  hashes at a time (plus, only on the UDF path of step 4, a file's skipped rowids, 8 bytes each).
  DuckDB holds one bit per row of a file for its skip bitstring.
* Every name goes through `core.text.normalize` (or is proven a fixed point of its cleaning, ASCII
  letters/digits/_ and CJK ideographs, and then gets OpenCC's t2s when it holds a character t2s may change).
* Nothing lost: rows_in == triples_out + quarantined + duplicates (checked by `run_stage`; the
  per-file split is in ``ingest_stats``); every rejected row (bad bytes, NUL, column count, syntax,
  empty or too-long name) is in ``quarantine`` with source file, line and reason.
* Re-ingesting a partition replaces it (idempotent, atomic publish); same inputs give byte-identical
  files (rows in input order, fixed writer options), whichever reader staged them.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import itertools
import math
import resource
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..core import atomic, lake, warehouse
from ..core.config import add_config_args, config_from_args, opt
from ..core.home import Home, check_name
from ..core.schemas import table_schema
from ..core.stage import DatasetRef, StageReport, StageResult, run_stage
from ..core.text import TextRejected, normalize, to_simplified_many
from . import side_partition, stats_row, total_row
from .kg_readers import ReadOptions, Reject
from .kg_stage import REJECT_ROWS, FileStage, RejectSink, Stager

STAGE = "ingest_kg"
ALIASES = ("别名", "又称", "中文名", "英文名", "简称", "外文名")
MAX_LISTED_NAMES = 1000  # rejected names tested as a constant list in the one scan; more: a semi-join
KEY_SLICE = 1 << 24  # triple hashes sorted in NumPy at a time (128 MB)
MAX_BITSTRING_ROWS = (1 << 31) - 1  # DuckDB's get_bit takes an INTEGER index


@dataclass(frozen=True)
class KGIngestConfig:
    format: str = opt("auto", "input format: auto (by suffix) | tsv | csv | ntriples | turtle | jsonl")
    columns: str = opt("", "TSV/CSV column mapping, by index (head=0,relation=1,tail=2) or header name (head=subj,...)")
    header: str = opt("auto", "TSV/CSV header row: auto (detect head/relation/tail-like names) | yes | no")
    json_keys: str = opt("head,relation,tail", "JSONL keys holding head, relation and tail (comma-separated)")
    alias_relations: tuple[str, ...] = opt(ALIASES, "relations whose tail is an alias of the head (folded into kg_entities.aliases)")
    to_simplified: bool = opt(True, "fill kg_entities.name_simplified with OpenCC traditional->simplified (off: a copy of the name)")
    max_name_chars: int = opt(256, "names longer than this (code points, before or after cleaning) are quarantined as too_long")
    batch_rows: int = opt(100_000, "rows per read batch of the Python readers (bounds their memory)")
    name_cache: int = opt(1_000_000, "distinct names handed to Python at once for normalisation")
    duckdb_memory: str = opt("1GB", "DuckDB memory limit for staging / dedupe / entity rebuild (it spills to disk beyond)")
    duckdb_threads: int = opt(2, "DuckDB threads")

    def read_options(self) -> ReadOptions:
        return ReadOptions(self.format, self.columns, self.header, self.json_keys, self.batch_rows)


def stable_id(prefix: str, domain: str, name: str) -> str:
    """``e``/``r`` + sha256(domain \\0 name)[:15]: stable across runs, partitions and machines.

    (The stage computes the same hash in DuckDB, ``sha256(domain || chr(0) || name)``, once per distinct name.)
    """
    return prefix + hashlib.sha256(f"{domain}\0{name}".encode()).hexdigest()[:15]


def _sql(name: str) -> str:
    return warehouse.read_sql(name)


# ---------------------------------------------------------------- names (distinct raw name -> normal form)

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
    # `normalize` limits the cleaned name too, so no rejected raw name (too long, or empty) is ever a normal form:
    # sql/ingest_kg_run_tables.sql relies on that.
    try:
        n = normalize(raw, config.max_name_chars, config.to_simplified)
    except TextRejected as exc:
        return None, None, "empty_field" if exc.reason == "empty_text" else exc.reason
    return n.text, n.simplified, None


def _proven_clean(raw: pa.Array, config: KGIngestConfig) -> pa.Array:
    """Mask of the names `core.text.clean` returns unchanged (and not too long), by Arrow regex."""
    return pc.and_(pc.match_substring_regex(raw, _CLEAN_NAME), pc.less_equal(pc.utf8_length(raw), config.max_name_chars))


def _simplified(clean: pa.Array) -> list[tuple[str, str]]:
    """(name, OpenCC t2s of it) for the clean names holding a character t2s may change, in one call into OpenCC."""
    maybe = clean.filter(pc.match_substring_regex(clean, _traditional_pattern())).to_pylist()
    return list(zip(maybe, to_simplified_many(maybe)))


def normalise_names(raw: pa.Array, config: KGIngestConfig) -> pa.Table:
    """[raw, name, simplified, reason] of the raw names that normalise to something else, or are rejected.

    Names Arrow proves clean need at most OpenCC: those with a character t2s may change are converted in one call
    (`to_simplified_many`); only the rest go through `core.text.normalize` one by one."""
    clean = _proven_clean(raw, config)
    done = [(x, *_normalise_one(x, config)) for x in raw.filter(pc.invert(clean)).to_pylist()]
    if config.to_simplified:
        done += [(x, x, s, None) for x, s in _simplified(raw.filter(clean))]
    done = [d for d in done if d[3] is not None or d[1] != d[0] or d[2] != d[0]]
    return pa.table([pa.array([d[k] for d in done], pa.string()) for k in range(4)], schema=NAMES)


def build_names(con, config: KGIngestConfig) -> None:
    """Tables ends / rels (raw name -> uses) and changed (the raw names Python normalised to something else or rejected)."""
    con.execute(_sql("ingest_kg_names.sql"))
    con.execute("CREATE TABLE changed (raw VARCHAR, name VARCHAR, simplified VARCHAR, reason VARCHAR)")
    writer = con.cursor()  # the reader below streams on `con`
    for rb in con.sql("SELECT raw FROM ends UNION SELECT raw FROM rels").to_arrow_reader(config.name_cache):
        batch = normalise_names(rb.column(0), config)  # noqa: F841 (read by DuckDB)
        writer.execute("INSERT INTO changed SELECT * FROM batch")
    writer.close()


def quarantine_bad_names(con, stager: Stager) -> None:
    """Data rows with a rejected name: quarantined (raw = the three fields) and skipped from now on."""
    bad = [row[0] for row in con.execute("SELECT raw FROM changed WHERE reason IS NOT NULL").fetchall()]
    if not bad:
        return
    few = len(bad) <= MAX_LISTED_NAMES
    test = "list_contains($bad, {c})" if few else "{c} IN (SELECT raw FROM bad)"
    sql = _sql("ingest_kg_name_rejects.sql").format(hit=" OR ".join(test.format(c=c) for c in ("h", "r", "t")))
    writer = con.cursor()  # the reader below streams on `con`
    for rb in con.sql(sql, params={"bad": bad} if few else None).to_arrow_reader(REJECT_ROWS):
        rows, lines = rb.to_pydict(), _lines(stager.files, rb)
        by_file: dict[int, list[Reject]] = {}
        for i, f in enumerate(rows["f"]):
            role, reason = next((role, rows[f"{role}_reason"][i]) for role in ("head", "relation", "tail") if rows[f"{role}_reason"][i])
            raw = "\t".join((rows["h"][i], rows["r"][i], rows["t"][i]))[:2048]
            by_file.setdefault(f, []).append(Reject(int(lines[i]), reason, f"{role}: {reason}", raw))
        for f, rejects in by_file.items():
            stager.sink.add(stager.files[f], rejects)
        skipped = rb.select(["f", "rid"])  # noqa: F841 (read by DuckDB)
        writer.execute("INSERT INTO skip SELECT * FROM skipped")
    writer.close()


def _lines(files: list[FileStage], rb: pa.RecordBatch) -> np.ndarray:
    """File line of each row of `rb` (f, rid, pos): `pos` of a Python-read row, the line map of a DuckDB-read one."""
    f, rid = rb.column("f").to_numpy(), rb.column("rid").to_numpy()
    lines = pc.fill_null(rb.column("pos"), 0).to_numpy().copy()
    for index in np.unique(f):
        if files[index].duckdb:
            lines[f == index] = files[index].lines.lines(rid[f == index])
    return lines


def apply_renames(con, files: list[FileStage]) -> int:
    """Rewrite raw names to their normal form in place (only names that change and are not rejected), and the
    triple hash ``k`` of the rows that changed."""
    renamed = con.execute("SELECT count(*) FROM changed WHERE reason IS NULL AND name <> raw").fetchall()[0][0]
    if renamed:
        con.execute("CREATE TABLE renamed AS SELECT raw, name FROM changed WHERE reason IS NULL AND name <> raw")
        for file in files:
            for col in ("h", "r", "t"):
                con.execute(f"UPDATE {file.table} SET {col} = m.name, k = NULL FROM renamed m WHERE {file.table}.{col} = m.raw")
            con.execute(f"UPDATE {file.table} SET k = hash(h, r, t) WHERE k IS NULL")
    return renamed


def dedupe(con, rows: int) -> dict[int, int]:
    """Duplicate rows (later occurrences of a normalised triple) into ``skip``; returns duplicates per file.

    The hashes seen twice are found in NumPy (a sort of the ``k`` column, in slices of about ``KEY_SLICE`` rows by the
    low bits of ``k``, so memory stays bounded); sql/ingest_kg_dups.sql compares just those rows as strings."""
    slices = 1 << max(0, math.ceil(math.log2(max(rows, 1) / KEY_SLICE)))
    sql = "SELECT k FROM staged WHERE k & $mask::UBIGINT = $i::UBIGINT"  # the casts keep both sides UBIGINT
    repeated = [_repeated(con.sql(sql, params={"mask": slices - 1, "i": i}).fetchnumpy()["k"]) for i in range(slices)]
    keys = pa.table({"k": np.concatenate(repeated)})  # noqa: F841 (read by DuckDB)
    con.execute(f"CREATE TABLE dups AS {_sql('ingest_kg_dups.sql')}")
    con.execute("INSERT INTO skip SELECT f, rid FROM dups")
    return dict(con.execute("SELECT f, count(*) FROM dups GROUP BY f").fetchall())


def _repeated(k: np.ndarray) -> np.ndarray:
    s = np.sort(k)
    return np.unique(s[1:][s[1:] == s[:-1]])


# ---------------------------------------------------------------- kg_triples

def publish_triples(home: Home, con, stager: Stager) -> tuple[DatasetRef, dict[int, int]]:
    """kg_triples of this partition: one file per input, rows in file order (see the module doc, step 4); also
    returns the rows kept per input."""
    files, domain, partition = stager.files, stager.sink.domain, stager.sink.partition
    consts = [domain, partition, *(f.source for f in files)]
    con.execute("CREATE TYPE kg_consts AS ENUM (SELECT DISTINCT unnest($v) ORDER BY 1)", {"v": consts})
    skipped = dict(con.execute("SELECT f, count(*) FROM skip GROUP BY f").fetchall())
    queries = [(_triples_query(con, f, skipped.get(f.index, 0)), {"domain": domain, "partition": partition, "source": f.source})
               for f in files]
    try:
        ref = lake.publish_query(home, con, queries, None, "kg_triples", domain, partition, stage=STAGE)
    finally:
        for f, name in itertools.product(files, ("rapid_keep", "rapid_line")):
            with contextlib.suppress(duckdb.Error):
                con.remove_function(f"{name}_{f.index}")
        for f in files:
            con.execute(f"RESET VARIABLE rapid_skip_{f.index}")
    return ref, {f.index: f.rows - skipped.get(f.index, 0) for f in files}


def _triples_query(con, file: FileStage, skipped: int) -> str:
    """One file's kg_triples SELECT (sql/ingest_kg_triples.sql): the rows not in ``skip``, each with its line.

    Usually all SQL: the skipped rows are a bitstring over rowids (variable ``rapid_skip_<i>``, built by DuckDB from
    ``skip``) and a DuckDB-read row's line is `LineMap.sql`. A file with more rows than a bitstring index reaches, or
    more gaps than ``MAX_SQL_GAPS``, gets a Python UDF for that part instead (`keep_udf`, `LineMap.lines`)."""
    keep, pos = "true", (file.lines.sql() if file.duckdb else "pos")
    if skipped and file.rows <= MAX_BITSTRING_ROWS:
        con.execute(f"SET VARIABLE rapid_skip_{file.index} = (SELECT bitstring_agg(rid, 0::BIGINT, $last::BIGINT) "
                    "FROM skip WHERE f = $f)", {"last": file.rows - 1, "f": file.index})
        keep = f"get_bit(getvariable('rapid_skip_{file.index}'), rowid::INTEGER) = 0"
    elif skipped:
        rids = con.sql("SELECT rid FROM skip WHERE f = $f ORDER BY rid", params={"f": file.index}).fetchnumpy()["rid"]
        keep = _udf(con, f"rapid_keep_{file.index}", keep_udf(rids.astype(np.int64)), duckdb.sqltypes.BOOLEAN)
    if pos is None:
        pos = _udf(con, f"rapid_line_{file.index}", lambda rowid: pa.array(file.lines.lines(rowid.to_numpy())),
                   duckdb.sqltypes.BIGINT)
    return _sql("ingest_kg_triples.sql").format(table=file.table, pos=pos, keep=keep)


def _udf(con, name: str, fn, returns) -> str:
    """Register `fn` (Arrow rowid column -> Arrow column) as DuckDB function `name`; returns its call on rowid."""
    con.create_function(name, fn, [duckdb.sqltypes.BIGINT], returns, type="arrow")
    return f"{name}(rowid)"


def keep_udf(skipped: np.ndarray):
    """rowid -> whether the row is kept, i.e. not in the sorted `skipped` rowids (DuckDB calls it once per vector)."""
    last = len(skipped) - 1

    def rapid_keep(rowid: pa.Array) -> pa.Array:
        rid = rowid.to_numpy()
        return pa.array(skipped[np.minimum(np.searchsorted(skipped, rid), last)] != rid)

    return rapid_keep


def publish_quarantine(home: Home, con, stager: Stager) -> DatasetRef:
    """Line-level and name-level rejects together, in input order (file, then line)."""
    params = {"path": str(stager.sink.path), "sources": [f.source for f in stager.files]}
    return lake.publish_query(home, con, _sql("ingest_kg_quarantine.sql"), params, "quarantine", stager.sink.domain,
                              side_partition(STAGE, stager.sink.partition), stage=STAGE)


def publish_stats(home: Home, stager: Stager, kept: dict[int, int], dups: dict[int, int], seconds: float) -> DatasetRef:
    """ingest_stats: one row per input file plus the '*' total."""
    domain, partition = stager.sink.domain, stager.sink.partition
    rows = [stats_row(domain, partition, STAGE, f.source, kept.get(f.index, 0), dups.get(f.index, 0), f.reasons)
            for f in stager.files]
    rows.append(total_row(domain, partition, STAGE, rows, round(seconds, 3)))
    table = pa.Table.from_pylist(rows, schema=table_schema("ingest_stats"))
    return lake.publish_table(home, "ingest_stats", domain, side_partition(STAGE, partition), table, stage=STAGE)


# ---------------------------------------------------------------- kg_entities / kg_relations

@contextlib.contextmanager
def domain_lock(home: Home, domain: str):
    """kg_entities/kg_relations of a domain are rebuilt by any partition's ingest: one at a time."""
    with open(home.locks / f"{STAGE}.{domain}.entities.lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def rebuild_entities(home: Home, config: KGIngestConfig, con, stager: Stager) -> list[DatasetRef]:
    """kg_entities / kg_relations of the domain from every current kg_triples partition, on the run's session `con`
    (the caller holds `domain_lock`: rebuilds of one domain run one at a time and see every committed partition).

    When the partition this run wrote is the domain's only one, they come from the run's own tables, otherwise from
    the lake; both give the same rows (tests compare the bytes)."""
    domain, partition = stager.sink.domain, stager.sink.partition
    aliases = sorted({normalize(a).text for a in config.alias_relations})
    parts = lake.partitions(home, "kg_triples", domain)  # the caller holds the domain lock: nothing commits meanwhile
    if parts == [partition]:
        con.execute(_sql("ingest_kg_run_tables.sql"), {"alias_relations": aliases})
    else:
        stager.drop()  # the run's raw rows are done with: free their memory first
        _lake_tables(home, config, con, domain, parts, aliases)
    params = {"domain": domain, "prefix": domain + "\0"}
    return [lake.publish_query(home, con, _sql("ingest_kg_entities.sql"), params, "kg_entities", domain, "all", stage=STAGE),
            lake.publish_query(home, con, _sql("ingest_kg_relations.sql"), {**params, "alias_relations": aliases},
                               "kg_relations", domain, "all", stage=STAGE)]


def _lake_tables(home: Home, config: KGIngestConfig, con, domain: str, parts: list[str], aliases: list[str]) -> None:
    """ent_ends / rel_counts / ent_aliases / ent_simp from the domain's distinct triples across `parts`."""
    files = [str(p) for part in parts for p in atomic.manifest_paths(home.partition_dir("kg_triples", domain, part))]
    con.read_parquet(files).create_view("triples")
    con.execute(_sql("ingest_kg_lake_tables.sql"), {"alias_relations": aliases})
    con.execute("CREATE TABLE ent_simp (name VARCHAR, simplified VARCHAR)")
    if config.to_simplified:
        writer = con.cursor()  # the reader below streams on `con`
        for rb in con.sql("SELECT name FROM ent_ends").to_arrow_reader(config.name_cache):
            batch = simplified_names(rb.column(0))  # noqa: F841 (read by DuckDB)
            writer.execute("INSERT INTO ent_simp SELECT * FROM batch")
        writer.close()


def simplified_names(names: pa.Array) -> pa.Table:
    """(name, simplified) of the normalised names OpenCC changes."""
    pairs = [(n, s) for n, s in _simplified(names) if s != n]
    return pa.table({"name": pa.array([p[0] for p in pairs], pa.string()), "simplified": pa.array([p[1] for p in pairs], pa.string())})


# ---------------------------------------------------------------- the stage

@contextlib.contextmanager
def duck(config: KGIngestConfig, scratch: Path) -> Iterator[duckdb.DuckDBPyConnection]:
    con = duckdb.connect(config={"memory_limit": config.duckdb_memory, "threads": config.duckdb_threads,
                                 "temp_directory": str(scratch / "duckdb_tmp"), "preserve_insertion_order": True})
    try:
        yield con
    finally:
        con.close()


def _check_paths(paths: Sequence[str | Path]) -> list[Path]:
    out = [Path(p).expanduser().resolve() for p in paths]
    if not out:
        raise ValueError("ingest kg needs at least one input file")
    missing = [str(p) for p in out if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"input file(s) not found: {', '.join(missing)}")
    return out


class Clock:
    """Named phase timings for the report (``seconds_<phase>``)."""

    def __init__(self) -> None:
        self.t0 = self.last = time.perf_counter()
        self.phases: dict[str, float] = {}

    def tick(self, phase: str) -> None:
        now = time.perf_counter()
        self.phases[phase] = round(now - self.last, 3)
        self.last = now


def _stage_and_publish(home: Home, config: KGIngestConfig, paths: list[Path], domain: str, partition: str,
                       scratch: Path) -> tuple[Stager, list[DatasetRef], dict]:
    """Stage -> names -> dedupe -> kg_triples + quarantine -> entities -> stats, all in one DuckDB session."""
    clock = Clock()
    with duck(config, scratch) as con:
        sink = RejectSink(scratch / "rejects.parquet", domain, partition, STAGE)
        stager = Stager(con, sink, config.read_options())
        stager.stage(paths)
        clock.tick("stage")
        build_names(con, config)
        quarantine_bad_names(con, stager)
        sink.close()
        renamed = apply_renames(con, stager.files)
        clock.tick("names")
        dups = dedupe(con, sum(f.rows for f in stager.files))
        clock.tick("dedupe")
        triples, kept = publish_triples(home, con, stager)
        outputs = [triples, publish_quarantine(home, con, stager)]
        clock.tick("publish")
        with domain_lock(home, domain):
            outputs += rebuild_entities(home, config, con, stager)
            clock.tick("entities")
            outputs.append(publish_stats(home, stager, kept, dups, clock.last - clock.t0))
            # Under the lock too: another ingest of this domain replaces (and deletes) kg_entities files, and a
            # view refresh listing them meanwhile would read a deleted file.
            warehouse.refresh_views(home)
    return stager, outputs, {"phases": clock.phases, "duplicates": dups, "renamed": renamed}


def _body(home: Home, config: KGIngestConfig, paths: list[Path], domain: str, partition: str) -> StageResult:
    # One scratch folder per (domain, partition): run_stage holds that partition's lock, so a leftover
    # here is from a killed run and is safe to remove.
    scratch = home.root / ".scratch" / f"{STAGE}-{domain}-{partition}"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    try:
        stager, outputs, info = _stage_and_publish(home, config, paths, domain, partition, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    quarantined = sum(f.quarantined for f in stager.files)
    return StageResult(outputs, rows_in=sum(f.rows_in for f in stager.files), rows_out=outputs[0].rows,
                       rows_quarantined=quarantined, rows_duplicate=sum(info["duplicates"].values()),
                       extra=_extra(stager, outputs, info))


def _extra(stager: Stager, outputs: list[DatasetRef], info: dict) -> dict:
    reasons = sum((f.reasons for f in stager.files), start=Counter())
    seconds = {f"seconds_{k}": v for k, v in info["phases"].items()}
    return {"reasons": dict(sorted(reasons.items())), "entities": outputs[2].rows, "relations": outputs[3].rows,
            "files_read_by_duckdb": sum(f.duckdb for f in stager.files), "names_renamed": info["renamed"], **seconds,
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


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
