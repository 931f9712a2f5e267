"""Publishing and reading lake partitions: ``lake/<table>/domain=<d>/part=<p>/``.

`publish_table` is the one way a stage writes a table partition from Arrow: conform to
``schemas/<table>.json``, write Parquet in row groups under temporary names, rename each to its content
hash, then swap the manifest (see `core.atomic`). `publish_query` does the same for the rows of DuckDB
queries, written by DuckDB's own (parallel) Parquet writer, one file per query, whose schema is then
checked against ``schemas/`` from the file footer before the manifest swap. Either way the whole partition is
replaced, so a rerun or a backfill of one partition never duplicates rows. `read_table` reads what the
manifests list, nothing else.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from . import atomic
from .faults import fault_point
from .home import Home
from .sqlsafe import ident
from .schemas import SchemaError, conform, empty_table, table_schema
from .stage import DatasetRef

ROWS_PER_FILE = 1_000_000
ROW_GROUP_ROWS = 122_880  # DuckDB's own default (60 vectors of 2048 rows)
# DuckDB's Parquet writer options for every lake file it writes. Parquet 2 pages: delta encodings for integers and
# byte arrays (pyarrow, DuckDB, Spark and polars read them). bench/ingest.py gives raw DuckDB the same options.
DUCKDB_PARQUET = f"FORMAT parquet, COMPRESSION zstd, COMPRESSION_LEVEL 1, ROW_GROUP_SIZE {ROW_GROUP_ROWS}, PARQUET_VERSION V2"


def _write_file(folder: Path, table: pa.Table) -> atomic.FileEntry:
    tmp = atomic.temp_path(folder, ".parquet")
    # Fixed writer options and no timestamps: same rows -> same bytes -> same file name.
    pq.write_table(table, tmp, compression="zstd", row_group_size=128_000, write_statistics=True)
    return atomic.finalize_file(tmp, folder, table.num_rows, ".parquet")


def publish_table(home: Home, table_name: str, domain: str, partition: str, table: pa.Table | Iterable[pa.Table],
                  stage: str, meta: dict | None = None) -> DatasetRef:
    """Replace partition (domain, partition) of `table_name` with `table` (or an iterable of batches)."""
    folder = home.partition_dir(table_name, domain, partition)
    folder.mkdir(parents=True, exist_ok=True)
    fault_point(stage, "start_write")
    batches = [table] if isinstance(table, pa.Table) else table
    entries, pending, rows = [], [], 0
    for batch in batches:
        pending.append(conform(batch, table_name))
        rows += batch.num_rows
        if rows >= ROWS_PER_FILE:
            entries.append(_write_file(folder, pa.concat_tables(pending)))
            fault_point(stage, "mid_write")
            pending, rows = [], 0
    if pending or not entries:
        entries.append(_write_file(folder, pa.concat_tables(pending) if pending else empty_table(table_name)))
    fault_point(stage, "mid_write")
    manifest = atomic.commit_manifest(folder, entries, {"table": table_name, "domain": domain, "partition": partition, **(meta or {})}, stage)
    fault_point(stage, "end_write")
    return DatasetRef("file://" + str(folder), manifest["fingerprint"], manifest["rows"], table_name)


def publish_query(home: Home, con, query: str | list[tuple[str, dict]], params: dict | None, table_name: str, domain: str,
                  partition: str, stage: str, meta: dict | None = None) -> DatasetRef:
    """Replace partition (domain, partition) of `table_name` with the rows of DuckDB `query` (bound `params`), or
    of each (query, params) of a list, one file each.

    A query must select exactly the schema's columns in order; its ORDER BY (or a plain scan, which keeps insertion
    order) fixes the bytes (same rows, same DuckDB version -> same file name). A NULL in a non-nullable column stops
    the write; a file that does not match ``schemas/`` is deleted and raises `SchemaError`: the previous partition
    stays what readers see.
    """
    if not isinstance(query, str) and params is not None:
        raise ValueError("publish_query: with a list of (query, params), pass params=None")
    folder = home.partition_dir(table_name, domain, partition)
    folder.mkdir(parents=True, exist_ok=True)
    fault_point(stage, "start_write")
    entries = []
    for q, p in ([(query, params)] if isinstance(query, str) else query):
        tmp = atomic.temp_path(folder, ".parquet")
        rows = _copy_checked(con, q, p, tmp, table_name)
        entries.append(atomic.finalize_file(tmp, folder, rows, ".parquet"))
    fault_point(stage, "mid_write")
    manifest = atomic.commit_manifest(folder, entries, {"table": table_name, "domain": domain, "partition": partition, **(meta or {})}, stage)
    fault_point(stage, "end_write")
    return DatasetRef("file://" + str(folder), manifest["fingerprint"], manifest["rows"], table_name)


NULL_GUARD = "is not nullable but has nulls"


def _copy_checked(con, query: str, params: dict, tmp: Path, table_name: str) -> int:
    """COPY the guarded query to `tmp` and check the file; on any failure `tmp` is gone."""
    try:
        con.execute(f"COPY ({_not_null_guard(query, table_name)}) TO '{_quote(tmp)}' ({DUCKDB_PARQUET})", params)
        return check_parquet(tmp, table_name)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, duckdb.InvalidInputException) and NULL_GUARD in str(exc):
            raise SchemaError(str(exc).split("Invalid Input Error: ")[-1]) from exc
        if isinstance(exc, duckdb.BinderException):  # the guard names every schema column: a missing one fails here
            raise SchemaError(f"table {table_name}: the query must select {table_schema(table_name).names} ({exc})") from exc
        raise


def _not_null_guard(query: str, table_name: str) -> str:
    """`query` with each non-nullable column as ``coalesce(c, error(...))``: a NULL raises, and every column
    is written OPTIONAL. Why: DuckDB marks a column REQUIRED only when its statistics prove it non-null, which
    depends on the plan (the same rows reached by two routes would otherwise differ in bytes)."""
    cols = []
    for f in table_schema(table_name):
        c = ident(f.name)
        cols.append(c if f.nullable else f"coalesce({c}, error('table {table_name}: column {f.name} {NULL_GUARD}')) AS {c}")
    return f"SELECT {', '.join(cols)} FROM ({query})"


def _quote(path: Path) -> str:
    # COPY ... TO takes no bound parameter for its target; the path is ours (partition folder + uuid).
    return str(path).replace("'", "''")


def check_parquet(path: Path, table_name: str) -> int:
    """Rows of a Parquet file whose columns, types and non-null columns match ``schemas/<table>.json``."""
    schema, meta = table_schema(table_name), pq.ParquetFile(path).metadata
    got = meta.schema.to_arrow_schema()
    if got.names != schema.names:
        raise SchemaError(f"table {table_name}: columns {got.names}, expected {schema.names}")
    for want, have in zip(schema, got):
        if not have.type.equals(want.type):
            raise SchemaError(f"table {table_name}: column {want.name} is {have.type}, expected {want.type}")
    for f in schema:
        if not f.nullable and _nulls(path, meta, f.name):
            raise SchemaError(f"table {table_name}: column {f.name} is not nullable but has nulls")
    return meta.num_rows


def _nulls(path: Path, meta: pq.FileMetaData, name: str) -> int:
    """Nulls of a top-level column: from the row-group statistics of a flat column, else (nested columns,
    where Parquet counts an empty list as a null leaf, or no statistics) from the column itself."""
    leaf = next((j for j in range(meta.num_columns) if meta.schema.column(j).path == name), None)
    stats = [meta.row_group(g).column(leaf).statistics for g in range(meta.num_row_groups)] if leaf is not None else []
    if leaf is not None and all(st is not None and st.has_null_count for st in stats):
        return sum(st.null_count for st in stats)
    return pq.read_table(path, columns=[name]).column(name).null_count


def partitions(home: Home, table_name: str, domain: str) -> list[str]:
    root = home.table_dir(table_name, domain)
    return sorted(p.name.removeprefix("part=") for p in root.glob("part=*") if (p / atomic.MANIFEST).exists())


def read_partition(home: Home, table_name: str, domain: str, partition: str, columns: list[str] | None = None) -> pa.Table:
    files = atomic.manifest_paths(home.partition_dir(table_name, domain, partition))
    if not files:
        return empty_table(table_name) if columns is None else empty_table(table_name).select(columns)
    return pa.concat_tables([pq.read_table(f, columns=columns, schema=table_schema(table_name)) for f in files])


def read_table(home: Home, table_name: str, domain: str, columns: list[str] | None = None) -> pa.Table:
    """All current partitions of `table_name` for `domain` (only manifest-listed files)."""
    parts = [read_partition(home, table_name, domain, p, columns) for p in partitions(home, table_name, domain)]
    if not parts:
        t = empty_table(table_name)
        return t if columns is None else t.select(columns)
    return pa.concat_tables(parts)


def partition_ref(home: Home, table_name: str, domain: str, partition: str) -> DatasetRef:
    folder = home.partition_dir(table_name, domain, partition)
    manifest = atomic.read_manifest(folder)
    if manifest is None:
        raise FileNotFoundError(f"no partition {table_name}/{domain}/{partition} in {home.lake}")
    return DatasetRef("file://" + str(folder), manifest["fingerprint"], manifest["rows"], table_name)


def table_refs(home: Home, table_name: str, domain: str) -> list[DatasetRef]:
    """Lineage refs for every current partition (inputs of a downstream stage)."""
    return [partition_ref(home, table_name, domain, p) for p in partitions(home, table_name, domain)]
