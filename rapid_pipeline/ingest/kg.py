"""Ingest knowledge-graph triples into the lake.

    rapid ingest kg triples.tsv dump.nt.gz --domain demo [--partition 2025-01-01]
    rapid ingest kg kg.csv --domain demo --columns head=subj,relation=pred,tail=obj
    .venv/bin/python bench/ingest.py --triples 1000000   # throughput against DuckDB's own TSV -> Parquet copy
    .venv/bin/python -m pytest tests/data/test_ingest_kg.py  # incl. DuckDB reader == read_tsv, byte for byte

Formats (by suffix, or ``--format``): TSV/CSV (header autodetected, or ``--columns``), N-Triples,
Turtle (pyoxigraph, streaming; IRIs become their percent-decoded local names, literals their
value), JSONL (``--json-keys``); ``.gz`` / ``.bz2`` transparently. Writes ``kg_triples``
(this partition), ``quarantine`` and ``ingest_stats`` (partition ``ingest_kg-<partition>``), and
rebuilds ``kg_entities`` / ``kg_relations`` (partition ``all``) of the domain from every current
``kg_triples`` partition (under a per-domain lock), then refreshes the warehouse views. Alias
triples (``--alias-relations``) fold their tail into the head's ``aliases``; the tail also stays an
entity, so no triple points at a missing entity.

How, in one DuckDB session (``--duckdb-memory``, spilling to a scratch folder):

1. Stage raw rows into table ``staged`` (``ord`` = file index << 40 | line, or DuckDB row number).
   A plain TSV with ``\\n`` newlines is read by DuckDB's own CSV reader, one whole line per row
   (sql/ingest_kg_stage_tsv.sql; `kg_readers.tsv_layout` pre-scans the file, and DuckDB's rows plus
   the lines it rejected must add up to the file's line count, else `kg_readers.read_tsv` re-reads
   it). Every other input streams through the Python readers of `kg_readers` in batches.
2. Names: the distinct raw names; those Arrow cannot prove clean go through `core.text.normalize`
   in Python (``changed``), giving ``canon`` (one row per normalised name, with its id hash) and
   ``nmap`` (raw name -> canon number).
3. Dedupe: one GROUP BY on integer name numbers keeps the first occurrence of each triple
   (sql/ingest_kg_firsts.sql, which also maps DuckDB row numbers to file lines with an ASOF join on
   the rejected-line gaps, and sorts the four integers by input position). The names are looked up
   by position in an Arrow copy of ``canon`` as DuckDB streams ``firsts`` (order kept; with more than
   ``--name-cache`` names DuckDB joins and re-sorts instead) and DuckDB writes the partition with its
   own parallel Parquet writer
   (sql/ingest_kg_triples.sql through `core.lake.publish_query`, which checks the file against
   ``schemas/kg_triples.json`` before the manifest swap); quarantine and the entity tables are
   written the same way.
4. Entities and relations are rebuilt from every current partition of the domain, under a
   per-domain lock: from the lake (sql/ingest_kg_entities.sql), or, when the partition just written
   is the domain's only one, from this session's ``firsts`` and ``canon`` (sql/ingest_kg_*_run.sql,
   integer GROUP BYs, nothing read back; same bytes).

Invariants:
* Bounded memory: rows are staged in DuckDB (it spills), never held in Python beyond one batch;
  Python holds at most ``--name-cache`` distinct names (the normalisation batch and the ``canon``
  copy), one output row group, and per DuckDB-read file a list of its rejected line numbers (at most
  2^20: a file with more rejected lines is read by `read_tsv` instead).
* Every name goes through `core.text.normalize` (or is proven a fixed point of it: ASCII
  letters/digits/_ and CJK ideographs OpenCC leaves alone); ids are ``e``/``r`` +
  sha256(domain \\0 name)[:15].
* Nothing lost: rows_in == triples_out + quarantined + duplicates (checked by `run_stage`; the
  per-file split is in ``ingest_stats``); every rejected row (bad bytes, NUL, column count, syntax,
  empty or too-long name) is in ``quarantine`` with source file, line and reason. A DuckDB-read file
  is trusted only if its rows + rejected lines equal the file's lines, and every line DuckDB rejected
  must be invalid UTF-8 in the file's bytes (else the run fails rather than misnumber rows).
* Re-ingesting a partition replaces it (idempotent, atomic publish); same inputs give byte-identical
  files (rows are ordered by input position; one file per table partition, fixed writer options).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import itertools
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
import pyarrow.parquet as pq

from ..core import atomic, lake, warehouse
from ..core.config import add_config_args, config_from_args, opt
from ..core.home import Home, check_name
from ..core.progress import bar
from ..core.schemas import table_schema
from ..core.stage import DatasetRef, StageReport, StageResult, run_stage
from ..core.text import TextRejected, normalize
from . import side_partition, stats_row, total_row
from .kg_readers import (RawBatch, ReadOptions, Reject, TsvLayout, column_count_reject, is_utf8, line_reject, read_lines,
                         read_triples, tsv_layout)

STAGE = "ingest_kg"
ALIASES = ("别名", "又称", "中文名", "英文名", "简称", "外文名")
ORD_BITS = 40  # ord = file index << 40 | line (or DuckDB row number): input order as one int64
ROW_MASK = (1 << ORD_BITS) - 1
MAX_REJECTED_LINES = 1 << 20  # per DuckDB-read file (its line map is a NumPy array); beyond, read_tsv reads it
REJECT_ROWS = 10_000  # quarantine rows built in Python at a time


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
    name_cache: int = opt(1_000_000, "distinct names handed to Python at once for normalisation; up to this many, the "
                                     "output looks names up by position instead of joining and re-sorting")
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
    """[raw, name, simplified, reason] of the raw names Arrow cannot prove to be their own normal form."""
    fast = pc.and_(pc.match_substring_regex(raw, _CLEAN_NAME), pc.less_equal(pc.utf8_length(raw), config.max_name_chars))
    if config.to_simplified:
        fast = pc.and_(fast, pc.invert(pc.match_substring_regex(raw, _traditional_pattern())))
    rest = raw.filter(pc.invert(fast)).to_pylist()
    done = [_normalise_one(x, config) for x in rest]
    return pa.table([pa.array(rest, pa.string()), *(pa.array([d[k] for d in done], pa.string()) for k in range(3))],
                    schema=NAMES)


def build_names(con, config: KGIngestConfig, domain: str) -> None:
    """Tables rawnames, changed (names normalised to something else, or rejected), canon and nmap."""
    con.execute(f"CREATE TABLE rawnames AS {_sql('ingest_kg_names.sql')}")
    con.execute("CREATE TABLE changed (raw VARCHAR, name VARCHAR, simplified VARCHAR, reason VARCHAR)")
    writer = con.cursor()  # the reader below streams on `con`
    for rb in con.sql("SELECT raw FROM rawnames").to_arrow_reader(config.name_cache):
        batch = normalise_names(rb.column(0), config)  # noqa: F841 (read by DuckDB)
        writer.execute("INSERT INTO changed SELECT * FROM batch "
                       "WHERE reason IS NOT NULL OR name IS DISTINCT FROM raw OR simplified IS DISTINCT FROM raw")
    writer.close()
    con.execute(f"CREATE TABLE canon AS {_sql('ingest_kg_canon.sql')}", {"prefix": domain + "\0"})
    con.execute(f"CREATE TABLE nmap AS {_sql('ingest_kg_nmap.sql')}")


# ---------------------------------------------------------------- staging (inputs -> DuckDB table `staged`)

class LineMap:
    """ord -> (file index, line). A DuckDB-read file's ord holds DuckDB's row number, which skips the lines
    DuckDB rejected: line = row + (rejected lines before it), a binary search in `gaps` (L_j - j)."""

    def __init__(self) -> None:
        self.gaps: dict[int, np.ndarray] = {}

    def add(self, file_idx: int, rejected_lines: np.ndarray) -> None:
        if len(rejected_lines):
            self.gaps[file_idx] = rejected_lines.astype(np.int64) - np.arange(1, len(rejected_lines) + 1)

    def table(self) -> pa.Table:
        """(file, gap, k) for the ASOF join of sql/ingest_kg_firsts.sql: per distinct gap of a file, k = the
        number of its gaps <= that gap (the lines skipped before any row above it)."""
        parts = [self._file_table(file_idx, gaps) for file_idx, gaps in self.gaps.items()]
        return pa.concat_tables(parts) if parts else self._file_table(0, np.zeros(0, np.int64))

    @staticmethod
    def _file_table(file_idx: int, gaps: np.ndarray) -> pa.Table:
        last = np.flatnonzero(np.append(gaps[1:] != gaps[:-1], True)) if len(gaps) else np.zeros(0, np.int64)
        return pa.table({"file": np.full(len(last), file_idx, np.int64), "gap": gaps[last], "k": (last + 1).astype(np.int64)})

    def lines(self, ords: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        files, rows = ords >> ORD_BITS, ords & ROW_MASK
        for file_idx, gaps in self.gaps.items():
            sel = files == file_idx
            rows[sel] += np.searchsorted(gaps, rows[sel], side="left")
        return files, rows


@dataclass
class Counts:
    rows_in: int = 0
    staged: int = 0  # valid rows (names not yet checked); name rejects are taken off again
    quarantined: int = 0


class Stager:
    """Stages every input into DuckDB table `staged`; rejects go to a Parquet file as they are found."""

    def __init__(self, con, scratch: Path, domain: str, partition: str, sources: list[str]):
        self.con, self.domain, self.partition, self.sources = con, domain, partition, sources
        self.rejects_path = scratch / "rejects.parquet"
        con.execute("CREATE TABLE staged (h VARCHAR, r VARCHAR, t VARCHAR, ord BIGINT, bad VARCHAR, raw VARCHAR)")
        self.rejects = pq.ParquetWriter(self.rejects_path, table_schema("quarantine"), compression="lz4")
        self.reasons: dict[str, Counter] = {s: Counter() for s in sources}
        self.staged_by_file: Counter = Counter()
        self.kept_by_file: Counter = Counter()  # filled from `firsts` by `dedupe`
        self.counts = Counts()
        self.lines = LineMap()
        self.duckdb_files = 0

    def stage(self, config: KGIngestConfig, paths: Sequence[Path]) -> None:
        with bar("ingest kg", unit="rows") as progress:
            for file_idx, path in enumerate(paths):
                layout = tsv_layout(path, config.read_options())
                if layout is not None and self.stage_tsv(file_idx, path, layout):
                    progress.update(layout.lines)
                    continue
                for batch in read_triples(path, config.read_options()):
                    self.write(batch, file_idx)
                    progress.update(batch.rows_in)

    def write(self, batch: RawBatch, file_idx: int) -> None:
        """One batch of a Python reader."""
        if len(batch.pos):
            raw = pa.table({"h": batch.head, "r": batch.relation, "t": batch.tail,  # noqa: F841 (read by DuckDB)
                            "ord": pc.add(batch.pos, file_idx << ORD_BITS)})
            self.con.execute("INSERT INTO staged SELECT h, r, t, ord, NULL, NULL FROM raw")
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

    # ------------------------------------------------ DuckDB reads a plain TSV itself

    def stage_tsv(self, file_idx: int, path: Path, layout: TsvLayout) -> bool:
        """Stage `path` with DuckDB (sql/ingest_kg_stage_tsv.sql); False, nothing staged, if its result does
        not reconcile with the file (then `read_tsv` reads it)."""
        check = self._duck_read(file_idx, path, layout)
        ok = (check is not None and check["other_errors"] == 0 and check["rejected_lines"] <= MAX_REJECTED_LINES
              and check["emitted"] + check["rejected_lines"] == layout.lines)
        if ok:
            quarantined = self.counts.quarantined
            self._rejected_lines(file_idx, path, layout)
            self._bad_rows(file_idx, layout.width)
            self.staged_by_file[file_idx] += check["valid"]
            self.counts.staged += check["valid"]
            self.counts.rows_in += check["valid"] + self.counts.quarantined - quarantined
            self.duckdb_files += 1
        else:
            self.con.execute("DELETE FROM staged WHERE ord >> 40 = $file", {"file": file_idx})
        self._drop_reject_tables()
        return ok

    def _duck_read(self, file_idx: int, path: Path, layout: TsvLayout) -> dict | None:
        self._drop_reject_tables()
        h, r, t = (c + 1 for c in layout.cols)
        params = {"path": str(path), "file": file_idx, "h": h, "r": r, "t": t, "width": layout.width,
                  "skip_first": layout.header and layout.first_valid}
        try:
            self.con.execute(_sql("ingest_kg_stage_tsv.sql"), params)
        except duckdb.Error:  # e.g. a line over DuckDB's max_line_size; the INSERT rolled back
            return None
        cur = self.con.execute(_sql("ingest_kg_tsv_check.sql"), {"file": file_idx})
        return dict(zip([d[0] for d in cur.description], cur.fetchall()[0]))

    def _drop_reject_tables(self) -> None:
        self.con.execute("DROP TABLE IF EXISTS kg_rejects")
        self.con.execute("DROP TABLE IF EXISTS kg_reject_scans")

    def _rejected_lines(self, file_idx: int, path: Path, layout: TsvLayout) -> None:
        """Lines DuckDB rejected (invalid UTF-8): into the line map, and (but a header) into quarantine from the file's bytes."""
        found = self.con.execute(_sql("ingest_kg_tsv_rejects.sql")).fetchnumpy()["line"]
        self.lines.add(file_idx, found)
        numbers = [int(n) for n in found if not (layout.header and n == 1)]
        done = 0
        with open(path, "rb") as f:
            lines = read_lines(f, numbers)
            while batch := [_rejected_line(path, n, raw) for n, raw in itertools.islice(lines, REJECT_ROWS)]:
                self.add_rejects(batch, file_idx)
                done += len(batch)
        if done != len(numbers):
            raise RuntimeError(f"{path}: DuckDB rejected {len(numbers)} lines, {done} found in the file")

    def _bad_rows(self, file_idx: int, width: int) -> None:
        """Staged rows that are rejects (NUL byte, column count), with their file line."""
        reader = self.con.sql(_sql("ingest_kg_bad_rows.sql"), params={"file": file_idx}).to_arrow_reader(REJECT_ROWS)
        for rb in reader:
            _, pos = self.lines.lines(rb.column("ord").to_numpy())
            rows = zip(pos.tolist(), rb.column("bad").to_pylist(), rb.column("raw").to_pylist())
            self.add_rejects([line_reject(p, raw) if bad == "nul_byte" else column_count_reject(p, raw, width)
                              for p, bad, raw in rows], file_idx)

    def close(self) -> None:
        self.rejects.close()


def _rejected_line(path: Path, line: int, raw: bytes) -> Reject:
    # DuckDB said this line is not UTF-8; if it decodes, its line numbers and ours disagree: fail loudly
    # rather than quarantine (and number every later row) wrongly.
    if b"\x00" not in raw and is_utf8(raw):
        raise RuntimeError(f"{path}: DuckDB rejected line {line} as invalid UTF-8, but that line decodes")
    return line_reject(line, raw)


def quarantine_bad_names(con, stager: Stager) -> None:
    """Staged rows with a rejected name join the line-level rejects (their rows leave the staged count)."""
    reader = con.sql(_sql("ingest_kg_name_rejects.sql")).to_arrow_reader(REJECT_ROWS)
    for rb in reader:
        files, pos = stager.lines.lines(rb.column("ord").to_numpy())
        by_file: dict[int, list[Reject]] = {}
        for file_idx, line, row in zip(files.tolist(), pos.tolist(), rb.to_pylist()):
            role, reason = next((role, row[f"{role}_reason"]) for role in ("head", "relation", "tail") if row[f"{role}_reason"])
            raw = "\t".join((row["h"], row["r"], row["t"]))[:2048]
            by_file.setdefault(file_idx, []).append(Reject(line, reason, f"{role}: {reason}", raw))
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


def dedupe(con, stager: Stager) -> None:
    """Table `firsts`: each normalised triple's first occurrence, with its file line (sql/ingest_kg_firsts.sql)."""
    line_gaps = stager.lines.table()  # noqa: F841 (read by DuckDB)
    con.execute("CREATE TABLE line_gaps AS SELECT * FROM line_gaps")
    con.execute(f"CREATE TABLE firsts AS {_sql('ingest_kg_firsts.sql')}")
    stager.kept_by_file.update(dict(con.execute(_sql("ingest_kg_kept.sql")).fetchall()))


def publish_triples(home: Home, con, config: KGIngestConfig, stager: Stager) -> DatasetRef:
    """kg_triples of this partition, written by DuckDB in input order (see the module doc, step 3)."""
    params = {"domain": stager.domain, "partition": stager.partition, "sources": stager.sources}
    if con.execute("SELECT count(*) FROM canon").fetchall()[0][0] > config.name_cache:
        return lake.publish_query(home, con, _sql("ingest_kg_triples_join.sql"), params, "kg_triples",
                                  stager.domain, stager.partition, stage=STAGE)
    con.register("triple_rows", triple_rows(con))
    try:
        return lake.publish_query(home, con, _sql("ingest_kg_triples.sql"), params, "kg_triples", stager.domain,
                                  stager.partition, stage=STAGE)
    finally:
        con.unregister("triple_rows")


def triple_rows(con) -> pa.RecordBatchReader:
    """`firsts` in order with ids, names and simplified names taken by position from the canon arrays."""
    canon = _name_arrays(con)
    firsts = con.cursor().sql("SELECT ord, hn, rn, tn FROM firsts").to_arrow_reader(lake.ROW_GROUP_ROWS)
    batches = (_canon_lookup(canon, b) for b in firsts)
    return pa.RecordBatchReader.from_batches(TRIPLE_ROWS, batches)


TRIPLE_ROWS = pa.schema([("ord", pa.int64())] + [(c, pa.string()) for c in (
    "head_id", "relation_id", "tail_id", "head", "relation", "tail", "head_simplified", "tail_simplified")])


def _canon_lookup(canon: dict[str, pa.Array], batch: pa.RecordBatch) -> pa.RecordBatch:
    """(ord, hn, rn, tn) -> (ord, ids, names, simplified names), by position in the `canon` arrays."""
    hn, rn, tn = (batch.column(c) for c in ("hn", "rn", "tn"))
    cols = [batch.column("ord"), pc.take(canon["eid"], hn), pc.take(canon["rid"], rn), pc.take(canon["eid"], tn),
            pc.take(canon["name"], hn), pc.take(canon["name"], rn), pc.take(canon["name"], tn),
            pc.take(canon["simplified"], hn), pc.take(canon["simplified"], tn)]
    return pa.RecordBatch.from_arrays(cols, schema=TRIPLE_ROWS)


def _name_arrays(con) -> dict[str, pa.Array]:
    table = con.sql("SELECT name, simplified, 'e' || hash AS eid, 'r' || hash AS rid FROM canon ORDER BY nid").to_arrow_table()
    return {name: table.column(name).combine_chunks() for name in table.column_names}


def publish_quarantine(home: Home, con, stager: Stager) -> DatasetRef:
    """Line-level and name-level rejects together, in input order (file, then line)."""
    params = {"path": str(stager.rejects_path), "sources": stager.sources}
    return lake.publish_query(home, con, _sql("ingest_kg_quarantine.sql"), params, "quarantine", stager.domain,
                              side_partition(STAGE, stager.partition), stage=STAGE)


def publish_stats(home: Home, stager: Stager, seconds: float) -> DatasetRef:
    """ingest_stats: one row per input file plus the '*' total (accepted/duplicates from the valid and kept rows)."""
    rows = []
    for idx, src in enumerate(stager.sources):
        valid, kept = stager.staged_by_file.get(idx, 0), stager.kept_by_file.get(idx, 0)
        rows.append(stats_row(stager.domain, stager.partition, STAGE, src, kept, valid - kept, stager.reasons[src]))
    rows.append(total_row(stager.domain, stager.partition, STAGE, rows, round(seconds, 3)))
    table = pa.Table.from_pylist(rows, schema=table_schema("ingest_stats"))
    return lake.publish_table(home, "ingest_stats", stager.domain, side_partition(STAGE, stager.partition), table, stage=STAGE)


@contextlib.contextmanager
def domain_lock(home: Home, domain: str):
    """kg_entities/kg_relations of a domain are rebuilt by any partition's ingest: one at a time."""
    with open(home.locks / f"{STAGE}.{domain}.entities.lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def rebuild_entities(home: Home, config: KGIngestConfig, con, domain: str, partition: str) -> list[DatasetRef]:
    """kg_entities / kg_relations of `domain` from every current kg_triples partition, on the run's session `con`
    (the caller holds `domain_lock`: rebuilds of one domain run one at a time and see every committed partition).

    When the partition this run wrote is the domain's only one, they come from the run's own tables
    (sql/ingest_kg_*_run.sql); otherwise from the lake. Both give the same rows (tests compare the bytes).
    """
    params = {"domain": domain, "alias_relations": sorted({normalize(a).text for a in config.alias_relations})}
    parts = lake.partitions(home, "kg_triples", domain)  # the caller holds the domain lock: nothing commits meanwhile
    sql = ("ingest_kg_entities_run.sql", "ingest_kg_relations_run.sql")
    if parts != [partition]:
        _lake_triples(home, con, domain, parts)
        sql = ("ingest_kg_entities.sql", "ingest_kg_relations.sql")
    return [lake.publish_query(home, con, _sql(sql[0]), params, "kg_entities", domain, "all", stage=STAGE),
            lake.publish_query(home, con, _sql(sql[1]), params, "kg_relations", domain, "all", stage=STAGE)]


def _lake_triples(home: Home, con, domain: str, parts: list[str]) -> None:
    """Table `t`: the domain's distinct triples across `parts` (partitions may share triples)."""
    con.execute("DROP TABLE staged")  # the run's raw rows are done with: free their memory first
    files = [str(p) for part in parts for p in atomic.manifest_paths(home.partition_dir("kg_triples", domain, part))]
    con.read_parquet(files).create_view("triples")
    con.execute(f"CREATE TABLE t AS {_sql('ingest_kg_distinct.sql')}")


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
                       scratch: Path) -> tuple[Stager, list[DatasetRef], dict]:
    """Stage -> names -> quarantine + deduplicated kg_triples -> entities -> stats, all in one DuckDB session."""
    with duck(config, scratch) as con:
        t0 = time.perf_counter()
        stager = Stager(con, scratch, domain, partition, [str(p) for p in paths])
        stager.stage(config, paths)
        t1 = time.perf_counter()
        build_names(con, config, domain)
        quarantine_bad_names(con, stager)
        stager.close()
        t2 = time.perf_counter()
        dedupe(con, stager)
        td = time.perf_counter()
        outputs = [publish_triples(home, con, config, stager), publish_quarantine(home, con, stager)]
        t3 = time.perf_counter()
        with domain_lock(home, domain):
            outputs += rebuild_entities(home, config, con, domain, partition)
            t4 = time.perf_counter()
            outputs.append(publish_stats(home, stager, t4 - t0))
            # Under the lock too: another ingest of this domain replaces (and deletes) kg_entities files, and a
            # view refresh listing them meanwhile would read a deleted file.
            warehouse.refresh_views(home)
    return stager, outputs, {"stage": t1 - t0, "names": t2 - t1, "dedupe": td - t2, "publish": t3 - td, "entities": t4 - t3}


def _body(home: Home, config: KGIngestConfig, paths: list[Path], domain: str, partition: str) -> StageResult:
    # One scratch folder per (domain, partition): run_stage holds that partition's lock, so a leftover
    # here is from a killed run and is safe to remove.
    scratch = home.root / ".scratch" / f"{STAGE}-{domain}-{partition}"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    try:
        stager, outputs, phases = _stage_and_publish(home, config, paths, domain, partition, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    counts, triples = stager.counts, outputs[0]
    return StageResult(outputs, rows_in=counts.rows_in, rows_out=triples.rows, rows_quarantined=counts.quarantined,
                       rows_duplicate=counts.staged - (triples.rows or 0), extra=_extra(stager, outputs, phases))


def _extra(stager: Stager, outputs: list[DatasetRef], phases: dict) -> dict:
    reasons = sum(stager.reasons.values(), Counter())
    seconds = {f"seconds_{k}": round(v, 3) for k, v in phases.items()}
    # seconds_read / seconds_dedupe_publish: the split bench/ingest.py has always reported
    seconds["seconds_read"] = round(phases["stage"] + phases["names"], 3)
    seconds["seconds_dedupe_publish"] = round(phases["dedupe"] + phases["publish"] + phases["entities"], 3)
    return {"reasons": dict(sorted(reasons.items())), "entities": outputs[2].rows, "relations": outputs[3].rows,
            "files_read_by_duckdb": stager.duckdb_files, **seconds,
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
