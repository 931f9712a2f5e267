"""Staging of KG input files into DuckDB for ``rapid ingest kg`` (`rapid_pipeline.ingest.kg`).

Each input file ``i`` becomes one DuckDB table ``s<i>`` (in input order; rows in file order), and the
view ``staged`` (``f, rid, h, r, t, k, pos``; ``k`` is the triple's 64-bit hash) unions them. Two ways in:

* **DuckDB reads a plain TSV itself** (sql/ingest_kg_stage_tsv.sql), in parallel, when
  `kg_readers.tsv_layout` proves it sees exactly the lines `kg_readers.read_tsv` would (``\\n``
  newlines, no CR, no BOM, not compressed). It emits one row per line, except the lines it rejects
  (invalid UTF-8, more than one field too many) and blank lines: those are the *gaps*, and
  `LineMap` turns a row's ``rowid`` back into its file line (``pos`` is NULL in ``staged``). Missing
  fields are padded with NULL (the NULL string is a NUL byte, which a NUL-free file cannot hold, so an
  empty field stays ``''``); a row with a NULL, a field too many or a NUL byte is flagged ``bad``.
  Rejected lines are read back at DuckDB's byte position of each (checked: `_lines_at`), else by
  counting newlines; a bad row's line is its fields joined again (or read back, in a file with NULs).
* **Python readers** (`kg_readers.read_triples`: TSV that DuckDB cannot read exactly, CSV,
  N-Triples, Turtle, JSONL, compressed) stream batches into ``s<i>`` with their ``pos``.

Invariants:
* Nothing is lost: every line DuckDB did not emit is either blank (not a row) or read back from the
  file's bytes and quarantined with the reason `read_tsv` gives it; so is every ``bad`` row. A line
  DuckDB set aside that `read_tsv` would accept stops the run (it would misnumber every later row).
* A DuckDB-read file is trusted only if its rows + gap lines equal the file's line count, every
  reject is an encoding or field-count error, and it has at most ``MAX_GAPS`` gaps; otherwise its table
  is dropped and `read_tsv` reads it (the same rows, quarantine and line numbers, more slowly).
* ``skip`` (``f, rid``) lists the rows that are not data: the header row and ``bad`` rows here; the
  stage adds rows with a rejected name and duplicates. Memory in Python: one batch, and per
  DuckDB-read file its gap array (at most ``MAX_GAPS`` integers).
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..core.progress import bar
from ..core.schemas import table_schema
from ..core.warehouse import read_sql
from .kg_readers import (RawBatch, ReadOptions, Reject, TsvLayout, column_count_reject, is_utf8, line_reject, read_lines,
                         read_triples, tsv_layout)

MAX_GAPS = 1 << 20  # lines without a row per DuckDB-read file; beyond, read_tsv reads it
MAX_SQL_GAPS = 4096  # gaps a file's line map may have to be written as SQL (`LineMap.sql`); beyond, a Python UDF maps them
REJECT_ROWS = 10_000  # quarantine rows built in Python at a time
NUL = "\x00"


class LineMap:
    """rowid -> file line of a DuckDB-read file: ``line = rowid + 1 + (gaps at or before rowid)``.

    ``shift[j] = L_j - j`` for the sorted 1-based gap lines ``L_1 < L_2 < ...``: gap ``j`` lies after the
    row whose rowid is ``shift[j] - 1``, so a row is pushed down one line by every gap with ``shift <= rowid``.
    """

    def __init__(self, gap_lines: np.ndarray):
        self.gap_lines = np.asarray(gap_lines, np.int64)
        self.shift = self.gap_lines - np.arange(1, len(self.gap_lines) + 1, dtype=np.int64)

    def lines(self, rowids: np.ndarray) -> np.ndarray:
        rowids = np.asarray(rowids, np.int64)
        return rowids + 1 + np.searchsorted(self.shift, rowids, side="right")

    def sql(self, rowid: str = "rowid") -> str | None:
        """The same map as a SQL expression over column `rowid`, or None beyond ``MAX_SQL_GAPS`` gaps.

        The gaps before a row are counted by a binary search written out as nested CASEs (depth log2 of the gaps):
        DuckDB evaluates it vectorised in its own threads, where a Python function would hold the GIL per vector."""
        if len(self.shift) > MAX_SQL_GAPS:
            return None
        shift = self.shift.tolist()

        def count(lo: int, hi: int) -> str:  # gaps with shift <= rowid, for shift[lo - 1] <= rowid < shift[hi]
            if lo == hi:
                return str(lo)
            mid = (lo + hi) // 2
            return f"CASE WHEN {rowid} < {shift[mid]} THEN {count(lo, mid)} ELSE {count(mid + 1, hi)} END"

        return f"{rowid} + 1 + {count(0, len(shift))}"


@dataclass
class FileStage:
    """What staging learnt about one input file."""

    index: int
    source: str
    duckdb: bool = False     # read by DuckDB (rowid order = line order; `lines` maps rowids to lines)
    rows: int = 0            # rows in table s<i>
    rows_in: int = 0         # data rows of the file: the rows of s<i> but the header, plus the lines DuckDB rejected
    lines: LineMap | None = None
    reasons: Counter = field(default_factory=Counter)

    @property
    def table(self) -> str:
        return f"s{self.index}"

    @property
    def quarantined(self) -> int:
        return sum(self.reasons.values())


class RejectSink:
    """Quarantine rows of the run, written to a scratch Parquet file as they are found."""

    def __init__(self, path: Path, domain: str, partition: str, stage: str):
        self.path, self.domain, self.partition, self.stage = path, domain, partition, stage
        self.writer = pq.ParquetWriter(path, table_schema("quarantine"), compression="lz4")

    def add(self, file: FileStage, rejects: list[Reject]) -> None:
        if not rejects:
            return
        n = len(rejects)
        cols = {"domain": [self.domain] * n, "partition": [self.partition] * n, "stage": [self.stage] * n,
                "source_file": [file.source] * n, "source_pos": [r.pos for r in rejects],
                "reason": [r.reason for r in rejects], "detail": [r.detail for r in rejects], "raw": [r.raw for r in rejects]}
        self.writer.write_table(pa.Table.from_pydict(cols, schema=table_schema("quarantine")))
        file.reasons.update(r.reason for r in rejects)

    def close(self) -> None:
        self.writer.close()


class Stager:
    """Stages every input into ``s<i>`` tables and the ``staged`` view; rejects go to `RejectSink`."""

    def __init__(self, con, sink: RejectSink, options: ReadOptions):
        self.con, self.sink, self.options = con, sink, options
        self.files: list[FileStage] = []
        con.execute("CREATE TABLE skip (f INTEGER, rid BIGINT)")

    def stage(self, paths: Sequence[Path]) -> list[FileStage]:
        with bar("ingest kg", unit="rows") as progress:
            for index, path in enumerate(paths):
                file = FileStage(index, str(path))
                layout = tsv_layout(path, self.options)
                if layout is None or not self._stage_duckdb(file, path, layout):
                    self._stage_python(file, path, progress)
                else:
                    progress.update(layout.lines)
                self.files.append(file)
        self.con.execute("CREATE VIEW staged AS " + " UNION ALL ".join(map(_view_branch, self.files)))
        return self.files

    def drop(self) -> None:
        """Free the staged rows (view and tables)."""
        self.con.execute("DROP VIEW IF EXISTS staged")
        for file in self.files:
            self.con.execute(f"DROP TABLE IF EXISTS {file.table}")

    # ------------------------------------------------ Python readers

    def _stage_python(self, file: FileStage, path: Path, progress) -> None:
        self.con.execute(f"CREATE TABLE {file.table} (h VARCHAR, r VARCHAR, t VARCHAR, k UBIGINT, pos BIGINT)")
        for batch in read_triples(path, self.options):
            self._insert(file, batch)
            progress.update(batch.rows_in)

    def _insert(self, file: FileStage, batch: RawBatch) -> None:
        if len(batch.pos):
            rows = pa.table({"h": batch.head, "r": batch.relation, "t": batch.tail, "pos": batch.pos})  # noqa: F841
            self.con.execute(f"INSERT INTO {file.table} SELECT h, r, t, hash(h, r, t), pos FROM rows")
        self.sink.add(file, batch.rejects)
        file.rows += len(batch.pos)
        file.rows_in += batch.rows_in

    # ------------------------------------------------ DuckDB reads a plain TSV itself

    def _stage_duckdb(self, file: FileStage, path: Path, layout: TsvLayout) -> bool:
        """Stage `path` with DuckDB's reader; False (and no table) when the result does not reconcile with the file."""
        rejected = self._read(file, path, layout)
        blank = np.zeros(0, np.int64)
        if rejected is not None and file.rows + len(rejected) < layout.lines:  # short: DuckDB skipped blank lines
            blank = blank_lines(path)
        if rejected is None or len(rejected) + len(blank) > MAX_GAPS or file.rows + len(rejected) + len(blank) != layout.lines:
            self.con.execute(f"DROP TABLE IF EXISTS {file.table}")
            file.rows = 0
            return False
        file.duckdb, file.lines = True, LineMap(np.union1d(rejected[:, 0], blank))
        self._quarantine_lines(file, path, layout, rejected)
        return True

    def _read(self, file: FileStage, path: Path, layout: TsvLayout) -> np.ndarray | None:
        """(line, byte position hint) of the lines DuckDB emitted no row for, sorted; None when its read failed or it
        rejected a line for another reason than encoding or a field too many."""
        self.con.execute("DROP TABLE IF EXISTS kg_rejects; DROP TABLE IF EXISTS kg_reject_scans")
        try:
            self.con.execute(stage_tsv_sql(file.table, layout), {"path": str(path), "nul": NUL, "check_nul": layout.nul})
        except duckdb.Error:  # e.g. a line over DuckDB's max_line_size; the CREATE rolled back
            return None
        file.rows = self.con.execute(f"SELECT count(*) FROM {file.table}").fetchall()[0][0]
        kinds = dict(self.con.execute(read_sql("ingest_kg_tsv_rejects.sql")).fetchall())
        if set(kinds) - {"INVALID ENCODING", "TOO MANY COLUMNS"}:
            return None
        got = self.con.sql("SELECT line, min(line_byte_position) AS at FROM kg_rejects GROUP BY line ORDER BY line").fetchnumpy()
        return np.stack([got["line"], got["at"]], axis=1).astype(np.int64).reshape(-1, 2)

    def _quarantine_lines(self, file: FileStage, path: Path, layout: TsvLayout, rejected: np.ndarray) -> None:
        """Quarantine the rejected lines and ``bad`` rows (never the header line); skip the header row and bad rows."""
        bad = self.con.sql(f"SELECT rowid, raw FROM {file.table} WHERE bad ORDER BY rowid").fetchnumpy()
        data = (lambda n: n != 1) if layout.header else (lambda n: True)
        hints = [(n, at) for n, at in rejected.tolist() if data(n)]
        bad_lines = [(n, raw) for n, raw in zip(file.lines.lines(bad["rowid"]).tolist(), bad["raw"]) if data(n)]
        self._add(file, path, layout, _lines_at(path, hints, layout.width))
        if layout.nul:  # a NUL field came back as NULL, so the joined fields are not the line: read it
            with open(path, "rb") as f:
                self._add(file, path, layout, read_lines(f, [n for n, _ in bad_lines]))
        else:
            self._add(file, path, layout, ((n, raw.encode()) for n, raw in bad_lines))
        if file.quarantined != len(hints) + len(bad_lines):
            raise RuntimeError(f"{path}: {len(hints) + len(bad_lines)} lines set aside, {file.quarantined} found in the file")
        skip = np.union1d([0] if layout.header and layout.first_valid else [], bad["rowid"]).astype(np.int64)  # row 0: header
        rows = pa.table({"f": np.full(len(skip), file.index, np.int32), "rid": skip})  # noqa: F841 (read by DuckDB)
        self.con.execute("INSERT INTO skip SELECT * FROM rows")
        file.rows_in = file.rows - len(skip) + file.quarantined

    def _add(self, file: FileStage, path: Path, layout: TsvLayout, lines: Iterator[tuple[int, bytes]]) -> None:
        lines = iter(lines)
        while batch := [_classify(path, n, raw, layout.width) for n, raw in itertools.islice(lines, REJECT_ROWS)]:
            self.sink.add(file, batch)


def stage_tsv_sql(table: str, layout: TsvLayout) -> str:
    """sql/ingest_kg_stage_tsv.sql with the file's column list: `width` fields plus one to catch a field too many."""
    names = [f"c{i}" for i in range(layout.width + 1)]
    h, r, t = (names[c] for c in layout.cols)
    null = " OR ".join(f"{c} IS NULL" for c in names[:-1])
    nul = " OR ".join(f"contains({c}, chr(0))" for c in names)
    return read_sql("ingest_kg_stage_tsv.sql").format(
        table=table, h=h, r=r, t=t, fields=", ".join(names), columns=", ".join(f"'{c}': 'VARCHAR'" for c in names),
        bad=f"({null}) OR {names[-1]} IS NOT NULL OR ($check_nul AND ({nul}))")


def _view_branch(file: FileStage) -> str:
    pos = "NULL::BIGINT" if file.duckdb else "pos"
    return f"SELECT {file.index}::INTEGER AS f, rowid AS rid, h, r, t, k, {pos} AS pos FROM {file.table}"


def _classify(path: Path, line: int, raw: bytes, width: int) -> Reject:
    """Why `read_tsv` would reject this line; it must reject it (see the module doc)."""
    if not _rejected(raw, width):
        raise RuntimeError(f"{path}: DuckDB's reader set line {line} aside, but it is a valid row")
    if b"\x00" in raw or not is_utf8(raw):
        return line_reject(line, raw)
    return column_count_reject(line, raw.decode("utf-8"), width)


def _lines_at(path: Path, hints: list[tuple[int, int]], width: int) -> Iterator[tuple[int, bytes]]:
    """(n, line) for rejected lines given DuckDB's ``line_byte_position`` of each, which is the line's first byte or
    the one after it: the start is the candidate right after a newline (or the file start) holding a non-empty line
    (a rejected line is never empty). The hints are trusted only if every one settles on such a start, in order, and
    every line found is one `read_tsv` rejects; otherwise `read_lines` counts newlines instead (slower, exact)."""
    with open(path, "rb") as f:
        starts = [_line_start(f, at) for _, at in hints]
        settled = None not in starts and all(a < b for a, b in zip(starts, starts[1:]))
        # Each line is read twice (check all, then yield): nothing reaches quarantine before every hint is checked,
        # and no line (up to DuckDB's maximum line size) is held meanwhile.
        if settled and all(_rejected(line, width) for line in _read_at(f, starts)):
            yield from zip((n for n, _ in hints), _read_at(f, starts))
            return
        f.seek(0)
        yield from read_lines(f, [n for n, _ in hints])


def _read_at(f, starts: list[int]) -> Iterator[bytes]:
    for start in starts:
        f.seek(start)
        yield f.readline().rstrip(b"\n")


def _rejected(raw: bytes, width: int) -> bool:
    return b"\x00" in raw or not is_utf8(raw) or raw.count(b"\t") + 1 != width


def _line_start(f, at: int) -> int | None:
    fits = []
    for start in (at - 1, at):
        if start < 0:
            continue
        f.seek(max(start - 1, 0))
        around = f.read(2) if start else b"\n" + f.read(1)
        if around[:1] == b"\n" and around[1:2] not in (b"\n", b""):
            fits.append(start)
    return fits[0] if len(fits) == 1 else None


def blank_lines(path: Path, chunk_bytes: int = 8 << 20) -> np.ndarray:
    """1-based numbers of the empty lines of `path` (DuckDB's reader skips them without a word)."""
    out, base, prev_end = [], 0, True  # prev_end: the byte before this chunk was a newline (or file start)
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            ends = np.flatnonzero(np.frombuffer(block, np.uint8) == 10)
            starts = np.concatenate(([0], ends[:-1] + 1))  # where each line ending in this chunk starts
            empty = (ends == starts) & (np.arange(len(ends)) > 0) | ((ends == 0) & prev_end)
            out.append(base + 1 + np.flatnonzero(empty))
            base += len(ends)
            prev_end = block.endswith(b"\n")
    return np.concatenate(out).astype(np.int64) if out else np.zeros(0, np.int64)

